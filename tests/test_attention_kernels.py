"""Attention backends (chunked, cpu_flash, splash, cudnn) against a float64 NumPy reference: values and dq, dk,
dv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from loopjax import attention
from loopjax.attention import chunked, cpu_kernel
from loopjax.attention.chunked import chunked_attention, default_blocks
from loopjax.attention.cpu_kernel import cpu_flash_attention
from loopjax.attention.cudnn import cudnn_attention, cudnn_supported
from loopjax.attention.splash import splash_attention


def _np_visible(qpos, kpos, qseg, kseg, window):
    """[B, S, T] bool: the mask every backend implements."""
    vis = kpos[:, None, :] <= qpos[:, :, None]
    if window is not None:
        vis &= qpos[:, :, None] - kpos[:, None, :] < window
    if qseg is not None:
        vis &= qseg[:, :, None] == kseg[:, None, :]
    return vis


def _np_attention(q, k, v, dout, vis, scale=None):
    """float64 attention and its analytic backward for cotangent `dout`: (out, dq, dk, dv)."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, s, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head j reads kv head j // g
    scores = np.einsum("bsnh,btnh->bnst", q, kr) * scale
    vis4 = vis[:, None]
    scores = np.where(vis4, scores, -np.inf)
    m = scores.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(vis4, np.exp(scores - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom == 0, 1.0, denom)
    out = np.einsum("bnst,btnh->bsnh", p, vr)
    dp = np.einsum("bsnh,btnh->bnst", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bnst,btnh->bsnh", ds, kr)
    dk = np.einsum("bnst,bsnh->btnh", ds, q).reshape(b, -1, kh, g, h).sum(3)
    dv = np.einsum("bnst,bsnh->btnh", p, dout).reshape(b, -1, kh, g, h).sum(3)
    return out, dq, dk, dv


def _inputs(seed, b, s, t, n, kh, h, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in
               ((b, s, n, h), (b, t, kh, h), (b, t, kh, h)))
    dout = rng.normal(size=(b, s, n, h)).astype(np.float32)
    return (jnp.asarray(x, dtype) for x in (q, k, v)), dout


def _packed(b, t, starts):
    """Segment ids and per-segment positions for documents starting at `starts` (row-major)."""
    seg = np.zeros((b, t), np.int32)
    for st in starts:
        seg[:, st:] += 1
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for i in range(1, t):
            pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
    return seg, pos


def _value_and_vjp(fn, q, k, v, dout):
    """fn(q, k, v) and its vjp for cotangent `dout`, compiled as one program."""
    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout.astype(out.dtype)))
    return jax.jit(run)(q, k, v, jnp.asarray(dout))


def _assert_close(got, want, atol, rtol=1e-4):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=atol, rtol=rtol, err_msg=name)


# (b, s, t, n, kh, h, window, packed segment starts or None, block_q, block_k)
CHUNKED_CASES = {
    "causal_gqa_blocks_divide": (2, 96, 96, 4, 2, 16, None, None, 32, 32),
    "causal_mqa_ragged_blocks": (2, 100, 100, 4, 1, 16, None, None, 32, 24),
    "window_gqa": (1, 130, 130, 4, 2, 16, 9, None, 32, 32),
    "packed_window_mid_row_start": (2, 120, 120, 4, 2, 16, 17, (37, 90), 32, 16),
    "packed_mha_default_blocks": (1, 300, 300, 2, 2, 8, None, (150,), None, None),
}


def _case(case, seed):
    """Inputs of a (b, s, t, n, kh, h, window, starts, block_q, block_k) case: ((q, k, v), dout, the kernels'
    keyword arguments, the float64 NumPy (out, dq, dk, dv))."""
    b, s, t, n, kh, h, window, starts, bq, bk = case
    (q, k, v), dout = _inputs(seed, b, s, t, n, kh, h)
    if starts is None:
        qseg = None
        pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    else:
        qseg, pos = _packed(b, s, starts)
    want = _np_attention(q, k, v, dout, _np_visible(pos, pos, qseg, qseg, window))
    kw = dict(q_positions_BS=jnp.asarray(pos), kv_positions_BT=jnp.asarray(pos), sliding_window=window)
    if qseg is not None:
        kw.update(q_segment_ids_BS=jnp.asarray(qseg), kv_segment_ids_BT=jnp.asarray(qseg))
    if bq is not None:
        kw.update(block_q=bq, block_k=bk)
    return (q, k, v), dout, kw, want


