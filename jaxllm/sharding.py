"""Device mesh and the rule table that maps logical parameter axes to mesh axes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "tensor")

# Logical axis -> mesh axis. Axes not listed are replicated.
DEFAULT_RULES: dict[str, str] = {"vocab": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self):
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")


def make_mesh(parallel: ParallelConfig, devices=None) -> Mesh:
    """A (data=1, tensor=tp) mesh over the first tp devices."""
    devices = list(devices if devices is not None else jax.devices())
    tp = parallel.tensor_parallel_size
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size={tp} but only {len(devices)} device(s) are visible")
    return Mesh(np.array(devices[:tp]).reshape(1, tp), MESH_AXES)


def check_divisible(config, parallel: ParallelConfig) -> None:
    """Tensor parallelism splits KV heads and MLP columns: both must divide evenly."""
    tp = parallel.tensor_parallel_size
    for name, value in (("num_key_value_heads", config.num_kv_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide {name}={value}")


def spec_for(axes: tuple, shape: tuple, mesh: Mesh, rules: dict[str, str] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array; an axis the mesh cannot split evenly stays replicated."""
    parts = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            mesh_axis = None
        parts.append(mesh_axis)
    return PartitionSpec(*parts)


def shardings_for(axes_tree, shapes_tree, mesh: Mesh, rules: dict[str, str] = DEFAULT_RULES):
    """NamedSharding for every leaf of a (logical axes, shapes) pair of pytrees."""
    is_axes = lambda x: isinstance(x, tuple)
    return jax.tree.map(
        lambda axes, shape: NamedSharding(mesh, spec_for(axes, shape, mesh, rules)),
        axes_tree, shapes_tree, is_leaf=is_axes,
    )


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [L, P, S, Hkv, hd] split over KV heads, like the attention weights."""
    return NamedSharding(mesh, PartitionSpec(None, None, None, "tensor", None))
