"""loopjax.analysis against independent references: the model's own forward, float64 NumPy attention and
metrics, hand-built affine trajectories with known contraction rates, and exact Jacobians from jax.jacfwd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax import analysis as an
from loopjax.analysis import plots
from loopjax.data.tasks import PHop, answer_correct


def _model(seed=0, **kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, init_std=0.2)
    base.update(kw)
    return lj.LoopedLM(lj.tiny(**base), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def looped():
    """One model exercising every submodule the recorder re-runs (prelude, add-injection, sandwich norms, step
    norm, gate, coda), its tokens and its recorded 3-loop trajectory (shared so each compiles once)."""
    model = _model(norm_scheme="sandwich", step_norm=True, input_injection="add", n_prelude=1, n_coda=1)
    batch = PHop(alphabet=4, n=10, hops=(1,)).eval_batch(seed=0, count=4)  # vocabulary 6 < the model's 64
    tokens = jnp.asarray(batch["inputs"])
    return model, tokens, an.record(model, tokens, n_loops=3), batch


def _trajectory(layers_TkBSD, attn=None, logits=None):
    layers = jnp.asarray(layers_TkBSD, jnp.float32)
    return an.Trajectory(embed_BSD=layers[0, 0], state0_BSD=layers[0, 0], layer_TkBSD=layers,
                         state_TBSD=layers[:, -1], out_TBSD=layers[:, -1], gate_TBS=None, attn_TkBNQS=attn,
                         step_logits_TBSV=logits, heads_N=jnp.zeros((0,), jnp.int32),
                         queries_Q=jnp.zeros((0,), jnp.int32))


# --------------------------------------------------------------------------------------------- recording

def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_rope(x_BSNH, pos_S, theta):
    h = x_BSNH.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = pos_S[:, None] * inv  # [S, H/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x_BSNH[..., : h // 2], x_BSNH[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_attention_probs(layer, x_BSD, cfg):
    """Float64 causal GQA softmax of one layer from its input, written from the architecture: [B, N, S, S]."""
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    xn = _np_rms(np.asarray(x_BSD, np.float64), f64(layer.norm_in.scale), cfg.rms_eps)
    pos = np.arange(x_BSD.shape[1], dtype=np.float64)
    q = _np_rope(np.einsum("bsd,dnh->bsnh", xn, f64(layer.attn.wq)), pos, cfg.rope_theta)
    k = _np_rope(np.einsum("bsd,dkh->bskh", xn, f64(layer.attn.wk)), pos, cfg.rope_theta)
    k = np.repeat(k, cfg.n_heads // cfg.kv_heads, axis=2)  # query head j reads kv head j // G
    scores = np.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(cfg.d_head)
    s = x_BSD.shape[1]
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_record_equals_model_forward_and_float64_attention(looped):
    model, tokens, traj, _ = looped
    cfg, n_loops = model.cfg, traj.layer_TkBSD.shape[0]
    ref = model(tokens, n_loops=n_loops, return_steps=True)
    k, (b, s) = cfg.n_layers, tokens.shape
    assert traj.layer_TkBSD.shape == (n_loops, k, b, s, cfg.d_model)
    assert traj.attn_TkBNQS.shape == (n_loops, k, b, cfg.n_heads, s, s)
    np.testing.assert_allclose(traj.out_TBSD, ref.step_hidden, atol=1e-5, rtol=0)
    np.testing.assert_allclose(traj.step_logits_TBSV, ref.step_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(traj.step_logits_TBSV[-1], ref.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(jnp.moveaxis(traj.gate_TBS, 0, -1), ref.gate_logits, atol=1e-5, rtol=0)
    # step norm: the carried state is the normed last layer
    np.testing.assert_allclose(traj.state_TBSD, jax.vmap(model.core.norm)(traj.layer_TkBSD[:, -1]), atol=1e-5)
    # attention of every layer and loop from its recorded input, in float64
    h_prev = np.asarray(traj.state0_BSD)
    for t in range(n_loops):
        x = h_prev + np.asarray(traj.embed_BSD)  # additive injection
        for li, layer in enumerate(model.core.layers):
            np.testing.assert_allclose(traj.attn_TkBNQS[t, li], _np_attention_probs(layer, x, cfg), atol=2e-5)
            x = np.asarray(traj.layer_TkBSD[t, li])
        h_prev = np.asarray(traj.state_TBSD[t])
    # a head / query subset is the same slice of the full recording
    sub = an.record(model, tokens, n_loops=n_loops, heads=(3, 1), query_positions=(s - 1,), logits=False)
    assert sub.step_logits_TBSV is None
    np.testing.assert_array_equal(sub.attn_TkBNQS, traj.attn_TkBNQS[:, :, :, [3, 1]][:, :, :, :, [s - 1]])
    with pytest.raises(ValueError, match="heads"):
        an.record(model, tokens, heads=(cfg.n_heads,))


# --------------------------------------------------------------------------------------------- fixed points

def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_affine_cycle_converges_at_known_rate_with_distinct_fixed_points():
    """Two affine 'layers' x -> r_l Q_l x + b_l: every layer's change shrinks by exactly r1·r2 per loop."""
    rng = np.random.default_rng(0)
    d, r1, r2, n_loops = 6, 0.95, 0.95, 120
    a1, a2 = r1 * _orthogonal(rng, d), r2 * _orthogonal(rng, d)
    b1, b2 = rng.normal(size=d), rng.normal(size=d)
    h2 = np.linalg.solve(np.eye(d) - a2 @ a1, a2 @ b1 + b2)  # fixed points: h2* = A2 h1* + b2, h1* = A1 h2* + b1
    h1 = a1 @ h2 + b1
    x = h2 + 0.05 * np.linalg.norm(h2) * rng.normal(size=(2, 3, d)) / np.sqrt(d)  # [B, S, D] start near h2*
    layers = []
    for _ in range(n_loops):
        y1 = x @ a1.T + b1
        x = y1 @ a2.T + b2
        layers.append(np.stack([y1, x]))
    traj = _trajectory(np.stack(layers))
    conv = an.layer_convergence(traj)
    np.testing.assert_allclose(an.convergence_rate(conv["abs_mean"][:40]), [r1 * r2] * 2, rtol=1e-4)
    # relative change: the ratio of consecutive loops tends to r1·r2 as ‖h_t‖ settles
    np.testing.assert_allclose(conv["mean"][31:38] / conv["mean"][30:37], r1 * r2, rtol=5e-3)
    expect = np.linalg.norm(h1 - h2) / np.sqrt(np.linalg.norm(h1) * np.linalg.norm(h2))
    np.testing.assert_allclose(an.fixed_point_distances(traj), [[0, expect], [expect, 0]], atol=1e-5)
    score = an.cyclic_score(traj)
    assert score[-1] > 0.999 and score[0] < score[-1]
    np.testing.assert_allclose(an.cyclic_score(_trajectory(traj.layer_TkBSD[:, :1])), 0.0)


