"""Logical axis names → mesh axes, and activation sharding constraints that layers can call.

This module sits low in the import order (it needs only jax) so that ``layers``, ``looped`` and ``model`` can
mark their activations with logical names. The rule presets, meshes and parameter shardings live in
``sharding.py``, which builds on this.

A rule table maps each logical name (``"embed"``, ``"activation_batch"``, ...) to a tuple of mesh axes (possibly
empty = replicated). ``with_logical_constraint`` is a no-op unless a ``use_rules(mesh, rules)`` context is active,
so the model runs un-sharded everywhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AxisNames = tuple[str | tuple[str, ...] | None, ...]  # per dimension; a tuple names dimensions merged, major first

ACTIVATION_BSD: AxisNames = ("activation_batch", "activation_length", "activation_embed")
LOGITS_BSV: AxisNames = ("activation_batch", "activation_length", "activation_vocab")
LOGITS_TBSV: AxisNames = (None, *LOGITS_BSV)  # per-loop logits: the loop axis is never sharded


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """A logical-axis rule table: ``table`` is ``((logical_name, (mesh_axis, ...)), ...)``.

    A logical name that is not in the table, or ``None``, is replicated. Build one with ``LogicalRules.of``::

        LogicalRules.of(batch=("data", "fsdp"), embed="fsdp", mlp="tensor", norm=None)
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        seen = set()
        for entry in self.table:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], tuple) or not all(isinstance(a, str) for a in entry[1])):
                raise ValueError(f"table entry {entry!r}: must be (logical_name: str, (mesh_axis: str, ...))")
            if entry[0] in seen:
                raise ValueError(f"table: logical name {entry[0]!r} appears twice")
            seen.add(entry[0])

    @classmethod
    def of(cls, **rules: str | Sequence[str] | None) -> LogicalRules:
        """Rules from keywords; a value is a mesh axis name, a sequence of them, or None (replicated)."""
        def norm(v):
            return () if v is None else (v,) if isinstance(v, str) else tuple(v)
        return cls(tuple((k, norm(v)) for k, v in rules.items()))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes a logical name maps to (empty when replicated or unknown)."""
        if logical is None:
            return ()
        return dict(self.table).get(logical, ())

    def replace(self, **rules: str | Sequence[str] | None) -> LogicalRules:
        """A copy with some logical names remapped (or added)."""
        merged = dict(self.table)
        merged.update(LogicalRules.of(**rules).table)
        return LogicalRules(tuple(merged.items()))


def logical_to_spec(axes: AxisNames, rules: LogicalRules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical names ``axes``.

    A dimension named by a tuple of logical names (several dimensions merged into one, major first, e.g. a KV
    cache's (batch, kv heads)) is sharded over all their mesh axes, in that order.

    Raises ValueError when a mesh axis would be used by two dimensions, or (given ``mesh``) when a rule names a
    mesh axis the mesh does not have. Mesh axes of size 1 are kept: they shard nothing but keep specs stable.
    """
    used: dict[str, str | None] = {}
    spec = []
    for name in axes:
        names = name if isinstance(name, tuple) else (name,)  # a tuple: merged dimensions, major first
        mesh_axes = tuple(ax for n in names for ax in rules.mesh_axes(n))
        for ax in mesh_axes:
            if mesh is not None and ax not in mesh.axis_names:
                raise ValueError(f"logical axis {name!r} maps to mesh axis {ax!r}, which the mesh does not have "
                                 f"(mesh axes: {tuple(mesh.axis_names)}); fix the rule or the mesh")
            if ax in used:
                raise ValueError(f"logical axes {used[ax]!r} and {name!r} of {axes} both map to mesh axis {ax!r}; "
                                 "a mesh axis can shard only one dimension of an array")
            used[ax] = name
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


class _Active(threading.local):
    mesh: Mesh | None = None
    rules: LogicalRules | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Make ``with_logical_constraint`` constrain activations onto ``mesh`` with ``rules`` while tracing.

    The context is read at trace time: jit (trace) the step inside it. A function traced outside it has no
    activation constraints (same results, GSPMD propagation only).
    """
    prev = (_ACTIVE.mesh, _ACTIVE.rules)
    _ACTIVE.mesh, _ACTIVE.rules = mesh, rules
    try:
        yield
    finally:
        _ACTIVE.mesh, _ACTIVE.rules = prev


def active_rules() -> tuple[Mesh | None, LogicalRules | None]:
    """The (mesh, rules) of the innermost ``use_rules`` context, or (None, None)."""
    return _ACTIVE.mesh, _ACTIVE.rules


def with_logical_constraint(x: jax.Array, axes: AxisNames) -> jax.Array:
    """Constrain activation ``x`` (dimensions named by ``axes``) to the active rules; identity without a context.

    A mesh axis that does not divide its dimension is dropped for that call (e.g. batch 1 while decoding on a
    data-parallel mesh): activation constraints are layout hints, unlike parameter shardings, which must divide.
    """
    mesh, rules = active_rules()
    if mesh is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"axes={axes}: must name each of the {x.ndim} dimensions of an array of shape {x.shape}")
    spec = logical_to_spec(axes, rules, mesh)
    fitted = []
    for dim, entry in zip(x.shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for ax in names:
            if dim % (size * mesh.shape[ax]) == 0:
                kept.append(ax)
                size *= mesh.shape[ax]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fitted)))
