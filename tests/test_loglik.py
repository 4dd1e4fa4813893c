"""Log-likelihood scoring equals transformers' PyTorch Llama on a tiny random model (the default packed path,
and the plain path); the packed path (identical inputs once, short inputs packed into rows) equals the plain
one request by request; multiple-choice metrics equal hand computations; malformed multiple-choice files fail
naming the file and line."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import build_hf_llama

from jaxcollab import model
from jaxcollab.data.tokenizers import ByteTokenizer
from jaxcollab.evaluation.loglik import (
    MultipleChoiceDataError,
    aggregate_multiple_choice,
    load_multiple_choice_jsonl,
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
    multiple_choice,
    pack_segments,
    rolling_windows,
)

BOS = ByteTokenizer.BOS
RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float64 torch reference, cfg, params) of one random Llama with a byte-sized vocabulary (259 ids)."""
    path = tmp_path_factory.mktemp("llama_bytes")
    reference = build_hf_llama(path, vocab_size=ByteTokenizer.VOCAB_SIZE).double()
    cfg, params = model.load_hf(path)
    return reference, cfg, params


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def torch_logprobs(reference, inputs: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = reference(torch.tensor([inputs])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def torch_score(reference, tokens: list[int], num_scored: int) -> tuple[float, bool]:
    """Sum of log p(tokens[i] | tokens[:i]) over the last `num_scored` tokens, and whether each is the argmax."""
    logprobs = torch_logprobs(reference, tokens[:-1])
    first = len(tokens) - num_scored
    total = sum(logprobs[i - 1, tokens[i]] for i in range(first, len(tokens)))
    greedy = all(int(logprobs[i - 1].argmax()) == tokens[i] for i in range(first, len(tokens)))
    return float(total), greedy


@pytest.fixture(params=["default_chunk", "chunk_16"])
def score_chunk(request, monkeypatch):
    """Scoring with the default head chunk (one chunk per pass here) and with 16 positions per chunk."""
    from jaxcollab.evaluation import loglik

    if request.param == "chunk_16":
        monkeypatch.setattr(loglik, "SCORE_CHUNK", 16)  # read at each call (a static argument of the scorers)
    return loglik.SCORE_CHUNK


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_loglikelihood_equals_transformers_for_mixed_lengths(tiny, score_chunk, packed):
    reference, cfg, params = tiny
    sentence = "The quick brown fox jumps over the lazy dog. " * 3
    requests = [
        ("Question: what is two plus two?", " four"),
        ("Answer: ", "yes"),  # the trailing space moves to the continuation: " yes" is scored
        ("", "hello world"),  # empty context: BOS alone
        ("a", "b"),
        (sentence, "Done."),
        ("Zürich liegt in der ", "Schweiz"),
    ]
    # Token sequences and scored lengths written out by hand (bytes, BOS first).
    expected_tokens = [
        ([BOS, *ids("Question: what is two plus two? four")], 5),
        ([BOS, *ids("Answer: yes")], 4),
        ([BOS, *ids("hello world")], 11),
        ([BOS, *ids("ab")], 1),
        ([BOS, *ids(sentence + "Done.")], 6),  # the sentence ends with a space: " Done." is scored
        ([BOS, *ids("Zürich liegt in der Schweiz")], 8),
    ]
    expected = [torch_score(reference, tokens, n) for tokens, n in expected_tokens]
    tokenizer = ByteTokenizer()
    ours = loglikelihood(cfg, params, tokenizer, requests, batch_size=3, packed=packed)
    np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in expected], rtol=RTOL)
    assert [g for _, g in ours] == [g for _, g in expected]
    # One request (or row) at a time (other shapes, other buckets) gives the same numbers.
    single = loglikelihood(cfg, params, tokenizer, requests, batch_size=1, packed=packed)
    np.testing.assert_allclose([v for v, _ in single], [v for v, _ in ours], rtol=1e-5)
    # The moved space matters: scoring "yes" alone is a different number.
    without_space = torch_score(reference, [BOS, *ids("Answer: yes")], 3)[0]
    assert abs(without_space - ours[1][0]) > 1e-3


