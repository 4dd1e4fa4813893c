"""Tokenizers behind one small interface: a byte-level one for tiny models, and a local Hugging Face one.

Everything downstream (pipelines, evaluation prompts) only needs `encode` (text -> ids, no special tokens),
`decode` (ids -> text, special ids dropped), the ids of BOS, EOS and PAD, and `add_bos`: whether a sequence
starts with BOS (Llama 3's tokenizer prepends it; SmolLM2's and GPT-2's do not, and a model trained without
it should not see it). `start_ids` is what every sequence begins with: `[bos_id]` or nothing. Instruct models
come with a chat template: `chat_prompt(message)` renders one user turn and the start of the assistant's.

- `ByteTokenizer`: UTF-8 bytes are ids 0..255, then PAD=256, BOS=257, EOS=258; `vocab_size` is 259 (a
  model may round its embedding table up; ids above 258 are never produced).
- `HFTokenizer`: a tokenizer loaded from a LOCAL directory (e.g. Llama 3's `tokenizer.json`) with
  `local_files_only=True`; never downloads.

Padding for Llama 3: its tokenizer has no pad token. Adding a new `[PAD]` token (what Alpaca-style code
such as MetaMath's `train_math.py` does) grows the vocabulary and forces an embedding resize, so we never
add a token. Instead, when the tokenizer has no pad token, `HFTokenizer` reuses an existing special token,
first found of: `<|finetune_right_pad_id|>` (Llama 3.1+ reserves it for exactly this), then
`<|reserved_special_token_0|>` (Llama 3), then the EOS token. In this project the pad id is never trained
on and never attended to (`loss_mask` and `segment_ids` mark padding explicitly), so reusing EOS is also
safe; the choice only matters for readability of padded batches. Pass `pad_token=` to choose another.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "TokenizerError", "check_fits_model"]

# Existing special tokens reused as padding, in order of preference (see the module docstring).
LLAMA3_PAD_CANDIDATES: tuple[str, ...] = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


class TokenizerError(ValueError):
    """A tokenizer directory or token cannot be used."""


class Tokenizer(abc.ABC):
    """What the data pipelines need from a tokenizer."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts; implementations may override with a faster batched call."""
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids (BOS, EOS, PAD) are dropped."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (max id + 1)."""

    @property
    def add_bos(self) -> bool:
        """Whether sequences start with BOS (the tokenizer's own convention)."""
        return True

    @property
    def start_ids(self) -> list[int]:
        """The ids every sequence starts with: `[bos_id]` when `add_bos`, else none."""
        return [self.bos_id] if self.add_bos else []

    @property
    def has_chat_template(self) -> bool:
        """Whether `chat_prompt` can render a conversation (an instruct model's template)."""
        return False

    def chat_prompt(self, user_message: str) -> str:
        """The text an assistant's answer to `user_message` follows, rendered with the chat template."""
        raise TokenizerError(f"{self!r} has no chat template")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = PAD, 257 = BOS, 258 = EOS."""

    PAD = 256
    BOS = 257
    EOS = 258
    VOCAB_SIZE = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer from a local directory; reuses an existing special token as padding."""

    def __init__(self, path: str | Path, *, pad_token: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise TokenizerError(f"tokenizer directory {self.path} does not exist (expected tokenizer.json etc.)")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise TokenizerError(f"cannot load a tokenizer from {self.path}: {error}") from error
        if self._tok.bos_token_id is None or self._tok.eos_token_id is None:
            raise TokenizerError(
                f"tokenizer in {self.path} has no BOS or EOS token (bos={self._tok.bos_token!r}, "
                f"eos={self._tok.eos_token!r}); set them in its tokenizer_config.json"
            )
        self._pad_id = self._choose_pad_id(pad_token)
        # The tokenizer's own convention, as `encode(text)` with its special tokens shows it.
        self._add_bos = self._tok.encode("a", add_special_tokens=True)[:1] == [self._tok.bos_token_id]

    def _choose_pad_id(self, pad_token: str | None) -> int:
        vocab = self._tok.get_vocab()
        if pad_token is not None:
            if pad_token not in vocab:
                raise TokenizerError(f"pad_token {pad_token!r} is not in the vocabulary of {self.path}")
            return int(vocab[pad_token])
        if self._tok.pad_token_id is not None:
            return int(self._tok.pad_token_id)
        for candidate in LLAMA3_PAD_CANDIDATES:
            if candidate in vocab:
                return int(vocab[candidate])
        return int(self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)

    @property
    def bos_id(self) -> int:
        return int(self._tok.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def chat_prompt(self, user_message: str) -> str:
        if not self.has_chat_template:
            raise TokenizerError(f"the tokenizer in {self.path} has no chat template (tokenizer_config.json"
                                 " 'chat_template' or chat_template.jinja)")
        return self._tok.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def check_fits_model(tokenizer: Tokenizer, model_vocab_size: int, model: str) -> None:
    """Refuse a tokenizer with ids the model has no embedding for: it is another model's tokenizer (the
    model would read ids past its vocabulary, or garbage from a byte tokenizer). `model` names it in the error."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} ids but the model only"
                             f" {model_vocab_size} ({model}): it is not this model's tokenizer")
