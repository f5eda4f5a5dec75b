"""Device mesh, state and batch shardings, host batches to global arrays.

The mesh has two axes: ``data`` (pure data parallelism: parameters replicated) and ``fsdp``
(fully-sharded data parallelism: parameters, EMA and optimiser state split along their largest
divisible dimension, never the layer axis of stacked blocks; the batch is split over both axes).
Shardings are a function of the config and the abstract state, so a new axis (tensor
parallelism, say) is added here alone.

Multi-host: every process holds the rows of the global batch that belong to its devices;
``global_batch`` assembles them into one ``jax.Array`` without gathering.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    fsdp = int(mesh_cfg.fsdp)
    data = int(mesh_cfg.data)
    if fsdp < 1:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices; pick a divisor")
        data = num_devices // fsdp
    if data < 1 or data * fsdp > num_devices:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {num_devices} are available;"
            " set mesh.data=-1 to use all of them"
        )
    return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(mesh_cfg, len(devices))
    # Mesh built directly (not jax.make_mesh) so axes are Auto: XLA propagates shardings.
    grid = np.array(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_rows(a: jax.Array) -> jax.Array:
    """``a`` with its first axis (rows) held split over the batch axes, where the step is traced
    under this project's mesh (``jax.set_mesh``, as ``Experiment.compile_step`` does); ``a`` as it
    is otherwise (one device, a test calling a loss directly).

    For the network's inputs on a number of rows that the devices do not divide evenly (the
    shortcut teacher's guided rows appended to its batch): left unconstrained, XLA's partitioner
    may split such a call's activations over the fsdp axis by features and move them at every
    layer; split by rows (the last device's share padded) the call is partitioned as every other
    pass. Figures: docs/configs.md, row groups on a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != BATCH_AXES:
        return a
    return jax.lax.with_sharding_constraint(a, P(BATCH_AXES))


def _fsdp_spec(shape: tuple, fsdp: int, min_size: int, layer_axis: bool = False) -> P:
    """Shard the largest dimension divisible by the fsdp axis; small arrays stay replicated.

    ``layer_axis``: axis 0 stacks the layers of a scanned model (``model.scan_blocks``). It is
    never sharded: the scan reads one layer per iteration, and a layer split over devices would
    have each iteration's slice live on one device. The other axes are chosen, and ``min_size``
    applied, as for one layer's parameter, so every layer is split as the unrolled model splits it."""
    layer_shape = shape[1:] if layer_axis else shape
    if fsdp == 1 or math.prod(layer_shape) < min_size:
        return P()
    offset = 1 if layer_axis else 0
    for dim in sorted(range(len(layer_shape)), key=lambda d: -layer_shape[d]):
        if layer_shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim + offset] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(
    abstract_state, mesh: Mesh, *, min_fsdp_size: int = 2**14, layer_axis: Callable[[tuple], bool] = lambda path: False
):
    """Sharding of every leaf of an abstract train state (a tree of ShapeDtypeStructs).

    ``layer_axis(key_path)``: whether a leaf's axis 0 stacks layers (the model's rule,
    ``models.convert.in_stacked_blocks`` for the DiT; the layout is the model's business)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, _fsdp_spec(tuple(leaf.shape), fsdp, min_fsdp_size, layer_axis=layer_axis(path))
        ),
        abstract_state,
    )


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy rows -> global arrays sharded over the batch axes of ``mesh``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds in full -> a global array split by rows over the
    batch axes. Rows are padded with zeros to a multiple of the batch axes' size."""
    parts = math.prod(mesh.shape[a] for a in BATCH_AXES)
    pad = -x.shape[0] % parts
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process (gathered across hosts if needed)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
