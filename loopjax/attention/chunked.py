"""Flash-style attention in pure JAX: online softmax over key blocks, blockwise recomputing backward.

Mask (identical in every backend): key t is visible to query s iff kv_pos[b,t] <= q_pos[b,s], and
q_pos[b,s] - kv_pos[b,t] < sliding_window when a window is given, and q_seg[b,s] == kv_seg[b,t] when
segment ids are given. A query with no visible key outputs zeros.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from loopjax.attention._checks import check_block, check_inputs

# Up to this many (query block, key block) pairs run as straight-line code (static slices, no loops), so that
# XLA:CPU can overlap the blocks' work; more pairs run as loops, whose program size does not grow with S.
UNROLL_MAX_PAIRS = 16

# Hides padded keys: no query position reaches it, and q_pos - _PAD_POS cannot overflow int32.
_PAD_POS = 2**30


def default_blocks(s: int, t: int) -> tuple[int, int]:
    """(block_q, block_k) for S queries and T keys, from benchmarks/attention.py on XLA:CPU: 128 up to 512
    (at most 16 block pairs, run as straight-line code; causal skipping then saves a quarter or more of the
    blocks), 256 up to 4096, 512 beyond."""
    bq = 128 if s <= 512 else 256 if s <= 4096 else 512
    bk = 128 if t <= 512 else 256 if t <= 4096 else 512
    return min(bq, _round_up(s, 8)), min(bk, _round_up(t, 8))


def chunked_attention(
    q_BSNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    q_positions_BS: jax.Array,
    kv_positions_BT: jax.Array,
    q_segment_ids_BS: jax.Array | None = None,
    kv_segment_ids_BT: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Masked softmax attention, memory O(S·block) in forward and backward.

    q_BSNH [B, S, N, H], k_BTKH / v_BTKH [B, T, K, H] with N % K == 0 (query head j reads kv head
    j // (N // K); k/v are never repeated), positions and segment ids int [B, S] / [B, T].
    Returns [B, S, N, H] in q's dtype. Scores and softmax run in float32; `scale` defaults to H**-0.5.
    `block_q` / `block_k` default to `default_blocks(S, T)`; S and T need not be multiples of them.
    Key blocks that no query of a query block can see (decided from per-block min/max of positions
    and segment ids, across the batch) are skipped. Up to ``UNROLL_MAX_PAIRS`` block pairs run as straight-line
    code, more as loops. Reverse mode only (custom_vjp; no jvp).
    """
    check_inputs(q_BSNH, k_BTKH, v_BTKH, q_positions_BS, kv_positions_BT, q_segment_ids_BS, kv_segment_ids_BT,
                 sliding_window, position_names=("q_positions_BS", "kv_positions_BT"))
    b, s, n, h = q_BSNH.shape
    t, kh = k_BTKH.shape[1], k_BTKH.shape[2]
    dbq, dbk = default_blocks(s, t)
    bq, bk = block_q or dbq, block_k or dbk
    check_block("block_q", bq)
    check_block("block_k", bk)
    scale = float(h**-0.5 if scale is None else scale)
    g = n // kh
    s_pad, t_pad = _round_up(s, bq), _round_up(t, bk)

    # Padded queries repeat the last position (their rows are sliced off); padded keys sit at _PAD_POS.
    qpos_BS = _pad_edge(q_positions_BS.astype(jnp.int32), s_pad)
    kpos_BT = jnp.pad(kv_positions_BT.astype(jnp.int32), ((0, 0), (0, t_pad - t)),
                      constant_values=_PAD_POS)
    has_seg = q_segment_ids_BS is not None
    if has_seg:
        qseg_BS = _pad_edge(q_segment_ids_BS.astype(jnp.int32), s_pad)
        kseg_BT = _pad_edge(kv_segment_ids_BT.astype(jnp.int32), t_pad)
    else:
        qseg_BS, kseg_BT = jnp.zeros((b, s_pad), jnp.int32), jnp.zeros((b, t_pad), jnp.int32)

    q_BKGSH = q_BSNH.reshape(b, s, kh, g, h).transpose(0, 2, 3, 1, 4)
    q_BKGSH = jnp.pad(q_BKGSH, ((0, 0),) * 3 + ((0, s_pad - s), (0, 0)))
    k_BKTH = jnp.pad(k_BTKH.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    v_BKTH = jnp.pad(v_BTKH.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    cfg = _Cfg(scale=scale, window=None if sliding_window is None else int(sliding_window), has_seg=has_seg, bq=bq,
               bk=bk, unroll_pairs=UNROLL_MAX_PAIRS)
    out_BKGSH = _flash(cfg, q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT)
    return out_BKGSH[:, :, :, :s].transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


class _Cfg(NamedTuple):
    """Static (hashable) settings of one call."""

    scale: float
    window: int | None
    has_seg: bool
    bq: int
    bk: int
    unroll_pairs: int


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_edge(x_BL: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x_BL, ((0, 0), (0, length - x_BL.shape[1])), mode="edge")


def _block_stats(x_BL: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block min and max over batch and block: two [L // block] arrays."""
    x_nBb = x_BL.reshape(x_BL.shape[0], -1, block).transpose(1, 0, 2).reshape(x_BL.shape[1] // block, -1)
    return x_nBb.min(-1), x_nBb.max(-1)


def _skip_table(cfg, qpos_BS, kpos_BT, qseg_BS, kseg_BT) -> jax.Array:
    """[nq, nk] bool: True where no query of block i can see any key of block j."""
    qmin, qmax = _block_stats(qpos_BS, cfg.bq)
    kmin, kmax = _block_stats(kpos_BT, cfg.bk)
    skip = kmin[None, :] > qmax[:, None]
    if cfg.window is not None:
        skip |= qmin[:, None] - kmax[None, :] >= cfg.window
    if cfg.has_seg:
        qsmin, qsmax = _block_stats(qseg_BS, cfg.bq)
        ksmin, ksmax = _block_stats(kseg_BT, cfg.bk)
        skip |= (ksmin[None, :] > qsmax[:, None]) | (ksmax[None, :] < qsmin[:, None])
    return skip


def _mask(cfg, qpos_Bq, kpos_Bk, qseg_Bq, kseg_Bk) -> jax.Array:
    """[B, 1, 1, bq, bk] visibility of one (query block, key block) pair."""
    qp, kp = qpos_Bq[:, :, None], kpos_Bk[:, None, :]
    vis = kp <= qp
    if cfg.window is not None:
        vis &= qp - kp < cfg.window
    if cfg.has_seg:
        vis &= qseg_Bq[:, :, None] == kseg_Bk[:, None, :]
    return vis[:, None, None]


def _scores(cfg, q_BKGqH, k_BKkH) -> jax.Array:
    """[B, K, G, bq, bk] float32 scaled scores; G and bq are merged into one matmul row dim."""
    b, kh, g, bq, h = q_BKGqH.shape
    s = jnp.einsum("bkrh,bkch->bkrc", q_BKGqH.reshape(b, kh, g * bq, h), k_BKkH,
                   preferred_element_type=jnp.float32)
    return (s * cfg.scale).reshape(b, kh, g, bq, -1)


def _slice(x, i, block, axis):
    return lax.dynamic_slice_in_dim(x, i * block, block, axis)


def _unrolled(cfg, nq: int, nk: int) -> bool:
    return nq * nk <= cfg.unroll_pairs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT):
    return _flash_fwd(cfg, q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT)[0]


def _fwd_block(cfg, q_i, qpos_i, qseg_i, k_j, v_j, kpos_j, kseg_j, carry):
    """One key block's online-softmax update of a query block's (running max, sum, accumulator)."""
    m_old, l_old, acc_old = carry
    vis = _mask(cfg, qpos_i, kpos_j, qseg_i, kseg_j)
    s_ = jnp.where(vis, _scores(cfg, q_i, k_j), -jnp.inf)
    m_new = jnp.maximum(m_old, s_.max(-1))
    # Rows with nothing visible yet keep m = -inf; exponentiate against 0 to get zeros.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s_ - m_safe[..., None])
    alpha = jnp.exp(m_old - m_safe)
    pv = jnp.einsum("bkgqc,bkch->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    return m_new, l_old * alpha + p.sum(-1), acc_old * alpha[..., None] + pv


def _fwd_finish(carry, dtype):
    """(output, log-sum-exp) of a query block from its final carry; a row that saw no key gets zeros / +inf."""
    m, l, acc = carry
    empty = l == 0.0
    out = (acc / jnp.where(empty, 1.0, l)[..., None]).astype(dtype)
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def _flash_fwd(cfg, q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT):
    b, kh, g, s, h = q_BKGSH.shape
    nq, nk = s // cfg.bq, k_BKTH.shape[2] // cfg.bk
    skip_QK = _skip_table(cfg, qpos_BS, kpos_BT, qseg_BS, kseg_BT)
    init = (jnp.full((b, kh, g, cfg.bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, cfg.bq), jnp.float32),
            jnp.zeros((b, kh, g, cfg.bq, h), jnp.float32))

    def q_slices(i):
        return _slice(q_BKGSH, i, cfg.bq, 3), _slice(qpos_BS, i, cfg.bq, 1), _slice(qseg_BS, i, cfg.bq, 1)

    def kv_slices(j):
        return (_slice(k_BKTH, j, cfg.bk, 2), _slice(v_BKTH, j, cfg.bk, 2), _slice(kpos_BT, j, cfg.bk, 1),
                _slice(kseg_BT, j, cfg.bk, 1))

    def update(i, j, q_blk, carry):
        compute = lambda c: _fwd_block(cfg, *q_blk, *kv_slices(j), c)  # noqa: E731
        return lax.cond(skip_QK[i, j], lambda c: c, compute, carry)

    if _unrolled(cfg, nq, nk):
        blocks = []
        for i in range(nq):
            q_blk, carry = q_slices(i), init
            for j in range(nk):
                carry = update(i, j, q_blk, carry)
            blocks.append(_fwd_finish(carry, q_BKGSH.dtype))
        out_BKGSH = jnp.concatenate([o for o, _ in blocks], axis=3)
        lse_BKGS = jnp.concatenate([x for _, x in blocks], axis=3)
    else:
        def q_block(i):
            q_blk = q_slices(i)
            return _fwd_finish(lax.fori_loop(0, nk, lambda j, c: update(i, j, q_blk, c), init), q_BKGSH.dtype)

        out_QBKGqH, lse_QBKGq = lax.map(q_block, jnp.arange(nq))
        out_BKGSH = out_QBKGqH.transpose(1, 2, 3, 0, 4, 5).reshape(b, kh, g, s, h)
        lse_BKGS = lse_QBKGq.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, s)
    res = (q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT, out_BKGSH, lse_BKGS)
    return out_BKGSH, res


def _bwd_block(cfg, q_i, do_i, lse_i, delta_i, qpos_i, qseg_i, k_j, v_j, kpos_j, kseg_j, dk, dv, dq_i):
    """One (query block, key block) pair's gradient contributions added to (dk_j, dv_j, dq_i)."""
    vis = _mask(cfg, qpos_i, kpos_j, qseg_i, kseg_j)
    p = jnp.where(vis, jnp.exp(_scores(cfg, q_i, k_j) - lse_i[..., None]), 0.0)
    dv = dv + jnp.einsum("bkgqc,bkgqh->bkch", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgqh,bkch->bkgqc", do_i, v_j, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_i[..., None]) * cfg.scale
    dk = dk + jnp.einsum("bkgqc,bkgqh->bkch", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
    dq_i = dq_i + jnp.einsum("bkgqc,bkch->bkgqh", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
    return dk, dv, dq_i


def _flash_bwd(cfg, res, dout_BKGSH):
    q_BKGSH, k_BKTH, v_BKTH, qpos_BS, kpos_BT, qseg_BS, kseg_BT, out_BKGSH, lse_BKGS = res
    b, kh, g, s, h = q_BKGSH.shape
    t = k_BKTH.shape[2]
    nq, nk = s // cfg.bq, t // cfg.bk
    skip_QK = _skip_table(cfg, qpos_BS, kpos_BT, qseg_BS, kseg_BT)
    delta_BKGS = jnp.einsum("bkgsh,bkgsh->bkgs", dout_BKGSH.astype(jnp.float32),
                            out_BKGSH.astype(jnp.float32))

    def q_slices(i):
        return (_slice(q_BKGSH, i, cfg.bq, 3), _slice(dout_BKGSH, i, cfg.bq, 3), _slice(lse_BKGS, i, cfg.bq, 3),
                _slice(delta_BKGS, i, cfg.bq, 3), _slice(qpos_BS, i, cfg.bq, 1), _slice(qseg_BS, i, cfg.bq, 1))

    def kv_slices(j):
        return (_slice(k_BKTH, j, cfg.bk, 2), _slice(v_BKTH, j, cfg.bk, 2), _slice(kpos_BT, j, cfg.bk, 1),
                _slice(kseg_BT, j, cfg.bk, 1))

    def update(i, j, kv_blk, dk, dv, dq_i):
        compute = lambda *c: _bwd_block(cfg, *q_slices(i), *kv_blk, *c)  # noqa: E731
        return lax.cond(skip_QK[i, j], lambda *c: c, compute, dk, dv, dq_i)

    zeros_k = jnp.zeros((b, kh, cfg.bk, h), jnp.float32)
    if _unrolled(cfg, nq, nk):
        dq = [jnp.zeros((b, kh, g, cfg.bq, h), jnp.float32)] * nq
        dk_blocks, dv_blocks = [], []
        for j in range(nk):
            kv_blk, dk, dv = kv_slices(j), zeros_k, zeros_k
            for i in range(nq):
                dk, dv, dq[i] = update(i, j, kv_blk, dk, dv, dq[i])
            dk_blocks.append(dk)
            dv_blocks.append(dv)
        dq_BKGSH = jnp.concatenate(dq, axis=3)
        dk_BKTH, dv_BKTH = jnp.concatenate(dk_blocks, axis=2), jnp.concatenate(dv_blocks, axis=2)
    else:
        def kv_block(dq_BKGSH, j):
            kv_blk = kv_slices(j)

            def q_step(i, carry):
                # Only the block of dq goes through the cond: a cond carrying all of it copies S·N·H floats.
                dk, dv, dq = carry
                dk, dv, dq_i = update(i, j, kv_blk, dk, dv, _slice(dq, i, cfg.bq, 3))
                return dk, dv, lax.dynamic_update_slice_in_dim(dq, dq_i, i * cfg.bq, 3)

            dk, dv, dq_BKGSH = lax.fori_loop(0, nq, q_step, (zeros_k, zeros_k, dq_BKGSH))
            return dq_BKGSH, (dk, dv)

        dq_BKGSH, (dk_JBKkH, dv_JBKkH) = lax.scan(
            kv_block, jnp.zeros(q_BKGSH.shape, jnp.float32), jnp.arange(nk))
        dk_BKTH = dk_JBKkH.transpose(1, 2, 0, 3, 4).reshape(b, kh, t, h)
        dv_BKTH = dv_JBKkH.transpose(1, 2, 0, 3, 4).reshape(b, kh, t, h)
    return (dq_BKGSH.astype(q_BKGSH.dtype), dk_BKTH.astype(k_BKTH.dtype),
            dv_BKTH.astype(v_BKTH.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
