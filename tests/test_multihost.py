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
