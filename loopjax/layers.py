"""Transformer building blocks: RMSNorm, rotary embedding, GQA attention, SwiGLU MLP, decoder layer.

Shapes: B batch, S query positions, T key positions, D d_model, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, F d_ff. Every parameter carries ``logical_axes`` metadata that
``sharding.py`` maps onto mesh axes. Weight matmuls go through ``dense`` (its derivative written out so the
CPU weight gradient stays a plain GEMM); their outputs are tagged with ``checkpoint_name`` so named remat
policies can keep or drop them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from loopjax.attention import TokenLayout, attend, attention_probs, visible_mask
from loopjax.config import LoopedConfig

# checkpoint_name tags of the ``dense`` outputs inside the looped core (what the dot-saving remat policies keep).
DENSE_OUTPUT_NAMES = ("query_proj", "key_proj", "value_proj", "attn_out", "mlp_gate", "mlp_up", "mlp_out",
                      "inject_proj")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str) -> jnp.dtype:
    """The jnp dtype for a config dtype name."""
    return _DTYPES[name]


def make_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float,
               param_dtype: str) -> nnx.Param:
    """A normally initialised weight annotated with its logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype(param_dtype)), logical_axes=axes)


def dense(x_MD: jax.Array, w_DF: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x @ w over the last axis of x (any leading shape), accumulated in float32, returned in ``out_dtype``
    (default: x's dtype).

    The same product as ``jnp.matmul``, with its derivative written out (forward and reverse mode) so that on
    CPU the weight gradient is a plain row-major GEMM; see ``_tangent_from_weight``.
    """
    return _dense(x_MD, w_DF, jnp.dtype(out_dtype or x_MD.dtype))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dense(x_MD: jax.Array, w_DF: jax.Array, out_dtype: jnp.dtype) -> jax.Array:
    return jnp.matmul(x_MD, w_DF, preferred_element_type=jnp.float32).astype(out_dtype)


def _tangent_from_weight(x_MD: jax.Array, dw_DF: jax.Array) -> jax.Array:
    """x @ dw, the part of the tangent that is linear in the weight; reverse mode transposes it into the weight
    gradient x^T @ g."""

    def plain(x, dw):
        return jnp.matmul(x, dw, preferred_element_type=jnp.float32)

    def cpu(x, dw):
        # Left to itself XLA:CPU lays the token axis of g minor for x^T @ g: a strided transpose of g fused into
        # the elementwise backward, then a dot off the fast GEMM path. Here the smaller of x and g is transposed
        # on its own (the barrier keeps that a plain transpose), so the transposed product is a row-major GEMM:
        # x^T @ g as [D, M] x [M, F], or (g^T @ x)^T as [F, M] x [M, D].
        lead, d, f = x.shape[:-1], x.shape[-1], dw.shape[-1]
        x_MD = x.reshape(-1, d)
        if d <= f:
            x_DM = jax.lax.optimization_barrier(x_MD.T)
            t_MF = jnp.einsum("dm,df->mf", x_DM, dw, preferred_element_type=jnp.float32)
        else:  # reverse mode turns the barrier and transpose below into a plain transpose of g
            v_FM = jnp.einsum("fd,md->fm", dw.T, x_MD, preferred_element_type=jnp.float32)
            t_MF = jax.lax.optimization_barrier(v_FM).T
        return t_MF.reshape(*lead, f)

    return jax.lax.platform_dependent(x_MD, dw_DF, cpu=cpu, default=plain)


def _dense_jvp(out_dtype, primals, tangents):
    x_MD, w_DF = primals
    dx_MD, dw_DF = tangents
    y = _dense(x_MD, w_DF, out_dtype)
    parts = []
    if not isinstance(dx_MD, SymbolicZero):
        parts.append(jnp.matmul(dx_MD, w_DF, preferred_element_type=jnp.float32))
    if not isinstance(dw_DF, SymbolicZero):
        parts.append(_tangent_from_weight(x_MD, dw_DF))
    t = sum(parts[1:], parts[0]) if parts else jnp.zeros(y.shape, jnp.float32)
    return y, t.astype(out_dtype)


_dense.defjvp(_dense_jvp, symbolic_zeros=True)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x²) + eps) * scale, statistics in float32, result cast back before the scale (as HF)."""

    def __init__(self, dim: int, eps: float, param_dtype: str = "float32"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype(param_dtype)), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_cos_sin(positions_BS: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for integer positions: cos and sin, each [B, S, H/2], float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BSh), jnp.sin(angles_BSh)


def apply_rope(x_BSNH: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dim (HF/Llama "rotate_half" form, not interleaved pairs)."""
    half = x_BSNH.shape[-1] // 2
    x1, x2 = x_BSNH[..., :half], x_BSNH[..., half:]
    cos = cos_BSh[:, :, None, :].astype(x_BSNH.dtype)
    sin = sin_BSh[:, :, None, :].astype(x_BSNH.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """Grouped-query attention without biases: projections and rotary here, the softmax through the
    ``loopjax.attention`` seam (backend ``cfg.attention_impl``; causal, sliding window and segments from the
    ``TokenLayout``)."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.compute_dtype = dtype(cfg.compute_dtype)
        self.impl, self.interpret, self.sliding_window = cfg.attention_impl, cfg.attention_interpret, cfg.sliding_window
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq = make_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.wk = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = make_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** 0.5, pd)

    def project(self, x_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array):
        """q [B,S,N,H], k and v [B,S,K,H]; rotary applied to q and k."""
        cdt = self.compute_dtype
        x = x_BSD.astype(cdt)
        b, s, d = x.shape

        def proj(w_DXH):
            return dense(x, w_DXH.astype(cdt).reshape(d, -1)).reshape(b, s, w_DXH.shape[1], w_DXH.shape[2])

        q = checkpoint_name(proj(self.wq[...]), "query_proj")
        k = checkpoint_name(proj(self.wk[...]), "key_proj")
        v = checkpoint_name(proj(self.wv[...]), "value_proj")
        return apply_rope(q, cos_BSh, sin_BSh), apply_rope(k, cos_BSh, sin_BSh), v

    def probs(self, q_BSNH: jax.Array, k_BSKH: jax.Array, layout: TokenLayout) -> jax.Array:
        """Attention probabilities [B, K, G, S, S], float32 (the reference backend's; for analysis)."""
        pos, seg = layout.positions_BS, layout.segment_ids_BS
        vis = visible_mask(pos, pos, seg, seg, self.sliding_window)
        return attention_probs(q_BSNH, k_BSKH, vis, self.head_dim ** -0.5)

    def attend(self, q_BSNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, layout: TokenLayout) -> jax.Array:
        """Self-attention of the chunk through the seam, then the output projection: [B, S, D]."""
        b, s, n, h = q_BSNH.shape
        pos, seg = layout.positions_BS, layout.segment_ids_BS
        out = attend(q_BSNH, k_BSKH, v_BSKH, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                     sliding_window=self.sliding_window, impl=self.impl, interpret=self.interpret)
        out = dense(out.reshape(b, s, n * h), self.wo[...].astype(out.dtype).reshape(n * h, -1))
        return checkpoint_name(out, "attn_out")

    def __call__(self, x_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout) -> jax.Array:
        q, k, v = self.project(x_BSD, cos_BSh, sin_BSh)
        return self.attend(q, k, v, layout)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        d, f, std, pd = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.param_dtype
        self.compute_dtype = dtype(cfg.compute_dtype)
        self.w_gate = make_param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w_up = make_param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w_down = make_param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5, pd)

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        x = x_BSD.astype(cdt)
        gate = checkpoint_name(dense(x, self.w_gate[...].astype(cdt)), "mlp_gate")
        up = checkpoint_name(dense(x, self.w_up[...].astype(cdt)), "mlp_up")
        return checkpoint_name(dense(jax.nn.silu(gate) * up, self.w_down[...].astype(cdt)), "mlp_out")


class DecoderLayer(nnx.Module):
    """Attention + MLP residual block.

    pre:      h = h + attn(norm_in(h));            h = h + mlp(norm_post(h))
    sandwich: h = h + norm_in2(attn(norm_in(h)));  h = h + norm_post2(mlp(norm_post(h)))   (Ouro)
    """

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        d, eps, pd = cfg.d_model, cfg.rms_eps, cfg.param_dtype
        self.attn = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.norm_in = RMSNorm(d, eps, pd)
        self.norm_post = RMSNorm(d, eps, pd)
        sandwich = cfg.norm_scheme == "sandwich"
        self.norm_in2 = RMSNorm(d, eps, pd) if sandwich else None
        self.norm_post2 = RMSNorm(d, eps, pd) if sandwich else None

    def attn_residual(self, h_BSD: jax.Array, attn_out_BSD: jax.Array, residual_scale: jax.Array | None = None
                      ) -> jax.Array:
        """Add the attention output to the residual stream (through norm_in2 under the sandwich scheme), scaled by
        ``residual_scale`` (a scalar) when given."""
        if self.norm_in2 is not None:
            attn_out_BSD = self.norm_in2(attn_out_BSD)
        return h_BSD + _scaled(attn_out_BSD.astype(h_BSD.dtype), residual_scale)

    def mlp_residual(self, h_BSD: jax.Array, residual_scale: jax.Array | None = None) -> jax.Array:
        """The MLP half of the layer, residual included (its branch scaled by ``residual_scale`` when given)."""
        y = self.mlp(self.norm_post(h_BSD))
        if self.norm_post2 is not None:
            y = self.norm_post2(y)
        return h_BSD + _scaled(y.astype(h_BSD.dtype), residual_scale)

    def __call__(self, h_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout,
                 residual_scale: jax.Array | None = None) -> jax.Array:
        """The layer; ``residual_scale`` s (a scalar, per-layer loops) makes it h += s·attn(...); h += s·mlp(...).
        None is the plain layer (no multiply at all)."""
        h_BSD = self.attn_residual(h_BSD, self.attn(self.norm_in(h_BSD), cos_BSh, sin_BSh, layout), residual_scale)
        return self.mlp_residual(h_BSD, residual_scale)


def _scaled(y_BSD: jax.Array, scale: jax.Array | None) -> jax.Array:
    return y_BSD if scale is None else y_BSD * jnp.asarray(scale).astype(y_BSD.dtype)
