"""Fully-collaborative setting: every dataset stays available.

    python -m jaxcollab.launch --config=full                       # embedded default
    python -m jaxcollab.launch --config=full:llama3_8b_trace --config.model.path=... \\
        --config.data.trace_root=... --config.data.metamath_file=...

Strategies: joint_fft, joint_lora, replay_fft, replay_lora (replay weight --config.replay.w_hist, 0.1 by
default). Every key and its meaning: jaxcollab/experiments/config.py.
"""

from jaxcollab.experiments.config import experiment_config


def get_config(variant=None):
    return experiment_config("full", variant)
