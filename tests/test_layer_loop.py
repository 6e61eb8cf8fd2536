"""Per-layer adaptive loops (``loopjax.layer_loop``) against a float64 NumPy implementation of the formulas and
against the unrolled equivalent written from the model's own decoder layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.layer_loop import LayerLoop


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_softplus(x):
    return np.log1p(np.exp(x))


def _np_toy_step(h, s, w):
    return h + s * np.tanh(h @ w)


def _np_layer_loop(params, x, w):
    """The formulas of THINK-OR-KNOW.md in float64: (Σ p_t h_t, E[n]) for the toy layer h + s·tanh(h W)."""
    a, rw, rt, rb = params
    n = a.shape[0]
    h, survive = x, np.ones(x.shape[:-1])
    out, en = np.zeros_like(x), np.zeros(x.shape[:-1])
    for t in range(1, n + 1):
        h = _np_toy_step(h, _np_softplus(a[t - 1]), w)
        lam = _np_sigmoid(h @ rw + rt * (t - 1) / max(n - 1, 1) + rb)
        p = survive if t == n else lam * survive
        out, en = out + p[..., None] * h, en + p * t
        survive = survive * (1 - lam)
    return out, en


def _loop_module(n, d, seed):
    cfg = lj.tiny(d_model=d, n_heads=1, n_kv_heads=1, layer_loops=max(n, 2), init_std=0.5)
    loop = LayerLoop(cfg, nnx.Rngs(seed))
    if n == 1:  # a one-iteration loop: the module's formulas at N = 1 (the model builds none at layer_loops=1)
        loop = LayerLoop(cfg.replace(layer_loops=2), nnx.Rngs(seed))
        loop.n_iterations = 1
        loop.scale_logits = nnx.Param(loop.scale_logits[...][:1], logical_axes=(None,))
    rng = np.random.default_rng(seed)
    loop.scale_logits[...] = jnp.asarray(rng.normal(0, 1, n), jnp.float32)
    loop.router_b[...] = jnp.asarray(rng.normal(), jnp.float32)
    loop.router_t[...] = jnp.asarray(rng.normal(), jnp.float32)
    return loop


@pytest.mark.parametrize("n", [1, 2, 3])
def test_layer_loop_values_and_grads_match_float64_numpy(n):
    d, seed = 6, 10 + n
    loop = _loop_module(n, d, seed)
    rng = np.random.default_rng(seed + 100)
    x = rng.normal(0, 1, (2, 3, d))
    w = rng.normal(0, 0.5, (d, d))
    c_out, c_en = rng.normal(0, 1, (2, 3, d)), rng.normal(0, 1, (2, 3))
    graphdef, params = nnx.split(loop)

    def loss(params, x, w):
        out, stats, _ = nnx.merge(graphdef, params).run(lambda h, s: (h + s * jnp.tanh(h @ w), None), x)
        return jnp.sum(out * c_out) + jnp.sum(stats.expected_n_BS * c_en), (out, stats)

    (_, (out, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    p64 = [np.asarray(params[k][...], np.float64) for k in ("scale_logits", "router_w", "router_t", "router_b")]
    want_out, want_en = _np_layer_loop(p64, x, w)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.expected_n_BS, want_en, rtol=1e-5)
    assert 1 <= want_en.min() and want_en.max() <= n
    np.testing.assert_array_equal(stats.exit_iteration_BS, n)

    def np_loss(p, x, w):
        o, e = _np_layer_loop(p, x, w)
        return np.sum(o * c_out) + np.sum(e * c_en)

    def numeric_grad(f, arr):
        g, eps = np.zeros_like(arr), 1e-6
        for i in np.ndindex(arr.shape):
            up, dn = arr.copy(), arr.copy()
            up[i] += eps
            dn[i] -= eps
            g[i] = (f(up) - f(dn)) / (2 * eps)
        return g

    gp, gx, gw = grads
    for j, name in enumerate(("scale_logits", "router_w", "router_t", "router_b")):
        want = numeric_grad(lambda v: np_loss(p64[:j] + [v] + p64[j + 1:], x, w), p64[j])
        np.testing.assert_allclose(gp[name][...], want, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gx, numeric_grad(lambda v: np_loss(p64, v, w), x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, numeric_grad(lambda v: np_loss(p64, x, v), w), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the model

def _cfg(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, init_std=0.2, n_loops=2,
                layer_loops=3, layer_loop_scale_init=-0.5)
    base.update(kw)
    return lj.tiny(**base)


def _model(seed=0, **kw):
    return lj.LoopedLM(_cfg(**kw), rngs=nnx.Rngs(seed))


def _tokens(b=2, s=10, seed=1, vocab=64):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab)


def reference_forward(model, tokens_BS):
    """Unrolled Python loops written from the formulas with the model's decoder layers: (logits, E[n] [B, S, k])."""
    cfg, core = model.cfg, model.core
    b, s = tokens_BS.shape
    cos, sin, layout = model.rope_and_layout(jnp.broadcast_to(jnp.arange(s), (b, s)))
    e = model.embed[...][tokens_BS]
    for layer in model.prelude:
        e = layer(e, cos, sin, layout)
    h = e if cfg.input_injection == "none" else jnp.zeros_like(e)
    ens = []
    for _ in range(cfg.n_loops):
        if cfg.input_injection == "add":
            h = h + e
        en_loop = []
        for layer, loop in zip(core.layers, core.layer_loops):
            n = cfg.layer_loops
            x, survive, acc, en = h, 1.0, 0.0, 0.0
            for t in range(1, n + 1):
                x = layer(x, cos, sin, layout, jax.nn.softplus(loop.scale_logits[...][t - 1]))
                lam = jax.nn.sigmoid(x @ loop.router_w[...] + loop.router_t[...] * (t - 1) / (n - 1)
                                     + loop.router_b[...])
                p = survive if t == n else lam * survive
                acc, en, survive = acc + p[..., None] * x, en + p * t, survive * (1 - lam)
            h = acc
            en_loop.append(en)
        ens.append(jnp.stack(en_loop, -1))
        if cfg.step_norm:
            h = core.norm(h)
    x = h if cfg.step_norm else core.norm(h)
    for layer in model.coda:
        x = layer(x, cos, sin, layout)
    if model.coda_norm is not None:
        x = model.coda_norm(x)
    w = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    return x @ w, jnp.mean(jnp.stack(ens), 0)


