"""The reference backend: plain einsum softmax attention over an explicit [B, S, T] visibility mask.

The numeric truth the kernels are tested against, and the one analysis uses when it needs the attention
probabilities themselves. Memory O(B·N·S·T). Shapes as in ``loopjax.attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_probs(q_BSNH: jax.Array, k_BTKH: jax.Array, visible_BST: jax.Array, scale: float) -> jax.Array:
    """Softmax probabilities [B, K, G, S, T], float32; query head j is (kv head j // G, group j % G).

    A query with no visible key gets all-zero probabilities.
    """
    b, s, n, h = q_BSNH.shape
    kv = k_BTKH.shape[2]
    q = q_BSNH.reshape(b, s, kv, n // kv, h)
    scores = jnp.einsum("bskgh,btkh->bkgst", q, k_BTKH, preferred_element_type=jnp.float32) * scale
    vis = visible_BST[:, None, None, :, :]
    probs = jax.nn.softmax(jnp.where(vis, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(jnp.any(vis, axis=-1, keepdims=True), probs, 0.0)


def reference_attention(q_BSNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, visible_BST: jax.Array,
                        scale: float) -> jax.Array:
    """Attention output [B, S, N, H] in v's dtype."""
    b, s, n, h = q_BSNH.shape
    probs = attention_probs(q_BSNH, k_BTKH, visible_BST, scale).astype(v_BTKH.dtype)
    return jnp.einsum("bkgst,btkh->bskgh", probs, v_BTKH).reshape(b, s, n, h)
