"""The lm-eval adapter: same numbers and texts as lm-eval's own Hugging Face backend (HFLM) on a tiny local
model, with a tokenizer that prepends BOS (Llama 3 style) and one that does not (SmolLM2/GPT-2 style); local
custom tasks (multiple choice, generate_until) run end to end through `simple_evaluate`, and through lm-eval's
own command line (`python -m jaxcollab.evaluation.lm_eval_adapter`, a subprocess), without the network."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import build_hf_llama  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from jaxcollab.data.tokenizers import HFTokenizer  # noqa: E402
from jaxcollab.evaluation.lm_eval_adapter import JaxcollabLM, cut_at_stop_strings  # noqa: E402
from jaxcollab.evaluation.loglik import encode_request, multiple_choice, rolling_windows  # noqa: E402

MAX_LENGTH = 16
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Question: what is the capital of France? Answer: Paris",
          "hello world, hello there", "the cat sat on the mat"]


pytestmark = pytest.mark.usefixtures("no_network")


def build_tokenizer(path, add_bos: bool = True):
    """A tiny byte-level BPE whose encode() prepends BOS, as Llama 3's does (or, with add_bos=False, adds no
    special token, as SmolLM2's and GPT-2's); saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module", params=["bos", "no_bos"])
def model_dir(request, tmp_path_factory):
    """A directory holding a random tiny Llama and its tokenizer (what HFLM's `pretrained=` expects); the
    tokenizer prepends BOS ("bos") or adds nothing ("no_bos")."""
    add_bos = request.param == "bos"
    path = tmp_path_factory.mktemp(f"tiny_llama_bpe_{request.param}")
    tokenizer = build_tokenizer(path, add_bos=add_bos)
    plain = tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.encode("hello") == ([0, *plain] if add_bos else plain)
    assert HFTokenizer(path).add_bos is add_bos
    build_hf_llama(path, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return path


@pytest.fixture(scope="module")
def ours(model_dir):
    return JaxcollabLM(pretrained=str(model_dir), batch_size=3, max_length=MAX_LENGTH)


def hflm(model_dir, **kwargs):
    return HFLM(pretrained=str(model_dir), device="cpu", batch_size=3, max_length=MAX_LENGTH, dtype="float32",
                **kwargs)


def instances(request_type, args_list):
    return [Instance(request_type, {}, args, index) for index, args in enumerate(args_list)]


def test_rolling_windows_equal_lm_eval_windows():
    for n in range(13):
        for max_length in range(1, 6):
            tokens = list(range(100, 100 + n))
            expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
            assert rolling_windows(tokens, 7, max_length) == expected, (n, max_length)


LOGLIK_REQUESTS = [
    ("Question: what is the capital", " of France?"),
    ("hello ", "world"),  # trailing space moves to the continuation
    ("", "the cat sat"),  # empty context
    ("The quick brown fox jumps over the lazy", " dog."),  # longer than MAX_LENGTH: truncated on the left
    ("hel", "lo there"),  # BPE merges across the boundary: lm-eval splits the joint encoding
    ("Paris", " is the capital of France"),
    ("<s>", " the cat"),  # a context that is BOS's own text
]


def test_tokenization_equals_lm_eval(model_dir):
    reference = hflm(model_dir)
    tokenizer = HFTokenizer(model_dir)
    for context, continuation in LOGLIK_REQUESTS:
        if context:
            expected = reference._encode_pair(context, continuation)
        else:
            expected = ([reference.prefix_token_id], reference.tok_encode(continuation, add_special_tokens=False))
        assert encode_request(tokenizer, context, continuation) == tuple(expected), (context, continuation)


def test_loglikelihood_equals_lm_eval_hf_backend(model_dir, ours):
    requests = instances("loglikelihood", LOGLIK_REQUESTS)
    expected = hflm(model_dir).loglikelihood(requests)
    got = ours.loglikelihood(requests)
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in expected], rtol=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]


def test_loglikelihood_rolling_equals_lm_eval_with_text_encoded_without_bos(model_dir, ours):
    texts = ["The quick brown fox jumps over the lazy dog. the cat sat on the mat", "hello", "Paris"]
    requests = instances("loglikelihood_rolling", [(t,) for t in texts])
    if ours.tokenizer.add_bos:
        # HFLM encodes the text with the tokenizer's default, which for a BOS-prepending tokenizer puts a second
        # BOS after the prefix token; add_bos_token=False gives the documented "text given BOS".
        expected = hflm(model_dir, add_bos_token=False).loglikelihood_rolling(requests)
    else:  # without BOS in the encoding, HFLM's default is exactly the documented definition
        expected = hflm(model_dir).loglikelihood_rolling(requests)
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), expected, rtol=1e-4)


