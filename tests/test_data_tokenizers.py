"""Tokenizers: byte-level ids and specials, a tiny local HF tokenizer, and TRACE text through both."""

from pathlib import Path

import pytest
from trace_root import TRACE_ROOT

from jaxcollab.data import ByteTokenizer, HFTokenizer, TokenizerError, get_task
from jaxcollab.data.pipeline import encode_example

needs_trace = pytest.mark.skipif(not TRACE_ROOT.is_dir(), reason=f"TRACE data not found at {TRACE_ROOT}")
TRACE500_TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")


def build_tiny_hf_tokenizer(path: Path, extra_special: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE (vocab ~300) trained offline and saved as a transformers fast tokenizer (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What is the monetary policy stance for the following text?",
                             "def main ( ) : return None <EOL>", "Die Katze schläft.", "判断以下文本"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(build_tiny_hf_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.encode("Ab") == [65, 98]
    assert tok.encode("ü") == [0xC3, 0xBC]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([257, 72, 105, 258, 256, 256]) == "Hi"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes with errors="replace"
    assert tok.encode_batch(["a", ""]) == [[97], []]


def test_hf_tokenizer_from_a_local_directory(tiny_hf):
    text = "判断以下文本 Stance: ü\n\tdef f ( x ) :"
    ids = tiny_hf.encode(text)
    assert tiny_hf.bos_id not in ids and tiny_hf.eos_id not in ids  # no special tokens added
    assert tiny_hf.decode(ids) == text
    assert tiny_hf.decode([tiny_hf.bos_id, *ids, tiny_hf.eos_id]) == text
    assert tiny_hf.encode_batch([text, "x"]) == [ids, tiny_hf.encode("x")]
    assert (tiny_hf.bos_id, tiny_hf.eos_id) == (0, 1)
    assert tiny_hf.pad_id == tiny_hf.eos_id  # no pad token and no reserved token: reuse EOS, add nothing
    assert tiny_hf.vocab_size == 300
    assert max(ids) < tiny_hf.vocab_size


def test_hf_tokenizer_prefers_a_reserved_token_for_padding(tmp_path):
    path = build_tiny_hf_tokenizer(tmp_path / "tok", extra_special=("<|reserved_special_token_0|>",))
    tok = HFTokenizer(path)
    assert tok.pad_id == 2  # the reserved token's id; vocabulary unchanged
    assert tok.vocab_size == 300
    assert HFTokenizer(path, pad_token="<s>").pad_id == 0
    with pytest.raises(TokenizerError, match="'<pad>' is not in the vocabulary"):
        HFTokenizer(path, pad_token="<pad>")
    with pytest.raises(TokenizerError, match="does not exist"):
        HFTokenizer(tmp_path / "missing")


def test_loss_mask_covers_exactly_answer_and_eos_hand_built():
    tok = ByteTokenizer()
    example = encode_example(tok.encode("Q?"), tok.encode("A1"), bos_id=tok.bos_id, eos_id=tok.eos_id, seq_len=16)
    assert example.tokens.tolist() == [257, ord("Q"), ord("?"), ord("A"), ord("1"), 258]
    assert example.loss_mask().tolist() == [0, 0, 0, 1, 1, 1]
    # a tokenizer without BOS (SmolLM2's): the prompt's first token starts the sequence
    example = encode_example(tok.encode("Q?"), tok.encode("A1"), bos_id=None, eos_id=tok.eos_id, seq_len=16)
    assert example.tokens.tolist() == [ord("Q"), ord("?"), ord("A"), ord("1"), 258]
    assert example.loss_mask().tolist() == [0, 0, 1, 1, 1]
    # cut to fit: without BOS the prompt keeps one more token
    example = encode_example(tok.encode("abcdef"), tok.encode("Z"), bos_id=None, eos_id=tok.eos_id, seq_len=4)
    assert example.tokens.tolist() == [ord("e"), ord("f"), ord("Z"), 258] and example.prompt_truncated
    with pytest.raises(ValueError, match="empty prompt needs a BOS"):
        encode_example([], tok.encode("Z"), bos_id=None, eos_id=tok.eos_id, seq_len=8)


def test_tokenizer_bos_convention_follows_the_tokenizer(tiny_hf, tmp_path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    assert ByteTokenizer().add_bos and ByteTokenizer().start_ids == [ByteTokenizer.BOS]
    assert not tiny_hf.add_bos and tiny_hf.start_ids == []  # its post-processor adds nothing
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_hf.path)
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", fast.bos_token_id)])
    fast.save_pretrained(tmp_path / "with_bos")
    with_bos = HFTokenizer(tmp_path / "with_bos")
    assert with_bos.add_bos and with_bos.start_ids == [with_bos.bos_id]


@needs_trace
@pytest.mark.parametrize("name", TRACE500_TASKS)
def test_trace_text_tokenizes_and_masks_only_the_answer(name, tiny_hf):
    task = get_task(name, root=TRACE_ROOT, variant="trace500")
    byte_tok = ByteTokenizer()
    for split in ("train", "test"):
        rows = task.examples(split)
        for row in rows:  # every row, byte-level: lossless and inside the vocabulary
            prompt_ids = byte_tok.encode(row["prompt"])
            assert byte_tok.decode(prompt_ids) == row["prompt"]
            answer_ids = byte_tok.encode(row["answer"])
            assert byte_tok.decode(answer_ids) == row["answer"]
        for row in rows[:10]:  # a sample through the HF tokenizer (whole files would be slow)
            prompt_ids, answer_ids = tiny_hf.encode(row["prompt"]), tiny_hf.encode(row["answer"])
            assert tiny_hf.decode(answer_ids) == row["answer"]
            for bos_id in (tiny_hf.bos_id, None):
                example = encode_example(prompt_ids, answer_ids, bos_id=bos_id, eos_id=tiny_hf.eos_id,
                                         seq_len=len(prompt_ids) + len(answer_ids) + 2)
                mask = example.loss_mask()
                assert mask.sum() == len(answer_ids) + 1
                assert example.tokens[mask == 1].tolist() == [*answer_ids, tiny_hf.eos_id]
                start = [] if bos_id is None else [bos_id]
                assert example.tokens[mask == 0].tolist() == [*start, *prompt_ids]
