"""Cached forward passes: ``prefill`` (the whole prompt, all loop steps) and ``decode_step`` (one token per row).

Both are pure functions of a merged ``LoopedLM`` (called inside ``jax.jit``) built from the model's own pieces:
``Attention.project`` / ``attend``, ``DecoderLayer.attn_residual`` / ``mlp_residual``, ``LoopedCore.inject`` /
``norm`` / ``gate``, ``LoopedLM.embed_tokens`` / ``head``, so cached decoding computes what ``LoopedLM.__call__``
computes. Shapes: B batch, S prompt length, C cache length, D d_model, V vocab, T loop steps.

Per-layer loops (``cfg.layer_loops`` N > 1): every token runs all N iterations of every core layer, in prefill and
in decoding (no per-layer early exit while decoding), each iteration's keys and values in a cache slot of its own
(``cache.slots_per_step``), so cached decoding computes the no-cache forward without ``layer_exit_threshold``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from loopjax.generate.cache import (KVCache, constrain, fill_skipped_steps, slots_per_step, write_slot,
                                    write_slot_rows)
from loopjax.halting import rule_fires
from loopjax.attention import TokenLayout, attend_cache_slot, visible_mask
from loopjax.layers import Attention, DecoderLayer, rope_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What a prefill or decode step returns besides the cache.

    logits_BV: float32 logits of each row's last token, read out at its exit step.
    exit_step_B: int32, the loop (1..T) whose state was read out (0 for rows that were not live).
    n_iterations: int32 scalar, loop iterations the batch executed.
    """

    logits_BV: jax.Array
    exit_step_B: jax.Array
    n_iterations: jax.Array


def _layer_chunk(layer: DecoderLayer, x_BSD, cos, sin, layout: TokenLayout, scale=None):
    """A decoder layer over a whole chunk attending to itself; also returns its k and v [B, S, K, H]."""
    q, k, v = layer.attn.project(layer.norm_in(x_BSD), cos, sin)
    x_BSD = layer.attn_residual(x_BSD, layer.attn.attend(q, k, v, layout), scale)
    return layer.mlp_residual(x_BSD, scale), k, v


