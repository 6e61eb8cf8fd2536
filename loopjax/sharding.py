"""Meshes, the logical-axis rule table, parameter / batch shardings, sharded creation and multi-process setup.

Typical use (the train step is traced inside ``use_rules`` so activations get their constraints)::

    mesh_cfg = lj.MeshConfig(data=2, fsdp=-1, rules="fsdp")
    mesh, rules = lj.make_mesh(mesh_cfg), rules_for(mesh_cfg.rules)
    model, opt = create_sharded(lambda: build(cfg, tx), mesh, rules)   # never on one device first
    tokens_BS = shard_batch(local_tokens_BS, mesh, rules)               # this process's rows only
    with use_rules(mesh, rules):
        state, metrics = train_step(state, tokens_BS)

Mesh axes: ``data`` (batch only), ``fsdp`` (batch and parameter shards), ``tensor`` (heads, MLP and vocab
dimensions). Parameters name their dimensions with ``logical_axes`` metadata (``layers.make_param``); the
table below maps those names, and the activation names used by ``with_logical_constraint``, onto mesh axes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from loopjax.config import MESH_AXES, SHARDING_PRESETS, MeshConfig
from loopjax.partitioning import (AxisNames, LogicalRules, active_rules, logical_to_spec, use_rules,
                                  with_logical_constraint)

__all__ = [
    "BATCH_AXES", "LogicalRules", "abstract_sharded", "active_rules", "batch_sharding", "create_sharded",
    "init_distributed", "logical_to_spec", "make_mesh", "param_shardings", "process_batch_rows", "rules_for",
    "shard_batch", "use_rules", "with_logical_constraint",
]

BATCH_AXES: AxisNames = ("activation_batch", "activation_length")

_DATA = ("data",)
_DATA_FSDP = ("data", "fsdp")
_T = ("tensor",)
# One row per logical name; columns are the presets "dp", "fsdp", "fsdp_tp".
_RULE_TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # parameters
    "vocab": ((), (), _T),
    "embed": ((), ("fsdp",), ("fsdp",)),
    "heads": ((), (), _T),
    "kv_heads": ((), (), _T),
    "head_dim": ((), (), ()),
    "mlp": ((), (), _T),
    "norm": ((), (), ()),
    # memory banks [slots, D]: FSDP over the slot axis (see BENCHMARKS.md, "Memory banks under FSDP")
    "memory_slots": ((), ("fsdp",), ("fsdp",)),
    "memory_embed": ((), (), ()),
    # activations and input batches
    "batch": (_DATA, _DATA_FSDP, _DATA_FSDP),
    "activation_batch": (_DATA, _DATA_FSDP, _DATA_FSDP),
    "activation_length": ((), (), ()),
    "activation_embed": ((), (), ()),
    "activation_heads": ((), (), _T),
    "activation_kv_heads": ((), (), _T),
    "activation_mlp": ((), (), _T),
    "activation_vocab": ((), (), _T),
    "activation_loop": ((), (), ()),
}


def rules_for(preset: str) -> LogicalRules:
    """The rule table of a preset: "dp", "fsdp" or "fsdp_tp" (see ``MeshConfig``)."""
    if preset not in SHARDING_PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {SHARDING_PRESETS}")
    col = SHARDING_PRESETS.index(preset)
    return LogicalRules(tuple((name, row[col]) for name, row in _RULE_TABLE.items()))


def _slice_grid(sizes: tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray | None:
    """A hybrid (ICI x DCN) device grid with slices along ``data`` when devices span several slices, else None."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    slices.discard(None)
    n = len(slices)
    if n <= 1:
        return None
    if sizes[0] % n:
        raise ValueError(f"data={sizes[0]}: must be a multiple of the {n} slices (slices are laid along 'data')")
    ici = (sizes[0] // n, sizes[1], sizes[2])
    return mesh_utils.create_hybrid_device_mesh(ici, (n, 1, 1), devices)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") over ``devices`` (default: all devices of all processes).

    Axis types are Auto (GSPMD propagation; ``with_sharding_constraint`` works inside jit). On several slices
    the device grid comes from ``mesh_utils.create_hybrid_device_mesh``, slices along ``data``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.axis_sizes(len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    grid = _slice_grid(sizes, devices)
    if grid is not None:
        return Mesh(grid, MESH_AXES, axis_types=types)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _sharding_for(path, leaf, mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    axes = leaf.get_metadata().get("logical_axes") if isinstance(leaf, nnx.Variable) else None
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    shape = tuple(leaf.shape)
    where = _path_str(path)
    if len(axes) != len(shape):
        raise ValueError(f"{where}: logical_axes={axes} names {len(axes)} dimensions but the array has shape {shape}")
    try:
        spec = logical_to_spec(tuple(axes), rules, mesh)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    for i, (dim, entry) in enumerate(zip(shape, spec)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
        if dim % size:
            raise ValueError(f"{where}: dimension {i} ({axes[i]!r}) of shape {shape} has size {dim}, not divisible "
                             f"by mesh axes {names} of total size {size}; change the model size, the mesh, or "
                             f"the rule for {axes[i]!r}")
    return NamedSharding(mesh, spec)


def param_shardings(tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a state (concrete or abstract) from each Variable's ``logical_axes`` metadata.

    ``tree``: an ``nnx.State``, a pytree of Variables, or a graph node (model, optimizer, tuple of them; its
    ``nnx.state`` is used). Returns the same structure with every Variable replaced by its NamedSharding, usable
    as jit ``in_shardings`` / ``out_shardings`` for that state. Variables without ``logical_axes`` (optimizer
    step counts, RNG keys) are replicated. Raises ValueError naming the parameter when a dimension is not
    divisible by its mesh axes or a rule names a mesh axis the mesh lacks.
    """
    if not isinstance(tree, nnx.State) and nnx.graph.is_graph_node(tree):
        tree = nnx.state(tree)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, v: _sharding_for(p, v, mesh, rules), tree, is_leaf=is_var)


def abstract_sharded(build_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any, Any]:
    """Shape-only build: (graphdef, abstract state of ``jax.ShapeDtypeStruct`` with shardings, shardings).

    The abstract state is what orbax restores into (restoring onto this mesh, whatever mesh saved it).
    """
    graphdef, abs_state = nnx.split(nnx.eval_shape(build_fn))
    shardings = param_shardings(abs_state, mesh, rules)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    target = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abs_state, shardings,
        is_leaf=is_var)
    return graphdef, target, shardings


def create_sharded(build_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules) -> Any:
    """Build ``build_fn()`` directly sharded on ``mesh``: shapes from ``nnx.eval_shape``, values from one jit
    with ``out_shardings``, so no array is ever materialised whole on one device.

    ``build_fn``: a no-argument function returning an NNX graph node, e.g.
    ``lambda: LoopedLM(cfg, rngs=nnx.Rngs(seed))`` or ``lambda: (model := LoopedLM(...), nnx.Optimizer(model,
    tx, wrt=nnx.Param))``. Returns the same object(s), every Variable holding a global jax.Array sharded by the
    rules (optimizer moments inherit their parameter's ``logical_axes``, so they shard alike). Values equal an
    eager ``build_fn()`` with the same seeds up to float rounding of the jitted initialisers. For jit shardings of the result use
    ``param_shardings(nnx.state(obj), mesh, rules)``; for checkpoint restore targets ``abstract_sharded``.
    """
    graphdef, _, shardings = abstract_sharded(build_fn, mesh, rules)
    state = jax.jit(lambda: nnx.split(build_fn())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of a [B, S] token batch: rows over the batch mesh axes, sequence replicated."""
    return NamedSharding(mesh, logical_to_spec(BATCH_AXES, rules, mesh))


def process_batch_rows(mesh: Mesh, rules: LogicalRules, global_batch: int) -> slice:
    """The rows [start, stop) of a global batch that this process's devices hold (what it must load)."""
    index_map = batch_sharding(mesh, rules).addressable_devices_indices_map((global_batch, 1))
    rows = sorted({(ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop)
                   for ix in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's rows {rows} are not one contiguous block; lay the batch mesh axes "
                         "so that each process holds consecutive rows")
    return slice(start, stop)


def shard_batch(local_BS: Any, mesh: Mesh, rules: LogicalRules) -> jax.Array:
    """A global [B, S] array from this process's rows (``process_batch_rows``), sharded by ``batch_sharding``.

    In a single process ``local_BS`` is the whole batch.
    """
    local_BS = np.asarray(local_BS)
    spec = tuple(batch_sharding(mesh, rules).spec)
    sharding = NamedSharding(mesh, PartitionSpec(*(spec + (None,) * local_BS.ndim)[:local_BS.ndim]))
    rows = spec[0] if isinstance(spec[0], tuple) else () if spec[0] is None else (spec[0],)
    n_shards = int(np.prod([mesh.shape[a] for a in rows], dtype=np.int64))
    # Rows are split into n_shards blocks; this process holds some of them (all of them when replicated).
    index_map = sharding.addressable_devices_indices_map((n_shards,) + (1,) * (local_BS.ndim - 1))
    local_shards = len({ix[0].start for ix in index_map.values()})
    global_shape = (local_BS.shape[0] * n_shards // local_shards,) + local_BS.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_BS, global_shape)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                     auto_detect: bool = False, initialization_timeout: int = 300) -> bool:
    """Start the multi-process JAX runtime once; returns True when running multi-process.

    Arguments left None come from the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``). With no coordinator and at most one process this is a single-process run and nothing
    is started, unless ``auto_detect`` asks JAX to detect a cluster (TPU pod, SLURM, Open MPI, ...). Calling it
    again is a no-op (it checks that the process count agrees). On CPU, collectives use gloo.
    Must run before anything touches a device.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        if num_processes is not None and num_processes != jax.process_count():
            raise ValueError(f"num_processes={num_processes}: the runtime is already initialized with "
                             f"{jax.process_count()} processes")
        return jax.process_count() > 1
    if coordinator_address is None and (num_processes or 1) <= 1 and not auto_detect:
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes and process_id "
                         "(arguments or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return jax.process_count() > 1
