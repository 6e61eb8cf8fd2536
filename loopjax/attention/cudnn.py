"""cuDNN flash attention (GPU) through `jax.nn.dot_product_attention(implementation="cudnn")`.

Causal by token index (S == T, one document per row, positions 0..S-1): key t is visible to query s
iff t <= s and, with a window W, s - t < W. Segment ids (packed rows) are not supported here; the
dispatcher sends those calls to the chunked backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopjax.attention._checks import check_qkv, check_window

_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supported(head_dim: int, dtype: jnp.dtype) -> str | None:
    """Why cuDNN attention cannot run for this head dim and dtype here, or None when it can."""
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()!r}, cuDNN attention needs a GPU"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return f"dtype={jnp.dtype(dtype)}: cuDNN attention takes bfloat16 or float16 inputs"
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    h_max = 256 if float(capability) >= 9.0 else 128  # Hopper and later take head_dim up to 256
    if head_dim % 8 or head_dim > h_max:
        return f"head_dim={head_dim}: cuDNN needs a multiple of 8 that is <= {h_max} on sm_{capability}"
    return None


def cudnn_attention(
    q_BSNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) attention on cuDNN.

    q_BSNH [B, S, N, H], k_BTKH / v_BTKH [B, S, K, H] with N % K == 0 (grouped heads handled by
    cuDNN, k/v not repeated). Returns [B, S, N, H] in q's dtype. `scale` defaults to H**-0.5. Check
    `cudnn_supported(H, q.dtype)` first: cuDNN raises for other dtypes and head dims.
    """
    check_qkv(q_BSNH, k_BTKH, v_BTKH)
    check_window(sliding_window)
    s, t = q_BSNH.shape[1], k_BTKH.shape[1]
    if s != t:
        raise ValueError(f"seq_len={s} (q) and {t} (kv): cuDNN attention here is self-attention, S == T")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q_BSNH, k_BTKH, v_BTKH, scale=scale, is_causal=True,
                                        local_window_size=window, implementation="cudnn")