def _loss(logits, en, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() + 0.1 * en.mean()


def _loss_and_grads(model, tokens, reference=False):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p)
        if reference:
            return _loss(*reference_forward(m, tokens), tokens)
        out = m(tokens)
        return _loss(out.logits, out.layer_expected_n, tokens)

    return jax.value_and_grad(loss)(params)


VARIANTS = {"pre": {}, "ouro": dict(norm_scheme="sandwich", step_norm=True),
            "inject_prelude_coda_one_loop": dict(input_injection="add", n_prelude=1, n_coda=1, n_loops=1)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_values_and_grads_equal_unrolled_reference(variant):
    model, tokens = _model(**VARIANTS[variant]), _tokens()
    out = model(tokens)
    want_logits, want_en = reference_forward(model, tokens)
    np.testing.assert_allclose(out.logits, want_logits, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out.layer_expected_n, want_en, rtol=1e-5)
    assert out.layer_expected_n.shape == (2, 10, 2) and out.layer_iterations.shape == (model.cfg.n_loops, 2)
    np.testing.assert_array_equal(out.layer_iterations, 3)
    got_loss, got = jax.jit(_loss_and_grads)(model, tokens)
    want_loss, want = jax.jit(functools.partial(_loss_and_grads, reference=True))(model, tokens)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), got, want)


@functools.lru_cache(maxsize=1)
def _no_remat_loss_and_grads():
    return jax.jit(_loss_and_grads)(_model(remat_policy="none"), _tokens())


@pytest.mark.parametrize("policy,scope,scan_layers", [("full", "loop", False), ("full", "loop", True),
                                                      ("save_dots", "layer", False), ("full", "layer", True),
                                                      ("minimal", "both", True), ("offload", "both", False),
                                                      ("none", "loop", True)])
