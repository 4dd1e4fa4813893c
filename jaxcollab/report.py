"""results.json -> report.md and PNG plots: the strategies side by side, round by round.

    python -m jaxcollab.report runs/semi/results.json      # rewrites report.md and the plots beside it
    python -m jaxcollab.report --table A/results.json B/results.json   # final-round table(s), markdown

report.md has, for the setting, a table of strategies x (new, recent, old, OP, BWT) at the final round,
then each strategy's score matrix R (rows: the base and each round; columns: the tasks; plus the old-
knowledge score). Plots: `knowledge.png` (new, recent, old and OP per round, one line per strategy) and
`R_matrices.png` (a heatmap of each strategy's R).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from jaxcollab.atomic import atomic_file

MEASURES = (("new", "new"), ("recent", "recent"), ("old", "old"), ("op", "OP"), ("bwt", "BWT"))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _last(values: list) -> float | None:
    """The final round's value (`old` lists the base first, the others start at round 1)."""
    return values[-1] if values else None


def final_table(results: dict) -> list[str]:
    """Markdown rows: strategies x (new, recent, old, OP, BWT) at the final round, and seconds."""
    lines = ["| strategy | " + " | ".join(label for _, label in MEASURES) + " | seconds |",
             "|---" * (len(MEASURES) + 2) + "|"]
    for name, s in results["strategies"].items():
        cells = [_fmt(_last(s[key])) for key, _ in MEASURES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s.get('seconds', 0):.0f} |")
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
              "old: the old-knowledge suite; OP: mean over all tasks so far; BWT: mean change on earlier tasks",
              "since they were learned.", "", "## Score matrices R (rows: base, then after each round)", ""]
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
        for name, s in strategies.items():
            values = s[key][1:] if key == "old" else s[key]
            ys = [math.nan if v is None else v for v in values]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "--table":
        runs = [json.loads(Path(p).read_text()) for p in argv[2:]]
        print("\n".join(final_table(runs[0]) if len(runs) == 1 else seed_table(runs)))
        return 0
    if len(argv) != 2:
        print("usage: python -m jaxcollab.report RESULTS_JSON | --table RESULTS_JSON [RESULTS_JSON ...]",
              file=sys.stderr)
        return 2
    path = Path(argv[1])
    for written in write_report(json.loads(path.read_text()), path.parent):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
