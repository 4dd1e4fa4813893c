"""llama.cpp GGUF files -> (LlamaConfig, params), without torch: `load_gguf` returns what `load_hf` returns.

    cfg, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=jnp.bfloat16, mesh=mesh)

The file is read with `gguf.GGUFReader` (llama.cpp's own Python reader: metadata plus a memory map of the
tensor bytes); the tensors are dequantized here, with vectorised numpy, one GGUF tensor at a time. Each
parameter is assembled on the host in the Hugging Face layout (layers stacked on a leading axis), placed
on the devices with its `NamedSharding`, transposed / cast there, and dropped from the host before the
next one: host memory holds about one parameter at a time.

Format facts this module relies on (GGUF v2/v3, little-endian, as llama.cpp's ggml writes them):

- A tensor's dimensions are listed fastest-varying first (ggml's `ne`), so numpy's shape is the reverse:
  a HF weight `[out, in]` is stored with `ne = [in, out]`, and its rows are contiguous. Its bytes are the
  row-major elements, or for quantized types a sequence of blocks along each row (`in` must be a multiple
  of the block size). All scales are IEEE float16 (`d`, `dmin`, `m`) unless stated.
- F32, F16: plain little-endian floats. BF16: the upper 16 bits of a float32.
- Q8_0 (32 values, 34 bytes): d, int8 q[32]; value = q * d.
- Q4_0 (32 values, 18 bytes): d, 16 bytes of nibbles; byte j holds value j (low nibble) and value j + 16
  (high nibble); value = (q - 8) * d.
- Q4_1 (32 values, 20 bytes): d, m, nibbles as Q4_0; value = q * d + m.
- Q5_0 (32 values, 22 bytes): d, a little-endian uint32 whose bit j is the fifth (high) bit of value j,
  nibbles as Q4_0; value = (q - 16) * d.
- Q5_1 (32 values, 24 bytes): d, m, the uint32 of high bits, nibbles; value = q * d + m.
- K-quants use 256-value super-blocks split into sub-blocks with their own scale:
  - Q2_K (84 bytes): 16 scale bytes (low nibble: scale, high nibble: min, one per 16 values), 64 bytes of
    2-bit values, d, dmin. Value e sits in byte 32 * (e // 128) + e % 32 at bit 2 * ((e % 128) // 32);
    value = d * scale * q - dmin * min.
  - Q3_K (110 bytes): 32 bytes of high-bit masks, 64 bytes of 2-bit values (placed as Q2_K), 12 bytes
    packing sixteen 6-bit scales (low 4 bits: nibbles of bytes 0-7, low then high; top 2 bits: bit pairs
    of bytes 8-11), d. Value e's high bit is bit 4 * (e // 128) + (e % 128) // 32 of mask byte e % 32;
    value = d * (scale - 32) * (q - (0 if high bit else 4)).
  - Q4_K (144 bytes): d, dmin, 12 bytes packing eight 6-bit scales and eight 6-bit mins (sub-blocks j < 4:
    low 6 bits of bytes j and j + 4; j >= 4: the nibbles of byte j + 4 plus the top 2 bits of bytes j - 4
    and j), 128 bytes of nibbles: each 32-byte group g holds sub-block 2g (low nibbles) and 2g + 1 (high
    nibbles); value = d * scale * q - dmin * min.
  - Q5_K (176 bytes): d, dmin, the 12 scale bytes of Q4_K, 32 bytes whose bit s of byte l is the high bit
    of value l of sub-block s, 128 bytes of nibbles as Q4_K; value = d * scale * q - dmin * min.
  - Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (one per 16
    values), d. Each half h of 128 values uses low bytes 64h..64h+63 and high bytes 32h..32h+31: quarter k
    of the half takes the low (k < 2) or high (k >= 2) nibble of low byte 32 * (k % 2) + l and bits 2k, 2k+1
    of high byte l; value = d * scale * (q - 32).
- Every other tensor type (IQ*, TQ*, Q8_1, ...) is refused.

llama.cpp's converter (convert_hf_to_gguf) permutes the rows of the q and k projections for its rotary
layout: within each head it interleaves the two halves of the HF "rotate-half" order, so GGUF row
2i + j of a head is HF row j * head_dim / 2 + i (j in {0, 1}). k is permuted per KV head. Loading undoes
this: rows viewed as [heads, head_dim / 2, 2] are reordered to [heads, 2, head_dim / 2].

Names: `token_embd`, `blk.N.attn_norm/attn_q/attn_k/attn_v/attn_output/ffn_norm/ffn_gate/ffn_up/ffn_down`,
`output_norm` and `output` (absent: the embeddings are tied). `rope_freqs` (Llama 3.1 and later) holds one
divisor per rotary frequency; it is turned back into llama3 RopeScaling and checked to reproduce every
divisor, or the file is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxcollab.model.config import ConfigError, LlamaConfig, RopeScaling, dtype_name
from jaxcollab.model.hf import TensorMap, _aligned_empty, _hf_layout_sharding, _llama_tensors, _to_param_layout
from jaxcollab.model.llama import param_shapes, param_shardings, rope_inv_freq
from jaxcollab.model.safetensors_io import CheckpointError
from jaxcollab.model.sharding import LOGICAL_RULES, Rules, single_device_mesh
from jaxcollab.trees import get_path, set_path

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor

logger = logging.getLogger(__name__)

ARCHITECTURE = "llama"


# ------------------------------------------------------------------------------------------ dequantization
def _halves(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block, as float32 [blocks, 1]."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2n]: all low nibbles, then all high nibbles (the Q4_0 / Q5_0 order)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _low_bits_first(words: np.ndarray) -> np.ndarray:
    """Bytes [blocks, n] of little-endian bit fields -> bits [blocks, 8n], bit 0 of byte 0 first."""
    return np.unpackbits(words, axis=-1, bitorder="little")


def _shifted(packed: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """(packed >> shift) & mask for every shift, on a new axis just before the last."""
    return (packed[..., None, :] >> np.asarray(shifts, np.uint8)[:, None]) & mask


def _per_sub_block(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    """scale [blocks, S] times q [blocks, S * k] where each scale covers k consecutive values."""
    blocks, subs = scale.shape
    return (scale[:, :, None] * q.reshape(blocks, subs, -1)).reshape(blocks, -1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:34].view(np.int8).astype(np.float32) * _halves(b, 0)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * _halves(b, 0)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b[:, 4:20]).astype(np.float32) * _halves(b, 0) + _halves(b, 2)


def _five_bit(high_bits: np.ndarray, nibble_bytes: np.ndarray) -> np.ndarray:
    return _nibbles(nibble_bytes) | (_low_bits_first(high_bits) << 4)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _five_bit(b[:, 2:6], b[:, 6:22]).astype(np.int8) - np.int8(16)
    return q.astype(np.float32) * _halves(b, 0)


def _q5_1(b: np.ndarray) -> np.ndarray:
    return _five_bit(b[:, 4:8], b[:, 8:24]).astype(np.float32) * _halves(b, 0) + _halves(b, 2)


def _two_bit_values(packed: np.ndarray) -> np.ndarray:
    """64 bytes of 2-bit values -> [blocks, 256] in K-quant order (half, shift, position)."""
    blocks = packed.shape[0]
    return _shifted(packed.reshape(blocks, 2, 32), (0, 2, 4, 6), 0x03).reshape(blocks, 256)


def _q2_k(b: np.ndarray) -> np.ndarray:
    scales = b[:, 0:16]
    d, dmin = _halves(b, 80), _halves(b, 82)
    q = _two_bit_values(b[:, 16:80]).astype(np.float32)
    scaled = _per_sub_block(d * (scales & 0x0F).astype(np.float32), q)
    return scaled - np.repeat(dmin * (scales >> 4).astype(np.float32), 16, axis=1)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """12 bytes -> sixteen signed 6-bit scales (already minus 32) as float32."""
    low = _nibbles(packed[:, 0:8])
    high = _shifted(packed[:, 8:12], (0, 2, 4, 6), 0x03).reshape(packed.shape[0], 16)
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)


def _q3_k(b: np.ndarray) -> np.ndarray:
    blocks = b.shape[0]
    high_bit = _shifted(b[:, 0:32], tuple(range(8)), 0x01).reshape(blocks, 256)
    q = _two_bit_values(b[:, 32:96]).astype(np.int8) - np.where(high_bit == 1, 0, 4).astype(np.int8)
    return _per_sub_block(_halves(b, 108) * _q3_k_scales(b[:, 96:108]), q.astype(np.float32))


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K / Q5_K -> eight 6-bit scales and eight 6-bit mins, as float32."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_nibbles(packed: np.ndarray) -> np.ndarray:
    """128 bytes -> [blocks, 8, 32]: group g's low nibbles are sub-block 2g, its high nibbles 2g + 1."""
    groups = packed.reshape(packed.shape[0], 4, 1, 32)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=2).reshape(packed.shape[0], 8, 32)


