"""Model shapes of the suites, their jaxcollab and transformers configs, parameter and FLOP counts.

FLOPs per token of a training step (matmuls only; N_mm = parameters that multiply activations, i.e. every
linear layer and the LM head, not the embedding gather; A = L * T * H * hd, the attention width summed over
layers times the sequence length):

    forward                         2 N_mm + 2 A          (QK^T and AV, causal: half of 4 A)
    full fine-tuning                6 N_mm + 6 A          (forward, activation gradients, weight gradients)
    LoRA (frozen base)              4 N_mm + 6 N_lora + 6 A

The attention term counts the causal half; PaLM's convention (12 L d T for the whole step) counts the
masked half as well and gives a larger figure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The architecture of a random Llama made for a benchmark."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 500000.0
    llama3_rope: bool = False
    init_range: float = 0.02

    @property
    def max_positions(self) -> int:
        return 131072 if self.llama3_rope else 8192

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def describe(self) -> str:
        return (f"vocab={self.vocab} hidden={self.hidden} intermediate={self.intermediate} layers={self.layers} "
                f"heads={self.heads} kv_heads={self.kv_heads} head_dim={self.hd} params={self.num_params() / 1e6:.1f}M")

    # ------------------------------------------------------------------------------------------ counts
    def layer_matmul_params(self) -> int:
        d, f, hd = self.hidden, self.intermediate, self.hd
        return d * hd * (2 * self.heads + 2 * self.kv_heads) + 3 * d * f

    def matmul_params(self) -> int:
        return self.layers * self.layer_matmul_params() + self.hidden * self.vocab

    def num_params(self) -> int:
        return self.matmul_params() + self.vocab * self.hidden + self.layers * 2 * self.hidden + self.hidden

    def lora_params(self, rank: int) -> int:
        d, f, hd = self.hidden, self.intermediate, self.hd
        dims = {"q_proj": (d, self.heads * hd), "k_proj": (d, self.kv_heads * hd), "v_proj": (d, self.kv_heads * hd),
                "o_proj": (self.heads * hd, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
        return self.layers * rank * sum(i + o for i, o in dims.values())

    def train_flops_per_token(self, seq_len: int, lora_rank: int | None) -> float:
        attention = 6 * self.layers * seq_len * self.heads * self.hd
        if lora_rank is None:
            return 6 * self.matmul_params() + attention
        return 4 * self.matmul_params() + 6 * self.lora_params(lora_rank) + attention

    # ----------------------------------------------------------------------------------------- configs
    def jax_config(self, dtype: str = "float32", remat: str = "none", **runtime: Any):  # -> LlamaConfig
        from jaxcollab.model.config import LlamaConfig, RopeScaling

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=self.hd,
            rope_theta=self.rope_theta, rope_scaling=RopeScaling() if self.llama3_rope else None,
            max_position_embeddings=self.max_positions, dtype=dtype, param_dtype=dtype, remat_policy=remat, **runtime,
        )

    def hf_config(self, dtype: str = "float32"):  # -> transformers.LlamaConfig
        from transformers import LlamaConfig

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.llama3_rope:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hd, max_position_embeddings=self.max_positions, rope_parameters=rope, rms_norm_eps=1e-5,
            initializer_range=self.init_range, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, dtype=dtype,
        )


# A small Llama for CPU (about 56M parameters, 40M outside the embedding and head).
CPU_SMALL = ModelShape(vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4)
# Seconds-long shapes for tests.
TINY = ModelShape(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
# Llama 3 8B.
LLAMA3_8B = ModelShape(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                       llama3_rope=True)
# The Llama 3 8B layout scaled down so the gpu suite can be checked on a CPU.
LLAMA3_8B_REDUCED = ModelShape(vocab=1024, hidden=256, intermediate=896, layers=2, heads=4, kv_heads=1, head_dim=64,
                               llama3_rope=True)
