"""Argument checks shared by the attention backends."""

from __future__ import annotations

import jax
import numpy as np


def check_window(sliding_window: int | None) -> None:
    """Raise unless `sliding_window` is None or a positive int."""
    if sliding_window is None:
        return
    is_int = isinstance(sliding_window, (int, np.integer)) and not isinstance(sliding_window, bool)
    if not is_int or sliding_window <= 0:
        raise ValueError(f"sliding_window={sliding_window!r}: must be None or an int >= 1")


def check_qkv(q_BSNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array) -> None:
    """Raise unless q, k, v have rank 4, matching batch/head dims and N % K == 0."""
    for name, x in (("q", q_BSNH), ("k", k_BTKH), ("v", v_BTKH)):
        if x.ndim != 4:
            raise ValueError(f"{name}.shape={x.shape}: must be rank 4 ([B, S, heads, H])")
    if k_BTKH.shape != v_BTKH.shape:
        raise ValueError(f"k.shape={k_BTKH.shape} and v.shape={v_BTKH.shape}: must be equal")
    (b, _, n, h), (bk, _, kh, hk) = q_BSNH.shape, k_BTKH.shape
    if b != bk or h != hk:
        raise ValueError(f"q.shape={q_BSNH.shape}, k.shape={k_BTKH.shape}: batch and head_dim must match")
    if n % kh:
        raise ValueError(f"q heads {n} and kv heads {kh}: q heads must be a multiple of kv heads")


def check_ids(name: str, ids: jax.Array | None, shape: tuple[int, int]) -> None:
    """Raise unless the integer id array `name` is None or has `shape`."""
    if ids is None:
        return
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name}.shape={tuple(ids.shape)}: must be {tuple(shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}.dtype={ids.dtype}: must be an integer dtype")


def check_segments(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   q_shape: tuple[int, int], kv_shape: tuple[int, int]) -> None:
    """Raise unless both segment id arrays are given with the right shapes, or neither."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        missing = "q_segment_ids" if q_segment_ids is None else "kv_segment_ids"
        raise ValueError(f"{missing}=None: give both q_segment_ids and kv_segment_ids, or neither")
    check_ids("q_segment_ids", q_segment_ids, q_shape)
    check_ids("kv_segment_ids", kv_segment_ids, kv_shape)


def check_inputs(q_BSNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, q_positions: jax.Array,
                 kv_positions: jax.Array, q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                 sliding_window: int | None,
                 position_names: tuple[str, str] = ("q_positions", "kv_positions")) -> None:
    """Every check of an attention call's arguments; ``position_names``: the caller's names of the two position
    arrays, used in the errors."""
    check_qkv(q_BSNH, k_BTKH, v_BTKH)
    check_window(sliding_window)
    (b, s), t = q_BSNH.shape[:2], k_BTKH.shape[1]
    check_ids(position_names[0], q_positions, (b, s))
    check_ids(position_names[1], kv_positions, (b, t))
    check_segments(q_segment_ids, kv_segment_ids, (b, s), (b, t))


def check_block(name: str, value: int) -> None:
    """Raise unless the tile size ``name`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive int")
