"""results.json -> report.md and PNG plots: the strategies side by side, round by round.

    python -m jaxcollab.report runs/semi/results.json      # rewrites report.md and the plots beside it
    python -m jaxcollab.report --table A/results.json B/results.json   # final-round table(s), markdown

report.md has, for the setting, a table of strategies x (new, recent, old, OP, BWT) at the final round
with 95% intervals where the run kept per-item scores, the weights' relative change from the base, whether
each round's task was learned (above the base and above always giving one fixed answer, the best on the
training rows, by paired intervals), then every old-knowledge measure (value and interval per round, and the
paired change from the base with its interval: "forgetting" when it lies below zero), the paper's
findings checked on this run (`jaxcollab.findings`), and each strategy's score matrix R (rows: the base
and each round; columns: the tasks; plus the old-knowledge score). Plots: `knowledge.png` (new, recent,
old and OP per round, one line per strategy) and `R_matrices.png` (a heatmap of each strategy's R).

    python -m jaxcollab.report --findings semi/results.json full/results.json   # the findings across runs
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from jaxcollab.atomic import atomic_file
from jaxcollab.evaluation.stats import mean_ci, proportion_ci
from jaxcollab.findings import check_findings, final_items, paired_difference

MEASURES = (("new", "new"), ("recent", "recent"), ("old", "old"), ("op", "OP"), ("bwt", "BWT"))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _last(values: list) -> float | None:
    """The final round's value (`old` lists the base first, the others start at round 1)."""
    return values[-1] if values else None


def items_ci(values: list[float] | None) -> tuple[float, float] | None:
    """95% interval of a mean of per-item scores: Wilson for 0/1 scores, Student t otherwise."""
    if not values or len(values) < 2:
        return None
    if all(v in (0.0, 1.0) for v in values):
        return proportion_ci(int(sum(values)), len(values))
    low, high = mean_ci(values)
    return None if math.isnan(low) else (low, high)


def _with_ci(value: float | None, ci: tuple[float, float] | list | None) -> str:
    if ci is None or value is None or any(c is None for c in ci):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def final_table(results: dict) -> list[str]:
    """Markdown rows: strategies x (new, recent, old, OP, BWT) at the final round with 95% intervals where
    per-item scores exist, the weights' relative change from the base, and seconds."""
    lines = ["| strategy | " + " | ".join(label for _, label in MEASURES) + " | ‖ΔW‖/‖W‖ | seconds |",
             "|---" * (len(MEASURES) + 3) + "|"]
    for name, s in results["strategies"].items():
        cells = []
        for key, _ in MEASURES:
            if key == "old":
                ci = (s.get("old_ci95") or [None])[-1]
            elif key in ("new", "recent", "op"):
                ci = items_ci(final_items(s, key))
            else:
                ci = None
            cells.append(_with_ci(_last(s[key]), ci))
        change = _last((s.get("weight_change") or {}).get("from_base") or [])
        cells.append("–" if change is None else f"{change:.2%}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s.get('seconds', 0):.0f} |")
    return lines


def old_knowledge_tables(results: dict) -> list[str]:
    """Per old-knowledge measure: each strategy's value [95% CI] per round, and its final paired change from
    the base [95% CI] with the verdict (forgetting when the interval lies below zero)."""
    names: list[str] = []
    for s in results["strategies"].values():
        names.extend(n for n in s.get("old_measures", {}) if n not in names)
    lines: list[str] = []
    for measure in names:
        rounds = max(len(s["old_measures"][measure]["value"]) for s in results["strategies"].values()
                     if measure in s.get("old_measures", {}))
        first = next(s["old_measures"][measure] for s in results["strategies"].values()
                     if measure in s.get("old_measures", {}))
        chance = first.get("chance")
        at_chance = chance is not None and not first["ci95"][0][0] > chance
        lines += [f"### {measure}", "",
                  f"{first['n']} items per model; chance {_fmt(chance)}." if chance is not None
                  else f"{first['n']} items per model; no chance level (higher is better).", ""]
        if at_chance:
            lines += ["**The base does not score above chance beyond its interval**: this measure cannot show what"
                      " the base knew, and a change from it is not evidence of forgetting.", ""]
        head = ["strategy", "base", *(f"round {j}" for j in range(1, rounds)), "change from base (final)",
                "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, s in results["strategies"].items():
            m = s.get("old_measures", {}).get(measure)
            if m is None:
                continue
            cells = [_with_ci(v, ci) for v, ci in zip(m["value"], m["ci95"], strict=True)]
            change_ci = m["change_ci95"][-1]
            verdict = ("forgetting" if m["forgetting"][-1] else
                       "gain" if change_ci is not None and change_ci[0] > 0 else "no change resolved")
            change = _with_ci(m["change"][-1], change_ci)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} | {verdict} |")
        lines.append("")
    return lines


