"""The attention seam: visibility rule, reference backend and dispatch against float64 NumPy; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax import attention
from loopjax.attention import attend, visible_mask


def _np_visible(qp, kp, qs=None, ks=None, window=None):
    b, s, t = qp.shape[0], qp.shape[1], kp.shape[1]
    vis = np.zeros((b, s, t), bool)
    for i in range(b):
        for a in range(s):
            for c in range(t):
                ok = kp[i, c] <= qp[i, a]
                ok &= window is None or qp[i, a] - kp[i, c] < window
                ok &= qs is None or qs[i, a] == ks[i, c]
                vis[i, a, c] = ok
    return vis


def _np_attention(q, k, v, vis, scale):
    """float64: softmax over visible keys per (row, head); zeros for a query with no visible key."""
    b, s, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, s, n, h))
    for i in range(b):
        for j in range(n):
            sc = q[i, :, j] @ k[i, :, j // g].T * scale
            sc = np.where(vis[i], sc, -np.inf)
            m = np.max(sc, -1, keepdims=True)
            p = np.where(vis[i], np.exp(sc - np.where(np.isfinite(m), m, 0)), 0.0)
            z = p.sum(-1, keepdims=True)
            out[i, :, j] = np.where(z > 0, p / np.where(z > 0, z, 1), 0) @ v[i, :, j // g]
    return out


def _packed(seed, b=2, s=24, n=4, kv=2, h=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, s, n, h))
    k = jax.random.normal(ks[1], (b, s, kv, h))
    v = jax.random.normal(ks[2], (b, s, kv, h))
    # row 0: documents of 7, 11 and 6 tokens (one starts mid-row); row 1: padding (-1), then one document
    seg = np.array([[0] * 7 + [1] * 11 + [2] * 6, [-1] * 5 + [3] * 19])
    pos = np.zeros_like(seg)
    for i in range(b):
        for a in range(1, s):
            pos[i, a] = pos[i, a - 1] + 1 if seg[i, a] == seg[i, a - 1] else 0
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("window", [None, 3])
def test_visible_mask_matches_brute_force(window):
    _, _, _, pos, seg = _packed(0)
    got = visible_mask(pos, pos, seg, seg, window)
    np.testing.assert_array_equal(got, _np_visible(np.asarray(pos), np.asarray(pos), np.asarray(seg),
                                                    np.asarray(seg), window))


@pytest.mark.parametrize("impl", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("window", [None, 4])
def test_attend_values_and_grads_match_float64_numpy_on_packed_rows(impl, window):
    q, k, v, pos, seg = _packed(1)
    scale = 8 ** -0.5
    vis = _np_visible(*(np.asarray(a) for a in (pos, pos, seg, seg)), window)
    want = _np_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), vis, scale)

    def f(q, k, v):
        return attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                      sliding_window=window, impl=impl)

    np.testing.assert_allclose(f(q, k, v), want, atol=2e-5, rtol=1e-5)
    # gradients against the float64 NumPy formula's, by central differences along a random direction
    cot = jax.random.normal(jax.random.key(7), q.shape)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
    rng = np.random.default_rng(3)
    base = [np.asarray(a, np.float64) for a in (q, k, v)]
    for i, g in enumerate(grads):
        d = rng.standard_normal(base[i].shape)
        eps = 1e-5
        plus, minus = list(base), list(base)
        plus[i], minus[i] = base[i] + eps * d, base[i] - eps * d
        fd = (np.sum(_np_attention(*plus, vis, scale) * np.asarray(cot))
              - np.sum(_np_attention(*minus, vis, scale) * np.asarray(cot))) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(g * d)), fd, rtol=1e-4, atol=1e-4)


def test_decode_query_over_longer_keys_matches_reference():
    """A query block shorter than the keys (a cached decode step): positions decide causality, not indices."""
    q, k, v, _, _ = _packed(2, b=2, s=24)
    pos_k = jnp.broadcast_to(jnp.arange(24), (2, 24))
    pos_q = jnp.full((2, 1), 17)
    got = attend(q[:, 17:18], k, v, q_positions=pos_q, kv_positions=pos_k, impl="chunked")
    want = attend(q[:, 17:18], k, v, q_positions=pos_q, kv_positions=pos_k, impl="reference")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_attend_cache_slot_equals_attend_on_the_same_keys():
    q, k, v, _, _ = _packed(3, b=2, s=16)
    b, t, kv, h = k.shape
    pos_k = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.arange(t)[None] < jnp.array([[12], [16]])
    vis = visible_mask(jnp.full((b, 1), 15), pos_k, kv_valid_BT=valid)[:, 0]
    slot = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * kv, t, h)  # noqa: E731
    got = attention.attend_cache_slot(q[:, :1], slot(k), slot(v), vis)
    want = attention.reference_attention(q[:, :1], k, v, vis[:, None, :], h ** -0.5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_picks_the_platforms_kernel():
    from loopjax.attention import cpu_kernel

    kw = dict(head_dim=64, q_len=1024, kv_len=1024, has_segments=False)
    cpu = "cpu_flash" if cpu_kernel.available() else "chunked"
    assert attention.resolve_impl("auto", platform="cpu", **kw) == cpu
    assert attention.resolve_impl("auto", platform="cpu", **dict(kw, has_segments=True)) == cpu
    assert attention.resolve_impl("auto", platform="tpu", **kw) == "splash"
    assert attention.resolve_impl("auto", platform="tpu", **dict(kw, q_len=1000, kv_len=1000)) == "chunked"
    assert attention.resolve_impl("splash", platform="cpu", interpret=True, **kw) == "splash"
    assert attention.resolve_impl("reference", platform="tpu", **kw) == "reference"


@pytest.mark.parametrize("impl,platform,match", [
    ("splash", "cpu", "attention_impl='splash': needs a TPU"),
    ("cudnn", "cpu", "attention_impl='cudnn': needs an NVIDIA GPU"),
    ("cudnn", "tpu", "attention_impl='cudnn': needs an NVIDIA GPU"),
    ("flash", "cpu", "attention_impl='flash'"),
])
def test_impl_that_cannot_run_here_is_a_value_error(impl, platform, match):
    with pytest.raises(ValueError, match=match):
        attention.check_impl(impl, head_dim=64, platform=platform)


def test_bad_inputs_name_the_argument():
    q, k, v, pos, seg = _packed(4)
    with pytest.raises(ValueError, match="sliding_window=0"):
        attend(q, k, v, q_positions=pos, kv_positions=pos, sliding_window=0)
    with pytest.raises(ValueError, match="q_segment_ids.shape"):
        attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg[:, :5], kv_segment_ids=seg)
    with pytest.raises(ValueError, match="give both q_segment_ids and kv_segment_ids, or neither"):
        attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg)
    with pytest.raises(ValueError, match="kv_positions.shape"):
        attend(q, k, v, q_positions=pos, kv_positions=pos[:1])