def test_scan_layers_and_remat_scopes_give_the_same_values_and_grads(policy, scope, scan_layers):
    want_loss, want = _no_remat_loss_and_grads()
    model = _model(remat_policy=policy, remat_scope=scope, scan_layers=scan_layers)
    got_loss, got = jax.jit(_loss_and_grads)(model, _tokens())
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got, want)


def test_layer_loops_1_is_todays_model_bit_for_bit():
    """``layer_loops=1`` builds no extra parameter and computes what the pre-existing layer call computes."""
    from tests.test_looped import reference_logits  # the block-loop reference, written before per-layer loops

    cfg = _cfg(layer_loops=1)
    model, tokens = lj.LoopedLM(cfg, rngs=nnx.Rngs(0)), _tokens()
    assert model.core.layer_loops is None
    plain = lj.LoopedLM(cfg.replace(layer_loops=1, layer_loop_scale_init=3.0), rngs=nnx.Rngs(0))
    assert lj.count_params(model) == lj.count_params(plain)
    out = model(tokens)
    assert out.layer_expected_n is None and out.layer_iterations is None
    np.testing.assert_allclose(out.logits, reference_logits(model, tokens, cfg.n_loops), rtol=2e-5, atol=2e-5)
    # the layer call with residual_scale=None is the exact computation of the plain decoder layer
    layer, x = model.core.layers[0], jax.random.normal(jax.random.key(3), (2, 10, 32))
    cos, sin, layout = model.rope_and_layout(jnp.broadcast_to(jnp.arange(10), (2, 10)))
    h = x + layer.attn(layer.norm_in(x), cos, sin, layout)
    np.testing.assert_array_equal(layer(x, cos, sin, layout), h + layer.mlp(layer.norm_post(h)))
    s = jnp.float32(0.37)
    h = x + s * layer.attn(layer.norm_in(x), cos, sin, layout)
    np.testing.assert_allclose(layer(x, cos, sin, layout, s), h + s * layer.mlp(layer.norm_post(h)), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_loops=0), "layer_loops=0"), (dict(layer_loops=2.0), "layer_loops=2.0"),
    (dict(layer_loop_scale_init=float("nan")), "layer_loop_scale_init"),
])
def test_bad_config_raises_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kwargs)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, True, "0.5"])
def test_bad_threshold_raises_before_tracing(threshold):
    with pytest.raises(ValueError, match="layer_exit_threshold"):
        _model()(_tokens(), layer_exit_threshold=threshold)


def test_threshold_without_layer_loops_raises():
    with pytest.raises(ValueError, match="layer_loops >= 2"):
        _model(layer_loops=1)(_tokens(), layer_exit_threshold=0.9)


# ------------------------------------------------------------------------------------------------ inference

def test_threshold_one_equals_the_all_iterations_expectation():
    model, tokens = _model(), _tokens()
    full, adaptive = model(tokens), model(tokens, layer_exit_threshold=1.0)
    np.testing.assert_allclose(adaptive.logits, full.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adaptive.layer_expected_n, full.layer_expected_n, rtol=1e-5)
    np.testing.assert_array_equal(adaptive.layer_iterations, 3)
    np.testing.assert_array_equal(adaptive.layer_exit_iteration, 3.0)


def test_threshold_with_routers_that_always_halt_runs_one_iteration():
    model, tokens = _model(scan_layers=True), _tokens()
    for loop in model.core.layer_loops:
        loop.router_b[...] = jnp.float32(30.0)  # λ ≈ 1: all the mass on the first iteration
    full, adaptive = model(tokens), model(tokens, layer_exit_threshold=0.99)
    np.testing.assert_array_equal(adaptive.layer_iterations, 1)
    np.testing.assert_array_equal(adaptive.layer_exit_iteration, 1.0)
    np.testing.assert_allclose(adaptive.layer_expected_n, 1.0, rtol=1e-6)
    np.testing.assert_allclose(adaptive.logits, full.logits, rtol=1e-5, atol=1e-5)