@pytest.mark.parametrize("driver", ["loops", "unrolled"])
@pytest.mark.parametrize("case", list(CHUNKED_CASES))
def test_chunked_matches_numpy_values_and_grads(case, driver, monkeypatch):
    """Both drivers of the block pairs (loops, and straight-line code for few pairs) against float64 NumPy."""
    monkeypatch.setattr(chunked, "UNROLL_MAX_PAIRS", 0 if driver == "loops" else 10**6)
    qkv, dout, kw, want = _case(CHUNKED_CASES[case], seed=list(CHUNKED_CASES).index(case))
    _assert_close(_value_and_vjp(lambda q, k, v: chunked_attention(q, k, v, **kw), *qkv, dout), want, atol=2e-5)


@pytest.fixture
def cpu_flash():
    """The C++ kernel, built here. Where a C++ compiler exists the build must succeed; only a machine without
    one (where "auto" runs chunked, as the fallback test checks) skips these tests."""
    if cpu_kernel.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine: the CPU attention kernel cannot be built")
    assert cpu_kernel.available(), "a C++ compiler is here but the CPU attention kernel did not build (see the log)"
    return cpu_flash_attention


# the chunked cases, and head dims that exercise the kernel's 16-wide panels, their scalar tail, and row
# counts that are not a multiple of its 6-row micro-tile
CPU_FLASH_CASES = {**CHUNKED_CASES,
                   "causal_gqa_head32_default_blocks": (2, 300, 300, 4, 2, 32, None, None, None, None),
                   "window_head20_ragged": (1, 157, 157, 2, 1, 20, 61, None, 64, 48),
                   "packed_gqa_head64": (2, 256, 256, 8, 2, 64, None, (100, 101), 128, 128)}


@pytest.mark.parametrize("case", list(CPU_FLASH_CASES))
def test_cpu_flash_matches_numpy_values_and_grads(case, cpu_flash):
    qkv, dout, kw, want = _case(CPU_FLASH_CASES[case], seed=100 + list(CPU_FLASH_CASES).index(case))
    _assert_close(_value_and_vjp(lambda q, k, v: cpu_flash(q, k, v, **kw), *qkv, dout), want, atol=2e-5)


@pytest.mark.parametrize("s,window", [(1, None), (12, 5)], ids=["decode_causal", "prefill_chunk_window"])
def test_cpu_flash_queries_at_the_end_of_longer_keys(s, window, cpu_flash):
    b, t, n, kh, h = 2, 77, 4, 2, 16
    (q, k, v), dout = _inputs(s, b, s, t, n, kh, h)
    kpos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    qpos = kpos[:, t - s:]
    want = _np_attention(q, k, v, dout, _np_visible(qpos, kpos, None, None, window), scale=0.3)
    fn = (lambda q, k, v: cpu_flash(q, k, v, q_positions_BS=jnp.asarray(qpos), kv_positions_BT=jnp.asarray(kpos),
                                    sliding_window=window, scale=0.3, block_q=8, block_k=16))
    _assert_close(_value_and_vjp(fn, q, k, v, dout), want, atol=2e-5)


def test_cpu_flash_query_without_visible_key_outputs_zeros_and_zero_grads(cpu_flash):
    b, s, n, kh, h = 1, 40, 2, 1, 16
    (q, k, v), dout = _inputs(7, b, s, s, n, kh, h)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    qseg = np.where(np.arange(s) < 25, 0, 3)[None].astype(np.int32)  # segment 3 has no keys
    kseg = np.zeros((b, s), np.int32)
    want = _np_attention(q, k, v, dout, _np_visible(pos, pos, qseg, kseg, None))
    fn = (lambda q, k, v: cpu_flash(q, k, v, q_positions_BS=jnp.asarray(pos), kv_positions_BT=jnp.asarray(pos),
                                    q_segment_ids_BS=jnp.asarray(qseg), kv_segment_ids_BT=jnp.asarray(kseg),
                                    block_q=16, block_k=16))
    got = _value_and_vjp(fn, q, k, v, dout)
    assert np.all(np.asarray(got[0])[:, 25:] == 0.0) and np.all(np.asarray(got[1])[:, 25:] == 0.0)
    _assert_close(got, want, atol=2e-5)


