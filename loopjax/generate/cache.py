"""A static, preallocated KV cache across loop steps, and the writes that fill it.

Layout (as Ouro's ``UniversalTransformerCache``): the core cache has one slot per (loop step t, core layer l);
slot ``t * k + l`` holds the keys (after rotary) and values of step t, layer l, for every cached token. The
prelude and the coda (layers run once per token) have one slot per layer. Shapes: N slots, B batch, C cache
length, K kv heads, H head dim. Arrays are [N, B, K, C, H] (HF's [batch, kv heads, seq, head dim] per slot), so
a decode step's attention reads each (row, kv head) block of one slot as a contiguous [C, H] matrix, with no
transposed copy.

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
# Logical axes of the cache arrays: sharded like activations (batch rows, kv heads) under ``use_rules``.
KV_AXES = (None, "activation_batch", "activation_kv_heads", "activation_length", None)
ROW_AXES = ("activation_batch", "activation_length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Preallocated keys/values of every cached token, for every loop step and layer.

    core_k, core_v: [N, B, K, C, H]; N = n_loops * k ("per_step", "compute_all"; slot t*k + l) or k
      ("last_step"; slot l).
    prelude_k, prelude_v: [n_prelude, B, K, C, H]; coda_k, coda_v: [n_coda, B, K, C, H].
    positions_BC: int32 rotary position of each entry; valid_BC: bool, entry written and not padding.
    next_pos_B: int32 position of each row's next token; length: int32 scalar, the next cache index to write
      (shared by all rows: prompts are left-padded).
    """

    core_k: jax.Array
    core_v: jax.Array
    prelude_k: jax.Array
    prelude_v: jax.Array
    coda_k: jax.Array
    coda_v: jax.Array
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
        return with_logical_constraint(x, KV_AXES if x.ndim == 5 else ROW_AXES if x.ndim == 2 else (None,) * x.ndim)
    return jax.tree.map(one, cache)


def core_slots(cfg: LoopedConfig, n_loops: int, kv_mode: str) -> int:
    """Number of core cache slots for a KV mode."""
    return cfg.n_layers if kv_mode == "last_step" else n_loops * cfg.n_layers


def init_cache(cfg: LoopedConfig, batch: int, capacity: int, *, n_loops: int, kv_mode: str) -> KVCache:
    """An empty cache (zeros, nothing valid) in the compute dtype."""
    kv_dt = dtype(cfg.compute_dtype)

    def zeros(n):
        return jnp.zeros((n, batch, cfg.kv_heads, capacity, cfg.d_head), kv_dt)

    n_core = core_slots(cfg, n_loops, kv_mode)
    return constrain(KVCache(core_k=zeros(n_core), core_v=zeros(n_core), prelude_k=zeros(cfg.n_prelude),
                             prelude_v=zeros(cfg.n_prelude), coda_k=zeros(cfg.n_coda), coda_v=zeros(cfg.n_coda),
                             positions_BC=jnp.zeros((batch, capacity), jnp.int32),
                             valid_BC=jnp.zeros((batch, capacity), bool),
                             next_pos_B=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32)))


def write_slot(c_NBKCH: jax.Array, slot, start, kv_BSKH: jax.Array) -> jax.Array:
    """Write S new entries of every row into one slot at cache index ``start``."""
    new = jnp.swapaxes(kv_BSKH, 1, 2)[None].astype(c_NBKCH.dtype)
    return jax.lax.dynamic_update_slice(c_NBKCH, new, (slot, 0, 0, start, 0))


def write_slot_rows(c_NBKCH: jax.Array, slot, index, kv_B1KH: jax.Array, rows_B: jax.Array) -> jax.Array:
    """Write one new entry into one slot at cache index ``index``, only for the rows where ``rows_B``."""
    _, b, k, _, h = c_NBKCH.shape
    old = jax.lax.dynamic_slice(c_NBKCH, (slot, 0, 0, index, 0), (1, b, k, 1, h))
    new = jnp.where(rows_B[None, :, None, None, None], jnp.swapaxes(kv_B1KH, 1, 2)[None].astype(old.dtype), old)
    return jax.lax.dynamic_update_slice(c_NBKCH, new, (slot, 0, 0, index, 0))


def fill_skipped_steps(c_NBKCH: jax.Array, n_layers: int, index, deepest_B: jax.Array) -> jax.Array:
    """Per-step cache: at cache index ``index``, copy each row's deepest computed step into the steps it skipped.

    deepest_B: the 1-based last step the row computed (0 leaves the row unchanged).
    """
    n, b, k, _, h = c_NBKCH.shape
    t_max = n // n_layers
    col = jax.lax.dynamic_slice(c_NBKCH, (0, 0, 0, index, 0), (n, b, k, 1, h)).reshape(t_max, n_layers, b, k, 1, h)
    src_TB = jnp.minimum(jnp.arange(t_max)[:, None], jnp.maximum(deepest_B, 1)[None, :] - 1)
    src_TB = jnp.where(deepest_B[None, :] > 0, src_TB, jnp.arange(t_max)[:, None])
    col = jnp.take_along_axis(col, src_TB[:, None, :, None, None, None], axis=0)
    return jax.lax.dynamic_update_slice(c_NBKCH, col.reshape(n, b, k, 1, h), (0, 0, 0, index, 0))
