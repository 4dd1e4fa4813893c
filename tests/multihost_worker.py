"""One process of the two-process test in test_multihost.py (not a test module itself).

usage: python multihost_worker.py COORDINATOR PROCESS_ID HF_DIR OUT_DIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxcollab import model  # noqa: E402
from jaxcollab.model import sharding  # noqa: E402


def main(coordinator: str, process_id: int, hf_dir: str, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert sharding.maybe_initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = model.make_mesh(model.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, params = model.load_hf(hf_dir, mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not q.is_fully_addressable and len(q.addressable_shards) == 4

    rng = np.random.RandomState(100 + process_id)  # each process brings its own rows
    local_tokens = rng.randint(0, cfg.vocab_size, size=(2, 16)).astype(np.int32)
    tokens = sharding.shard_batch(local_tokens, mesh)
    assert tokens.shape == (4, 16)
    logits = model.forward(cfg, params, tokens)
    all_tokens = multihost_utils.process_allgather(tokens, tiled=True)
    all_logits = multihost_utils.process_allgather(logits, tiled=True)
    model.save_hf(cfg, params, os.path.join(out_dir, "saved"))
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "result.npz"), tokens=all_tokens, logits=all_logits)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
