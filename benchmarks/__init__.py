"""Speed of jaxcollab measured side by side against named peers (transformers + PEFT, mergekit, raw reads).

`python benchmarks/run.py --suite=cpu` runs every benchmark of a suite and prints one `RESULT` line per
figure (see `benchmarks.common.Result`); RESULTS.md records the figures and what dominates the time.
"""
