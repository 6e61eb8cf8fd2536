"""Layers against float64 NumPy references: RMSNorm, rotary embedding, GQA attention, sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.attention import TokenLayout
from loopjax import layers


def _np_rope(x, pos, theta):
    """float64 rotate-half rotary: pairs element i with i + H/2."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    ang = pos[..., None].astype(np.float64) * inv  # [B,S,H/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None, :]
    rot = np.concatenate([-x[..., h // 2:], x[..., : h // 2]], -1)
    return x * cos + rot * sin


def _np_attention(x, wq, wk, wv, wo, pos, theta, window=None):
    """float64 multi-head attention with KV heads repeated (repeat_interleave) to the query heads."""
    x = x.astype(np.float64)
    q = _np_rope(np.einsum("bsd,dnh->bsnh", x, wq), pos, theta)
    k = _np_rope(np.einsum("bsd,dkh->bskh", x, wk), pos, theta)
    v = np.einsum("bsd,dkh->bskh", x, wv)
    g = wq.shape[1] // wk.shape[1]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(q.shape[-1])
    i, j = pos[0][:, None], pos[0][None, :]
    vis = j <= i
    if window is not None:
        vis &= (i - j) < window
    s = np.where(vis[None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnhd,hdD->bnD", np.einsum("bnst,btnh->bsnh", p, v), wo)


def _attn(cfg, seed=0):
    return layers.Attention(cfg, nnx.Rngs(seed))


def _inputs(cfg, b=2, s=12, seed=1):
    x = jax.random.normal(jax.random.key(seed), (b, s, cfg.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    return x, pos


def _run(attn, cfg, x, pos):
    cos, sin = layers.rope_cos_sin(pos, cfg.d_head, cfg.rope_theta)
    return attn(x, cos, sin, TokenLayout(pos))


def test_rms_norm_matches_numpy():
    norm = layers.RMSNorm(16, 1e-6)
    norm.scale[...] = jax.random.normal(jax.random.key(3), (16,))
    x = jax.random.normal(jax.random.key(4), (3, 5, 16)) * 3.0
    xn = np.asarray(x, np.float64)
    ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...], np.float64)
    np.testing.assert_allclose(norm(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rotary_matches_float64_numpy(theta):
    x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
    pos = jax.random.randint(jax.random.key(1), (2, 9), 0, 5000)
    cos, sin = layers.rope_cos_sin(pos, 16, theta)
    got = layers.apply_rope(x, cos, sin)
    want = _np_rope(np.asarray(x, np.float64), np.asarray(pos), theta)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)  # float32 angles at positions up to 5000


def test_rotary_preserves_relative_position_dot_products():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))

    def dot(pq, pk):
        cq, sq = layers.rope_cos_sin(jnp.array([[pq]]), 32, 1e4)
        ck, sk = layers.rope_cos_sin(jnp.array([[pk]]), 32, 1e4)
        return float((layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk)).sum())

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_attention_matches_numpy_multihead(kv_heads):
    cfg = lj.tiny(d_model=32, n_heads=4, n_kv_heads=kv_heads, init_std=0.3)
    attn = _attn(cfg)
    x, pos = _inputs(cfg)
    got = _run(attn, cfg, x, pos)
    want = _np_attention(np.asarray(x), *(np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo)),
                         np.asarray(pos), cfg.rope_theta)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_gqa_with_full_kv_heads_equals_plain_multihead():
    """n_kv_heads = n_heads is ordinary MHA: equal to GQA weights whose kv heads are each query head's copy."""
    cfg_mha = lj.tiny(d_model=32, n_heads=4, n_kv_heads=4, init_std=0.3)
    cfg_gqa = lj.tiny(d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3)
    gqa = _attn(cfg_gqa)
    mha = _attn(cfg_mha)
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)  # query head j uses kv head j // 2
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
    x, pos = _inputs(cfg_mha)
    np.testing.assert_allclose(_run(mha, cfg_mha, x, pos), _run(gqa, cfg_gqa, x, pos), atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_attention_ignores_tokens_beyond_window(window):
    cfg = lj.tiny(d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3, sliding_window=window)
    attn = _attn(cfg)
    x, pos = _inputs(cfg, b=1, s=10)
    base = _run(attn, cfg, x, pos)
    j = 2
    x2 = x.at[:, j].add(jax.random.normal(jax.random.key(9), (cfg.d_model,)))
    diff = np.abs(np.asarray(_run(attn, cfg, x2, pos) - base)).max(-1)[0]  # [S]
    for i in range(10):
        affected = j <= i < j + window
        assert (diff[i] > 1e-4) == affected, (i, diff[i])
    want = _np_attention(np.asarray(x), *(np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo)),
                         np.asarray(pos), cfg.rope_theta, window=window)
    np.testing.assert_allclose(base, want, atol=1e-5, rtol=1e-4)


def test_padding_segment_hides_keys_and_never_gives_nan():
    cfg = lj.tiny(d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3)
    attn = _attn(cfg)
    x, pos = _inputs(cfg, b=1, s=8)
    layout = TokenLayout(pos, jnp.array([[-1, -1, 0, 0, 0, 0, 0, 0]]))  # padding is a segment of its own
    cos, sin = layers.rope_cos_sin(pos, cfg.d_head, cfg.rope_theta)
    out = attn(x, cos, sin, layout)
    out2 = attn(x.at[:, :2].set(7.0), cos, sin, layout)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[:, 2:], out2[:, 2:], atol=1e-6)