def test_model_with_affine_loop_map_contracts_at_known_rate():
    """Zeroed attention and MLP outputs make each layer the identity, so with concat injection the loop map is
    F(h) = h·A_h + e·A_e; with A_h = r·Q (Q orthogonal) every token's change shrinks by exactly r per loop and the
    Jacobian's spectral norm is r."""
    r, d = 0.7, 16
    model = _model(d_model=d, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=1, input_injection="concat",
                   exit_gate=False)
    for layer in model.core.layers:
        layer.attn.wo[...] = jnp.zeros_like(layer.attn.wo[...])
        layer.mlp.w_down[...] = jnp.zeros_like(layer.mlp.w_down[...])
    adapter = np.array(model.core.adapter[...])
    adapter[:d] = r * _orthogonal(np.random.default_rng(2), d)
    model.core.adapter[...] = jnp.asarray(adapter)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (1, 5)), jnp.int32)
    traj = an.record(model, tokens, n_loops=8, attention=False, logits=False)
    delta, _ = an.step_change(traj.layer_TkBSD)  # [T-1, k, B, S]
    np.testing.assert_allclose(delta[1:] / delta[:-1], r, rtol=1e-3)
    sigma, _ = an.loop_contraction(model, tokens, traj.state_TBSD[-1:], key=jax.random.key(1), iters=20)
    np.testing.assert_allclose(sigma, [r], rtol=1e-5)


