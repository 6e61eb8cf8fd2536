"""A static, preallocated KV cache across loop steps, and the writes that fill it.

Layout (as Ouro's ``UniversalTransformerCache``): the core cache has one slot per (loop step t, core layer l);
slot ``t * k + l`` holds the keys (after rotary) and values of step t, layer l, for every cached token. With
per-layer loops (``cfg.layer_loops`` N > 1) every iteration i of a core layer has a slot of its own: slot
``(t * k + l) * N + i`` (``slots_per_step`` = k·N slots per loop step, in (layer, iteration) order). The
prelude and the coda (layers run once per token) have one slot per layer. Shapes: N slots, B batch, C cache
length, K kv heads, H head dim. Each slot is its own array [B·K, C, H]: HF's [batch, kv heads, seq, head dim]
with (row, kv head) merged, row-major (``stacked`` gives the [N, B, K, C, H] view). So a decode step's
attention is a dot that reads the slot in place, one contiguous [C, H] block per (row, kv head). On XLA:CPU a
slot sliced out of one stacked [N, ...] array, or one whose (row, kv head) axes the dot has to merge, is copied
in full before every attention, at every layer and loop step.

What a slot holds for a token depends on the KV mode (``KV_MODES``):

* ``"per_step"``: every step has its own slots. A token that exited at step e (1-based) never computed steps
  e+1..T; its slots for those steps hold its step-e keys and values (its *deepest available* KV, the
  recurrent-depth rule), so later tokens' step t reads step min(t, e) of that position.
* ``"last_step"``: the core has only k slots, one per layer; slot l holds each token's deepest computed step
  (Ouro's decoding-time KV sharing: every step of a new token attends to past tokens' last-step KV, 1/T of
  the memory). Prefill computes the prompt's steps exactly and keeps only the last one.
* ``"compute_all"``: as ``"per_step"``, but every token runs all steps (the reference behaviour), so every
  slot holds the token's own KV of that step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from loopjax.config import LoopedConfig
from loopjax.layers import dtype
from loopjax.partitioning import with_logical_constraint

KV_MODES = ("per_step", "last_step", "compute_all")
# Logical axes of the cache arrays: sharded like activations (batch rows, kv heads) under ``use_rules``; a slot's
# first axis is (row, kv head) merged, so it takes both rules' mesh axes.
KV_AXES = (("activation_batch", "activation_kv_heads"), "activation_length", None)
ROW_AXES = ("activation_batch", "activation_length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys/values of every cached token, for every loop step and layer.

    core_k, core_v: N slots of [B·K, C, H]; N = n_loops * k ("per_step", "compute_all"; slot t*k + l) or k
      ("last_step"; slot l).
    prelude_k, prelude_v: n_prelude slots of [B·K, C, H]; coda_k, coda_v: n_coda slots.
    positions_BC: int32 rotary position of each entry; valid_BC: bool, entry written and not padding.
    next_pos_B: int32 position of each row's next token; length: int32 scalar, the next cache index to write
      (shared by all rows: prompts are left-padded).
    """

    core_k: tuple[jax.Array, ...]
    core_v: tuple[jax.Array, ...]
    prelude_k: tuple[jax.Array, ...]
    prelude_v: tuple[jax.Array, ...]
    coda_k: tuple[jax.Array, ...]
    coda_v: tuple[jax.Array, ...]
    positions_BC: jax.Array
    valid_BC: jax.Array
    next_pos_B: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        """C, the number of tokens the cache can hold."""
        return self.valid_BC.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the cache arrays."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def constrain(cache: KVCache) -> KVCache:
    """Shard the cache by the active logical rules (identity outside ``partitioning.use_rules``)."""
    def one(x):
        return with_logical_constraint(x, KV_AXES if x.ndim == 3 else ROW_AXES if x.ndim == 2 else (None,) * x.ndim)
    return jax.tree.map(one, cache)


def stacked(slots: tuple[jax.Array, ...], batch: int) -> jax.Array:
    """Slots [B·K, C, H] as one [N, B, K, C, H] array (Ouro's / HF's per-layer layout, stacked)."""
    return jnp.stack(slots).reshape(len(slots), batch, -1, *slots[0].shape[1:])