def test_cpu_flash_bfloat16_inputs_give_bfloat16_output_and_grads(cpu_flash):
    b, s, n, kh, h = 1, 64, 4, 2, 32
    (q, k, v), dout = _inputs(3, b, s, s, n, kh, h, dtype=jnp.bfloat16)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    want = _np_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), dout,
                         _np_visible(pos, pos, None, None, None))
    fn = (lambda q, k, v: cpu_flash(q, k, v, q_positions_BS=jnp.asarray(pos),
                                    kv_positions_BT=jnp.asarray(pos)))
    got = _value_and_vjp(fn, q, k, v, dout)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    _assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_cpu_flash_under_vmap_matches_numpy(cpu_flash):
    """vmap runs the kernel once per mapped row."""
    b, s, n, kh, h = 4, 48, 4, 2, 16
    (q, k, v), dout = _inputs(21, b, s, s, n, kh, h)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    want = _np_attention(q, k, v, dout, _np_visible(pos, pos, None, None, 13))
    one = (lambda q, k, v, p: cpu_flash(q[None], k[None], v[None], q_positions_BS=p[None], kv_positions_BT=p[None],
                                        sliding_window=13, block_q=16, block_k=16)[0])
    mapped = lambda q, k, v: jax.vmap(one)(q, k, v, jnp.asarray(pos))  # noqa: E731
    _assert_close(_value_and_vjp(mapped, q, k, v, dout), want, atol=2e-5)


def test_cpu_flash_is_for_one_device_programs(cpu_flash):
    """Under a multi-device mesh "auto" runs chunked and "cpu_flash" raises naming the field."""
    from loopjax.config import MeshConfig
    from loopjax.sharding import make_mesh, rules_for, use_rules

    kw = dict(head_dim=16, q_len=64, kv_len=64, has_segments=False)
    assert attention.resolve_impl("auto", **kw) == "cpu_flash"
    mesh = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    with use_rules(mesh, rules_for("dp")):
        assert attention.resolve_impl("auto", **kw) == "chunked"
        with pytest.raises(ValueError, match="attention_impl='cpu_flash': runs on one device"):
            attention.check_impl("cpu_flash", head_dim=16)


def test_cpu_flash_off_or_unbuildable_falls_back_to_chunked(monkeypatch, tmp_path):
    """LOOPJAX_CPU_KERNEL=0, or a compiler that fails: "auto" runs chunked, "cpu_flash" raises naming the field,
    and the build error carries the compiler's command."""
    kw = dict(head_dim=16, q_len=64, kv_len=64, has_segments=False)
    try:
        cpu_kernel.available.cache_clear()
        monkeypatch.setenv("LOOPJAX_CPU_KERNEL", "0")
        assert not cpu_kernel.available()
        assert attention.resolve_impl("auto", platform="cpu", **kw) == "chunked"
        with pytest.raises(ValueError, match="attention_impl='cpu_flash'"):
            attention.check_impl("cpu_flash", head_dim=16, platform="cpu")
    finally:
        cpu_kernel.available.cache_clear()
    monkeypatch.delenv("LOOPJAX_CPU_KERNEL")
    monkeypatch.setenv("LOOPJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="false .*cpu_flash.cc"):
        cpu_kernel._build()
    with pytest.raises(ValueError, match="attention_impl='cpu_flash': needs the CPU platform"):
        attention.check_impl("cpu_flash", head_dim=16, platform="tpu")


@pytest.mark.parametrize("s,window", [(1, None), (12, 5)], ids=["decode_causal", "prefill_chunk_window"])
def test_chunked_queries_at_the_end_of_longer_keys(s, window):
    b, t, n, kh, h = 2, 77, 4, 2, 16
    (q, k, v), dout = _inputs(s, b, s, t, n, kh, h)
    kpos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    qpos = kpos[:, t - s:]
    want = _np_attention(q, k, v, dout, _np_visible(qpos, kpos, None, None, window), scale=0.3)
    fn = (lambda q, k, v: chunked_attention(
        q, k, v, q_positions_BS=jnp.asarray(qpos), kv_positions_BT=jnp.asarray(kpos),
        sliding_window=window, scale=0.3, block_q=8, block_k=16))
    _assert_close(_value_and_vjp(fn, q, k, v, dout), want, atol=2e-5)


def test_chunked_query_without_visible_key_outputs_zeros_and_finite_grads():
    b, s, n, kh, h = 1, 40, 2, 1, 8
    (q, k, v), dout = _inputs(7, b, s, s, n, kh, h)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    qseg = np.where(np.arange(s) < 25, 0, 3)[None].astype(np.int32)  # segment 3 has no keys
    kseg = np.zeros((b, s), np.int32)
    want = _np_attention(q, k, v, dout, _np_visible(pos, pos, qseg, kseg, None))
    fn = (lambda q, k, v: chunked_attention(
        q, k, v, q_positions_BS=jnp.asarray(pos), kv_positions_BT=jnp.asarray(pos),
        q_segment_ids_BS=jnp.asarray(qseg), kv_segment_ids_BT=jnp.asarray(kseg), block_q=16, block_k=16))
    got = _value_and_vjp(fn, q, k, v, dout)
    assert np.all(np.asarray(got[0])[:, 25:] == 0.0)
    _assert_close(got, want, atol=2e-5)


def test_chunked_bfloat16_inputs_give_bfloat16_output_close_to_float64():
    b, s, n, kh, h = 1, 64, 4, 2, 32
    (q, k, v), dout = _inputs(3, b, s, s, n, kh, h, dtype=jnp.bfloat16)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    want = _np_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), dout,
                         _np_visible(pos, pos, None, None, None))
    out = chunked_attention(q, k, v, q_positions_BS=jnp.asarray(pos), kv_positions_BT=jnp.asarray(pos),
                            block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), want[0], atol=3e-2, rtol=3e-2)