def test_power_iteration_on_affine_map_finds_known_spectral_norm():
    d, rng = 12, np.random.default_rng(1)
    u, v = _orthogonal(rng, d), _orthogonal(rng, d)
    s = np.linspace(0.3, 0.9, d)
    a = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
    b = jnp.asarray(rng.normal(size=d), jnp.float32)

    def f(x_BSD):
        return x_BSD @ a.T + b

    x = jnp.asarray(rng.normal(size=(1, 1, d)), jnp.float32)
    sigma, change = jax.jit(lambda x: an.spectral_norm(f, x, jax.random.key(5), iters=200))(x)
    np.testing.assert_allclose(sigma, 0.9, rtol=1e-5)
    assert change < 1e-5


@pytest.mark.slow  # jacfwd of the real loop map: the heaviest compile in this file
def test_loop_contraction_matches_exact_jacobian_svd(looped):
    model, tokens, traj, _ = looped
    tokens, states = tokens[:1], traj.state_TBSD[:2, :1]  # rows are independent: the first row's trajectory
    sigma, _ = an.loop_contraction(model, tokens, states, key=jax.random.key(0), iters=300)
    f, _ = an.loop_map(model, tokens)
    for t in range(states.shape[0]):
        jac = np.asarray(jax.jit(jax.jacfwd(f))(states[t]), np.float64).reshape(states[t].size, states[t].size)
        exact = np.linalg.svd(jac, compute_uv=False)[0]
        assert abs(float(sigma[t]) - exact) < 1e-3, (t, float(sigma[t]), exact)
    # the loop map is the model's step: one application from h_t gives h_{t+1}
    np.testing.assert_allclose(f(states[0]), states[1], atol=1e-5)


# --------------------------------------------------------------------------------------------- attention, lens

def _random_dists(rng, shape):
    x = np.exp(3 * rng.normal(size=shape))
    return jnp.asarray(x / x.sum(-1, keepdims=True), jnp.float32)


def test_attention_change_zero_for_equal_loops_and_matches_float64():
    rng = np.random.default_rng(0)
    a0 = _random_dists(rng, (2, 2, 3, 5, 7))  # [k, B, N, Q, S]
    a0 = np.asarray(a0).copy()
    a0[..., -1] = 0.0  # a zero entry: 0·log 0 must give 0, not nan
    a0 = jnp.asarray(a0 / a0.sum(-1, keepdims=True))
    a2 = _random_dists(rng, a0.shape)
    attn = jnp.stack([a0, a0, a2])  # loops 1 and 2 equal
    traj = _trajectory(np.zeros((3, 2, 2, 5, 4)), attn=attn)
    ch = an.attention_change(traj)
    assert ch["js"].shape == (2, 2, 3)
    assert np.all(np.asarray(ch["js"][0]) == 0.0) and np.all(np.asarray(ch["tv"][0]) == 0.0)
    p, q = np.asarray(a2, np.float64), np.asarray(a0, np.float64)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda x, y: np.where(x > 0, x * np.log2(x / y), 0.0).sum(-1)  # noqa: E731
        js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    np.testing.assert_allclose(ch["js"][1], js.mean(axis=(1, 3)), rtol=1e-5)
    np.testing.assert_allclose(ch["tv"][1], 0.5 * np.abs(p - q).sum(-1).mean(axis=(1, 3)), rtol=1e-5)
    # a query mask averages over the chosen queries only
    qmask = np.zeros((2, 5), np.float32)
    qmask[:, 2] = 1.0
    np.testing.assert_allclose(an.attention_change(traj, qmask)["js"][1], js[..., 2].mean(axis=1), rtol=1e-5)


