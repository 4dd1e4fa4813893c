"""A training run in its own process, for the kill-and-resume tests in test_train.py (not a test module).

usage: python train_worker.py WORKDIR OUT.npz MODE [--sleep SECONDS] [--kill-at-save STEP]
MODE: fft or lora (LoRA with dropout, so the RNG matters too). Data come from a grain pipeline whose
iterator state is checkpointed. Prints "start step N" when training begins.
"""

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcollab import lora, model, train  # noqa: E402

MODEL = model.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2)


def lookup_examples(num: int = 32, seed: int = 0) -> list[dict]:
    """BOS key SEP v1 v2 v3: a small table of facts; the loss is on the values."""
    rng = np.random.RandomState(seed)
    values = rng.randint(30, 64, size=(num, 3))
    out = []
    for i in range(num):
        tokens = np.array([1, 3 + i % 27, 2, *values[i]], np.int32)
        mask = np.array([0, 0, 0, 1, 1, 1], np.float32)
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def batches(seed: int = 7):
    dataset = grain.MapDataset.source(lookup_examples()).shuffle(seed=seed).repeat(None).batch(8)
    return iter(dataset.to_iter_dataset())


def variables_and_mask(mode: str) -> tuple[dict, dict]:
    params = model.init_params(MODEL, jax.random.key(0))
    if mode == "fft":
        variables = {"params": params}
        return variables, train.full_finetune_mask(variables)
    adapter = lora.init(lora.LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=lora.ALL_TARGETS), MODEL,
                        params, jax.random.key(1))
    variables = {"params": params, "lora": adapter}
    return variables, train.lora_mask(variables)


def kill_when_saving(step: int) -> None:
    """SIGKILL this process after the checkpoint of `step` is written but before it is committed."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        final = str(self.get_final())
        if final.endswith(f"/{step}.orbax-checkpoint-tmp/state"):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


class Slow:
    def __init__(self, iterator, seconds: float):
        self.iterator, self.seconds = iterator, seconds

    def __next__(self):
        time.sleep(self.seconds)
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("out")
    parser.add_argument("mode", choices=["fft", "lora"])
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-at-save", type=int, default=None)
    args = parser.parse_args()
    if args.kill_at_save is not None:
        kill_when_saving(args.kill_at_save)
    variables, mask = variables_and_mask(args.mode)
    cfg = train.TrainConfig(learning_rate=3e-3, num_steps=12, checkpoint_every=4, log_every=2, progress=False,
                            keep_checkpoints=5)
    trainer = train.Trainer(MODEL, cfg, variables, mask, workdir=args.workdir)
    print(f"start step {trainer.step}", flush=True)
    data = batches()
    if args.sleep:
        data = Slow(data, args.sleep)
    out = trainer.fit(data)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]}
    np.savez(args.out, **flat)


if __name__ == "__main__":
    sys.exit(main())
