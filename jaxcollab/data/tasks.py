"""The task registry: what each round's dataset is, where its splits come from, and how it is scored.

A `Task` names a dataset, loads its `train` / `eval` / `test` splits as a `datasets.Dataset` of
`{"prompt": str, "answer": str}` rows (prompt already formatted for the model), and says how generations
are scored (`metric`, implemented in `jaxcollab.evaluation.metrics`) and how many tokens to generate
(`max_new_tokens`). `get_task(name, **options)` builds one; `list_tasks()` names them.

Families:

- TRACE (C-STANCE, FOMC, MeetingBank, Py150, ScienceQA, NumGLUE-cm, NumGLUE-ds, 20Minuten) and Lima (TRACE's
  replay set): `<root>/<Task>/<variant>/{train,eval,test}.json`, each a JSON list of `{"prompt", "answer"}`.
  TRACE prompts already contain the task instruction and are used as they are. Files are read with `json`,
  validated row by row, and turned into an in-memory `datasets.Dataset` (`Dataset.from_list`: nothing is
  written to any cache). Options: `root` (or the environment variable `JAXCOLLAB_TRACE_ROOT`), `variant`
  (`trace500`, `trace1000`, `trace5000`, `reasoning`), `eval_variant` (variant for eval/test, default the
  same), `substitute_missing` (default True), `drop_test_overlap` (default False: drop train rows whose
  prompt also appears in the test split; TRACE has a little such leakage).
- MetaMath: MetaMathQA training rows (`query`, `response`) from a local `.json` / `.jsonl` file
  (`train_file=`) or a hub id the user names (`hub_id=`, the only case that uses the network), formatted
  with the Alpaca template of MetaMath's `train_math.py`; eval and test are GSM8K test
  (`GSM8K_test.jsonl` of the MetaMath repository, `gsm8k_file=` or found under `root`), formatted with the
  prompt of MetaMath's `eval_gsm8k.py` (the same template followed by " Let's think step by step."; set
  `think_step_by_step=False` to use the training template). The GSM8K reference answer is the final number
  (the text after "#### ", thousands separators removed).
- synthetic: fictional-fact domains `synthetic/old`, `synthetic/round1`, ... (see `jaxcollab.data.synthetic`).

Missing TRACE files. Only the substitutes that `SOURCES.md` of the TRACE copy names are applied (with a
warning in the log), and `substitute_missing=False` turns them into errors:
- `MeetingBank/trace500/train.json` (and trace5000) -> `MeetingBank/reasoning/train.json` (376 rows), with the
  reasoning stripped: the answer becomes the gold summary that follows the line
  "Therefore, the summary of the meeting transcripts is:\\n", and the prompt is rewritten to the trace500
  form (" Give your reasoning first, and then the answer." removed, the trailing "\\nReasoning:" - doubled
  in 222 rows - replaced by "\\nSummary:").
- `trace5000/train.json` of Py150, ScienceQA and 20Minuten -> their `trace1000/train.json`.
- `reasoning/eval.json` -> `reasoning/test.json` (identical upstream).
Any other missing file is an error that names the path and suggests `eval_variant="trace500"` where that
helps (trace1000 has train only; MeetingBank and Py150 have no trace5000 eval/test).

max_new_tokens (Llama 3 tokens, from the answer lengths in the TRACE files: about 4 characters per token
for English, 3 for German, 2.5 for space-separated code): C-STANCE, FOMC 4 (one letter; the metric reads
the first character); ScienceQA 8 (the metric reads the first character only, the explanation need not be
generated); NumGLUE 8 (answers are at most 18 characters); Py150 64 (next line, at most 143 characters in
trace500 test); 20Minuten 256 (simplifications of at most 696 characters); MeetingBank 320 (summaries of at
most 1,100 characters); Lima and MetaMath/GSM8K 512 (MetaMath's `eval_gsm8k.py` uses 512). In the
`reasoning` variant every TRACE task generates a rationale first: 512.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "ALPACA_TEMPLATE",
    "GSM8K_EVAL_TEMPLATE",
    "METRICS",
    "PAPER_TASK_ORDER",
    "SPLITS",
    "TRACE_TASKS",
    "TRACE_VARIANTS",
    "DataError",
    "MissingDataError",
    "Task",
    "get_task",
    "lima_task",
    "list_tasks",
    "metamath_task",
    "read_jsonl_rows",
    "read_trace_file",
    "trace_task",
    "with_chat_template",
]

SPLITS: tuple[str, ...] = ("train", "eval", "test")
METRICS: tuple[str, ...] = ("accuracy", "rouge_l", "edit_similarity", "sari", "exact_match", "gsm8k")

TRACE_TASKS: tuple[str, ...] = (
    "C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten",
)
TRACE_VARIANTS: tuple[str, ...] = ("trace500", "trace1000", "trace5000", "reasoning")
# The paper's round order (DESIGN.md).
PAPER_TASK_ORDER: tuple[str, ...] = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "20Minuten", "MetaMath")

TRACE_METRICS: dict[str, str] = {
    "C-STANCE": "accuracy", "FOMC": "accuracy", "ScienceQA": "accuracy", "MeetingBank": "rouge_l",
    "Py150": "edit_similarity", "20Minuten": "sari", "NumGLUE-cm": "exact_match", "NumGLUE-ds": "exact_match",
}
TRACE_MAX_NEW_TOKENS: dict[str, int] = {
    "C-STANCE": 4, "FOMC": 4, "ScienceQA": 8, "NumGLUE-cm": 8, "NumGLUE-ds": 8, "Py150": 64,
    "20Minuten": 256, "MeetingBank": 320,
}
REASONING_MAX_NEW_TOKENS = 512
LIMA_MAX_NEW_TOKENS = 512
GSM8K_MAX_NEW_TOKENS = 512

# MetaMath's train_math.py ("prompt_no_input"); the response follows "### Response:" directly.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:"
)
# MetaMath's eval_gsm8k.py.
GSM8K_EVAL_TEMPLATE = ALPACA_TEMPLATE + " Let's think step by step."

MEETINGBANK_SUMMARY_MARKER = "Therefore, the summary of the meeting transcripts is:\n"
_REASONING_INSTRUCTION = " Give your reasoning first, and then the answer."
_TRAILING_REASONING = re.compile(r"\nReasoning:(?:Reasoning:)*\Z")

ROOT_ENV = "JAXCOLLAB_TRACE_ROOT"

Example = dict[str, str]
RowTransform = Callable[[list[Example], Path], list[Example]]


class DataError(ValueError):
    """A data file is malformed or a split cannot be built; the message names the file and row."""


class MissingDataError(DataError, FileNotFoundError):
    """A data directory or file does not exist."""


@dataclass(frozen=True)
class Task:
    """One dataset of the study: its splits, prompt format, metric and generation budget.

    `read(split)` returns raw rows `{"prompt", "answer"}`; `load(split)` applies the prompt template
    (`prompt_template` for train, `eval_prompt_template` for eval/test; `{prompt}` is the raw prompt).
    """

    name: str
    metric: str
    max_new_tokens: int
    read: Callable[[str], list[Example]] = field(repr=False, compare=False)
    splits: tuple[str, ...] = SPLITS
    prompt_template: str = "{prompt}"
    eval_prompt_template: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"task {self.name}: max_new_tokens must be positive, got {self.max_new_tokens}")

    def examples(self, split: str) -> list[Example]:
        """The split as a list of `{"prompt", "answer"}` dicts with the prompt template applied."""
        if split not in self.splits:
            raise ValueError(f"task {self.name}: unknown split {split!r}; valid: {', '.join(self.splits)}")
        template = self.prompt_template if split == "train" else (self.eval_prompt_template or self.prompt_template)
        rows = self.read(split)
        if template == "{prompt}":
            return [{"prompt": row["prompt"], "answer": row["answer"]} for row in rows]
        return [{"prompt": template.replace("{prompt}", row["prompt"]), "answer": row["answer"]} for row in rows]

    def load(self, split: str) -> datasets.Dataset:
        """The split as an in-memory `datasets.Dataset` with string columns `prompt` and `answer`."""
        return to_dataset(self.examples(split))


_CHAT_SLOT = "\x00jaxcollab-prompt\x00"


def with_chat_template(task: Task, render: Callable[[str], str]) -> Task:
    """`task` with its prompts (after its own templates) put into a chat: `render(message)` is the text before
    the assistant's answer, e.g. `tokenizer.chat_prompt`. The answer, then EOS, ends the assistant's turn."""
    rendered = render(_CHAT_SLOT)
    if rendered.count(_CHAT_SLOT) != 1:
        raise DataError(f"task {task.name}: the chat template does not place the user's message verbatim exactly"
                        " once, so prompts cannot be put into it")

    def wrap(template: str) -> str:
        return rendered.replace(_CHAT_SLOT, template)

    eval_template = task.eval_prompt_template
    return dataclasses.replace(task, prompt_template=wrap(task.prompt_template),
                               eval_prompt_template=wrap(eval_template) if eval_template is not None else None)


def to_dataset(rows: Sequence[Mapping[str, str]]) -> datasets.Dataset:
    """In-memory `datasets.Dataset` of `{"prompt", "answer"}` rows (no cache files)."""
    features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string")})
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows],
                                      features=features)


# ----------------------------------------------------------------------------------------------- validation


def validate_rows(rows: Any, source: str | Path, *, fields: Sequence[str] = ("prompt", "answer"),
                  row_label: str = "row") -> list[dict[str, Any]]:
    """Check `rows` is a non-empty list of objects whose `fields` are strings; errors name source and row."""
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON list of objects with fields {list(fields)}, "
                        f"got a JSON {type(rows).__name__}")
    if not rows:
        raise DataError(f"{source}: empty split (0 rows)")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: {row_label} {index}: expected an object with fields {list(fields)}, "
                            f"got {type(row).__name__}")
        for name in fields:
            if name not in row:
                raise DataError(f"{source}: {row_label} {index}: missing field {name!r} "
                                f"(fields present: {sorted(row)})")
            if not isinstance(row[name], str):
                raise DataError(f"{source}: {row_label} {index}: field {name!r} must be a string, "
                                f"got {type(row[name]).__name__}")
    return rows


def read_trace_file(path: str | Path) -> list[Example]:
    """Read and validate a TRACE split file (a JSON list of `{"prompt": str, "answer": str}`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    validate_rows(rows, path)
    return [{"prompt": row["prompt"], "answer": row["answer"]} for row in rows]


def read_jsonl_rows(path: str | Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a `.jsonl` file (one object per line, blank lines skipped) or a `.json` list, validated."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file does not exist")
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {line_number}: not valid JSON ({error})") from error
        return validate_rows(rows, path, fields=fields, row_label="row (0-based, blank lines skipped)")
    if path.suffix == ".json":
        try:
            with path.open(encoding="utf-8") as handle:
                rows = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        return validate_rows(rows, path, fields=fields)
    raise DataError(f"{path}: expected a .json (list of objects) or .jsonl file")


# ----------------------------------------------------------------------------------------------------- TRACE


def strip_meetingbank_reasoning(rows: list[Example], path: Path) -> list[Example]:
    """MeetingBank `reasoning` rows -> trace500-style rows: the prompt asks for the summary, the answer is it."""
    out = []
    for index, row in enumerate(rows):
        answer = row["answer"]
        at = answer.rfind(MEETINGBANK_SUMMARY_MARKER)
        if at < 0:
            raise DataError(f"{path}: row {index}: answer has no line {MEETINGBANK_SUMMARY_MARKER!r}; "
                            "cannot recover the summary from this reasoning row")
        prompt = row["prompt"].replace(_REASONING_INSTRUCTION, "", 1)
        prompt, replaced = _TRAILING_REASONING.subn("\nSummary:", prompt)
        if not replaced:
            raise DataError(f"{path}: row {index}: prompt does not end with '\\nReasoning:'")
        out.append({"prompt": prompt, "answer": answer[at + len(MEETINGBANK_SUMMARY_MARKER):]})
    return out


@dataclass(frozen=True)
class _Substitute:
    variant: str
    split: str
    transform: RowTransform | None
    note: str


def _trace_substitute(task: str, variant: str, split: str) -> _Substitute | None:
    """The substitute SOURCES.md names for a missing TRACE file, if any."""
    if task == "MeetingBank" and variant in ("trace500", "trace5000") and split == "train":
        return _Substitute("reasoning", "train", strip_meetingbank_reasoning,
                           "376 rows of the reasoning variant with the reasoning stripped")
    if task in ("Py150", "ScienceQA", "20Minuten") and variant == "trace5000" and split == "train":
        return _Substitute("trace1000", "train", None, "the 1000-row training set")
    if variant == "reasoning" and split == "eval":
        return _Substitute("reasoning", "test", None, "reasoning eval.json is identical to test.json upstream")
    return None


def _resolve_root(root: str | Path | None) -> Path:
    if root is None:
        root = os.environ.get(ROOT_ENV)
        if not root:
            raise MissingDataError(f"no TRACE root given: pass root=<dir holding <Task>/<variant>/*.json> "
                                   f"or set the environment variable {ROOT_ENV}")
    path = Path(root)
    if not path.is_dir():
        raise MissingDataError(f"TRACE root {path} does not exist")
    return path


def read_trace_split(root: str | Path, task: str, variant: str, split: str, *,
                     substitute_missing: bool = True) -> list[Example]:
    """Rows of `<root>/<task>/<variant>/<split>.json`, using a documented substitute if it is missing."""
    if variant not in TRACE_VARIANTS:
        raise ValueError(f"unknown TRACE variant {variant!r}; valid: {', '.join(TRACE_VARIANTS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    root = Path(root)
    task_dir = root / task
    if not task_dir.is_dir():
        raise MissingDataError(f"TRACE task directory {task_dir} does not exist")
    path = task_dir / variant / f"{split}.json"
    if path.is_file():
        return read_trace_file(path)
    substitute = _trace_substitute(task, variant, split)
    present = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
    if substitute is None:
        where = f"directory {path.parent} does not exist" if not path.parent.is_dir() else f"{path} does not exist"
        hint = ""
        if split != "train" and variant != "trace500":
            hint = ' (evaluate on another variant with eval_variant="trace500", and drop_test_overlap=True)'
        raise MissingDataError(f"{where}; variants present for {task}: {present}{hint}")
    source = task_dir / substitute.variant / f"{substitute.split}.json"
    if not substitute_missing:
        raise MissingDataError(f"{path} does not exist; a substitute is available ({source}: {substitute.note}): "
                               "pass substitute_missing=True to use it")
    logger.warning("%s is missing; using %s instead (%s)", path, source, substitute.note)
    rows = read_trace_file(source)
    return substitute.transform(rows, source) if substitute.transform else rows


def trace_task(name: str, root: str | Path | None = None, variant: str = "trace500", *,
               eval_variant: str | None = None, substitute_missing: bool = True,
               drop_test_overlap: bool = False) -> Task:
    """A TRACE task read from `<root>/<name>/<variant>/{train,eval,test}.json`."""
    if name not in TRACE_TASKS:
        raise ValueError(f"unknown TRACE task {name!r}; valid: {', '.join(TRACE_TASKS)}")
    for v in (variant, eval_variant):
        if v is not None and v not in TRACE_VARIANTS:
            raise ValueError(f"unknown TRACE variant {v!r}; valid: {', '.join(TRACE_VARIANTS)}")
    root_path = _resolve_root(root)
    test_variant = eval_variant or variant

    def read(split: str) -> list[Example]:
        rows = read_trace_split(root_path, name, variant if split == "train" else test_variant, split,
                                substitute_missing=substitute_missing)
        if split == "train" and drop_test_overlap:
            test_prompts = {row["prompt"] for row in
                            read_trace_split(root_path, name, test_variant, "test",
                                             substitute_missing=substitute_missing)}
            kept = [row for row in rows if row["prompt"] not in test_prompts]
            if len(kept) < len(rows):
                logger.info("%s: dropped %d train rows whose prompt is in the test split", name, len(rows) - len(kept))
            if not kept:
                raise DataError(f"{root_path / name / variant}: every train row is also in the test split")
            rows = kept
        return rows

    reasoning = variant == "reasoning" or test_variant == "reasoning"
    return Task(
        name=name,
        metric=TRACE_METRICS[name],
        max_new_tokens=REASONING_MAX_NEW_TOKENS if reasoning else TRACE_MAX_NEW_TOKENS[name],
        read=read,
        description=f"TRACE {name} ({variant}{'' if test_variant == variant else f', eval on {test_variant}'})",
    )


def lima_task(root: str | Path | None = None, *, substitute_missing: bool = True) -> Task:
    """Lima, TRACE's replay set (`<root>/Lima/trace500`). Its eval/test answers are empty: train only is useful."""
    root_path = _resolve_root(root)

    def read(split: str) -> list[Example]:
        return read_trace_split(root_path, "Lima", "trace500", split, substitute_missing=substitute_missing)

    return Task(name="Lima", metric="rouge_l", max_new_tokens=LIMA_MAX_NEW_TOKENS, read=read,
                description="Lima (TRACE replay set); eval/test answers are empty upstream")


# -------------------------------------------------------------------------------------------------- MetaMath


def gsm8k_final_answer(response: str, source: str | Path, index: int) -> str:
    """The number after '#### ' in a GSM8K solution, thousands separators removed."""
    parts = response.split("#### ")
    if len(parts) < 2 or not parts[-1].strip():
        raise DataError(f"{source}: row {index}: response has no final answer after '#### '")
    return parts[-1].strip().replace(",", "")


def metamath_task(root: str | Path | None = None, *, train_file: str | Path | None = None,
                  hub_id: str | None = None, gsm8k_file: str | Path | None = None,
                  cache_dir: str | Path | None = None, train_subset: int | None = None, subset_seed: int = 0,
                  think_step_by_step: bool = True) -> Task:
    """MetaMathQA for training (Alpaca template) and GSM8K test for evaluation (metric `gsm8k`)."""
    if train_file is not None and hub_id is not None:
        raise ValueError("MetaMath: pass train_file= or hub_id=, not both")
    if train_subset is not None and train_subset <= 0:
        raise ValueError(f"MetaMath: train_subset must be positive, got {train_subset}")

    def read_train() -> list[Example]:
        if train_file is not None:
            rows = read_jsonl_rows(train_file, fields=("query", "response"))
        elif hub_id is not None:
            if cache_dir is None:
                logger.warning("downloading %s into the default Hugging Face datasets cache; pass cache_dir= "
                               "to choose where", hub_id)
            loaded = datasets.load_dataset(hub_id, split="train", cache_dir=None if cache_dir is None
                                           else str(cache_dir))
            rows = validate_rows(list(loaded), f"hub dataset {hub_id}", fields=("query", "response"))
        else:
            raise MissingDataError("MetaMath training data not configured: pass train_file=<.json or .jsonl with "
                                   "'query' and 'response'> or hub_id='meta-math/MetaMathQA' (downloads)")
        if train_subset is not None and train_subset < len(rows):
            rows = random.Random(subset_seed).sample(rows, train_subset)
        return [{"prompt": row["query"], "answer": row["response"]} for row in rows]

    def read_test() -> list[Example]:
        path = gsm8k_file
        if path is None:
            if root is None and not os.environ.get(ROOT_ENV):
                raise MissingDataError("GSM8K test file not configured: pass gsm8k_file=<GSM8K_test.jsonl> "
                                       f"or root= (or {ROOT_ENV}) holding MetaMathQA/eval_from_MetaMath_repo/")
            path = _resolve_root(root) / "MetaMathQA" / "eval_from_MetaMath_repo" / "GSM8K_test.jsonl"
        rows = read_jsonl_rows(path, fields=("query", "response"))
        return [{"prompt": row["query"], "answer": gsm8k_final_answer(row["response"], path, i)}
                for i, row in enumerate(rows)]

    def read(split: str) -> list[Example]:
        return read_train() if split == "train" else read_test()

    return Task(
        name="MetaMath",
        metric="gsm8k",
        max_new_tokens=GSM8K_MAX_NEW_TOKENS,
        read=read,
        prompt_template=ALPACA_TEMPLATE.replace("{query}", "{prompt}"),
        eval_prompt_template=(GSM8K_EVAL_TEMPLATE if think_step_by_step else ALPACA_TEMPLATE).replace(
            "{query}", "{prompt}"),
        description="MetaMathQA (train, Alpaca template); GSM8K test (eval and test)",
    )


# -------------------------------------------------------------------------------------------------- registry

_SYNTHETIC_NAME = re.compile(r"\Asynthetic/(old|round([1-9][0-9]*))\Z")


def list_tasks(num_synthetic_rounds: int = 4) -> list[str]:
    """Every task name `get_task` accepts (synthetic rounds up to `num_synthetic_rounds`)."""
    synthetic = ["synthetic/old"] + [f"synthetic/round{k}" for k in range(1, num_synthetic_rounds + 1)]
    return [*TRACE_TASKS, "Lima", "MetaMath", *synthetic]


def _call_with_options(factory: Callable[..., Task], name: str, positional: Sequence[Any],
                       options: Mapping[str, Any], valid: Sequence[str]) -> Task:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {name!r}; valid: {', '.join(valid)}")
    return factory(*positional, **options)


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`, built with `options` (see the module docstring for each family's options)."""
    if name in TRACE_TASKS:
        return _call_with_options(trace_task, name, [name], options,
                                  ["root", "variant", "eval_variant", "substitute_missing", "drop_test_overlap"])
    if name == "Lima":
        return _call_with_options(lima_task, name, [], options, ["root", "substitute_missing"])
    if name == "MetaMath":
        return _call_with_options(metamath_task, name, [], options,
                                  ["root", "train_file", "hub_id", "gsm8k_file", "cache_dir", "train_subset",
                                   "subset_seed", "think_step_by_step"])
    match = _SYNTHETIC_NAME.match(name)
    if match:
        from jaxcollab.data import synthetic

        valid = ["num_rounds", "seed", "facts_per_domain", "test_template"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for task {name!r}; valid: {', '.join(valid)}")
        tasks = synthetic.synthetic_tasks(**options)
        index = 0 if match.group(1) == "old" else int(match.group(2))
        if index >= len(tasks):
            raise ValueError(f"task {name!r} needs num_rounds >= {index} (got {len(tasks) - 1}); "
                             f"valid: {', '.join(t.name for t in tasks)}")
        return tasks[index]
    raise ValueError(f"unknown task {name!r}; valid: {', '.join(list_tasks())} (synthetic/roundK for any K "
                     "up to num_rounds)")
