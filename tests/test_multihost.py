"""A real two-process run (gloo collectives on 127.0.0.1): sharded load, forward and save across hosts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import rel_err, torch_logits
from safetensors.numpy import load_file

from jaxcollab import model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_load_forward_save(hf_llama, tmp_path):
    src, reference = hf_llama(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    coordinator = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen([sys.executable, str(worker), coordinator, str(i), str(src), str(tmp_path)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    result = np.load(tmp_path / "result.npz")
    assert result["tokens"].shape == (4, 16)
    assert rel_err(result["logits"], torch_logits(reference, result["tokens"])) <= 1e-5

    saved = tmp_path / "saved"
    original = load_file(src / "model.safetensors")
    exported = {}
    for f in saved.glob("*.safetensors"):
        exported.update(load_file(f))
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[k], v) for k, v in original.items())
    assert model.LlamaConfig.from_pretrained_dir(saved) == model.LlamaConfig.from_pretrained_dir(src)


def test_two_process_training_matches_one_process_and_its_checkpoint_restores_in_one(tmp_path):
    import json

    import jax
    from multihost_train_worker import MODEL, global_batches, settings

    from jaxcollab import train

    coordinator = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).with_name("multihost_train_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workdir = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, str(worker), coordinator, str(i), str(workdir), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    two_losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]

    # The same global batches in one process, on one device.
    from jaxcollab import model

    params = model.init_params(MODEL, jax.random.key(0))
    variables = {"params": params}
    one = train.Trainer(MODEL, settings(), variables, train.full_finetune_mask(variables), workdir=tmp_path / "one")
    one_params = one.fit(iter(global_batches()))
    one_losses = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(two_losses) == len(one_losses) == 6 and one_losses[-1] < one_losses[0]
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)

    # The checkpoint the two processes wrote restores in one process, with the parameters they ended with.
    restored = train.Trainer(MODEL, settings(), variables, train.full_finetune_mask(variables), workdir=workdir)
    assert restored.step == 6
    saved = np.load(tmp_path / "params.npz")
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(restored.variables())[0]}
    assert sorted(flat) == sorted(saved.files)
    for key, value in flat.items():
        assert np.array_equal(value, saved[key]), key
    for a, b in zip(jax.tree.leaves(restored.variables()), jax.tree.leaves(one_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