def torch_greedy(reference, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(torch_logprobs(reference, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def test_is_greedy_true_exactly_for_the_models_own_continuation(tiny):
    reference, cfg, params = tiny
    context = [BOS, *ids("The cat")]
    greedy = torch_greedy(reference, context, 4)
    changed = [*greedy[:-1], (greedy[-1] + 1) % ByteTokenizer.VOCAB_SIZE]
    ours = loglikelihood_tokens(cfg, params, [(context, greedy), (context, changed)])
    expected = [torch_score(reference, context + greedy, 4), torch_score(reference, context + changed, 4)]
    assert [g for _, g in expected] == [True, False]
    assert [g for _, g in ours] == [True, False]
    np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in expected], rtol=RTOL)


def test_long_requests_are_truncated_from_the_left(tiny):
    reference, cfg, params = tiny
    context, continuation = "A rather long context that will not fit in the window", " at all"
    tokens = [BOS, *ids(context + continuation)]
    window = tokens[-17:]  # max_length=16 model inputs plus the last target
    expected = torch_score(reference, window, 7)[0]
    (ours, _), = loglikelihood(cfg, params, ByteTokenizer(), [(context, continuation)], max_length=16)
    np.testing.assert_allclose(ours, expected, rtol=RTOL)
    assert abs(ours - torch_score(reference, tokens, 7)[0]) > 1e-3  # truncation really changed the score
    with pytest.raises(ValueError, match="max_length=4"):
        loglikelihood(cfg, params, ByteTokenizer(), [("Q", " too long")], max_length=4)


def test_pack_segments_places_every_segment_once_without_overlap():
    lengths = [5, 17, 3, 8, 8, 1, 40, 2, 16, 16, 9]
    rows = pack_segments(lengths, 16)
    assert rows == pack_segments(lengths, 16)  # deterministic
    placed = sorted(segment for _, members in rows for segment, _ in members)
    assert placed == list(range(len(lengths)))
    for row_length, members in rows:
        assert row_length % 16 == 0
        spans = sorted((offset, offset + lengths[segment]) for segment, offset in members)
        assert spans[-1][1] <= row_length
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    # Longest first: 40 opens a 48-row, 17 a 32-row, each 16 its own row; then 9 -> the 32-row, 8 -> the 48-row
    # (full), 8 -> a new 16-row, 5 -> the 32-row, 3 and 2 -> the last 16-row, 1 -> the 32-row (full).
    assert [(length, sorted(segment for segment, _ in members)) for length, members in rows] == [
        (48, [3, 6]), (32, [0, 1, 5, 10]), (16, [8]), (16, [9]), (16, [2, 4, 7])]
    assert sum(lengths) == 125 and sum(length for length, _ in rows) == 128


def test_packed_path_equals_plain_path_and_runs_identical_inputs_once(tiny, monkeypatch):
    _, cfg, params = tiny
    from jaxcollab.evaluation import loglik

    tokenizer = ByteTokenizer()
    context = "Which letter? A. cat B. dog C. fish D. bird\nAnswer:"
    requests = [(context, f" {letter}") for letter in "ABCD"]  # one-token continuations of one context
    requests += [("The sky is", " blue"), ("The sky is", " a very long and unlikely answer"), ("Two", " plus")]
    requests += [("x" * 70, " long context"), ("", "empty context"), ("The sky is", " blue")]  # a duplicate
    plain = loglikelihood(cfg, params, tokenizer, requests, packed=False)
    inputs_seen = []
    real_forward = loglik.forward_hidden

    def recording_forward(cfg_, params_, tokens, lora=None, **kwargs):
        ids, tok = np.asarray(kwargs["segment_ids"]), np.asarray(tokens)
        for row in range(ids.shape[0]):
            for segment in set(ids[row].tolist()) - {0}:
                inputs_seen.append(tuple(tok[row][ids[row] == segment].tolist()))
        return real_forward(cfg_, params_, tokens, lora, **kwargs)

    monkeypatch.setattr(loglik, "forward_hidden", recording_forward)
    for pack_length, batch_size in ((16, 1), (32, 2), (256, 8)):
        inputs_seen.clear()
        packed = loglikelihood(cfg, params, tokenizer, requests, packed=True, pack_length=pack_length,
                               batch_size=batch_size)
        np.testing.assert_allclose([v for v, _ in packed], [v for v, _ in plain], rtol=1e-5, atol=1e-5)
        assert [g for _, g in packed] == [g for _, g in plain]
        # The four letters share one input, the duplicate request reuses its twin's: 10 requests, 6 inputs.
        expected_inputs = {tuple(([BOS, *ids(c.rstrip())] + ids(c[len(c.rstrip()):] + x))[:-1])
                           if c else tuple([BOS, *ids(x)][:-1]) for c, x in requests}
        assert len(inputs_seen) == len(expected_inputs) == 6
        assert set(inputs_seen) == expected_inputs


def test_rolling_windows_follow_the_lm_eval_example():
    # lm-eval's LM.loglikelihood_rolling docstring: tokens 0..9, max length 4 ->
    # inputs [BOS 0 1 2], [3 4 5 6], [5 6 7 8]; predictions [0 1 2 3], [4 5 6 7], [8 9].
    assert rolling_windows(range(10), 99, 4) == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows(range(8), 99, 4) == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7])]
    assert rolling_windows([5, 6], 99, 4) == [([99], [5, 6])]
    assert rolling_windows([], 99, 4) == []


