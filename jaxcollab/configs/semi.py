"""Semi-collaborative setting: a round's data is gone after its round.

    python -m jaxcollab.launch --config=semi                       # embedded default
    python -m jaxcollab.launch --config=semi:tiny_trace --config.data.trace_root=/data/TRACE
    python -m jaxcollab.launch --config=semi:llama3_8b_trace \\
        --config.model.path=/models/Meta-Llama-3-8B --config.data.trace_root=/data/TRACE \\
        --config.data.metamath_file=/data/MetaMathQA-395K.json

Strategies: seq_fft, seq_lora, olora, avg_fft, avg_lora, ties_lora, dare_ties_lora, moe_gateless,
moe_noisy (default) and moe_router; pick some with --config.strategies=seq_lora,olora. Every key and its
meaning: jaxcollab/experiments/config.py.
"""

from jaxcollab.experiments.config import experiment_config


def get_config(variant=None):
    return experiment_config("semi", variant)
