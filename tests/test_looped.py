"""The scanned, rematerialised core against an independent plain Python loop over the same shared layers."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj

VARIANTS = {
    "pre": dict(),
    "ouro": dict(norm_scheme="sandwich", step_norm=True),
    "inject_add_prelude_coda": dict(input_injection="add", n_prelude=1, n_coda=1),
    "inject_concat_untied": dict(input_injection="concat", tie_embeddings=False),
}


def _model(seed=0, **kw):
    cfg = lj.tiny(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, init_std=0.2, **kw)
    return lj.LoopedLM(cfg, rngs=nnx.Rngs(seed))


def _tokens(b=2, s=10, seed=1, vocab=64):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab)


def reference_logits(model: lj.LoopedLM, tokens_BS, n_loops):
    """Plain Python loop written from the architecture, not from LoopedCore.step."""
    cfg, core = model.cfg, model.core
    b, s = tokens_BS.shape
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin, mask = model.rope_and_layout(pos)
    e = model.embed[...][tokens_BS]
    for layer in model.prelude:
        e = layer(e, cos, sin, mask)
    h = e if cfg.input_injection == "none" else jnp.zeros_like(e)
    for _ in range(n_loops):
        if cfg.input_injection == "add":
            h = h + e
        elif cfg.input_injection == "concat":
            h = jnp.concatenate([h, e], -1) @ core.adapter[...]
        for layer in core.layers:
            h = layer(h, cos, sin, mask)
        if cfg.step_norm:
            h = core.norm(h)
    x = h if cfg.step_norm else core.norm(h)
    for layer in model.coda:
        x = layer(x, cos, sin, mask)
    if model.coda_norm is not None:
        x = model.coda_norm(x)
    w = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    return x @ w


def _ce(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scan_equals_python_loop_forward_and_grads(variant):
    model = _model(**VARIANTS[variant])
    tokens = _tokens()
    np.testing.assert_allclose(model(tokens, n_loops=3).logits, reference_logits(model, tokens, 3), atol=1e-5)

    g_scan = nnx.grad(lambda m: _ce(m(tokens, n_loops=3).logits, tokens))(model)
    g_ref = nnx.grad(lambda m: _ce(reference_logits(m, tokens, 3), tokens))(model)
    flat_scan, flat_ref = nnx.to_flat_state(g_scan), nnx.to_flat_state(g_ref)
    assert [k for k, _ in flat_scan] == [k for k, _ in flat_ref]
    for (path, a), (_, b) in zip(flat_scan, flat_ref):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))
        if "gate" not in path:  # the gate does not feed the logits
            assert float(jnp.abs(b[...]).max()) > 0, path


def _assert_logits_and_grads_match_reference(model, tokens, n_loops):
    np.testing.assert_allclose(model(tokens, n_loops=n_loops).logits, reference_logits(model, tokens, n_loops),
                               atol=1e-5)
    g = nnx.to_flat_state(nnx.grad(lambda m: _ce(m(tokens, n_loops=n_loops).logits, tokens))(model))
    g_ref = nnx.to_flat_state(nnx.grad(lambda m: _ce(reference_logits(m, tokens, n_loops), tokens))(model))
    for (path, a), (_, b) in zip(g, g_ref):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("unroll", [True, 3])
def test_scan_unroll_equals_python_loop_forward_grads_and_steps(unroll):
    """``scan_unroll`` (full, and 3 over 4 loops: a remainder) changes the program, not the numbers: logits and
    every gradient against the plain loop, and the per-loop outputs and gates against the plain scan."""
    model = _model(scan_unroll=unroll, **VARIANTS["ouro"])
    tokens = _tokens()
    _assert_logits_and_grads_match_reference(model, tokens, 4)
    scan = _model(**VARIANTS["ouro"])
    a, b = model(tokens, n_loops=4, return_steps=True), scan(tokens, n_loops=4, return_steps=True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_scan_layers_equals_reference_forward_grads_and_masked_while_loop():
    """``scan_layers``: the k layers as a scan over stacked parameters give the plain-loop logits and gradients
    (per layer), and the masked while_loop and run_all_loops executors give what the unrolled layers give."""
    kw = dict(VARIANTS["ouro"], n_layers=3)
    model, plain = _model(scan_layers=True, **kw), _model(**kw)
    tokens = _tokens()
    _assert_logits_and_grads_match_reference(model, tokens, 3)
    for kwargs in (dict(exit_rule=lj.QExit(0.6)), dict(exit_rule=lj.QExit(0.6), run_all_loops=True)):
        a, b = model(tokens, n_loops=4, **kwargs), plain(tokens, n_loops=4, **kwargs)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
        np.testing.assert_array_equal(a.exit_step, b.exit_step)


def test_unrolled_path_equals_scan():
    model = _model(norm_scheme="sandwich", step_norm=True)
    tokens = _tokens()
    a = model(tokens, n_loops=4, return_steps=True)
    b = model(tokens, n_loops=4, return_steps=True, use_scan=False)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["pre", "ouro"])
def test_step_logits_equal_shorter_calls(variant):
    model = _model(**VARIANTS[variant])
    tokens = _tokens()
    out = model(tokens, n_loops=5, return_steps=True)
    assert out.step_logits.shape == (5, 2, 10, 64) and out.step_hidden.shape == (5, 2, 10, 32)
    for t in range(5):
        short = model(tokens, n_loops=t + 1)
        np.testing.assert_allclose(out.step_logits[t], short.logits, atol=1e-5)
        np.testing.assert_allclose(out.gate_logits[..., : t + 1], short.gate_logits, atol=1e-5)


def test_param_count_independent_of_loops_and_holds_k_layers():
    cfg = lj.tiny(n_layers=3)
    counts = {lj.count_params(lj.LoopedLM(cfg.replace(n_loops=n), rngs=nnx.Rngs(0))) for n in (1, 4, 16)}
    assert len(counts) == 1
    d, f, n, k, h, v = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.vocab_size
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
    expected = v * d + 3 * per_layer + d + (d + 1)  # embed (tied) + k layers + norm + gate
    assert counts == {expected}
    # the same module runs any loop count without new parameters
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(vocab=cfg.vocab_size)
    for loops in (1, 4, 16):
        assert model(tokens, n_loops=loops).logits.shape == (2, 10, cfg.vocab_size)
    assert lj.count_params(model) == expected


@pytest.mark.parametrize("policy", ["none", "full", "save_dots", "minimal", "save_qkv"])
def test_every_remat_policy_gives_same_loss_and_grads(policy):
    tokens = _tokens()
    base = _model(remat_policy="none", norm_scheme="sandwich", step_norm=True)
    model = _model(remat_policy=policy, norm_scheme="sandwich", step_norm=True)

    def loss(m):
        out = m(tokens, n_loops=3, return_steps=True)
        return _ce(out.logits, tokens) + 0.1 * out.exit_pdf.mean() + 0.01 * out.step_hidden.sum()

    (l0, g0), (l1, g1) = nnx.value_and_grad(loss)(base), nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(l1, l0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_remat_policy_is_applied_in_the_jaxpr():
    tokens = _tokens()
    for policy, expect in (("none", False), ("full", True)):
        model = _model(remat_policy=policy)
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens).logits.sum())(state))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == expect


def test_loops_beyond_config_extrapolate_and_stay_finite():
    model = _model()
    out = model(_tokens(), n_loops=3 * model.cfg.n_loops)
    assert np.isfinite(np.asarray(out.logits)).all()


def _loss_and_grads(model, tokens):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return _ce(nnx.merge(graphdef, p)(tokens).logits, tokens)

    return jax.value_and_grad(loss)(params)


# every policy under per-layer remat, every scope under the policies that differ most, and the scan over layers
REMAT = ([(p, "layer", False) for p in ("full", "save_dots", "minimal", "save_qkv", "save_dots_offload", "offload")]
         + [(p, s, False) for p in ("full", "save_dots", "offload") for s in ("loop", "both")]
         + [(p, s, True) for p, s in (("none", "loop"), ("full", "layer"), ("save_qkv", "layer"), ("full", "both"),
                                      ("offload", "layer"))])
_REMAT_KW = dict(norm_scheme="sandwich", step_norm=True, n_loops=3)


@functools.lru_cache(maxsize=1)
def _no_remat_loss_and_grads():
    return jax.jit(_loss_and_grads)(_model(remat_policy="none", **_REMAT_KW), _tokens(s=12))


@pytest.mark.parametrize("policy,scope,scan_layers", REMAT)
def test_every_remat_policy_and_scope_gives_the_no_remat_gradients(policy, scope, scan_layers):
    """... and so does ``scan_layers`` (the k layers as a scan over their stacked parameters)."""
    want_loss, want = _no_remat_loss_and_grads()
    model = _model(remat_policy=policy, remat_scope=scope, scan_layers=scan_layers, **_REMAT_KW)
    got_loss, got = jax.jit(_loss_and_grads)(model, _tokens(s=12))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got, want)


@pytest.mark.parametrize("policy,scope,scan_layers", [("offload", "layer", True), ("offload", "layer", False),
                                                      ("save_dots_offload", "layer", True), ("offload", "loop", False),
                                                      ("offload", "both", False), ("full", "layer", True)])
def test_offload_policies_move_states_to_host_under_every_scope(policy, scope, scan_layers):
    """The gradient's program puts saved states on ``pinned_host`` for the offload policies (also under per-layer
    remat, where the layer input must be tagged inside the layer's checkpoint), and nothing for the others."""
    model = _model(remat_policy=policy, remat_scope=scope, scan_layers=scan_layers, **_REMAT_KW)
    jaxpr = str(jax.make_jaxpr(_loss_and_grads)(model, _tokens(s=12)))
    moves = jaxpr.count("<host>")  # arrays typed as living in host memory
    assert (moves > 0) == policy.endswith("offload"), (policy, scope, moves)