def test_rolling_loglikelihood_equals_transformers(tiny):
    reference, cfg, params = tiny
    text = "abcdefghij"
    t = ids(text)
    # Windows of 4 inputs as in lm-eval's example: each token predicted once, the last window with full context.
    # (model inputs, next tokens, how many of the last positions are scored)
    windows = [([BOS, *t[0:3]], t[0:4], 4), (t[3:7], t[4:8], 4), (t[5:9], t[6:10], 2)]
    expected = 0.0
    for inputs, targets, num_scored in windows:
        logprobs = torch_logprobs(reference, inputs)
        expected += sum(logprobs[k, targets[k]] for k in range(len(inputs) - num_scored, len(inputs)))
    short = "xyz"
    expected_short = torch_score(reference, [BOS, *ids(short)], 3)[0]
    ours = loglikelihood_rolling(cfg, params, ByteTokenizer(), [text, short, ""], max_length=4)
    np.testing.assert_allclose(ours, [expected, expected_short, 0.0], rtol=RTOL)
    # With room for the whole text it is the plain sum of log p(token | BOS, earlier tokens).
    full = loglikelihood_rolling(cfg, params, ByteTokenizer(), [text])[0]
    np.testing.assert_allclose(full, torch_score(reference, [BOS, *t], len(t))[0], rtol=RTOL)
    assert abs(full - ours[0]) > 1e-3


def test_aggregate_multiple_choice_by_hand():
    rows = [
        {"context": "q1", "choices": ["no", "maybe"], "gold": 1},
        {"context": "q2", "choices": ["yes", "é"], "gold": 0},  # "é": 1 character, 2 UTF-8 bytes
        {"context": "q3", "choices": ["x", "y"], "gold": 0},
        {"context": "q4", "choices": ["ab", "cd"], "gold": 1},  # a tie goes to the first choice
    ]
    scores = [[-3.0, -5.0], [-6.0, -2.5], [-1.0, -2.0], [-2.0, -2.0]]
    # acc:       argmax [0, 1, 0, 0]                                 -> hits r3        = 1/4
    # acc_norm:  [-1.5, -1.0], [-2.0, -2.5], [-1, -2], [-1, -1]       -> hits r1 r2 r3  = 3/4
    # acc_bytes: [-1.5, -1.0], [-2.0, -1.25], [-1, -2], [-1, -1]      -> hits r1 r3     = 2/4
    result = aggregate_multiple_choice(rows, scores)
    assert result == {"acc": 0.25, "acc_norm": 0.75, "acc_bytes": 0.5, "num_rows": 4}
    with pytest.raises(ValueError, match="row 1: 2 choices but 3"):
        aggregate_multiple_choice(rows[:2], [[0.0, 0.0], [0.0, 0.0, 0.0]])


