"""grain pipelines: the batch format on hand-built rows, packing, truncation, shuffling, resuming, eval prompts."""

import json
from collections import Counter

import numpy as np
import pytest

from jaxcollab.data import ByteTokenizer, build_train_pipeline, encode_example, left_pad, prepare_eval
from jaxcollab.data.pipeline import tokenize_examples

TOK = ByteTokenizer()
BOS, EOS, PAD = 257, 258, 256


def _examples(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"q{i:03d}?", "answer": "a" * (1 + i % 5)} for i in range(n)]


def _segments(batch: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(prompt, answer) of every packed segment, read back from tokens and loss_mask."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in sorted(set(seg.tolist()) - {0}):
            where = seg == s
            tokens, mask = batch["tokens"][row][where], batch["loss_mask"][row][where]
            assert tokens[0] == BOS and tokens[-1] == EOS  # whole example: never split across rows
            assert batch["positions"][row][where].tolist() == list(range(int(where.sum())))
            out.append((TOK.decode(tokens[mask == 0]), TOK.decode(tokens[mask == 1])))
    return out


def test_packed_row_hand_built():
    examples = [{"prompt": "ab", "answer": "c"}, {"prompt": "de", "answer": "fg"}]
    pipe = build_train_pipeline(examples, TOK, seq_len=12, batch_size=1, packing=True, shuffle=False,
                                num_packing_bins=1, drop_remainder=False)
    batches = list(pipe)
    assert len(batches) == 1
    b = batches[0]
    assert set(b) == {"tokens", "loss_mask", "segment_ids", "positions"}
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((1, 12), "int32"), "loss_mask": ((1, 12), "float32"),
        "segment_ids": ((1, 12), "int32"), "positions": ((1, 12), "int32")}
    assert b["tokens"][0].tolist() == [BOS, 97, 98, 99, EOS, BOS, 100, 101, 102, 103, EOS, PAD]
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]


