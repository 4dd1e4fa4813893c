"""Device mesh, logical-axis rules and shardings, and multi-host start-up.

Every parameter and activation of the model carries *logical* axis names ("embed", "mlp", "batch", ...).
`LOGICAL_RULES` maps them onto the three mesh axes:

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
- `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

Changing the parallelism layout means changing the rules or the mesh shape, never the model code.
A dimension that a mesh axis does not divide evenly is replicated over that axis instead of failing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

LOGICAL_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("exp", None),  # experts: replicated (no expert parallelism by default)
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) axes; one of them may be -1 for "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {self}: sizes must be positive or -1")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {self} needs {int(np.prod(sizes))} devices but {num_devices} are available")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
    config: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        unknown = set(config) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
        config = MeshConfig(**config)
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1x1x1 mesh: the unsharded case expressed in the same terms as the sharded one."""
    return make_mesh(MeshConfig(1, 1, 1), [device or jax.devices()[0]])


def logical_to_spec(
    logical: Sequence[str | None], rules: Rules = LOGICAL_RULES, shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array. With `shape` and `mesh`, an assignment whose mesh size
    does not divide the dimension is dropped (that dimension is replicated).
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(logical):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known axes: {sorted(table)}")
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_tuple = tuple(a for a in axes_tuple if a not in used)
        if mesh is not None:
            axes_tuple = tuple(a for a in axes_tuple if a in mesh.shape and mesh.shape[a] > 1)
        if shape is not None and mesh is not None and axes_tuple:
            size = int(np.prod([mesh.shape[a] for a in axes_tuple]))
            if shape[i] % size:
                logger.info("dimension %d of size %d is not divisible by mesh axes %s; replicating it",
                            i, shape[i], axes_tuple)
                axes_tuple = ()
        used.update(axes_tuple)
        out.append(None if not axes_tuple else axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of logical-axis tuples and a matching tree of shapes (or arrays)."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, rules, np.shape(x), mesh)),
        logical_tree,
        shape_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) dimension over data and fsdp; replicate the rest."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put a host batch (tree of arrays with the global batch first) onto the mesh.

    In a multi-process run every process passes only its own rows (its share of the global batch).
    """
    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        sharding = batch_sharding(mesh)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
    **kwargs: Any,
) -> bool:
    """Start JAX's multi-host runtime when asked, or when the environment describes a cluster.

    Asked: any argument given or `force`. Environment: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID`), a multi-host TPU slice (`TPU_WORKER_HOSTNAMES` with several hosts), or a SLURM
    / Open MPI job of several tasks; JAX detects the details of the last two itself.
    Returns True when the runtime was started by this call. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return False
    asked = force or any(v is not None for v in (coordinator_address, num_processes, process_id))
    env = os.environ
    if not asked:
        coordinator_address = next((env[k] for k in _CLUSTER_ENV if env.get(k)), None)
        if coordinator_address:
            num_processes = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
            process_id = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None
        multi_tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        multi_slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
        multi_mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        if not (coordinator_address or multi_tpu or multi_slurm or multi_mpi):
            return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )
    logger.info("jax.distributed started: process %d of %d, %d global devices",
                jax.process_index(), jax.process_count(), jax.device_count())
    return True