def test_multiple_choice_end_to_end_equals_transformers(tiny):
    reference, cfg, params = tiny
    rows = [
        {"context": "The sky is", "choices": ["blue", "a very long and unlikely answer", "x"]},
        {"context": "Two plus two is", "choices": ["four", "5"]},
        {"context": "Coffee with milk is called", "choices": ["café au lait", "tea", "a flat white or latte"]},
        {"context": "Pick one:", "choices": ["A", "BB", "CCC", "DDDD"]},
    ]
    lls = [[torch_score(reference, [BOS, *ids(f"{row['context']} {choice}")], len(ids(" " + choice)))[0]
            for choice in row["choices"]] for row in rows]
    raw = [int(np.argmax(s)) for s in lls]
    norm = [int(np.argmax(np.array(s) / [len(c) for c in row["choices"]])) for s, row in zip(lls, rows, strict=True)]
    per_byte = [int(np.argmax(np.array(s) / [len(c.encode()) for c in row["choices"]]))
                for s, row in zip(lls, rows, strict=True)]
    assert raw != norm, "the reference rows should separate acc from acc_norm"
    rows = [{**row, "gold": g} for row, g in zip(rows, norm, strict=True)]
    result = multiple_choice(cfg, params, ByteTokenizer(), rows, batch_size=4)
    assert result["acc_norm"] == 1.0
    assert result["acc"] == pytest.approx(np.mean([r == n for r, n in zip(raw, norm, strict=True)]))
    assert result["acc_bytes"] == pytest.approx(np.mean([b == n for b, n in zip(per_byte, norm, strict=True)]))
    assert result["num_rows"] == 4
    with pytest.raises(MultipleChoiceDataError, match=r"row 1: 'gold'=5 is out of range"):
        multiple_choice(cfg, params, ByteTokenizer(), [rows[0], {**rows[1], "gold": 5}])


GOOD_ROW = {"context": "Q?", "choices": ["a", "b"], "gold": 1}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"context": "q", "choices": ["a"]}', "missing key(s) ['gold']"),
        ('{"context": "q", "choices": [], "gold": 0}', "'choices' must be a non-empty list"),
        ('{"context": "q", "choices": "ab", "gold": 0}', "'choices' must be a non-empty list"),
        ('{"context": "q", "choices": ["a", ""], "gold": 0}', "choice 1 must be a non-empty string"),
        ('{"context": "q", "choices": ["a", "b"], "gold": 2}', "'gold'=2 is out of range for 2 choices"),
        ('{"context": "q", "choices": ["a", "b"], "gold": -1}', "'gold'=-1 is out of range"),
        ('{"context": "q", "choices": ["a", "b"], "gold": true}', "'gold' must be an integer"),
        ('{"context": "q", "choices": ["a", "b"], "gold": "1"}', "'gold' must be an integer"),
        ('{"context": 7, "choices": ["a", "b"], "gold": 0}', "'context' must be a string"),
    ],
)
def test_malformed_jsonl_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "old_knowledge.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + line + "\n", encoding="utf-8")  # the bad row is line 3
    with pytest.raises(MultipleChoiceDataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        load_multiple_choice_jsonl(path)


def test_load_multiple_choice_jsonl_reads_rows(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [GOOD_ROW, {"context": "Wer?", "choices": ["ich", "du", "er"], "gold": 2, "id": "x"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert load_multiple_choice_jsonl(path) == rows
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(MultipleChoiceDataError, match=re.escape(f"{empty}: no rows")):
        load_multiple_choice_jsonl(empty)
