"""LoopedLM as a whole: causality, padding, bf16 compute, call-time validation, output contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj


def _model(**kw):
    cfg = lj.tiny(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, init_std=0.2, **kw)
    return lj.LoopedLM(cfg, rngs=nnx.Rngs(0))


def _tokens(b=2, s=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 64)


@pytest.mark.parametrize("kw", [dict(), dict(norm_scheme="sandwich", step_norm=True, n_prelude=1, n_coda=1,
                                             input_injection="concat")])
def test_causality_future_token_changes_no_earlier_logits(kw):
    model = _model(**kw)
    tokens = _tokens()
    base = model(tokens, n_loops=3).logits
    for j in (0, 5, 11):
        changed = tokens.at[:, j].set((tokens[:, j] + 7) % 64)
        logits = model(changed, n_loops=3).logits
        np.testing.assert_array_equal(logits[:, :j], base[:, :j])
        assert float(jnp.abs(logits[:, j:] - base[:, j:]).max()) > 1e-4


def test_sliding_window_receptive_field_of_the_looped_model():
    """Each layer sees window-1 tokens back, so k layers × L loops reach k·L·(window−1) positions back."""
    window, k, loops = 2, 1, 3
    model = _model(sliding_window=window, n_layers=k)
    tokens = _tokens(b=1, s=12)
    base = model(tokens, n_loops=loops).logits
    j = 2
    changed = model(tokens.at[:, j].set((tokens[:, j] + 1) % 64), n_loops=loops).logits
    diff = np.abs(np.asarray(changed - base)).max(-1)[0]
    reach = k * loops * (window - 1)
    assert (diff[: j] == 0).all()
    assert (diff[j: j + reach + 1] > 1e-6).all()
    assert (diff[j + reach + 1:] == 0).all()


def test_left_padding_matches_unpadded_row():
    model = _model()
    tokens = _tokens(b=1, s=8)
    pad = 3
    padded = jnp.concatenate([jnp.full((1, pad), 5), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 8), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = model(padded, attention_mask_BS=mask, positions_BS=positions)
    np.testing.assert_allclose(out.logits[:, pad:], model(tokens).logits, atol=1e-5)
    assert np.isfinite(np.asarray(out.logits)).all()


@pytest.mark.parametrize("kw", [dict(), dict(norm_scheme="sandwich", step_norm=True)])
def test_bf16_compute_within_documented_tolerance_of_float32(kw):
    """Documented tolerance: bf16 compute (f32 params) logits within 5% of max |logit|; probabilities within 0.05 TV."""
    f32 = _model(**kw)
    bf16 = lj.LoopedLM(f32.cfg.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = _tokens()
    a, b = f32(tokens).logits, bf16(tokens).logits
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) <= 0.05 * float(jnp.abs(a).max())
    tv = 0.5 * jnp.abs(jax.nn.softmax(a) - jax.nn.softmax(b)).sum(-1)
    assert float(tv.max()) <= 0.05
    grads = nnx.grad(lambda m: m(tokens).logits.mean())(bf16)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_bf16_params_and_compute_run():
    model = lj.LoopedLM(lj.tiny(param_dtype="bfloat16", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = model(_tokens())
    assert model.core.layers[0].attn.wq[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out.logits)).all()


def test_output_contract():
    model = _model()
    out = model(_tokens(), n_loops=3)
    assert out.logits.shape == (2, 12, 64) and out.hidden.shape == (2, 12, 32)
    assert out.step_logits is None and out.step_hidden is None
    assert out.gate_logits.shape == (2, 12, 3) and out.exit_pdf.shape == (2, 12, 3)
    np.testing.assert_allclose(out.exit_pdf.sum(-1), 1.0, atol=1e-6)
    no_gate = _model(exit_gate=False)(_tokens())
    assert no_gate.gate_logits is None and no_gate.exit_pdf is None
    # the output is a pytree, so it can leave jit
    jitted = nnx.jit(lambda m, t: m(t, return_steps=True))(model, _tokens())
    assert jitted.step_logits.shape == (4, 2, 12, 64)


@pytest.mark.parametrize("bad", [dict(n_loops=0), dict(n_loops=-2), dict(n_loops=2.5)])
def test_bad_call_arguments_raise(bad):
    with pytest.raises(ValueError, match="n_loops"):
        _model()(_tokens(), **bad)


def test_too_long_or_wrong_rank_input_raises():
    model = _model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="batch, seq"):
        model(jnp.zeros((17,), jnp.int32))


def _grads(model, tokens, **kw):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, **kw).logits
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_logits_and_grads_equal_across_attention_backends(impl):
    """A tiny Ouro-style model with packed segments and a window: every backend gives the reference's numbers."""
    kw = dict(norm_scheme="sandwich", step_norm=True, sliding_window=40, max_seq_len=128, n_loops=2)
    ref = _model(attention_impl="reference", **kw)
    other = lj.LoopedLM(ref.cfg.replace(attention_impl=impl, attention_interpret=impl == "splash"), rngs=nnx.Rngs(0))
    tokens = _tokens(b=2, s=128, seed=4)
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3], [4, 4, 5, 6]], 32, axis=1))
    pos = jnp.asarray(np.tile(np.arange(32), (2, 4)))
    pos = pos.at[1, 32:64].add(32)  # row 1: a 64-token document, then two of 32
    layout = dict(segment_ids_BS=seg, positions_BS=pos)
    np.testing.assert_allclose(other(tokens, **layout).logits, ref(tokens, **layout).logits, atol=2e-5, rtol=1e-5)
    (want_loss, want), (got_loss, got) = _grads(ref, tokens, **layout), _grads(other, tokens, **layout)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()), got, want)


