"""TPU splash attention (Pallas) behind the loopjax mask semantics, optionally under shard_map.

Causality here is by token index (S == T, q and kv are the same sequence): key t is visible to query s
iff t <= s, s - t < sliding_window when a window is given, and q_seg[s] == kv_seg[t] when segment ids
are given. That equals the position-based mask of the other backends whenever positions increase by one
per token within a segment (packed rows restarting at 0 per document, or a full sequence 0..S-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec as P

from loopjax.attention._checks import check_qkv, check_segments, check_window

_BLOCK_CHOICES = (512, 256, 128)


def default_block_sizes(seq_len: int) -> splash.BlockSizes:
    """Forward and fused-backward tiles: the largest of 512, 256, 128 that divides `seq_len`."""
    if seq_len % 128:
        raise ValueError(f"seq_len={seq_len}: splash attention needs a multiple of 128")
    blk = next(b for b in _BLOCK_CHOICES if seq_len % b == 0)
    return splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                             block_kv_dkv=blk, block_kv_dkv_compute=blk, use_fused_bwd_kernel=True)


def splash_attention(
    q_BSNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    q_segment_ids_BS: jax.Array | None = None,
    kv_segment_ids_BT: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = (),
    head_axes: Sequence[str] = (),
) -> jax.Array:
    """Causal (optionally windowed, segment-masked) attention through the splash Pallas kernel.

    q_BSNH [B, S, N, H], k_BTKH / v_BTKH [B, S, K, H] with N % K == 0 (grouped heads are read by the
    kernel's index maps; k/v are not repeated), segment ids int [B, S]. Returns [B, S, N, H] in q's
    dtype. S must equal T and be a multiple of 128; tiles come from `default_block_sizes(S)`.
    `scale` (default H**-0.5) is applied to q before the kernel, in float32. With `mesh`, the kernel
    runs per shard under `jax.shard_map`: batch split over `batch_axes`, q and kv heads over
    `head_axes` (both head counts must divide), the rest replicated; mesh axes of type Auto (as
    `loopjax.sharding` builds them), or inputs already sharded that way under Explicit axes. `interpret=True` runs the kernel
    in the Pallas interpreter (CPU tests). Every query must see at least one key (true for causal
    self-attention with q_segment_ids == kv_segment_ids); the kernel leaves empty rows undefined.
    """
    check_qkv(q_BSNH, k_BTKH, v_BTKH)
    check_window(sliding_window)
    b, s, n, h = q_BSNH.shape
    t, kh = k_BTKH.shape[1], k_BTKH.shape[2]
    if s != t:
        raise ValueError(f"seq_len={s} (q) and {t} (kv): splash attention here is self-attention, S == T")
    if s % 128:
        raise ValueError(f"seq_len={s}: splash attention needs a multiple of 128; use chunked attention")
    check_segments(q_segment_ids_BS, kv_segment_ids_BT, (b, s), (b, t))
    scale = h**-0.5 if scale is None else scale
    q_BSNH = (q_BSNH.astype(jnp.float32) * scale).astype(q_BSNH.dtype)
    has_seg = q_segment_ids_BS is not None
    seg = (q_segment_ids_BS.astype(jnp.int32), kv_segment_ids_BT.astype(jnp.int32)) if has_seg else ()
    run = partial(_splash_local, sliding_window=sliding_window, interpret=interpret)
    if mesh is None:
        return run(q_BSNH, k_BTKH, v_BTKH, *seg)

    batch = tuple(batch_axes) or None
    heads = tuple(head_axes) or None
    head_shards = 1
    for ax in head_axes:
        head_shards *= mesh.shape[ax]
    if n % head_shards or kh % head_shards:
        raise ValueError(f"head_axes={tuple(head_axes)!r}: {head_shards} shards must divide q heads {n} "
                         f"and kv heads {kh}")
    qkv_spec = P(batch, None, heads, None)
    seg_spec = (P(batch, None),) * len(seg)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec,) * 3 + seg_spec, out_specs=qkv_spec,
                         check_vma=False)(q_BSNH, k_BTKH, v_BTKH, *seg)


def _splash_local(q_BSNH, k_BTKH, v_BTKH, *seg, sliding_window, interpret):
    """The kernel on local (per-shard) arrays; built for the local head count."""
    _, s, n, _ = q_BSNH.shape
    if sliding_window is None:
        head_mask = splash.CausalMask((s, s))
    else:
        head_mask = splash.LocalMask((s, s), window_size=(sliding_window - 1, 0), offset=0)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * n),
                                    block_sizes=default_block_sizes(s), head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    q_BNSH, k_BKSH, v_BKSH = (x.transpose(0, 2, 1, 3) for x in (q_BSNH, k_BTKH, v_BTKH))
    if seg:
        ids = splash.SegmentIds(q=seg[0], kv=seg[1])
        out_BNSH = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(q_BNSH, k_BKSH, v_BKSH, ids)
    else:
        out_BNSH = jax.vmap(kernel)(q_BNSH, k_BKSH, v_BKSH)
    return out_BNSH.transpose(0, 2, 1, 3).astype(q_BSNH.dtype)