def attend_cached(attn: Attention, q_B1NH: jax.Array, k_XCH: jax.Array, v_XCH: jax.Array, visible_BC: jax.Array,
                  own_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """``Attention.attend`` for one query per row over a cache slot (``attention.attend_cache_slot``), then the
    output projection: [B, 1, D]."""
    b, _, n, h = q_B1NH.shape
    out = attend_cache_slot(q_B1NH, k_XCH, v_XCH, visible_BC, own_kv)
    return out.reshape(b, 1, n * h) @ attn.wo[...].reshape(n * h, -1).astype(out.dtype)


def _layer_cached(layer: DecoderLayer, x_B1D, cos, sin, mask_BC, ck_XCH, cv_XCH, index, rows_B, scale=None):
    """A decoder layer for one new token per row: stores its KV at cache ``index`` of one slot (rows where
    ``rows_B``), then attends to that slot (entries where ``mask_BC``). Returns the new x and the updated slot."""
    q, k, v = layer.attn.project(layer.norm_in(x_B1D), cos, sin)
    ck_XCH, cv_XCH = write_slot_rows(ck_XCH, index, k, rows_B), write_slot_rows(cv_XCH, index, v, rows_B)
    x_B1D = layer.attn_residual(x_B1D, attend_cached(layer.attn, q, ck_XCH, cv_XCH, mask_BC), scale)
    return layer.mlp_residual(x_B1D, scale), ck_XCH, cv_XCH


def _layer_own_kv(layer: DecoderLayer, x_B1D, cos, sin, mask_BC, ck_XCH, cv_XCH, scale=None):
    """A decoder layer for one new token per row that leaves the slot untouched: attends to the slot's entries
    where ``mask_BC`` plus its own KV. Returns the new x and the token's k and v [B, 1, K, H] to write later."""
    q, k, v = layer.attn.project(layer.norm_in(x_B1D), cos, sin)
    x_B1D = layer.attn_residual(x_B1D, attend_cached(layer.attn, q, ck_XCH, cv_XCH, mask_BC, (k, v)), scale)
    return layer.mlp_residual(x_B1D, scale), k, v


def _core_layer(core, l: int, x_BSD: jax.Array, iteration) -> jax.Array:
    """Core layer ``l`` on ``x`` with all its per-layer iterations, unrolled: ``iteration(j, layer, h, scale)``
    runs one of them (j = l·N + i, its slot within a loop step; scale None without per-layer loops) and the
    layer's output is their expectation (``LayerLoop``), as ``LoopedCore.core_layer`` computes."""
    layer = core.layers[l]
    if core.layer_loops is None:
        return iteration(l, layer, core.inject_memory(x_BSD), None)
    loop = core.layer_loops[l]
    n, scales = loop.n_iterations, loop.scales()
    sums, h = loop.start(x_BSD), x_BSD
    for i in range(n):
        h = iteration(l * n + i, layer, core.inject_memory(h), scales[i])
        sums = loop.accumulate(sums, h, i)
    return loop.finish(sums, x_BSD.dtype)[0]


def _head(model, x_BD: jax.Array) -> jax.Array:
    """``LoopedLM.head``; a tied head contracts the embedding's D axis directly ([V, D] as stored), where
    ``head``'s ``embed.T`` makes XLA copy the whole transposed embedding at every decoded token."""
    if model.lm_head is not None:
        return model.head(x_BD)
    return jnp.einsum("bd,vd->bv", x_BD, model.embed[...].astype(x_BD.dtype), preferred_element_type=jnp.float32)


def _select(fires, open_, out_new, out_sel, exit_step, t):
    """Read out the state of tokens whose rule fires now; ``open_`` marks tokens not yet read out."""
    take = open_ & fires
    out_sel = jnp.where(take[..., None], out_new, out_sel)
    exit_step = jnp.where(take, t + 1, exit_step)
    return out_sel, exit_step, open_ & ~fires


def _core_slot(kv_mode: str, per_step: int, t, j: int):
    """Cache slot of layer-iteration j (of ``per_step``) at loop step t."""
    return j if kv_mode == "last_step" else t * per_step + j


def prefill(model, tokens_BS: jax.Array, mask_BS: jax.Array, cache: KVCache, *, n_loops: int, kv_mode: str,
            exit_rule: Any) -> tuple[KVCache, StepOutput]:
    """Run the prompt through every loop step, fill the cache from index 0, and read out the last token.

    tokens_BS, mask_BS: a left-padded prompt and its mask (1 = token); positions are cumsum(mask) − 1.
    Every prompt token runs all ``n_loops`` steps in every KV mode (exact KV for all steps); the exit rule
    only selects each token's read-out step, which feeds the coda and, for the last token, the logits.
    """
    cfg, core = model.cfg, model.core
    n_layers, per_step = cfg.n_layers, slots_per_step(cfg)
    s = tokens_BS.shape[1]
    mask_BS = mask_BS.astype(bool)
    pos_BS = jnp.maximum(jnp.cumsum(mask_BS, axis=1) - 1, 0).astype(jnp.int32)
    cos, sin, layout = model.rope_and_layout(pos_BS, mask_BS)  # padding: a segment of its own

    e = model.embed_tokens(tokens_BS)
    pk, pv = list(cache.prelude_k), list(cache.prelude_v)
    for i, layer in enumerate(model.prelude):
        e, k, v = _layer_chunk(layer, e, cos, sin, layout)
        pk[i], pv[i] = write_slot(pk[i], 0, k), write_slot(pv[i], 0, v)

    def step(carry, t):
        h, out_sel, open_, exit_step, gates = carry
        x = core.inject(h, e)
        kv = []

        def chunk(j, layer, x, scale):
            x, k, v = _layer_chunk(layer, x, cos, sin, layout, scale)
            kv.append((k, v))
            return x
        for l in range(n_layers):
            x = _core_layer(core, l, x, chunk)
        out = core.norm(x)
        new_h = out if cfg.step_norm else x
        if core.gate is not None:
            gates = gates.at[..., t].set(core.gate(out))
        fires = rule_fires(exit_rule, t, n_loops, gates, h, new_h)
        out_sel, exit_step, open_ = _select(fires, open_, out, out_sel, exit_step, t)
        return (new_h, out_sel, open_, exit_step, gates), kv

    h0 = core.initial_state(e)
    carry = (h0, jnp.zeros_like(h0), jnp.ones(tokens_BS.shape, bool), jnp.zeros(tokens_BS.shape, jnp.int32),
             jnp.zeros((*tokens_BS.shape, n_loops), jnp.float32))
    (_, out_sel, _, exit_BS, _), kv_T = jax.lax.scan(step, carry, jnp.arange(n_loops))
    ck, cv = list(cache.core_k), list(cache.core_v)
    for t in range(n_loops) if kv_mode != "last_step" else (n_loops - 1,):  # last_step keeps the last step only
        for j, (k_T, v_T) in enumerate(kv_T):
            slot = _core_slot(kv_mode, per_step, t, j)
            ck[slot], cv[slot] = write_slot(ck[slot], 0, k_T[t]), write_slot(cv[slot], 0, v_T[t])

    x = out_sel
    dk, dv = list(cache.coda_k), list(cache.coda_v)
    for i, layer in enumerate(model.coda):
        x, k, v = _layer_chunk(layer, x, cos, sin, layout)
        dk[i], dv[i] = write_slot(dk[i], 0, k), write_slot(dv[i], 0, v)
    x_last = x[:, -1]
    if model.coda_norm is not None:
        x_last = model.coda_norm(x_last)
    logits = model.head(x_last)

    cache = KVCache(core_k=tuple(ck), core_v=tuple(cv), prelude_k=tuple(pk), prelude_v=tuple(pv), coda_k=tuple(dk),
                    coda_v=tuple(dv), positions_BC=jax.lax.dynamic_update_slice(cache.positions_BC, pos_BS, (0, 0)),
                    valid_BC=jax.lax.dynamic_update_slice(cache.valid_BC, mask_BS, (0, 0)),
                    next_pos_B=pos_BS[:, -1] + 1, length=jnp.asarray(s, jnp.int32))
    return constrain(cache), StepOutput(logits_BV=logits, exit_step_B=exit_BS[:, -1],
                                        n_iterations=jnp.asarray(n_loops, jnp.int32))


def decode_step(model, cache: KVCache, tokens_B: jax.Array, live_B: jax.Array, *, n_loops: int, kv_mode: str,
                exit_rule: Any) -> tuple[KVCache, StepOutput]:
    """Append one token per row at cache index ``cache.length`` and read out its logits.

    live_B: rows still generating; the others write nothing to the cache (nor keep an adaptive loop running).
    The loop steps are unrolled, so every layer attends to its own cache slot in place (a slot picked by a
    traced step index is copied out of the cache first, at every layer and step). With an exit rule in
    "per_step" / "last_step" each step runs under a ``lax.cond`` only while some row still runs: a row stops
    computing once its rule fires and the steps after the last row's exit are skipped at no cost (the cache gets
    each row's deepest KV for the steps it skipped). In "compute_all", and with no rule, every step runs.
    """
    cfg, core = model.cfg, model.core
    n_layers, per_step = cfg.n_layers, slots_per_step(cfg)
    idx = cache.length
    pos_B1 = cache.next_pos_B[:, None]
    positions_BC = jax.lax.dynamic_update_slice(cache.positions_BC, pos_B1, (0, idx))
    valid_BC = jax.lax.dynamic_update_slice(cache.valid_BC, jnp.ones_like(pos_B1, bool), (0, idx))
    cos, sin = rope_cos_sin(pos_B1, cfg.d_head, cfg.rope_theta)
    mask_BC = visible_mask(pos_B1, positions_BC, sliding_window=cfg.sliding_window, kv_valid_BT=valid_BC)[:, 0]

    b = tokens_B.shape[0]
    every_row = jnp.ones((b,), bool)
    e = model.embed_tokens(tokens_B[:, None])
    pk, pv = list(cache.prelude_k), list(cache.prelude_v)
    for i, layer in enumerate(model.prelude):
        e, pk[i], pv[i] = _layer_cached(layer, e, cos, sin, mask_BC, pk[i], pv[i], idx, every_row)

    adaptive = exit_rule is not None and kv_mode != "compute_all"

    def run_step(t, state, layer_fn):
        """Loop step t (static: every layer names its slot, read in place); ``layer_fn(j, layer, x, scale)`` runs
        layer-iteration j of the step (``_core_layer``) and handles its cache slot."""
        h, out_sel, open_, exit_step, gates, n_iter = state
        x = core.inject(h, e)
        for l in range(n_layers):
            x = _core_layer(core, l, x, layer_fn)
        out = core.norm(x)
        new_h = out if cfg.step_norm else x
        if core.gate is not None:
            gates = gates.at[:, :, t].set(core.gate(out))
        fires = rule_fires(exit_rule, t, n_loops, gates, h, new_h)
        out_sel, exit_step, open_ = _select(fires, open_, out, out_sel, exit_step, t)
        return new_h, out_sel, open_, exit_step, gates, n_iter + 1

    h0 = core.initial_state(e)
    state = (h0, jnp.zeros_like(h0), live_B[:, None], jnp.zeros((b, 1), jnp.int32),
             jnp.zeros((b, 1, n_loops), jnp.float32), jnp.asarray(0, jnp.int32))
    ck, cv = list(cache.core_k), list(cache.core_v)
    # adaptive steps attend to the entries cached before this token plus its own KV (``_layer_own_kv``)
    mask_cached_BC = visible_mask(pos_B1, cache.positions_BC, sliding_window=cfg.sliding_window,
                                  kv_valid_BT=cache.valid_BC)[:, 0]
    no_kv = tuple((jnp.zeros((b, 1, cfg.kv_heads, cfg.d_head), ck[0].dtype),) * 2 for _ in range(per_step))
    for t in range(n_loops):
        slots_t = [_core_slot(kv_mode, per_step, t, j) for j in range(per_step)]
        if not adaptive:
            def write_and_attend(j, layer, x, scale, slots_t=slots_t):
                i = slots_t[j]
                x, ck[i], cv[i] = _layer_cached(layer, x, cos, sin, mask_BC, ck[i], cv[i], idx, live_B, scale)
                return x
            state = run_step(t, state, write_and_attend)
            continue

        # Under a cond that runs only while a row is left (so the loop stops at the first step no row runs).
        # The cond reads the slots and returns the new KV, written after it: the slots stay in place.
        def step_kv(state, t=t, slots_t=slots_t):
            new_kv = []

            def attend(j, layer, x, scale):
                x, k, v = _layer_own_kv(layer, x, cos, sin, mask_cached_BC, ck[slots_t[j]], cv[slots_t[j]], scale)
                new_kv.append((k, v))
                return x
            state = run_step(t, state, attend)
            return tuple(new_kv), state

        rows = state[2][:, 0]
        new_kv, state = jax.lax.cond(jnp.any(rows), step_kv, lambda st: (no_kv, st), state)
        for i, (k, v) in zip(slots_t, new_kv):
            ck[i], cv[i] = write_slot_rows(ck[i], idx, k, rows), write_slot_rows(cv[i], idx, v, rows)
    _, out_sel, _, exit_B1, _, n_iter = state
    if adaptive and kv_mode == "per_step":
        ck = fill_skipped_steps(tuple(ck), per_step, idx, exit_B1[:, 0])
        cv = fill_skipped_steps(tuple(cv), per_step, idx, exit_B1[:, 0])

    x = out_sel
    dk, dv = list(cache.coda_k), list(cache.coda_v)
    for i, layer in enumerate(model.coda):
        x, dk[i], dv[i] = _layer_cached(layer, x, cos, sin, mask_BC, dk[i], dv[i], idx, every_row)
    x = x[:, 0]
    if model.coda_norm is not None:
        x = model.coda_norm(x)
    logits = _head(model, x)

    cache = KVCache(core_k=tuple(ck), core_v=tuple(cv), prelude_k=tuple(pk), prelude_v=tuple(pv),
                    coda_k=tuple(dk), coda_v=tuple(dv), positions_BC=positions_BC, valid_BC=valid_BC,
                    next_pos_B=cache.next_pos_B + 1, length=idx + 1)
    return constrain(cache), StepOutput(logits_BV=logits, exit_step_B=exit_B1[:, 0], n_iterations=n_iter)