def _np_adaptive(params, x, w, threshold):
    """The documented inference semantics in float64, with a toy layer that mixes tokens (each token reads the mean
    of every token's input, as attention would): stopped tokens feed their frozen state to later iterations."""
    a, rw, rt, rb = params
    n = a.shape[0]

    def step(h, s):
        return h + s * np.tanh((h + h.mean(axis=1, keepdims=True)) @ w)

    h, active = x.copy(), np.ones(x.shape[:-1], bool)
    survive, out, en = np.ones(x.shape[:-1]), np.zeros_like(x), np.zeros(x.shape[:-1])
    exit_it, runs = np.full(x.shape[:-1], n), 0
    for t in range(1, n + 1):
        if not active.any():
            break
        runs = t
        new = step(h, _np_softplus(a[t - 1]))
        lam = _np_sigmoid(new @ rw + rt * (t - 1) / (n - 1) + rb)
        nxt = survive * (1 - lam)
        fires = (t == n) | (1 - nxt >= threshold)
        p = np.where(active, np.where(fires, survive, survive * lam), 0.0)
        out, en = out + p[..., None] * new, en + p * t
        survive = np.where(active, np.where(fires, 0.0, nxt), survive)
        h = np.where(active[..., None], new, h)
        exit_it = np.where(active & fires, t, exit_it)
        active = active & ~fires
    return out, en, exit_it, runs


def test_early_halting_token_keeps_its_state_frozen_and_others_see_it():
    n, d, threshold = 3, 6, 0.9
    loop = _loop_module(n, d, seed=7)
    rng = np.random.default_rng(8)
    x = rng.normal(0, 1, (2, 5, d))
    u = rng.normal(0, 1, d)
    u /= np.linalg.norm(u)
    loop.router_w[...] = jnp.asarray(8.0 * u, jnp.float32)  # tokens with x·u > ~0.3 halt after iteration 1
    loop.router_t[...] = jnp.float32(-2.0)
    loop.router_b[...] = jnp.float32(0.0)
    w = rng.normal(0, 0.5, (d, d))

    def step(h, s):
        return h + s * jnp.tanh((h + h.mean(axis=1, keepdims=True)) @ jnp.asarray(w, jnp.float32)), None

    out, stats, _ = loop.run_adaptive(step, jnp.asarray(x, jnp.float32), threshold)
    p64 = [np.asarray(loop.scale_logits[...], np.float64), 8.0 * u, -2.0, 0.0]
    want_out, want_en, want_exit, want_runs = _np_adaptive(p64, x, w, threshold)
    np.testing.assert_array_equal(stats.exit_iteration_BS, want_exit)
    assert int(stats.iterations) == want_runs
    early = want_exit == 1
    assert early.any() and (want_exit > 1).any(), want_exit  # the test needs both kinds of token
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.expected_n_BS, want_en, rtol=1e-5)
    # a token that stopped after iteration 1 reads out h_1 exactly (its remainder on its last computed state)
    h1 = np.asarray(step(jnp.asarray(x, jnp.float32), loop.scales()[0])[0])
    np.testing.assert_allclose(np.asarray(out)[early], h1[early], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.expected_n_BS)[early], 1.0)


# ------------------------------------------------------------------------------------------------ objective