def test_logit_lens_against_float64():
    logits = jnp.asarray(2 * np.random.default_rng(0).normal(size=(4, 2, 3, 11)), jnp.float32)
    lens = an.logit_lens(logits)
    x = np.asarray(logits, np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    kl = (np.exp(logp) * (logp - logp[-1])).sum(-1)
    np.testing.assert_allclose(lens["kl_per_token"], kl, atol=1e-5)
    np.testing.assert_allclose(lens["kl"], kl.mean(axis=(1, 2)), atol=1e-5)
    top = x.argmax(-1)
    np.testing.assert_allclose(lens["top1"], (top == top[-1]).mean(axis=(1, 2)))
    assert float(lens["kl"][-1]) == 0.0 and float(lens["top1"][-1]) == 1.0


# --------------------------------------------------------------------------------------------- efficiency

def _point(model, rule, acc, flops):
    return an.EvalPoint(model=model, rule=rule, accuracy=acc, mean_loops=1.0, answer_loops=1.0, iterations=1.0,
                        flops_per_token=flops, executed_flops_per_token=flops, n_examples=10)


def test_pareto_frontier_hand_table():
    table = [("a", 0.50, 10.0), ("b", 0.40, 12.0), ("c", 0.70, 20.0), ("d", 0.70, 25.0), ("e", 0.90, 40.0),
             ("f", 0.30, 5.0), ("g", 0.90, 40.0), ("h", 0.85, 40.0), ("i", 0.70, 20.0)]
    points = [_point("m", r, a, f) for r, a, f in table]
    assert [p.rule for p in an.pareto_frontier(points)] == ["f", "a", "c", "e"]
    assert list(an.pareto_mask([1.0], [0.5])) == [True]


def test_evaluate_rules_fixed_exit_matches_plain_forward(looped):
    model, tokens, traj, batch = looped  # the trajectory's loop-t logits are the plain forward with t loops
    rules = [lj.FixedExit(1), lj.FixedExit(3), lj.ConvergenceExit(1e9), lj.QExit(0.5)]
    points = an.evaluate_rules(model, batch, rules, n_loops=3, name="tiny", batch_size=2)
    s = tokens.shape[1]
    for n, p in zip((1, 3), points):
        assert p.rule == f"fixed={n}" and p.mean_loops == n and p.iterations == n
        pred = traj.step_logits_TBSV[n - 1].argmax(-1)
        assert p.accuracy == pytest.approx(float(answer_correct(pred, batch).mean()))
        assert p.flops_per_token == pytest.approx(lj.forward_flops(model.cfg, s, n) / s)
    conv = points[2]  # fires after the first loop for every token
    assert conv.mean_loops == 1.0 and conv.accuracy == points[0].accuracy
    q = points[3]
    assert 1.0 <= q.mean_loops <= 3.0 and q.iterations >= q.mean_loops
    assert q.flops_per_token == pytest.approx(lj.forward_flops(model.cfg, s, q.mean_loops) / s)
    assert "fixed=1" in an.points_table(points)
    grid = an.exit_rule_grid(3, q_grid=(0.5,), eps_grid=(0.1,), has_gate=False)
    assert [an.rule_name(r) for r in grid] == ["fixed=1", "fixed=2", "fixed=3", "conv=0.1"]


# --------------------------------------------------------------------------------------------- plots

def test_plots_write_nonempty_pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = [
        plots.plot_convergence(rng.uniform(1e-4, 1, (5, 2)), tmp_path / "conv.png"),
        plots.plot_attention_change(rng.uniform(0, 1, (5, 2, 4)), tmp_path / "attn.png"),
        plots.plot_trajectory_pca(rng.normal(size=(6, 2, 1, 3, 8)), tmp_path / "pca.png", position=1),
        plots.plot_exit_depth_text(list("hello world!"), rng.integers(1, 5, 12), tmp_path / "text.png",
                                   n_loops=4, per_line=6),
        plots.plot_pareto([_point("a", "r1", 0.5, 10.0), _point("a", "r2", 0.7, 20.0),
                           _point("b", "r1", 0.6, 15.0)], tmp_path / "pareto.png"),
        plots.plot_layer_specialisation(
            {"Base": {"expected_steps": None, "gate_local": None, "gate_global": None},
             "Loop": {"expected_steps": rng.uniform(1, 3, 4).tolist(), "gate_local": None, "gate_global": None},
             "Loop+Mem": {"expected_steps": rng.uniform(1, 3, 4).tolist(), "gate_local": rng.uniform(0, 1, 4),
                          "gate_global": rng.uniform(0, 1, 4)}}, tmp_path / "layers.png"),
        plots.plot_layer_specialisation({"Base": {"expected_steps": None}}, tmp_path / "none.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, path


def test_recording_does_not_change_the_models_outputs_or_state(looped):
    """The recorder runs beside the model: its forward before and after recording is bitwise the same, and no
    parameter or other state changes."""
    model, tokens, _, _ = looped
    before_state = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    before = model(tokens, n_loops=3, return_steps=True)
    an.record(model, tokens, n_loops=3, heads=(0, 2), query_positions=(1,))
    after = model(tokens, n_loops=3, return_steps=True)
    for name in ("logits", "step_logits", "step_hidden", "gate_logits"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name), err_msg=name)
    after_state = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    assert after_state.keys() == before_state.keys()
    for p in before_state:
        np.testing.assert_array_equal(after_state[p], before_state[p], err_msg=str(p))
