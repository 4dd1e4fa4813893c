"""The tokenizer a llama.cpp GGUF file carries, rebuilt as a Hugging Face `tokenizers.Tokenizer`, and written
as the tokenizer files of a Hugging Face model directory.

    tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")        # tokenizers.Tokenizer
    save_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf", "hf_dir")      # tokenizer.json, tokenizer_config.json, ...

Format facts this module relies on (llama.cpp's `tokenizer.ggml.*` metadata and its tokenizer, llama-vocab.cpp):

- `model == "gpt2"`: byte-level BPE. `tokens` is the vocabulary in id order, already spelled in GPT-2's
  byte alphabet (a space is "Ġ"); `merges` are "left right" pairs, best first. Other models (SentencePiece
  "llama", "t5", "bert", ...) are refused by name.
- `token_type` per token: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. llama.cpp
  matches control and user-defined tokens whole in the text before BPE; here control tokens become
  special added tokens and user-defined ones plain added tokens.
- `pre` names the pre-tokenizer: regular expressions applied one after the other, each splitting the
  pieces the previous left (matches and the text between them both kept), then byte-level BPE per piece.
  Supported (`PRE_TOKENIZERS`): `smollm` and the others of its family (`\\p{N}`, then GPT-2's pattern:
  digits are single tokens), `gpt-2`, and Llama 3's `llama-bpe` / `llama3` / `llama-v3` / `falcon3`
  (one pattern; a piece that is a whole vocabulary entry is taken without merging, llama.cpp's
  `ignore_merges`). Any other value, or none, is refused by name: a wrong split silently changes the ids.
  Note: transformers' own GGUF loader uses GPT-2's pattern for `smollm` and so keeps runs of digits
  together where llama.cpp (and SmolLM2's original tokenizer) splits them.
- `add_bos_token` / `add_eos_token`: whether encoding prepends BOS / appends EOS. When a file does not say,
  llama.cpp's default for its `pre` applies (BOS for the Llama 3 family, nothing otherwise).
- `bos_token_id`, `eos_token_id`, `unknown_token_id`, `padding_token_id`; `tokenizer.chat_template` is a
  Jinja template, the same as a Hugging Face `chat_template`; `<arch>.context_length` is the model's
  maximum length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from jaxcollab.model.gguf import GGUFFile
from jaxcollab.model.safetensors_io import CheckpointError

logger = logging.getLogger(__name__)

_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Token types of `tokenizer.ggml.token_type`.
CONTROL, USER_DEFINED = 3, 4


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` value."""

    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a vocabulary entry is one token, merges or not
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token
    clean_spaces: bool = True  # llama.cpp's clean_spaces: " ." -> "." etc. when decoding


_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_PATTERN)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": PreTokenizer(_DIGITS_THEN_GPT2, clean_spaces=False),
    "starcoder": PreTokenizer(_DIGITS_THEN_GPT2),
    "refact": PreTokenizer(_DIGITS_THEN_GPT2),
    "gpt-2": PreTokenizer((_GPT2_PATTERN,)),
    **{
        name: PreTokenizer((_LLAMA3_PATTERN,), ignore_merges=True, add_bos=True)
        for name in ("llama-bpe", "llama3", "llama-v3", "falcon3")
    },
}
SUPPORTED_MODELS = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer of a GGUF file and the settings its tokenizer_config.json needs."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    model_max_length: int
    clean_up_tokenization_spaces: bool


def _token(tokens: list[str], gguf: GGUFFile, key: str) -> str | None:
    index = gguf.get(f"tokenizer.ggml.{key}")
    if index is None:
        return None
    if not 0 <= int(index) < len(tokens):
        raise CheckpointError(f"{gguf.path}: tokenizer.ggml.{key}={index} is not a token id (vocabulary of"
                              f" {len(tokens)})")
    return tokens[int(index)]


def _merges(gguf: GGUFFile) -> list[tuple[str, str]]:
    pairs = []
    for merge in gguf.get("tokenizer.ggml.merges", []):  # gguf's writer leaves an empty list out
        left, space, right = merge.partition(" ")
        if not space or not left or not right or " " in right:
            raise CheckpointError(f"{gguf.path}: tokenizer.ggml.merges holds {merge!r}, not a 'left right' pair")
        pairs.append((left, right))
    return pairs


def _vocabulary(tokens: list[str], gguf: GGUFFile) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        logger.warning("%s: %d tokens repeat an earlier token's text; their ids are never produced", gguf.path,
                       len(tokens) - len(vocab))
    return vocab


def _pre_tokenizer_rule(gguf: GGUFFile) -> PreTokenizer:
    name = gguf.get("tokenizer.ggml.pre")
    if name not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{gguf.path}: tokenizer.ggml.pre={name!r} is not supported; jaxcollab knows {sorted(PRE_TOKENIZERS)}"
        )
    return PRE_TOKENIZERS[name]