def _scale_and_offset(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: d * scale * q - dmin * min per 32-value sub-block; q is [blocks, 8, 32]."""
    scales, mins = _k_scales_and_mins(b[:, 4:16])
    scale = (_halves(b, 0) * scales)[:, :, None]
    offset = (_halves(b, 2) * mins)[:, :, None]
    return (scale * q.astype(np.float32) - offset).reshape(b.shape[0], 256)


def _q4_k(b: np.ndarray) -> np.ndarray:
    return _scale_and_offset(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b: np.ndarray) -> np.ndarray:
    high = _shifted(b[:, 16:48], tuple(range(8)), 0x01)  # [blocks, sub-block, position]
    return _scale_and_offset(b, _k_nibbles(b[:, 48:176]) | (high << 4))


def _q6_k(b: np.ndarray) -> np.ndarray:
    blocks = b.shape[0]
    low = b[:, 0:128].reshape(blocks, 2, 2, 32)  # [half, which 32 bytes, position]
    nibbles = np.stack([low[:, :, 0] & 0x0F, low[:, :, 1] & 0x0F, low[:, :, 0] >> 4, low[:, :, 1] >> 4], axis=2)
    high = _shifted(b[:, 128:192].reshape(blocks, 2, 32), (0, 2, 4, 6), 0x03)  # [half, quarter, position]
    q = ((nibbles | (high << 4)).astype(np.int8) - np.int8(32)).reshape(blocks, 256)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return _per_sub_block(_halves(b, 208) * scales, q.astype(np.float32))


def _f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4").astype(np.float32, copy=False)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """How one GGUF tensor type stores values: `values` per block of `nbytes` bytes, and the decoder from
    blocks [n, nbytes] (uint8) to values [n, values] (float32)."""

    values: int
    nbytes: int
    decode: Callable[[np.ndarray], np.ndarray]


BLOCK_FORMATS: dict[str, BlockFormat] = {
    "F32": BlockFormat(1, 4, _f32),
    "F16": BlockFormat(1, 2, _f16),
    "BF16": BlockFormat(1, 2, _bf16),
    "Q8_0": BlockFormat(32, 34, _q8_0),
    "Q4_0": BlockFormat(32, 18, _q4_0),
    "Q4_1": BlockFormat(32, 20, _q4_1),
    "Q5_0": BlockFormat(32, 22, _q5_0),
    "Q5_1": BlockFormat(32, 24, _q5_1),
    "Q2_K": BlockFormat(256, 84, _q2_k),
    "Q3_K": BlockFormat(256, 110, _q3_k),
    "Q4_K": BlockFormat(256, 144, _q4_k),
    "Q5_K": BlockFormat(256, 176, _q5_k),
    "Q6_K": BlockFormat(256, 210, _q6_k),
}
SUPPORTED_TENSOR_TYPES = tuple(BLOCK_FORMATS)
# Decoded this many blocks at a time, so that the decoders' temporaries stay small next to the result.
_BLOCKS_PER_CHUNK = 1 << 16


def dequantize(raw: np.ndarray, tensor_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The bytes of one GGUF tensor of `tensor_type` (a name such as "Q4_K") -> float32 array of numpy `shape`.

    Raises ValueError for an unsupported type or a byte count that does not match the shape.
    """
    if tensor_type not in BLOCK_FORMATS:
        raise ValueError(f"tensor type {tensor_type} is not supported; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    fmt = BLOCK_FORMATS[tensor_type]
    count = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % fmt.values:
        raise ValueError(f"{tensor_type} rows hold blocks of {fmt.values} values; a row of {shape[-1]} does not")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if blocks.size != count // fmt.values * fmt.nbytes:
        raise ValueError(
            f"{tensor_type}{list(shape)} needs {count // fmt.values * fmt.nbytes} bytes, got {blocks.size}"
        )
    blocks = blocks.reshape(-1, fmt.nbytes)
    out = np.empty((blocks.shape[0], fmt.values), np.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        chunk = blocks[start : start + _BLOCKS_PER_CHUNK]
        out[start : start + chunk.shape[0]] = fmt.decode(chunk)
    return out.reshape(shape)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q / k rows ([out, in], out = heads * head_dim)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ------------------------------------------------------------------------------------------ the file
def _field_value(field: ReaderField) -> Any:
    """A metadata value as Python: str, int, float, bool, or a list of those."""
    from gguf import GGUFValueType

    def item(index: int, value_type: GGUFValueType) -> Any:
        part = field.parts[index]
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) != 2:
            raise ValueError(f"metadata {field.name!r} is a nested array, which no Llama key is")
        return [item(index, field.types[1]) for index in field.data]
    return item(field.data[0], field.types[0])


class GGUFFile:
    """An opened GGUF file: its metadata (`get`, `require`) and tensors (`tensors`, `shape`, `tensor_type`,
    `read`), every failure reported as a CheckpointError naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self._reader = self._open(self.path)
        self._values: dict[str, Any] = {}
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self._reader.tensors}

    @staticmethod
    def _open(path: Path) -> GGUFReader:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as error:  # the reader raises ValueError, IndexError, struct/numpy errors, ...
            raise CheckpointError(
                f"{path}: not a readable GGUF file; it is truncated or corrupt ({type(error).__name__}: {error})"
            ) from error
        if reader.byte_order == "S":  # "S": the file's byte order is the swap of this machine's
            raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
        return reader

    def __contains__(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value under `key`, or `default` when the file has none."""
        if key not in self._reader.fields:
            return default
        if key not in self._values:
            try:
                self._values[key] = _field_value(self._reader.fields[key])
            except (ValueError, IndexError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{self.path}: metadata {key!r} is corrupt ({error})") from error
        return self._values[key]

    def require(self, key: str) -> Any:
        if key not in self._reader.fields:
            raise CheckpointError(f"{self.path}: required metadata {key!r} is missing")
        return self.get(key)

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor_type(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.tensors[name].tensor_type).name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's numpy shape (GGUF lists dimensions in the reverse order)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def read(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, in numpy order."""
        tensor, tensor_type = self.tensors[name], self.tensor_type(name)
        if tensor_type not in BLOCK_FORMATS:
            raise CheckpointError(self.unsupported_message(name))
        start, size = int(tensor.data_offset), int(tensor.n_bytes)
        raw = self._reader.data[start : start + size]
        if raw.size != size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} needs bytes {start}..{start + size} but the file ends at byte"
                f" {self._reader.data.size}; the file is truncated"
            )
        try:
            return dequantize(raw, tensor_type, self.shape(name))
        except ValueError as error:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {error}") from error

    def unsupported_message(self, name: str) -> str:
        return (
            f"{self.path}: tensor {name!r} has type {self.tensor_type(name)}, which jaxcollab cannot dequantize;"
            f" supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )


# ------------------------------------------------------------------------------------------ the config
def _key(name: str) -> str:
    return f"{ARCHITECTURE}.{name}"


def _optional_int(gguf: GGUFFile, key: str) -> int | None:
    value = gguf.get(key)
    return None if value is None else int(value)


def _end_of_generation_ids(gguf: GGUFFile) -> int | tuple[int, ...] | None:
    """EOS, plus the end-of-turn / end-of-message tokens llama.cpp also stops at (Llama 3 instruct)."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _optional_int(gguf, f"tokenizer.ggml.{key}")
        if value is not None and value not in ids:
            ids.append(value)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else tuple(ids)


def _vocab_size(gguf: GGUFFile) -> int:
    """The stated size, else the embedding's rows (which may exceed the token list), else the token count."""
    if _key("vocab_size") in gguf:
        return int(gguf.get(_key("vocab_size")))
    if "token_embd.weight" in gguf.tensors:
        return gguf.shape("token_embd.weight")[0]
    if "tokenizer.ggml.tokens" in gguf:
        return len(gguf.get("tokenizer.ggml.tokens"))
    raise CheckpointError(f"{gguf.path}: no vocabulary size ({_key('vocab_size')}, tokens or token_embd)")


def _refuse_unsupported_features(gguf: GGUFFile) -> None:
    architecture = gguf.architecture
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{gguf.path}: general.architecture is {architecture!r}; jaxcollab loads only {ARCHITECTURE!r} GGUF files"
        )
    experts = gguf.get(_key("expert_count"), 0)
    if experts:
        raise CheckpointError(f"{gguf.path}: {_key('expert_count')}={experts}; mixture-of-experts GGUF files are"
                              " not supported")
    scaling = gguf.get(_key("rope.scaling.type"), "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{gguf.path}: {_key('rope.scaling.type')}={scaling!r} is not supported (only"
                              " Llama 3.1's rope_freqs scaling is)")
    key_length, value_length = gguf.get(_key("attention.key_length")), gguf.get(_key("attention.value_length"))
    if key_length is not None and value_length is not None and key_length != value_length:
        raise CheckpointError(f"{gguf.path}: attention key_length={key_length} != value_length={value_length}")


def read_config(gguf: GGUFFile, **runtime: Any) -> LlamaConfig:
    """The LlamaConfig a GGUF file's metadata describes (plus run-time fields such as dtype).

    EOS is `tokenizer.ggml.eos_token_id` plus, when present, the end-of-turn and end-of-message ids that
    llama.cpp also stops generating at (Llama 3 instruct files), as a tuple.
    """
    _refuse_unsupported_features(gguf)
    try:
        return _config_from_metadata(gguf, **runtime)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        if isinstance(error, (ConfigError, CheckpointError)):
            raise
        raise CheckpointError(f"{gguf.path}: metadata of an unexpected type ({error})") from error


def _config_from_metadata(gguf: GGUFFile, **runtime: Any) -> LlamaConfig:
    hidden = int(gguf.require(_key("embedding_length")))
    heads = int(gguf.require(_key("attention.head_count")))
    head_dim = _optional_int(gguf, _key("attention.key_length")) or (hidden // heads if hidden % heads == 0 else None)
    rotary_dims = _optional_int(gguf, _key("rope.dimension_count"))
    if head_dim is None:
        head_dim = rotary_dims
    if rotary_dims is not None and rotary_dims != head_dim:
        raise CheckpointError(f"{gguf.path}: rope.dimension_count={rotary_dims} but head_dim={head_dim}; partial"
                              " rotary embeddings are not supported")
    theta = float(gguf.get(_key("rope.freq_base"), 10000.0))
    kwargs = dict(
        vocab_size=_vocab_size(gguf),
        hidden_size=hidden,
        intermediate_size=int(gguf.require(_key("feed_forward_length"))),
        num_layers=int(gguf.require(_key("block_count"))),
        num_heads=heads,
        num_kv_heads=int(gguf.get(_key("attention.head_count_kv")) or heads),
        head_dim=head_dim,
        rms_norm_eps=float(gguf.get(_key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=theta,
        rope_scaling=None,
        max_position_embeddings=int(gguf.get(_key("context_length"), 2048)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=_optional_int(gguf, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_end_of_generation_ids(gguf),
        pad_token_id=_optional_int(gguf, "tokenizer.ggml.padding_token_id"),
    )
    kwargs.update({k: dtype_name(v) if k in ("dtype", "param_dtype") else v for k, v in runtime.items()})
    try:
        cfg = LlamaConfig(**kwargs)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{gguf.path}: {error}") from None
    if "rope_freqs.weight" in gguf.tensors:
        cfg = cfg.replace(rope_scaling=_rope_scaling_from_divisors(gguf, cfg))
    return cfg


# Llama 3.1's values: used when the divisors alone cannot pin the smooth band down.
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)


def _rope_scaling_from_divisors(gguf: GGUFFile, cfg: LlamaConfig) -> RopeScaling | None:
    """llama3 RopeScaling that reproduces the file's `rope_freqs` divisors (one per rotary frequency).

    llama.cpp divides each base frequency by its divisor: 1 for short wavelengths, `factor` for long ones,
    1 / ((1 - s) / factor + s) in between, with s linear in 1 / wavelength. That band is fitted; only the
    ratios original_max_position_embeddings : low_freq_factor : high_freq_factor matter, so the original
    context is taken from the metadata or Llama 3.1's 8192. The fit is accepted only if jaxcollab's RoPE
    reproduces every divisor.
    """
    name = "rope_freqs.weight"
    divisors = gguf.read(name).astype(np.float64).reshape(-1)
    if divisors.shape != (cfg.head_dim // 2,):
        raise CheckpointError(f"{gguf.path}: {name} has {divisors.size} values; head_dim {cfg.head_dim} needs"
                              f" {cfg.head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    base = rope_inv_freq(cfg.replace(rope_scaling=None)).astype(np.float64)
    original = int(gguf.get(_key("rope.scaling.original_context_length"), 8192))
    candidate = _fit_llama3_band(divisors, 2 * np.pi / base, original) or dataclasses.replace(
        _LLAMA31_SCALING, factor=float(divisors.max())
    )
    reproduced = base / rope_inv_freq(cfg.replace(rope_scaling=candidate)).astype(np.float64)
    if not np.allclose(reproduced, divisors, rtol=1e-4, atol=0):
        raise CheckpointError(
            f"{gguf.path}: {name} holds divisors {np.round(divisors, 4).tolist()} that llama3 RoPE scaling"
            " cannot reproduce; this rotary scaling is not supported"
        )
    return candidate


def _fit_llama3_band(divisors: np.ndarray, wavelengths: np.ndarray, original: int) -> RopeScaling | None:
    factor = float(divisors.max())
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor <= 1 or band.sum() < 2:
        return None
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths[band], smooth, 1)  # smooth = original/(high-low)/w - low/(high-low)
    if slope <= 0:
        return None
    span = original / slope
    low = -intercept * span
    if low <= 0:
        return None
    return RopeScaling(factor=factor, low_freq_factor=float(low), high_freq_factor=float(low + span),
                       original_max_position_embeddings=original)


# ------------------------------------------------------------------------------------------ the tensors
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Tensors read for the config, not as parameters.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a HF Llama tensor: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    words = stem.split(".", 3)
    if len(words) != 4 or words[:2] != ["model", "layers"] or words[3] not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for {hf_name!r}")
    return f"blk.{words[2]}.{_LAYER_NAMES[words[3]]}.{suffix}"


def _permuted_heads(cfg: LlamaConfig, hf_name: str) -> int | None:
    """The number of heads whose rows llama.cpp interleaved in this tensor (None: not permuted)."""
    if ".self_attn.q_proj." in hf_name:
        return cfg.num_heads
    if ".self_attn.k_proj." in hf_name:
        return cfg.num_kv_heads
    return None


def read_hf_tensor(gguf: GGUFFile, cfg: LlamaConfig, hf_name: str) -> np.ndarray:
    """The Hugging Face tensor `hf_name` (HF layout, float32) from its GGUF tensor, rotary rows restored."""
    values = gguf.read(gguf_tensor_name(hf_name))
    heads = _permuted_heads(cfg, hf_name)
    return values if heads is None else unpermute_rotary_rows(values, heads)


def check_tensors(gguf: GGUFFile, cfg: LlamaConfig) -> None:
    """Raise CheckpointError unless the file holds every tensor of `cfg`, with its shape and a supported type,
    and no tensor a Llama does not have."""
    _check_tensors(gguf, cfg, _llama_tensors(cfg), param_shapes(cfg))


def _check_tensors(gguf: GGUFFile, cfg: LlamaConfig, tmaps: list[TensorMap], shapes: dict) -> None:
    """Every tensor `cfg` needs is present with its shape and a supported type; nothing unknown is left."""
    needed: dict[str, tuple[int, ...]] = {}
    for tmap in tmaps:
        shape = tuple(get_path(shapes, tmap.path).shape)
        for hf_name in tmap.hf_names(shape):
            needed[gguf_tensor_name(hf_name)] = tmap.hf_shape(shape)
    missing = [name for name in needed if name not in gguf.tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{gguf.path}: tensors required by its metadata are missing: {shown}")
    for name, expected in needed.items():
        actual = gguf.shape(name)
        if actual != expected:
            raise CheckpointError(
                f"{gguf.path}: tensor {name!r} has shape {list(actual)} (numpy order) but the metadata"
                f" (hidden={cfg.hidden_size}, ffn={cfg.intermediate_size}, heads={cfg.num_heads},"
                f" kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, vocab={cfg.vocab_size}) implies"
                f" {list(expected)}"
            )
        if gguf.tensor_type(name) not in BLOCK_FORMATS:
            raise CheckpointError(gguf.unsupported_message(name))
    unknown = sorted(set(gguf.tensors) - set(needed) - set(_CONFIG_TENSORS))
    if unknown:
        raise CheckpointError(
            f"{gguf.path}: tensors a Llama model does not have (biases? another architecture?): {unknown[:8]}"
        )


def _host_parameter(gguf: GGUFFile, cfg: LlamaConfig, tmap: TensorMap, shape: tuple[int, ...],
                    on_tensor: Callable[[], None]) -> np.ndarray:
    """One parameter in the HF layout as float32 on the host, its layers dequantized into place one by one."""
    stack = tmap.stack_indices(shape)
    hf_shape = (*shape[: len(tmap.stack_keys)], *tmap.hf_shape(shape))
    out = _aligned_empty(hf_shape, np.dtype(np.float32))
    for index in stack:
        out[index] = read_hf_tensor(gguf, cfg, tmap.hf_name_at(index))
        on_tensor()
    return out


def _place(host: np.ndarray, tmap: TensorMap, sharding: NamedSharding, dtype: np.dtype) -> jax.Array:
    """The parameter on the devices: HF-layout slices placed with the matching sharding, then transposed and
    cast there into `sharding` (the host array can be dropped afterwards)."""
    hf_sharding = _hf_layout_sharding(sharding, host.ndim) if tmap.transpose else sharding
    raw = jax.make_array_from_callback(host.shape, hf_sharding, lambda index: host[index])
    if not tmap.transpose and dtype == np.dtype(np.float32):
        return raw
    return _to_param_layout(sharding, tmap.transpose, dtype)(raw).block_until_ready()


def _tensor_count(tmaps: list[TensorMap], shapes: dict) -> int:
    return sum(len(t.stack_indices(tuple(get_path(shapes, t.path).shape))) for t in tmaps)


def load_params(gguf: GGUFFile, cfg: LlamaConfig, mesh: Mesh | None = None, rules: Rules = LOGICAL_RULES,
                progress: bool = False) -> dict:
    """The parameters of `cfg` from an opened GGUF file, stored in `cfg.param_dtype`, one at a time."""
    from tqdm.auto import tqdm

    tmaps = _llama_tensors(cfg)
    shapes = param_shapes(cfg)
    _check_tensors(gguf, cfg, tmaps, shapes)
    shardings = param_shardings(cfg, mesh or single_device_mesh(), rules)
    dtype = np.dtype(cfg.storage_dtype)
    params: dict = {}
    with tqdm(total=_tensor_count(tmaps, shapes), desc=f"dequantize {gguf.path.name}", unit="tensor",
              disable=not progress, leave=False) as bar:
        for tmap in tmaps:
            shape = tuple(get_path(shapes, tmap.path).shape)
            host = _host_parameter(gguf, cfg, tmap, shape, lambda: bar.update(1))
            set_path(params, tmap.path, _place(host, tmap, get_path(shardings, tmap.path), dtype))
            del host
    return params


def load_gguf(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    *,
    compute_dtype: Any = None,
    rules: Rules = LOGICAL_RULES,
    **runtime: Any,
) -> tuple[LlamaConfig, dict]:
    """Load a llama.cpp GGUF Llama into (cfg, params) with parameters stored in `dtype`: the same tree,
    layout and shardings as `load_hf` gives for the same model.

    With `mesh`, every parameter is created with its `NamedSharding` (from the logical-axis `rules`);
    without one, on the default device. `compute_dtype` (default: `dtype`) and other `runtime` fields go
    into the config. Raises FileNotFoundError, CheckpointError (unreadable, truncated, another
    architecture, an unsupported tensor type) or ConfigError.
    """
    gguf = GGUFFile(path)
    cfg = read_config(gguf, param_dtype=dtype_name(dtype), dtype=dtype_name(compute_dtype or dtype), **runtime)
    return cfg, load_params(gguf, cfg, mesh, rules)

