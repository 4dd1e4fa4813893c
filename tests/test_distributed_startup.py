"""When jaxcollab starts JAX's multi-host runtime: asked explicitly, or described by the environment."""

import jax
import pytest

from jaxcollab.model import sharding

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def test_single_host_environment_starts_nothing(calls, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.maybe_initialize_distributed() is False
    assert calls == []


def test_explicit_request(calls):
    assert sharding.maybe_initialize_distributed("10.0.0.1:1234", num_processes=4, process_id=3)
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_coordinator_from_environment(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert sharding.maybe_initialize_distributed()
    assert calls == [{"coordinator_address": "10.0.0.2:999", "num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("var,value", [("TPU_WORKER_HOSTNAMES", "t1,t2,t3,t4"), ("SLURM_NTASKS", "8"),
                                       ("OMPI_COMM_WORLD_SIZE", "2")])
def test_cluster_environments_let_jax_autodetect(calls, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert sharding.maybe_initialize_distributed()
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


def test_already_initialized_is_left_alone(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert sharding.maybe_initialize_distributed(force=True) is False
    assert calls == []