def test_halting_loss_adds_the_ponder_cost():
    rng = np.random.default_rng(3)
    en = jnp.asarray(rng.uniform(1, 3, (2, 5, 4)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1)
    logits = jnp.asarray(rng.normal(0, 1, (2, 5, 11)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, (2, 5)))
    base = lj.halting_loss(lj.HaltingConfig(objective="final"), gate_BST=None, labels_BS=labels, mask_BS=mask,
                           step_logits_TBSV=logits[None])
    for weight in (0.1, -0.015):
        got = lj.halting_loss(lj.HaltingConfig(objective="final", ponder_weight=weight), gate_BST=None,
                              labels_BS=labels, mask_BS=mask, step_logits_TBSV=logits[None],
                              layer_expected_n_BSK=en, layer_loops=3)
        m = np.asarray(mask, np.float64)
        mean_en = (np.asarray(en, np.float64).mean(-1) * m).sum() / m.sum()
        np.testing.assert_allclose(got, float(base) + weight * (mean_en - 1) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="needs layer_expected_n_BSK"):
        lj.halting_loss(lj.HaltingConfig(objective="final", ponder_weight=0.1), gate_BST=None, labels_BS=labels,
                        step_logits_TBSV=logits[None])


def test_train_objective_adds_ponder_and_logs_expected_n_per_layer():
    from loopjax.train.step import objective_loss

    model, tokens = _model(), _tokens(s=9)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:])
    graphdef, params = nnx.split(model, nnx.Param)

    def total(params, weight):
        hcfg = lj.HaltingConfig(objective="ouro", ponder_weight=weight)
        return objective_loss(nnx.merge(graphdef, params), batch, hcfg, 0.0, None)

    grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
    (t0, m0), g0 = grad_fn(params, 0.0)
    (t1, m1), g1 = grad_fn(params, 0.5)
    en = model(batch["inputs"]).layer_expected_n
    ponder = (float(en.mean()) - 1) / 2
    np.testing.assert_allclose(m1["layer_ponder"], ponder, rtol=1e-5)
    np.testing.assert_allclose(t1, float(t0) + 0.5 * ponder, rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], float(m0["loss"]) + 0.5 * ponder, rtol=1e-5)
    for l in range(2):
        np.testing.assert_allclose(m0[f"layer{l}_expected_n"], en[..., l].mean(), rtol=1e-5)
    # the ponder term trains the routers and scales, and nothing it cannot reach
    gp = jax.jit(jax.grad(lambda p: 0.5 * (nnx.merge(graphdef, p)(batch["inputs"]).layer_expected_n.mean() - 1) / 2))(
        params)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a - b, c, rtol=1e-3, atol=1e-6), g1, g0, gp)
    assert np.abs(np.asarray(gp["core"]["layer_loops"][0]["router_b"][...])) > 0


@pytest.mark.parametrize("kwargs,match", [(dict(ponder_weight=float("inf")), "ponder_weight"),
                                          (dict(ponder_weight="0.1"), "ponder_weight"),
                                          (dict(ponder_weight=0.1, random_loops=True), "ponder_weight")])
def test_bad_ponder_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.HaltingConfig(**kwargs)


def test_negative_ponder_weight_is_allowed_and_ponder_without_layer_loops_raises():
    from loopjax.train.step import objective_loss

    assert lj.HaltingConfig(ponder_weight=-0.015).ponder_weight == -0.015  # the paper's ablation
    model, tokens = _model(layer_loops=1), _tokens()
    with pytest.raises(ValueError, match="ponder_weight=0.1: needs per-layer loops"):
        objective_loss(model, dict(inputs=tokens, targets=tokens), lj.HaltingConfig(ponder_weight=0.1), 0.0, None)


# ------------------------------------------------------------------------------------------------ counts

def test_count_params_and_forward_flops_match_closed_forms():
    v, d, n_h, k_h, h, f, k, n, t, s = 64, 32, 4, 2, 8, 64, 2, 3, 2, 10
    cfg = _cfg(n_prelude=1)
    layer_params = d * n_h * h + 2 * d * k_h * h + n_h * h * d + 3 * d * f + 2 * d
    loop_params = n + d + 2  # scale logits, router weights on [h; t], router bias
    want = v * d + (1 + k) * layer_params + d + (d + 1) + k * loop_params
    assert lj.count_params(lj.LoopedLM(cfg, rngs=nnx.Rngs(0))) == want
    assert lj.count_params(lj.LoopedLM(cfg.replace(layer_loops=1), rngs=nnx.Rngs(0))) == want - k * loop_params

    layer = 2 * s * d * (n_h * h + 2 * k_h * h) + 2 * s * n_h * h * d + 4 * s * s * n_h * h + 6 * s * d * f
    router = 2 * s * (d + 1)
    head, gate = 2 * s * d * v, 2 * s * d
    assert lj.forward_flops(cfg, s) == layer + t * (k * n * (layer + router) + gate) + head
    assert lj.forward_flops(cfg, s, layer_iterations=1.5) == layer + t * (k * 1.5 * (layer + router) + gate) + head
    assert lj.train_flops(cfg, s) == 3 * lj.forward_flops(cfg, s)
    assert lj.forward_flops(cfg.replace(layer_loops=1), s) == layer + t * (k * layer + gate) + head
    with pytest.raises(ValueError, match="layer_iterations"):
        lj.forward_flops(cfg, s, layer_iterations=4)