def _byte_level_bpe(gguf: GGUFFile, tokens: list[str], rule: PreTokenizer) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE(vocab=_vocabulary(tokens, gguf), merges=_merges(gguf), ignore_merges=rule.ignore_merges)
    except Exception as error:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{gguf.path}: the tokenizer metadata is inconsistent ({error})") from error
    tokenizer = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in rule.patterns]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_marked_tokens(tokenizer: Any, tokens: list[str], token_types: list[int]) -> None:
    from tokenizers import AddedToken

    marked = [(token, kind) for token, kind in zip(tokens, token_types, strict=True)
              if kind in (CONTROL, USER_DEFINED) and token]
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, kind in marked if kind == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token, kind in marked if kind == USER_DEFINED]
    )


def _post_processor(tokens: list[str], gguf: GGUFFile, add_bos: bool, add_eos: bool) -> Any:
    """Byte-level offsets, plus BOS before / EOS after every sequence where the file asks for them."""
    from tokenizers import processors

    byte_level = processors.ByteLevel(trim_offsets=False)
    if not add_bos and not add_eos:
        return byte_level
    specials: list[tuple[str, int]] = []
    before: list[str] = []
    after: list[str] = []
    for add, key, where in ((add_bos, "bos_token_id", before), (add_eos, "eos_token_id", after)):
        if add:
            token = _token(tokens, gguf, key)
            if token is None:
                raise CheckpointError(f"{gguf.path}: add_{key[:3]}_token is true but tokenizer.ggml.{key} is missing")
            specials.append((token, int(gguf.get(f"tokenizer.ggml.{key}"))))
            where.append(token)

    def sequence(piece: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in before] + [f"{piece}:{type_id}"] + [f"{t}:{type_id}" for t in after]

    template = processors.TemplateProcessing(
        single=sequence("$A", 0), pair=sequence("$A", 0) + sequence("$B", 1), special_tokens=specials
    )
    return processors.Sequence([byte_level, template])


def read_gguf_tokenizer(gguf: GGUFFile) -> GGUFTokenizer:
    """The tokenizer described by an opened GGUF file's metadata. Raises CheckpointError for a tokenizer
    model or pre-tokenizer that is not supported, or missing / inconsistent metadata."""
    model = gguf.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise CheckpointError(
            f"{gguf.path}: tokenizer.ggml.model={model!r} is not supported; jaxcollab rebuilds {list(SUPPORTED_MODELS)}"
            " (byte-level BPE) tokenizers"
        )
    rule = _pre_tokenizer_rule(gguf)
    tokens = list(gguf.require("tokenizer.ggml.tokens"))
    token_types = list(gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(token_types) != len(tokens):
        raise CheckpointError(f"{gguf.path}: {len(tokens)} tokens but {len(token_types)} token types")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", rule.add_bos))
    add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = _byte_level_bpe(gguf, tokens, rule)
    _add_marked_tokens(tokenizer, tokens, token_types)
    tokenizer.post_processor = _post_processor(tokens, gguf, add_bos, add_eos)
    architecture = gguf.get("general.architecture", "llama")
    return GGUFTokenizer(
        tokenizer=tokenizer,
        bos_token=_token(tokens, gguf, "bos_token_id"),
        eos_token=_token(tokens, gguf, "eos_token_id"),
        unk_token=_token(tokens, gguf, "unknown_token_id"),
        pad_token=_token(tokens, gguf, "padding_token_id"),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=gguf.get("tokenizer.chat_template"),
        model_max_length=int(gguf.get(f"{architecture}.context_length", 2048)),
        clean_up_tokenization_spaces=rule.clean_spaces,
    )


def gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The `tokenizers.Tokenizer` of a GGUF file (special tokens, BOS/EOS post-processing and decoder included)."""
    return read_gguf_tokenizer(GGUFFile(path)).tokenizer


def write_tokenizer_files(spec: GGUFTokenizer, out_dir: str | os.PathLike) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir` (which must
    exist) so that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads this tokenizer."""
    out_dir = Path(out_dir)
    special = {
        name: value
        for name, value in (("bos_token", spec.bos_token), ("eos_token", spec.eos_token),
                            ("unk_token", spec.unk_token), ("pad_token", spec.pad_token))
        if value is not None
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "model_max_length": spec.model_max_length,
        "clean_up_tokenization_spaces": spec.clean_up_tokenization_spaces,
    }
    if spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
    files = [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json"]
    spec.tokenizer.save(str(files[0]))
    files[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files[2].write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files


def save_gguf_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the tokenizer files of GGUF file `path` into the existing directory `out_dir`."""
    return write_tokenizer_files(read_gguf_tokenizer(GGUFFile(path)), out_dir)