def learning_table(results: dict) -> list[str]:
    """Markdown rows: whether each round's task was learned, i.e. the score on it right after its round above
    the base's and above the constant answer's (`Runner.constant_answer`), each by a paired interval."""
    constant = results.get("constant_answer") or []
    if not constant:
        return []
    lines = ["| strategy | round | task | score | − base [95% CI] | − constant answer [95% CI] | verdict |",
             "|---" * 7 + "|"]
    for name, s in results["strategies"].items():
        items = s.get("R_items") or []
        for j in range(1, len(s["R"])):
            own = items[j][j - 1] if j < len(items) else None
            base = items[0][j - 1] if items else None
            against_base = paired_difference(own, base)
            against_constant = paired_difference(own, constant[j - 1]["items"])
            cells = [_with_ci(*d) if d else "–" for d in (against_base, against_constant)]
            if against_base is None or against_constant is None:
                verdict = "no per-item scores"
            elif not against_base[1][0] > 0:
                verdict = "not above the base"
            elif not against_constant[1][0] > 0:
                verdict = f"no better than always answering {constant[j - 1]['answer']!r}"
            else:
                verdict = "learned"
            lines.append(f"| {name} | {j} | {constant[j - 1]['task']} | {_fmt(s['R'][j][j - 1])} | "
                         + " | ".join(cells) + f" | {verdict} |")
    return lines


def findings_lines(runs: list[dict]) -> list[str]:
    """The paper's findings checked on `runs`: one row per comparison (`jaxcollab.findings`)."""
    comparisons = check_findings(runs)
    if not comparisons:
        return ["No comparison of the paper's findings is possible with these strategies."]
    lines = ["| finding | comparison | measure | difference [95% CI] | items | verdict |", "|---" * 6 + "|"]
    for c in comparisons:
        lines.append(f"| {c.finding}. {c.claim} | {c.better} − {c.worse} | {c.measure} | "
                     f"{_with_ci(c.difference, c.ci95)} | {c.n} | {c.verdict} |")
    return lines