# ------------------------------------------------------------------------------------------------ generation

def test_kv_cache_greedy_generation_equals_no_cache_forward():
    """Each layer iteration caches its keys and values in its own slot; greedy decoding with the cache gives the
    no-cache forward's logits, with the block loop, a prelude and a coda."""
    from loopjax.generate import generate, prefill

    model = _model(n_prelude=1, n_coda=1, input_injection="add", max_seq_len=32)
    prompt, n_new = np.asarray(_tokens(2, 5, seed=4)), 5
    out = generate(model, prompt, n_new, return_logits=True)
    seq = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
    graphdef, state = nnx.split(model)
    full = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).logits)(state, jnp.asarray(seq)))
    ref = full[:, prompt.shape[1] - 1:-1]
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.argmax(-1))
    cache, _ = prefill(model, prompt, capacity=16)
    assert len(cache.core_k) == model.cfg.n_loops * model.cfg.n_layers * model.cfg.layer_loops
    # block-loop early exit while decoding still runs (each step's layer iterations under the exit rule's cond)
    ex = generate(model, prompt, n_new, exit_rule=lj.QExit(0.5), kv_mode="per_step")
    assert np.isin(np.asarray(ex.exit_steps), (1, 2)).all()


# ------------------------------------------------------------------------------------------------ persistence, mesh

def test_checkpoint_save_restore_round_trip(tmp_path):
    from loopjax.checkpoint import Checkpointer

    model, tokens = _model(), _tokens()
    for i, loop in enumerate(model.core.layer_loops):  # trained-looking values, not the init
        loop.scale_logits[...] = jnp.asarray([0.3, -1.0, 2.0], jnp.float32) + i
    state = nnx.state(model, nnx.Param)
    ckpt = Checkpointer(tmp_path, max_to_keep=1, async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    ckpt.close()
    fresh = _model(seed=5)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.state(fresh, nnx.Param))
    step, restored = Checkpointer(tmp_path, max_to_keep=1).restore(target)
    assert step == 1
    nnx.update(fresh, restored)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh, nnx.Param), state)
    np.testing.assert_array_equal(fresh(tokens).logits, model(tokens).logits)


def test_sharded_loss_and_grads_equal_single_device():
    """One loss-and-gradient step (the train step's core) on the 8-device CPU mesh under fsdp_tp, layers scanned
    over their stacked (layer, loop) parameters, equals the single-device step."""
    from loopjax.config import MeshConfig
    from loopjax.sharding import make_mesh, param_shardings, rules_for, shard_batch, use_rules

    cfg = _cfg(scan_layers=True, remat_scope="layer", max_seq_len=16)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 16), dtype=np.int32)
    graphdef, host = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))

    def loss_and_grads(state, tokens_BS):
        def loss(st):
            out = nnx.merge(graphdef, st)(tokens_BS)
            return _loss(out.logits, out.layer_expected_n, tokens_BS)
        return jax.value_and_grad(loss)(state)

    ref_loss, ref_grads = jax.jit(loss_and_grads)(host, tokens)
    mesh, rules = make_mesh(MeshConfig(2, 2, 2, rules="fsdp_tp")), rules_for("fsdp_tp")
    shardings = param_shardings(host, mesh, rules)
    assert shardings["core"]["layer_loops"][0]["router_w"].spec[0] == "fsdp"  # the router shards with the model
    with use_rules(mesh, rules):
        loss, grads = jax.jit(loss_and_grads, out_shardings=(None, shardings))(
            jax.device_put(host, shardings), shard_batch(tokens, mesh, rules))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        # sharded reductions only reorder float32 sums (scalar router weights sum over every token: a small floor)
        assert np.linalg.norm(g - r) <= 1e-5 * np.linalg.norm(r) + 1e-7