def slots_per_step(cfg: LoopedConfig) -> int:
    """Core cache slots of one loop step: one per (core layer, per-layer iteration)."""
    return cfg.n_layers * cfg.layer_loops


def core_slots(cfg: LoopedConfig, n_loops: int, kv_mode: str) -> int:
    """Number of core cache slots for a KV mode."""
    return slots_per_step(cfg) if kv_mode == "last_step" else n_loops * slots_per_step(cfg)


def init_cache(cfg: LoopedConfig, batch: int, capacity: int, *, n_loops: int, kv_mode: str) -> KVCache:
    """An empty cache (zeros, nothing valid) in the compute dtype."""
    kv_dt = dtype(cfg.compute_dtype)

    def zeros(n):
        return tuple(jnp.zeros((batch * cfg.kv_heads, capacity, cfg.d_head), kv_dt) for _ in range(n))

    n_core = core_slots(cfg, n_loops, kv_mode)
    return constrain(KVCache(core_k=zeros(n_core), core_v=zeros(n_core), prelude_k=zeros(cfg.n_prelude),
                             prelude_v=zeros(cfg.n_prelude), coda_k=zeros(cfg.n_coda), coda_v=zeros(cfg.n_coda),
                             positions_BC=jnp.zeros((batch, capacity), jnp.int32),
                             valid_BC=jnp.zeros((batch, capacity), bool),
                             next_pos_B=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32)))


def write_slot(c_XCH: jax.Array, start, kv_BSKH: jax.Array) -> jax.Array:
    """Write S new entries of every row into a slot [B·K, C, H] at cache index ``start``."""
    b, s, k, h = kv_BSKH.shape
    new = jnp.swapaxes(kv_BSKH, 1, 2).reshape(b * k, s, h).astype(c_XCH.dtype)
    return jax.lax.dynamic_update_slice(c_XCH, new, (0, start, 0))


def write_slot_rows(c_XCH: jax.Array, index, kv_B1KH: jax.Array, rows_B: jax.Array) -> jax.Array:
    """Write one new entry into a slot [B·K, C, H] at cache index ``index``, only for the rows where ``rows_B``."""
    b, _, k, h = kv_B1KH.shape
    old = jax.lax.dynamic_slice(c_XCH, (0, index, 0), (b * k, 1, h))
    new = jnp.where(jnp.repeat(rows_B, k)[:, None, None], kv_B1KH.reshape(b * k, 1, h).astype(old.dtype), old)
    return jax.lax.dynamic_update_slice(c_XCH, new, (0, index, 0))


def fill_skipped_steps(slots: tuple[jax.Array, ...], n_layers: int, index, deepest_B: jax.Array
                       ) -> tuple[jax.Array, ...]:
    """Per-step cache: at cache index ``index``, copy each row's deepest computed step into the steps it skipped.

    slots: the T * n_layers core slots [B·K, C, H] (slot t*k + l; with per-layer loops pass n_layers =
    ``slots_per_step``). deepest_B: the 1-based last step the row
    computed (0 leaves the row unchanged).
    """
    bk, _, h = slots[0].shape
    t_max = len(slots) // n_layers
    src_TB = jnp.minimum(jnp.arange(t_max)[:, None], jnp.maximum(deepest_B, 1)[None, :] - 1)
    src_TB = jnp.where(deepest_B[None, :] > 0, src_TB, jnp.arange(t_max)[:, None])
    src_TX = jnp.repeat(src_TB, bk // deepest_B.shape[0], axis=1)  # per (row, kv head)
    out = list(slots)
    for l in range(n_layers):
        col_TXH = jnp.stack([jax.lax.dynamic_slice(slots[t * n_layers + l], (0, index, 0), (bk, 1, h))[:, 0]
                             for t in range(t_max)])
        col_TXH = jnp.take_along_axis(col_TXH, src_TX[:, :, None], axis=0)
        for t in range(t_max):
            out[t * n_layers + l] = jax.lax.dynamic_update_slice(slots[t * n_layers + l], col_TXH[t][:, None],
                                                                 (0, index, 0))
    return tuple(out)