@pytest.mark.parametrize("call", ["plain", "adaptive", "all_loops"])
def test_packed_row_logits_equal_each_document_alone(call):
    """No token attends across a document boundary: in the scan, the masked while_loop and run_all_loops."""
    model = _model(norm_scheme="sandwich", step_norm=True)
    lengths = (5, 9, 3, 7)
    docs = [_tokens(b=1, s=n, seed=20 + i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs, axis=1)
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None])
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None])
    kw = {"plain": {}, "adaptive": dict(exit_rule=lj.QExit(0.5)),
          "all_loops": dict(exit_rule=lj.QExit(0.5), run_all_loops=True)}[call]
    got = model(packed, segment_ids_BS=seg, positions_BS=pos, **kw)
    start = 0
    for doc in docs:
        alone = model(doc, **kw)
        n = doc.shape[1]
        np.testing.assert_allclose(got.logits[:, start:start + n], alone.logits, atol=1e-5)
        if call == "all_loops":  # the read-out step is per token; in adaptive calls the batch shares iterations
            np.testing.assert_array_equal(got.exit_step[:, start:start + n], alone.exit_step)
        start += n


def test_layout_arrays_of_the_wrong_shape_are_value_errors():
    model = _model()
    tokens = _tokens(b=2, s=12)
    with pytest.raises(ValueError, match=r"segment_ids_BS.shape=\(2, 11\)"):
        model(tokens, segment_ids_BS=jnp.zeros((2, 11), jnp.int32))
    with pytest.raises(ValueError, match=r"positions_BS.shape=\(12,\)"):
        model(tokens, positions_BS=jnp.arange(12))


def test_attention_impl_that_cannot_run_here_fails_before_tracing():
    with pytest.raises(ValueError, match="attention_impl='splash': needs a TPU"):
        _model(attention_impl="splash")(_tokens())
    with pytest.raises(ValueError, match="attention_impl='cudnn': needs an NVIDIA GPU"):
        _model(attention_impl="cudnn")(_tokens())
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        _model(attention_impl="flash")