def test_generate_until_equals_lm_eval_hf_backend(model_dir, ours):
    contexts = ["Question: what is the capital", "hello", "the cat sat on", "The quick brown fox jumps over the lazy"]
    settings = [{"until": [], "max_gen_toks": 10}, {"until": ["e"], "max_gen_toks": 10},
                {"until": ["a", "o"], "max_gen_toks": 10, "do_sample": False}]
    # Interleaved groups of generation settings, as lm-eval hands them over.
    args = [(c, dict(s)) for c in contexts for s in settings]
    expected = hflm(model_dir).generate_until(instances("generate_until", args))
    got = ours.generate_until(instances("generate_until", args))
    assert got == expected
    free = {c: text for (c, s), text in zip(args, got, strict=True) if not s["until"]}
    assert sum(bool(text) for text in free.values()) >= 2, "the model should generate text to compare"
    cut = [free[c] != text for (c, s), text in zip(args, got, strict=True) if s["until"]]
    assert any(cut), "some stop string should have cut a generation"


def test_cut_at_stop_strings_takes_the_earliest():
    assert cut_at_stop_strings("abc\n\nQ: x", ["Q:", "\n\n"]) == "abc"
    assert cut_at_stop_strings("abc", ["", "z"]) == "abc"


def write_tasks(root, mc_rows, gen_rows):
    data = root / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows), encoding="utf-8")
    (data / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows), encoding="utf-8")
    common = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {json.dumps(str(root / 'cache'))}\n"
              f"  data_files:\n    test: {{file}}\ntest_split: test\nmetadata:\n  version: 1.0\n")
    (root / "tiny_mc.yaml").write_text(
        "task: jaxcollab_tiny_mc\n" + common.format(file=json.dumps(str(data / "mc.jsonl")))
        + "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    (root / "tiny_gen.yaml").write_text(
        "task: jaxcollab_tiny_gen\n" + common.format(file=json.dumps(str(data / "gen.jsonl")))
        + "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")