def test_padded_rows_hand_built_and_last_batch_filled():
    examples = [{"prompt": "ab", "answer": "c"}, {"prompt": "d", "answer": "ef"}, {"prompt": "g", "answer": "h"}]
    pipe = build_train_pipeline(examples, TOK, seq_len=7, batch_size=2, packing=False, shuffle=False,
                                drop_remainder=False)
    first, last = list(pipe)
    assert first["tokens"].tolist() == [[BOS, 97, 98, 99, EOS, PAD, PAD], [BOS, 100, 101, 102, EOS, PAD, PAD]]
    assert first["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]]
    assert first["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 2
    assert first["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 0]] * 2
    assert last["tokens"].tolist() == [[BOS, 103, 104, EOS, PAD, PAD, PAD], [PAD] * 7]
    assert last["segment_ids"][1].tolist() == [0] * 7 and last["loss_mask"][1].tolist() == [0] * 7
    assert len(list(build_train_pipeline(examples, TOK, seq_len=7, batch_size=2, packing=False))) == 1


def test_packing_keeps_every_example_whole_exactly_once():
    examples = _examples(50)  # 8..12 tokens each
    pipe = build_train_pipeline(examples, TOK, seq_len=32, batch_size=4, packing=True, seed=3,
                                drop_remainder=False)
    seen = [seg for batch in pipe for seg in _segments(batch)]
    assert Counter(seen) == Counter((e["prompt"], e["answer"]) for e in examples)
    rows = sum(batch["tokens"].shape[0] for batch in pipe)
    assert rows < 50  # several examples per row


def test_truncation_cuts_the_prompt_on_the_left_and_keeps_the_answer():
    prompt, answer = list(range(10)), [100, 101, 102]
    e = encode_example(prompt, answer, bos_id=BOS, eos_id=EOS, seq_len=10)
    assert e.tokens.tolist() == [BOS, 5, 6, 7, 8, 9, 100, 101, 102, EOS]
    assert (e.num_prompt_tokens, e.prompt_truncated, e.answer_truncated) == (6, True, False)
    # The answer alone leaves less than min(len(prompt), seq_len // 4) = 3 prompt tokens: cut it, EOS lost.
    e = encode_example(list(range(8)), list(range(100, 120)), bos_id=BOS, eos_id=EOS, seq_len=12)
    assert e.tokens.tolist() == [BOS, 5, 6, 7, *range(100, 108)]
    assert (e.num_prompt_tokens, e.prompt_truncated, e.answer_truncated) == (4, True, True)
    assert e.loss_mask().tolist() == [0] * 4 + [1] * 8
    examples = [{"prompt": "x" * 30, "answer": "yy"}, {"prompt": "short", "answer": "z"},
                {"prompt": "p" * 8, "answer": "w" * 40}]
    encoded, stats = tokenize_examples(examples, TOK, seq_len=16)
    assert (stats.num_examples, stats.num_prompt_truncated, stats.num_answer_truncated, stats.num_dropped) == \
        (3, 2, 1, 0)
    assert TOK.decode(encoded[0].tokens) == "x" * 12 + "yy"
    assert TOK.decode(encoded[2].tokens) == "p" * 4 + "w" * 11  # floor min(8, 16 // 4) = 4 prompt tokens
    assert encoded[0].tokens[-1] == EOS
    _, dropped = tokenize_examples(examples, TOK, seq_len=16, overlong_answer="drop")
    assert (dropped.num_examples, dropped.num_dropped, dropped.num_prompt_truncated) == (2, 1, 1)
    pipe = build_train_pipeline(examples, TOK, seq_len=16, batch_size=1, packing=True)
    assert pipe.stats.num_prompt_truncated == 2
    assert all(batch["tokens"].shape == (1, 16) for batch in pipe)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("tokens", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("packing", [True, False])
def test_resumed_iterator_yields_exactly_the_next_batches(packing):
    examples = _examples(40)
    make = lambda: build_train_pipeline(examples, TOK, seq_len=32, batch_size=3, packing=packing,  # noqa: E731
                                        num_epochs=None, seed=7)
    reference = _take(iter(make()), 30)  # crosses several epoch boundaries
    it = iter(make())
    _take(it, 11)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    resumed = iter(make())
    resumed.set_state(state)
    rest = _take(resumed, 19)
    assert not np.array_equal(rest[0]["tokens"], reference[0]["tokens"])  # not simply restarted
    _assert_same_batches(rest, reference[11:])


def test_shuffle_is_seeded_and_epochs_repeat_the_data():
    examples = _examples(12)

    def order(seed, epochs=1):
        pipe = build_train_pipeline(examples, TOK, seq_len=16, batch_size=4, packing=False, seed=seed,
                                    num_epochs=epochs)
        return [seg[0] for batch in pipe for seg in _segments(batch)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(e["prompt"] for e in examples)
    two = order(1, epochs=2)
    assert len(two) == 24 and Counter(two) == Counter(2 * [e["prompt"] for e in examples])
    assert two[:12] != two[12:]  # each epoch reshuffled
    unshuffled = build_train_pipeline(examples, TOK, seq_len=16, batch_size=4, packing=False, shuffle=False)
    assert [s[0] for b in unshuffled for s in _segments(b)] == [e["prompt"] for e in examples]
    assert unshuffled.batches_per_epoch() == 3
    kept_last = build_train_pipeline(examples[:10], TOK, seq_len=16, batch_size=4, packing=False,
                                      drop_remainder=False)
    assert kept_last.batches_per_epoch() == len(list(kept_last)) == 3


def test_shards_are_disjoint_and_cover_the_data():
    examples = _examples(10)
    shards = [[s[0] for b in build_train_pipeline(examples, TOK, seq_len=16, batch_size=1, packing=False,
                                                   shard_index=i, shard_count=2) for s in _segments(b)]
              for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    half = build_train_pipeline(examples, TOK, seq_len=16, batch_size=2, packing=False, shard_index=1, shard_count=2)
    assert half.batches_per_epoch() == len(list(half)) == 2
    assert sorted(shards[0] + shards[1]) == sorted(e["prompt"] for e in examples)


def test_eval_prompts_are_left_truncated_with_bos():
    examples = [{"prompt": "abcdef", "answer": "X"}, {"prompt": "ab", "answer": "Y"}]
    ev = prepare_eval(examples, TOK, max_prompt_len=4)
    assert ev.prompt_ids == [[BOS, 100, 101, 102], [BOS, 97, 98]]
    assert ev.references == ["X", "Y"] and ev.num_truncated == 1 and len(ev) == 2
    tokens, mask = left_pad(ev.prompt_ids, PAD)
    assert tokens.tolist() == [[BOS, 100, 101, 102], [PAD, BOS, 97, 98]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert len(prepare_eval(examples, TOK, max_prompt_len=8, limit=1)) == 1


def test_bad_pipeline_arguments():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        build_train_pipeline(_examples(2), TOK, seq_len=16, batch_size=0)
    with pytest.raises(ValueError, match="unknown overlong_answer"):
        build_train_pipeline(_examples(2), TOK, seq_len=16, batch_size=1, overlong_answer="cut")
    with pytest.raises(ValueError, match="no training examples left"):
        build_train_pipeline([{"prompt": "p", "answer": "a" * 50}], TOK, seq_len=16, batch_size=1,
                             overlong_answer="drop")


@pytest.mark.slow
def test_worker_processes_resume_exactly():
    examples = _examples(40)
    make = lambda: build_train_pipeline(examples, TOK, seq_len=32, batch_size=3, num_epochs=None,  # noqa: E731
                                        seed=7, worker_count=2)
    it = iter(make())
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 5)
    resumed = iter(make())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)
    for iterator in (it, resumed):
        iterator.close()