def _naive_causal_attention(s, n, kh, h):
    """[1, S, N, H] causal attention through a [B, K, G, S, S] score tensor (the memory baseline)."""
    def naive(q, k, v):
        g = n // kh
        sc = jnp.einsum("bskgh,btkh->bkgst", q.reshape(1, s, kh, g, h), k)
        sc = jnp.where(jnp.tril(jnp.ones((s, s), bool)), sc, -jnp.inf)
        return jnp.einsum("bkgst,btkh->bskgh", jax.nn.softmax(sc, -1), v).reshape(1, s, n, h)
    return naive


def test_chunked_temp_memory_is_a_small_fraction_of_the_naive_path_at_4k():
    s, n, kh, h = 4096, 8, 4, 64
    shapes = [jax.ShapeDtypeStruct(x, jnp.float32) for x in ((1, s, n, h), (1, s, kh, h), (1, s, kh, h))]
    pos = jnp.arange(s, dtype=jnp.int32)[None]

    def temp(attn):
        loss = lambda q, k, v: jnp.sum(attn(q, k, v) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp(lambda q, k, v: chunked_attention(q, k, v, q_positions_BS=pos, kv_positions_BT=pos))
    naive = temp(_naive_causal_attention(s, n, kh, h))
    assert chunked * 8 <= naive, (chunked, naive)


def test_default_blocks_fit_short_sequences():
    assert default_blocks(256, 256) == (128, 128)
    assert default_blocks(1024, 1024) == (256, 256)
    assert default_blocks(8192, 8192) == (512, 512)
    assert default_blocks(1, 77) == (8, 80)


def _splash_case(b, s, n, kh, h, window, starts, seed):
    (q, k, v), dout = _inputs(seed, b, s, s, n, kh, h)
    if starts is None:
        seg, pos = None, np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    else:
        seg, pos = _packed(b, s, starts)
    want = _np_attention(q, k, v, dout, _np_visible(pos, pos, seg, seg, window))
    seg_kw = {} if seg is None else {"q_segment_ids_BS": jnp.asarray(seg), "kv_segment_ids_BT": jnp.asarray(seg)}
    return (q, k, v), dout, want, seg_kw


@pytest.mark.parametrize("kh,window,starts", [(2, 40, (97,)), (1, None, None)], ids=["gqa_packed_window", "mqa_causal"])
def test_splash_interpret_matches_numpy_values_and_grads(kh, window, starts):
    (q, k, v), dout, want, seg_kw = _splash_case(1, 256, 4, kh, 32, window, starts, seed=kh)
    fn = (lambda q, k, v: splash_attention(q, k, v, sliding_window=window, interpret=True, **seg_kw))
    _assert_close(_value_and_vjp(fn, q, k, v, dout), want, atol=3e-5)


def test_splash_under_shard_map_on_8_cpu_devices_matches_numpy():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    (q, k, v), dout, want, seg_kw = _splash_case(4, 128, 4, 2, 16, 24, (50,), seed=11)
    fn = (lambda q, k, v: splash_attention(q, k, v, sliding_window=24, interpret=True, mesh=mesh,
                                           batch_axes=("data",), head_axes=("model",), **seg_kw))
    _assert_close(_value_and_vjp(fn, q, k, v, dout), want, atol=3e-5)


@pytest.mark.parametrize("backend", ["chunked", "splash", "cudnn"])
def test_bad_window_raises_naming_sliding_window(backend):
    (q, k, v), _ = _inputs(0, 1, 128, 128, 2, 1, 8)
    pos = jnp.arange(128)[None]
    call = {"chunked": lambda w: chunked_attention(q, k, v, q_positions_BS=pos, kv_positions_BT=pos,
                                                   sliding_window=w),
            "splash": lambda w: splash_attention(q, k, v, sliding_window=w, interpret=True),
            "cudnn": lambda w: cudnn_attention(q, k, v, sliding_window=w)}[backend]
    for w in (0, -3):
        with pytest.raises(ValueError, match="sliding_window"):
            call(w)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_segment_ids_of_wrong_shape_raise_naming_the_argument(backend):
    (q, k, v), _ = _inputs(0, 2, 128, 128, 2, 1, 8)
    pos = jnp.broadcast_to(jnp.arange(128), (2, 128))
    good, bad = jnp.zeros((2, 128), jnp.int32), jnp.zeros((2, 127), jnp.int32)

    def call(qseg, kseg):
        if backend == "chunked":
            return chunked_attention(q, k, v, q_positions_BS=pos, kv_positions_BT=pos,
                                     q_segment_ids_BS=qseg, kv_segment_ids_BT=kseg)
        return splash_attention(q, k, v, q_segment_ids_BS=qseg, kv_segment_ids_BT=kseg, interpret=True)

    with pytest.raises(ValueError, match="q_segment_ids"):
        call(bad, good)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        call(good, bad)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        call(good, None)


def test_chunked_positions_of_wrong_shape_raise_naming_the_argument():
    (q, k, v), _ = _inputs(0, 1, 16, 20, 2, 1, 8)
    with pytest.raises(ValueError, match="kv_positions_BT"):
        chunked_attention(q, k, v, q_positions_BS=jnp.zeros((1, 16), jnp.int32),
                          kv_positions_BT=jnp.zeros((1, 16), jnp.int32))


def test_splash_rejects_seq_len_not_multiple_of_128_or_cross_attention():
    (q, k, v), _ = _inputs(0, 1, 200, 200, 2, 1, 8)
    with pytest.raises(ValueError, match="seq_len"):
        splash_attention(q, k, v, interpret=True)
    (q, _, _), _ = _inputs(0, 1, 128, 128, 2, 1, 8)
    (_, k, v), _ = _inputs(0, 1, 256, 256, 2, 1, 8)
    with pytest.raises(ValueError, match="seq_len"):
        splash_attention(q, k, v, interpret=True)


def test_cudnn_supported_gives_a_reason_off_gpu_or_for_float32():
    reason = cudnn_supported(64, jnp.float32)
    assert reason is not None and ("float32" in reason or "GPU" in reason)


@pytest.mark.gpu
@pytest.mark.parametrize("kh,window", [(2, None), (1, 33)])
def test_cudnn_matches_numpy_values_and_grads(kh, window):
    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN attention needs a GPU; backend is {jax.default_backend()!r}")
    b, s, n, h = 2, 256, 4, 64
    (q, k, v), dout = _inputs(kh, b, s, s, n, kh, h, dtype=jnp.bfloat16)
    assert cudnn_supported(h, q.dtype) is None
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    want = _np_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), dout,
                         _np_visible(pos, pos, None, None, window))
    fn = (lambda q, k, v: cudnn_attention(q, k, v, sliding_window=window))
    _assert_close(_value_and_vjp(fn, q, k, v, dout), want, atol=3e-2, rtol=3e-2)