class RecordingLM(JaxcollabLM):
    """Records the request arguments lm-eval sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list] = {}

    def loglikelihood(self, requests, disable_tqdm=False):
        self.seen.setdefault("loglikelihood", []).extend(r.args for r in requests)
        return super().loglikelihood(requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm=False):
        self.seen.setdefault("generate_until", []).extend(r.args for r in requests)
        return super().generate_until(requests, disable_tqdm)


def test_simple_evaluate_runs_local_tasks(model_dir, tmp_path):
    lm = RecordingLM(pretrained=str(model_dir), batch_size=4, max_length=64)
    mc_rows = [
        {"context": "The capital of France is", "choices": ["Paris", "the lazy dog", "hello"], "gold": 0},
        {"context": "The cat sat on the", "choices": ["mat", "quick brown fox"], "gold": 1},
        {"context": "Question: hello", "choices": ["world", "there", "the capital of France"], "gold": 2},
        {"context": "jumps over", "choices": ["the lazy dog", "Paris"], "gold": 0},
    ]
    questions = ["Question: what is the capital of France? Answer:", "the cat sat on"]
    kwargs = {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}
    first_answer = lm.generate_until(instances("generate_until", [(questions[0], dict(kwargs))]))[0]
    # Row 0's answer is the model's own greedy output, row 1's cannot be produced: exact_match must be 1/2.
    gen_rows = [{"question": questions[0], "answer": first_answer}, {"question": questions[1], "answer": "§never"}]
    write_tasks(tmp_path, mc_rows, gen_rows)
    lm.seen.clear()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["jaxcollab_tiny_mc", "jaxcollab_tiny_gen"], num_fewshot=0, bootstrap_iters=0,
        log_samples=False, task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )["results"]
    mc, gen = results["jaxcollab_tiny_mc"], results["jaxcollab_tiny_gen"]
    for value in (mc["acc,none"], mc["acc_norm,none"], gen["exact_match,none"]):
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert sorted(lm.seen["loglikelihood"]) == sorted((r["context"], " " + c) for r in mc_rows for c in r["choices"])
    assert sorted(c for c, _ in lm.seen["generate_until"]) == sorted(questions)
    ours = multiple_choice(lm.cfg, lm.params, lm.tokenizer, mc_rows, max_length=64)
    assert mc["acc,none"] == pytest.approx(ours["acc"])
    assert mc["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert gen["exact_match,none"] == pytest.approx(0.5)


def test_registered_by_name_and_built_from_an_argument_string(model_dir):
    from lm_eval.api.registry import get_model

    cls = get_model("jaxcollab")
    assert cls is JaxcollabLM
    # What simple_evaluate(model="jaxcollab", model_args=...) does; device and batch size come from lm-eval.
    lm = cls.create_from_arg_string(f"pretrained={model_dir},max_length=32,max_gen_toks=4",
                                    {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks) == (2, 32, 4)
    assert lm.tokenizer.eos_id == 1 and lm.eos_ids == [1]
    with pytest.raises(ValueError, match="leaves no room for the context"):
        lm.generate_until(instances("generate_until", [("hello", {"until": [], "max_gen_toks": 32})]))


def test_lm_eval_command_line_runs_model_jaxcollab(model_dir, tmp_path):
    """`lm_eval run --model jaxcollab ...`: lm-eval's own command line, started by the adapter's module."""
    if HFTokenizer(model_dir).add_bos:
        pytest.skip("one tokenizer is enough for the command line (the no-BOS case runs)")
    mc_rows = [
        {"context": "The capital of France is", "choices": ["Paris", "the lazy dog", "hello"], "gold": 0},
        {"context": "The cat sat on the", "choices": ["mat", "quick brown fox"], "gold": 1},
        {"context": "Question: hello", "choices": ["world", "there", "the capital of France"], "gold": 2},
    ]
    write_tasks(tmp_path, mc_rows, [{"question": "hello", "answer": "x"}])
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "jaxcollab.evaluation.lm_eval_adapter", "run", "--model", "jaxcollab",
               "--model_args", f"pretrained={model_dir},max_length=64", "--tasks", "jaxcollab_tiny_mc",
               "--include_path", str(tmp_path), "--batch_size", "4", "--num_fewshot", "0",
               "--output_path", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "jaxcollab"
    mc = results["results"]["jaxcollab_tiny_mc"]
    lm = JaxcollabLM(pretrained=str(model_dir), max_length=64)
    expected = multiple_choice(lm.cfg, lm.params, lm.tokenizer, mc_rows, max_length=64)
    assert mc["acc,none"] == pytest.approx(expected["acc"])
    assert mc["acc_norm,none"] == pytest.approx(expected["acc_norm"])


def test_old_knowledge_lm_eval_measure_on_a_local_task(model_dir, tmp_path):
    from jaxcollab.evaluation.old_measures import evaluate_old_knowledge

    mc_rows = [
        {"context": "The capital of France is", "choices": ["Paris", "the lazy dog", "hello"], "gold": 0},
        {"context": "The cat sat on the", "choices": ["mat", "quick brown fox"], "gold": 1},
        {"context": "Question: hello", "choices": ["world", "there", "the capital of France"], "gold": 2},
        {"context": "jumps over", "choices": ["the lazy dog", "Paris"], "gold": 0},
        {"context": "hello", "choices": ["world", "there"], "gold": 1},
    ]
    write_tasks(tmp_path, mc_rows, [{"question": "hello", "answer": "x"}])
    lm = JaxcollabLM(pretrained=str(model_dir), max_length=64)
    score = evaluate_old_knowledge("lm_eval:jaxcollab_tiny_mc", lm.cfg, lm.params, lm.tokenizer, size=4,
                                   source=tmp_path, max_length=64, progress=False)
    expected = multiple_choice(lm.cfg, lm.params, lm.tokenizer, mc_rows[:4], max_length=64)  # limit=4: first 4
    assert score.name == "lm_eval:jaxcollab_tiny_mc" and score.details["metric"] == "acc_norm,none"
    assert score.value == pytest.approx(expected["acc_norm"]) and score.n == 4
    assert set(score.per_item) <= {0.0, 1.0}
    assert sum(score.per_item) / 4 == pytest.approx(expected["acc_norm"])
    stderr = score.details["results"]["acc_norm_stderr,none"]
    assert score.ci95 == pytest.approx((score.value - 1.959964 * stderr, score.value + 1.959964 * stderr))