@pytest.mark.parametrize("d_in,d_out", [(24, 40), (40, 24)])
def test_dense_value_and_derivatives_match_float64_numpy(d_in, d_out):
    kx, kw, kg, kt, ku = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(kx, (3, 5, d_in))
    w = jax.random.normal(kw, (d_in, d_out)) / d_in ** 0.5
    cot = jax.random.normal(kg, (3, 5, d_out))
    tx, tw = jax.random.normal(kt, x.shape), jax.random.normal(ku, w.shape)
    x64, w64, c64, tx64, tw64 = (np.asarray(a, np.float64) for a in (x, w, cot, tx, tw))
    y, vjp = jax.vjp(layers.dense, x, w)
    dx, dw = vjp(cot)
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, c64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bsd,bsf->df", x64, c64), rtol=1e-5, atol=1e-5)
    # forward mode (the analysis tools' Jacobian-vector products), with and without a weight tangent
    _, t = jax.jvp(layers.dense, (x, w), (tx, tw))
    np.testing.assert_allclose(t, tx64 @ w64 + x64 @ tw64, rtol=1e-5, atol=1e-5)
    _, t = jax.jvp(lambda a: layers.dense(a, w), (x,), (tx,))
    np.testing.assert_allclose(t, tx64 @ w64, rtol=1e-5, atol=1e-5)
    # second order: d/dw of <dL/dx, v> for L = sum(sin(x @ w))
    hv = jax.grad(lambda b: jnp.vdot(jax.grad(lambda a: jnp.sum(jnp.sin(layers.dense(a, b))))(x), tx))(w)
    hv_ref = jax.grad(lambda b: jnp.vdot(jax.grad(lambda a: jnp.sum(jnp.sin(a @ b)))(x), tx))(w)
    np.testing.assert_allclose(hv, hv_ref, rtol=1e-4, atol=1e-4)


def test_dense_out_dtype_and_low_precision_grads():
    kx, kw = jax.random.split(jax.random.key(12))
    x = jax.random.normal(kx, (4, 16), jnp.bfloat16)
    w = jax.random.normal(kw, (16, 8), jnp.bfloat16)
    assert layers.dense(x, w).dtype == jnp.bfloat16
    y = layers.dense(x, w, jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.dense(a, b, jnp.float32))), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    rx, rw = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.matmul(a, b, preferred_element_type=jnp.float32))),
                      (0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(rx, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(rw, np.float32), rtol=2e-2, atol=2e-2)