def test_block_loop_exit_rules_drive_cores_with_layer_loops():
    """The block loop's executors (``_halting_call``) run the per-layer loops inside each core step."""
    model, tokens = _model(), _tokens()
    plain = model(tokens)
    for kw in (dict(exit_rule=lj.FixedExit(2)), dict(exit_rule=lj.FixedExit(2), run_all_loops=True)):
        out = model(tokens, **kw)
        np.testing.assert_allclose(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.exit_step, 2)
    frozen = model(tokens, exit_rule=lj.FixedExit(2), layer_exit_threshold=1.0)
    np.testing.assert_allclose(frozen.logits, plain.logits, rtol=1e-5, atol=1e-5)


def test_exit_rule_calls_report_per_layer_stats_and_gates_of_the_loops_run():
    """Under a block-loop exit rule the per-layer fields cover the loops each token ran: with every token exiting
    after loop 2 of 3 they equal a plain 2-loop call's, loop 3 reports 0 iterations and NaN gates; with
    run_all_loops they equal the plain 3-loop call's. The per-layer loops run adaptively in both."""
    model = _model(n_loops=3, memory_local_slots=4, memory_global_slots=2, memory_gate_bias=0.5)
    tokens = _tokens()
    fields = ("layer_expected_n", "layer_exit_iteration", "layer_iterations", "memory_gates")
    for threshold in (None, 0.6):
        two, three = (model(tokens, n_loops=n, layer_exit_threshold=threshold) for n in (2, 3))
        early = model(tokens, n_loops=3, exit_rule=lj.FixedExit(2), layer_exit_threshold=threshold)
        for f in fields[:2]:
            np.testing.assert_allclose(getattr(early, f), getattr(two, f), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(early.layer_iterations[:2], two.layer_iterations)
        np.testing.assert_array_equal(early.layer_iterations[2], 0)
        np.testing.assert_allclose(early.memory_gates[:2], two.memory_gates, rtol=1e-5, atol=1e-6)
        assert np.isnan(np.asarray(early.memory_gates[2])).all()
        full = model(tokens, n_loops=3, exit_rule=lj.FixedExit(2), run_all_loops=True,
                     layer_exit_threshold=threshold)
        for f in fields:
            np.testing.assert_allclose(getattr(full, f), getattr(three, f), rtol=1e-5, atol=1e-6)
        if threshold is not None:  # the threshold did stop some tokens early
            assert float(np.asarray(early.layer_exit_iteration).min()) < model.cfg.layer_loops


def test_exit_rule_per_token_stats_average_over_the_loops_each_token_ran():
    """Tokens exiting at different block loops: each token's per-layer E[n] is the mean over its own loops."""
    from loopjax.model import layer_outputs
    from loopjax.layer_loop import LayerLoopStats

    rng = np.random.default_rng(0)
    en_TKBS = jnp.asarray(rng.uniform(1, 3, (3, 2, 1, 4)), jnp.float32)
    stats = LayerLoopStats(en_TKBS, jnp.full((3, 2, 1, 4), 3, jnp.int32), jnp.full((3, 2), 3, jnp.int32))
    exit_BS = np.array([[1, 2, 3, 3]])
    ran_TBS = jnp.arange(3)[:, None, None] < exit_BS[None]
    got = layer_outputs(stats, None, ran_TBS=ran_TBS, executed_T=jnp.arange(3) < 3)["layer_expected_n"]
    want = np.stack([np.asarray(en_TKBS)[:e, :, 0, i].mean(0) for i, e in enumerate(exit_BS[0])])
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_ouro_export_refuses_layer_loops():
    from loopjax.convert.ouro import hf_ouro_config

    ouro_like = _cfg(norm_scheme="sandwich", step_norm=True)
    assert hf_ouro_config(ouro_like.replace(layer_loops=1))["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="layer_loops"):
        hf_ouro_config(ouro_like)
