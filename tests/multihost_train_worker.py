"""One process of the two-process training test in test_multihost.py (not a test module itself).

usage: python multihost_train_worker.py COORDINATOR PROCESS_ID WORKDIR OUT_DIR
Trains the tiny model of train_worker.py on a (data=2, fsdp=2) mesh spanning both processes, each process
feeding its half of every global batch, and checkpoints into WORKDIR.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxcollab import model, train  # noqa: E402
from jaxcollab.model import sharding  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_worker import MODEL, lookup_examples  # noqa: E402

STEPS = 6


def global_batches(num: int = STEPS) -> list[dict]:
    """The same global batches (8 rows) for every process and for the one-process reference."""
    examples = lookup_examples()
    rng = np.random.RandomState(3)
    out = []
    for _ in range(num):
        rows = rng.choice(len(examples), 8, replace=False)
        out.append({k: np.stack([examples[r][k] for r in rows]) for k in ("tokens", "loss_mask")})
    return out


def settings(log_every: int = 1) -> train.TrainConfig:
    return train.TrainConfig(learning_rate=3e-3, num_steps=STEPS, checkpoint_every=STEPS, log_every=log_every,
                             progress=False, keep_checkpoints=2)


def main(coordinator: str, process_id: int, workdir: str, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert sharding.maybe_initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = model.make_mesh(model.MeshConfig(data=2, fsdp=2, tensor=1))
    params = model.shard_params(MODEL, model.init_params(MODEL, jax.random.key(0)), mesh)
    variables = {"params": params}
    trainer = train.Trainer(MODEL, settings(), variables, train.full_finetune_mask(variables), workdir=workdir,
                            mesh=mesh)
    local = (({k: v[4 * process_id : 4 * process_id + 4] for k, v in b.items()}) for b in global_batches())
    out = trainer.fit(local)
    flat = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for p, x in jax.tree_util.tree_flatten_with_path(out)[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