def seed_table(runs: list[dict], measures: tuple[str, ...] = ("new", "old", "op")) -> list[str]:
    """Markdown rows comparing runs (e.g. seeds) at the final round: each measure per run, and the spread."""
    labels = [f"seed {r['config'].get('seed', i)}" for i, r in enumerate(runs)]
    head = ["strategy"]
    for key in measures:
        head += [f"{dict(MEASURES)[key]} ({label})" for label in labels] + [f"{dict(MEASURES)[key]} spread"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in runs[0]["strategies"]:
        cells = [name]
        for key in measures:
            values = [_last(r["strategies"][name][key]) for r in runs]
            cells += [_fmt(v) for v in values]
            known = [v for v in values if v is not None]
            cells.append(_fmt(max(known) - min(known)) if len(known) == len(values) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    setting = results["setting"]
    tasks = results["tasks"]
    title = {"semi": "Semi-collaborative", "full": "Fully-collaborative"}.get(setting, setting)
    lines = [f"# {title} setting: {len(tasks)} rounds", ""]
    lines.append(f"Tasks in order: {', '.join(tasks)}. Old knowledge: "
                 f"{', '.join(results.get('old_knowledge') or ['not measured'])}.")
    lines += ["", "## At the final round", "", *final_table(results)]
    lines += ["", "new: score on the round's own task right after it; recent: mean on the earlier rounds' tasks;",
              "old: the old-knowledge suite (its first measure); OP: mean over all tasks so far; BWT: mean change",
              "on earlier tasks since they were learned. Brackets: 95% intervals over the items (Wilson for 0/1",
              "scores, Student t otherwise; OP pools the items of every task). ‖ΔW‖/‖W‖: how far the weights moved",
              "from the base (all parameters, Frobenius norms; – for mixtures of experts).", ""]
    learning = learning_table(results)
    if learning:
        answers = ", ".join(f"{c['task']}: {c['answer']!r} scores {_fmt(c['score'])}"
                            for c in results["constant_answer"])
        lines += ["## Was each round's task learned?", "",
                  "The score on a round's task right after the round, against the base's and against answering",
                  f"every question with one fixed answer, the best on the training rows ({answers}); paired",
                  "intervals over the same rows. A model no better than the constant answer learned the task's",
                  "answer prior, not the task.", "", *learning, ""]
    old_tables = old_knowledge_tables(results)
    if old_tables:
        lines += ["## Old knowledge", "", "Change from base: the mean per-item difference from the base on the same",
                  "items, with its paired t interval.", "", *old_tables]
    lines += ["## The paper's findings on this run", "", *findings_lines([results]), ""]
    lines += ["## Score matrices R (rows: base, then after each round)", ""]
    for name, s in results["strategies"].items():
        lines += [f"### {name}", "", "| model | " + " | ".join(tasks) + " | old |", "|---" * (len(tasks) + 2) + "|"]
        for j, row in enumerate(s["R"]):
            label = "base" if j == 0 else f"round {j}"
            old = s["old"][j] if j < len(s["old"]) else None
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(old)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strategies = results["strategies"]
    written = []
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), constrained_layout=True)
    for ax, (key, label) in zip(axes, MEASURES[:4], strict=True):
        shown = []
        for name, s in strategies.items():
            values = s[key][1:] if key == "old" else s[key]
            ys = [math.nan if v is None else v for v in values]
            shown += [y for y in ys if not math.isnan(y)]
            line, = ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
            if key == "old" and s.get("old_ci95"):
                low = [math.nan if c is None else c[0] for c in s["old_ci95"][1:]]
                high = [math.nan if c is None else c[1] for c in s["old_ci95"][1:]]
                ax.fill_between(range(1, len(low) + 1), low, high, color=line.get_color(), alpha=0.1)
        ax.set_title(label + (f" ({results['old_knowledge'][0]})" if key == "old" and results.get("old_knowledge")
                              else ""))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if all(0.0 <= y <= 1.0 for y in shown):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    written.append(_save(fig, out_dir / "knowledge.png"))
    plt.close(fig)

    n = len(strategies)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False, constrained_layout=True)
    for ax, (name, s) in zip(axes.flat, strategies.items(), strict=False):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in s["R"]], dtype=float)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name)
        ax.set_xticks(range(matrix.shape[1]), [t.split("/")[-1] for t in results["tasks"]], rotation=45,
                      fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), ["base"] + [f"r{j}" for j in range(1, matrix.shape[0])], fontsize=7)
        for (r, c), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.5 else "black")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    written.append(_save(fig, out_dir / "R_matrices.png"))
    plt.close(fig)
    return written


def _save(fig: object, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write report.md and the plots into `out_dir`; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    with atomic_file(report) as tmp:
        tmp.write_text(markdown(results))
    return [report, *plots(results, out_dir)]


USAGE = ("usage: python -m jaxcollab.report RESULTS_JSON | --table RESULTS_JSON [RESULTS_JSON ...]"
         " | --findings RESULTS_JSON [RESULTS_JSON ...]")


def _read_results(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (a results.json that jaxcollab.launch wrote)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if len(argv) >= 3 and argv[1] == "--findings":
            print("\n".join(findings_lines([_read_results(p) for p in argv[2:]])))
            return 0
        if len(argv) >= 3 and argv[1] == "--table":
            runs = [_read_results(p) for p in argv[2:]]
            print("\n".join(final_table(runs[0]) if len(runs) == 1 else seed_table(runs)))
            return 0
        if len(argv) != 2 or argv[1].startswith("-"):
            print(USAGE, file=sys.stderr)
            return 2
        results = _read_results(argv[1])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for written in write_report(results, Path(argv[1]).parent):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
