"""Halting: exit distribution vs the Ouro reference, objectives vs float64 NumPy, exit rules, the masked
while-loop executor (equalities with the fixed-L scan, frozen-token semantics, no recompiles, vmap, sharding),
run_all_loops read-out selection and random loop-count training with truncated backprop."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import loopjax as lj
from loopjax import halting

ROOT = pathlib.Path(__file__).resolve().parents[1]
REF_DIRS = [ROOT / "tests" / "data" / "ouro", ROOT.parent / "shared" / "ouro-reference"]
L = 4


def _reference():
    for d in REF_DIRS:
        if (d / "reference.npz").exists():
            return dict(np.load(d / "reference.npz"))
    raise FileNotFoundError(f"reference.npz not found in {[str(d) for d in REF_DIRS]}")


def _model(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, init_std=0.2, n_loops=L,
                norm_scheme="sandwich", step_norm=True)
    base.update(kw)
    return lj.LoopedLM(lj.tiny(**base), rngs=nnx.Rngs(0))


def _tokens(b=2, s=8, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 64)


def _jit_call(model, **kw):
    """A jitted ``model(tokens, **kw)`` over the split state, with a trace counter."""
    graphdef, state = nnx.split(model)
    traces = []

    def f(st, tokens):
        traces.append(1)
        return nnx.merge(graphdef, st)(tokens, **kw)

    return jax.jit(f), state, traces


def _set_gate_bias(state, value):
    state = jax.tree.map(lambda x: x, state)
    state["core"]["gate"]["b"][...] = jnp.asarray(value, jnp.float32)
    return state


@dataclasses.dataclass(frozen=True)
class ScheduleExit:
    """A user-defined rule: token (b, s) exits after loop steps[b][s] (exercises the rule protocol)."""

    steps: tuple
    needs_gate = False

    def validate(self, n_loops):
        """Any loop count is valid for a fixed schedule."""

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD):
        return t + 1 >= jnp.asarray(self.steps, jnp.int32)


# ------------------------------------------------------------------------------- float64 NumPy references

def _np_pdf(g):
    lam = 1 / (1 + np.exp(-g.astype(np.float64)))
    t_max = g.shape[-1]
    p = np.zeros_like(lam)
    survive = np.ones(g.shape[:-1])
    for t in range(t_max - 1):
        p[..., t] = lam[..., t] * survive
        survive = survive * (1 - lam[..., t])
    p[..., -1] = survive
    return p


def _np_ce(logits, labels):
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(x, labels[..., None], -1)[..., 0]


def _np_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _random_problem(seed=0, t=4, b=2, s=5, d=6, v=11):
    rng = np.random.default_rng(seed)
    return dict(hidden=rng.normal(size=(t, b, s, d)).astype(np.float32),
                w=rng.normal(size=(d, v)).astype(np.float32),
                gates=(2 * rng.normal(size=(b, s, t))).astype(np.float32),
                labels=rng.integers(0, v, size=(b, s)),
                mask=(rng.random((b, s)) > 0.3).astype(np.float32))


# ------------------------------------------------------------------------------- distributions

def test_exit_distribution_reproduces_ouro_reference_pdf_and_cdf():
    ref = _reference()
    gates = np.moveaxis(ref["gate_logits"], 0, -1)
    np.testing.assert_allclose(lj.exit_distribution(jnp.asarray(gates)), ref["exit_pdf"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(lj.exit_cdf(jnp.asarray(gates)), ref["exit_cdf"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(lj.exit_distribution(jnp.asarray(gates)), _np_pdf(gates), atol=1e-6)


def test_qexit_rule_reproduces_reference_threshold_exit_steps():
    ref = _reference()
    gates = jnp.asarray(np.moveaxis(ref["gate_logits"], 0, -1))
    t_max = gates.shape[-1]
    rule = lj.QExit(float(ref["threshold"]))
    h = jnp.ones(gates.shape[:-1] + (1,))
    fired = np.stack([np.asarray(halting.rule_fires(rule, jnp.int32(t), t_max, gates, h, h))
                      for t in range(t_max)], -1)
    first = fired.argmax(-1)
    np.testing.assert_array_equal(first, ref["exit_steps_threshold"])  # both 0-based here
    assert len(np.unique(first)) > 1


def test_mixture_logits_loss_reproduces_reference_loss():
    ref = _reference()
    gates = jnp.asarray(np.moveaxis(ref["gate_logits"], 0, -1))
    step_logits = jnp.asarray(ref["logits_per_step"])
    mixed = lj.mixture_logits(gates, step_logits_TBSV=step_logits)
    np.testing.assert_allclose(mixed, ref["weighted_logits"], atol=1e-5)
    labels = jnp.asarray(ref["input_ids"][:, 1:])
    loss = lj.mixture_logits_loss(gates[:, :-1], labels, step_logits_TBSV=step_logits[:, :, :-1])
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-6)


def _ref_dir():
    for d in REF_DIRS:
        if (d / "model.safetensors").exists():
            return d
    raise FileNotFoundError(f"Ouro reference model.safetensors not found in {[str(d) for d in REF_DIRS]}")


@pytest.mark.parametrize("chunked", [False, True])
def test_mixture_objective_on_imported_ouro_model_reproduces_reference_loss(chunked):
    ref = _reference()
    model = lj.load_ouro(str(_ref_dir()), dtype="float32")
    tokens = jnp.asarray(ref["input_ids"])
    out = model(tokens, return_steps=True)
    loss = lj.halting_loss(lj.HaltingConfig(objective="mixture", chunked=chunked), gate_BST=out.gate_logits[:, :-1],
                           labels_BS=tokens[:, 1:], step_logits_TBSV=out.step_logits[:, :, :-1],
                           step_hidden_TBSD=out.step_hidden[:, :, :-1], head_fn=model.head)
    np.testing.assert_allclose(loss, ref["loss"], rtol=2e-6)


def test_log_distribution_is_finite_where_pdf_underflows():
    g = jnp.asarray([[[200.0, 200.0, 200.0, 0.0]]])
    logp = halting.exit_log_distribution(g)
    assert np.isfinite(np.asarray(logp)).all()
    np.testing.assert_allclose(jnp.exp(logp), lj.exit_distribution(g), atol=1e-7)


# ------------------------------------------------------------------------------- objectives

def test_ouro_and_pondernet_objectives_match_float64_numpy():
    pb = _random_problem()
    logits = np.einsum("tbsd,dv->tbsv", pb["hidden"], pb["w"])
    ce = _np_ce(logits, pb["labels"][None])
    p = _np_pdf(pb["gates"])
    expected = (p * np.moveaxis(ce, 0, -1)).sum(-1)
    entropy = -(p * np.log(p)).sum(-1)
    ce_j = lj.step_cross_entropy(jnp.asarray(logits), jnp.asarray(pb["labels"]))
    np.testing.assert_allclose(ce_j, ce, rtol=1e-5)
    got = lj.ouro_expected_loss(ce_j, jnp.asarray(pb["gates"]), jnp.asarray(pb["mask"]), beta=0.3)
    np.testing.assert_allclose(got, _np_mean(expected - 0.3 * entropy, pb["mask"]), rtol=1e-5)

    lam_p, t_max = 0.3, pb["gates"].shape[-1]
    prior = lam_p * (1 - lam_p) ** np.arange(t_max)
    prior /= prior.sum()
    kl = (p * (np.log(p) - np.log(prior))).sum(-1)
    got = lj.pondernet_loss(ce_j, jnp.asarray(pb["gates"]), jnp.asarray(pb["mask"]), beta=0.2, lambda_p=lam_p)
    np.testing.assert_allclose(got, _np_mean(expected + 0.2 * kl, pb["mask"]), rtol=1e-5)


def test_act_objective_matches_float64_numpy():
    pb = _random_problem(seed=3)
    eps, tau = 0.05, 0.02
    lam = 1 / (1 + np.exp(-pb["gates"].astype(np.float64)))
    t_max = lam.shape[-1]
    b, s = lam.shape[:2]
    loss = np.zeros((b, s))
    ns = np.zeros((b, s), int)
    for i in range(b):
        for j in range(s):
            total, weights = 0.0, np.zeros(t_max)
            for t in range(t_max):
                if total + lam[i, j, t] >= 1 - eps or t == t_max - 1:
                    weights[t] = 1 - total
                    n = t + 1
                    break
                weights[t] = lam[i, j, t]
                total += lam[i, j, t]
            state = np.einsum("t,td->d", weights, pb["hidden"][:, i, j].astype(np.float64))
            ce = _np_ce((state @ pb["w"].astype(np.float64))[None], pb["labels"][i, j][None])[0]
            loss[i, j] = ce + tau * (n + weights[n - 1])
            ns[i, j] = n
    assert len(np.unique(ns)) > 1
    got = lj.act_loss(jnp.asarray(pb["hidden"]), jnp.asarray(pb["gates"]), lambda h: h @ jnp.asarray(pb["w"]),
                      jnp.asarray(pb["labels"]), jnp.asarray(pb["mask"]), eps=eps, tau=tau)
    np.testing.assert_allclose(got, _np_mean(loss, pb["mask"]), rtol=1e-5)


def test_ouro_gate_objective_matches_float64_numpy():
    pb = _random_problem(seed=5)
    k, gamma = 50.0, 0.005
    ce = _np_ce(np.einsum("tbsd,dv->tbsv", pb["hidden"], pb["w"]), pb["labels"][None])
    g = pb["gates"].astype(np.float64)
    t_max = g.shape[-1]
    total = np.zeros(g.shape[:2])
    for t in range(1, t_max):
        improvement = np.maximum(0.0, ce[t - 1] - ce[t])
        w = 1 / (1 + np.exp(-k * (improvement - gamma)))
        lam = 1 / (1 + np.exp(-g[..., t]))
        total += -(w * np.log(1 - lam) + (1 - w) * np.log(lam))
    got = lj.ouro_gate_loss(jnp.asarray(ce, jnp.float32), jnp.asarray(pb["gates"]), jnp.asarray(pb["mask"]),
                            k=k, gamma=gamma)
    np.testing.assert_allclose(got, _np_mean(total / t_max, pb["mask"]), rtol=1e-5)


def test_final_and_mixture_objectives_match_float64_numpy():
    pb = _random_problem(seed=7)
    logits = np.einsum("tbsd,dv->tbsv", pb["hidden"], pb["w"]).astype(np.float64)
    ce = _np_ce(logits, pb["labels"][None])
    got = lj.final_step_loss(lj.step_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(pb["labels"])),
                             jnp.asarray(pb["mask"]))
    np.testing.assert_allclose(got, _np_mean(ce[-1], pb["mask"]), rtol=1e-5)
    mixed = np.einsum("bst,tbsv->bsv", _np_pdf(pb["gates"]), logits)
    got = lj.mixture_logits_loss(jnp.asarray(pb["gates"]), jnp.asarray(pb["labels"]), jnp.asarray(pb["mask"]),
                                 step_logits_TBSV=jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(got, _np_mean(_np_ce(mixed, pb["labels"]), pb["mask"]), rtol=1e-5)


def test_blocked_step_cross_entropy_matches_float64_numpy_with_prepare_and_lse():
    """Blocks of positions that do not divide S, a sequence-wise prepare_fn, and the logsumexp output."""
    pb = _random_problem(seed=5, s=13)
    mix = np.random.default_rng(6).normal(size=(13, 13)).astype(np.float32) / 4  # mixes positions: sequence-wise
    hidden = np.einsum("tbsd,us->tbud", pb["hidden"].astype(np.float64), mix)
    logits = hidden @ pb["w"].astype(np.float64)
    want_ce = _np_ce(logits, pb["labels"][None])
    want_lse = np.log(np.exp(logits).sum(-1))
    prepare = lambda h: jnp.einsum("bsd,us->bud", h, jnp.asarray(mix))  # noqa: E731
    head = lambda h: h @ jnp.asarray(pb["w"])  # noqa: E731
    for block in (0, 1, 4, 5, 13, 64):
        ce, lse = lj.chunked_step_cross_entropy(jnp.asarray(pb["hidden"]), head, jnp.asarray(pb["labels"]),
                                                block_tokens=block, prepare_fn=prepare, return_lse=True)
        np.testing.assert_allclose(ce, want_ce, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_blocked_step_cross_entropy_grads_equal_unblocked():
    pb = {k: jnp.asarray(v) for k, v in _random_problem(seed=8, s=13).items()}
    weight = jnp.asarray(np.random.default_rng(9).random((4, 2, 13)), jnp.float32)

    def loss(hidden, w, block):
        ce, lse = lj.chunked_step_cross_entropy(hidden, lambda h: h @ w, pb["labels"], block_tokens=block,
                                                return_lse=True)
        return (ce * weight).sum() + 0.1 * (lse ** 2 * weight).sum()

    v0, g0 = jax.value_and_grad(loss, argnums=(0, 1))(pb["hidden"], pb["w"], 0)
    for block in (3, 6, 12):
        v1, g1 = jax.value_and_grad(loss, argnums=(0, 1))(pb["hidden"], pb["w"], block)
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_step_cross_entropy_matches_float64_numpy_values_and_grads():
    """Σ w·CE_t + Σ z·lse_T² with its gradient formed in the forward pass: value and every gradient (states, head,
    weights, z weights) against float64 NumPy, with blocks that do not divide S."""
    pb = _random_problem(seed=12, s=13)
    rng = np.random.default_rng(13)
    weight, z_weight = rng.random((4, 2, 13)), 0.1 * rng.random((2, 13))
    h, w, y = pb["hidden"].astype(np.float64), pb["w"].astype(np.float64), pb["labels"]
    logits = h @ w
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - np.take_along_axis(logits, y[None, ..., None], -1)[..., 0]
    want = (weight * ce).sum() + (z_weight * lse[-1] ** 2).sum()
    prob = np.exp(logits - lse[..., None])
    zw = np.zeros_like(weight)
    zw[-1] = z_weight
    g = prob * (weight + 2 * zw * lse)[..., None] - np.eye(11)[y][None] * weight[..., None]
    want_dh, want_dw = g @ w.T, np.einsum("tbsd,tbsv->dv", h, g)
    for block in (0, 4, 12):
        def f(h, w, wt, zw):
            return lj.fused_step_cross_entropy(h, w, jnp.asarray(y), wt, zw, block_tokens=block)[0]
        args = [jnp.asarray(a, jnp.float32) for a in (pb["hidden"], pb["w"], weight, z_weight)]
        value, (dh, dw, dwt, dzw) = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(*args)
        np.testing.assert_allclose(value, want, rtol=1e-5)
        np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dwt, ce, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dzw, lse[-1] ** 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ce_block", [0, 2])
@pytest.mark.parametrize("objective", ["ouro", "pondernet", "final", "mixture"])
def test_chunked_objectives_equal_materialised_values_and_grads(objective, ce_block):
    pb = {k: jnp.asarray(v) for k, v in _random_problem(seed=11).items()}
    hcfg = lj.HaltingConfig(objective=objective, beta=0.2, ce_block=ce_block)

    def loss(hidden, w, gates, chunked):
        head = lambda h: h @ w  # noqa: E731
        if chunked:
            return lj.halting_loss(hcfg.replace(chunked=True), gate_BST=gates, labels_BS=pb["labels"],
                                   mask_BS=pb["mask"], step_hidden_TBSD=hidden, head_fn=head)
        return lj.halting_loss(hcfg, gate_BST=gates, labels_BS=pb["labels"], mask_BS=pb["mask"],
                               step_logits_TBSV=jax.vmap(head)(hidden))

    args = (pb["hidden"], pb["w"], pb["gates"])
    v0, g0 = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args, False)
    v1, g1 = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args, True)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    if objective != "final":
        assert float(jnp.abs(g0[2]).max()) > 1e-4  # the gates learn


@pytest.mark.slow
def test_gate_training_objective_updates_only_the_gate():
    model = _model(n_layers=1)
    tokens = _tokens()
    hcfg = lj.HaltingConfig(objective="ouro_gate")
    graphdef, state = nnx.split(model)

    def loss(st):
        m = nnx.merge(graphdef, st)
        out = m(tokens, return_steps=True)
        return lj.halting_loss(hcfg, gate_BST=out.gate_logits, labels_BS=jnp.roll(tokens, -1, 1),
                               step_hidden_TBSD=out.step_hidden, head_fn=m.head, gate_fn=m.core.gate)

    grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(state))
    gate_keys = [k for k, _ in grads if "gate" in k and "core" in k and k[-1] in ("w", "b")]
    assert len(gate_keys) == 2
    for key, g in grads:
        norm = float(np.abs(np.asarray(g[...])).max())
        assert (norm > 0) if key in gate_keys else (norm == 0), key


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("make", [lambda: lj.FixedExit(0), lambda: lj.FixedExit(2.0), lambda: lj.QExit(1.5),
                                  lambda: lj.QExit(-0.1), lambda: lj.ACTExit(0.0), lambda: lj.ACTExit(1.0),
                                  lambda: lj.ConvergenceExit(0.0)])
def test_exit_rules_reject_bad_fields(make):
    with pytest.raises(ValueError, match=r"Exit\.\w+="):
        make()


@pytest.mark.parametrize("kw,field", [(dict(objective="ponder"), "objective"), (dict(beta=-1.0), "beta"),
                                      (dict(geometric_lambda=1.0), "geometric_lambda"), (dict(act_eps=0), "act_eps"),
                                      (dict(chunked=1), "chunked"), (dict(backprop_loops=20), "backprop_loops"),
                                      (dict(mean_loops=40.0), "mean_loops"), (dict(ce_block=-1), "ce_block")])
def test_halting_config_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        lj.HaltingConfig(**kw)


def test_call_validation_before_tracing():
    model, tokens = _model(), _tokens()
    with pytest.raises(ValueError, match="FixedExit.n=5"):
        model(tokens, exit_rule=lj.FixedExit(5), n_loops=4)
    with pytest.raises(ValueError, match="needs the exit gate"):
        _model(exit_gate=False)(tokens, exit_rule=lj.QExit(0.5))
    with pytest.raises(ValueError, match="run_all_loops"):
        model(tokens, run_all_loops=True)
    with pytest.raises(ValueError, match="backprop_loops"):
        model(tokens, n_loops=2, max_loops=4, backprop_loops=5)
    with pytest.raises(ValueError, match="n_loops=5"):
        model(tokens, n_loops=5, max_loops=4)
    with pytest.raises(ValueError, match="exit_rule"):
        model(tokens, n_loops=2, max_loops=4, exit_rule=lj.QExit(0.5))


# ------------------------------------------------------------------------------- adaptive execution

def test_rule_that_never_fires_early_equals_fixed_scan_exactly():
    model, tokens = _model(), _tokens()
    fixed, state, _ = _jit_call(model, n_loops=L, return_steps=True)
    ref = fixed(state, tokens)
    for rule in (lj.FixedExit(L), lj.ConvergenceExit(1e-12)):
        adaptive, _, _ = _jit_call(model, n_loops=L, exit_rule=rule, return_steps=True)
        out = adaptive(state, tokens)
        np.testing.assert_array_equal(out.logits, ref.logits)
        np.testing.assert_array_equal(out.step_hidden, ref.step_hidden)
        np.testing.assert_array_equal(out.gate_logits, ref.gate_logits)
        np.testing.assert_array_equal(out.exit_step, np.full(tokens.shape, L))
        assert int(out.n_iterations) == L


@pytest.mark.parametrize("t", [1, 2, 3])
def test_rule_firing_for_every_token_at_t_equals_fixed_t_loop_call(t):
    model, tokens = _model(), _tokens()
    fixed, state, _ = _jit_call(model, n_loops=t)
    adaptive, _, _ = _jit_call(model, n_loops=L, exit_rule=lj.FixedExit(t))
    out, ref = adaptive(state, tokens), fixed(state, tokens)
    # a while loop and a length-t scan fuse differently: equal up to float32 reassociation
    close = dict(atol=5e-6, rtol=1e-6)
    np.testing.assert_allclose(out.logits, ref.logits, **close)
    np.testing.assert_allclose(out.hidden, ref.hidden, **close)
    np.testing.assert_allclose(out.gate_logits[..., :t], ref.gate_logits, **close)
    np.testing.assert_array_equal(out.gate_logits[..., t:], np.repeat(out.gate_logits[..., t - 1:t], L - t, -1))
    assert int(out.n_iterations) == t and (np.asarray(out.exit_step) == t).all()


def test_token_state_equals_its_exit_step_state_when_no_earlier_token_froze_first():
    """Exit steps non-increasing along the sequence: each token only attends to tokens still active as long as
    itself, so its returned state is the fixed scan's state at its own exit step."""
    model, tokens = _model(), _tokens()
    steps = ((4, 4, 3, 3, 2, 2, 1, 1), (3, 3, 3, 2, 2, 2, 1, 1))
    ref = _jit_call(model, n_loops=L, return_steps=True)
    ref_out = ref[0](ref[1], tokens)
    adaptive, state, _ = _jit_call(model, n_loops=L, exit_rule=ScheduleExit(steps))
    out = adaptive(state, tokens)
    exit_np = np.asarray(steps)
    np.testing.assert_array_equal(out.exit_step, exit_np)
    want = np.take_along_axis(np.moveaxis(np.asarray(ref_out.step_hidden), 0, 2), exit_np[..., None, None] - 1,
                              2)[:, :, 0]
    np.testing.assert_allclose(out.hidden, want, atol=1e-6)
    assert int(out.n_iterations) == exit_np.max()


def test_frozen_token_exposes_its_frozen_state_to_later_attention():
    """Token 0 exits after loop 1; the others attend in loops 2..L to the K/V its frozen state produces. Reference:
    an unrolled Python loop over ``core.step`` on the whole block, keeping token 0's state."""
    model, tokens = _model(), _tokens()
    b, s = tokens.shape
    steps = tuple(tuple(1 if j == 0 else L for j in range(s)) for _ in range(b))
    out = _jit_call(model, n_loops=L, exit_rule=ScheduleExit(steps))
    out = out[0](out[1], tokens)

    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    cos, sin, mask = model.rope_and_layout(positions)
    e = model.embed_tokens(tokens)
    h = model.core.initial_state(e)
    active = np.asarray(steps) > 0
    for t in range(L):
        new_h, new_out, _ = model.core.step(h, e, cos, sin, mask)
        h = jnp.where(active[..., None], new_h, h)
        if t == 0:
            frozen_out = new_out
        active = np.asarray(steps) > t + 1
    want = h.at[:, 0].set(frozen_out[:, 0])
    # float32: the jitted while_loop against eager op-by-op steps (5e-6 apart with "chunked", 1.1e-5 "cpu_flash")
    np.testing.assert_allclose(out.hidden, want, atol=2e-5)
    full = model(tokens, n_loops=L)
    # positions after 0 differ from the all-loops run: they saw token 0's frozen state, not its deeper loops
    assert float(jnp.abs(out.hidden[:, 1:] - full.hidden[:, 1:]).max()) > 1e-3


def test_one_compilation_serves_any_mix_of_exit_steps():
    model, tokens = _model(), _tokens()
    adaptive, state, traces = _jit_call(model, n_loops=L, exit_rule=lj.QExit(0.5))
    mixes = set()
    for bias in (-8.0, -0.5, 0.0, 0.7, 8.0):
        out = adaptive(_set_gate_bias(state, bias), tokens)
        exit_np = np.asarray(out.exit_step)
        assert int(out.n_iterations) == exit_np.max()
        mixes.add(tuple(sorted(set(exit_np.ravel().tolist()))))
    assert len(mixes) >= 3, mixes
    assert len(traces) == 1


def test_adaptive_call_under_vmap_equals_batched_call():
    model, tokens = _model(), _tokens(b=3)
    graphdef, state = nnx.split(model)
    state = _set_gate_bias(state, 0.3)
    rule = lj.QExit(0.6)
    call = lambda st, tok: nnx.merge(graphdef, st)(tok, n_loops=L, exit_rule=rule)  # noqa: E731
    batched = jax.jit(call)(state, tokens)
    per_row = jax.jit(jax.vmap(lambda tok: call(state, tok[None]), in_axes=0))(tokens)
    np.testing.assert_array_equal(per_row.exit_step[:, 0], batched.exit_step)
    np.testing.assert_allclose(per_row.logits[:, 0], batched.logits, atol=1e-5)
    np.testing.assert_array_equal(per_row.n_iterations, np.asarray(batched.exit_step).max(-1))
    assert len(np.unique(np.asarray(batched.exit_step))) > 1


def test_adaptive_call_on_a_batch_sharded_over_8_devices():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model, tokens = _model(), _tokens(b=8)
    adaptive, state, _ = _jit_call(model, n_loops=L, exit_rule=lj.QExit(0.6))
    state = _set_gate_bias(state, 0.3)
    ref = adaptive(state, tokens)
    sharded = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))
    out = adaptive(state, sharded)
    assert len(out.logits.sharding.device_set) == 8
    np.testing.assert_array_equal(out.exit_step, ref.exit_step)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)


# ------------------------------------------------------------------------------- run_all_loops

def test_run_all_loops_selects_the_qexit_step_and_its_logits():
    model, tokens = _model(), _tokens()
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, _set_gate_bias(state, 0.4))
    full = model(tokens, n_loops=L, return_steps=True)
    out = model(tokens, n_loops=L, exit_rule=lj.QExit(0.7), run_all_loops=True)
    cdf = np.cumsum(_np_pdf(np.asarray(full.gate_logits)), -1)
    want = np.where((cdf >= 0.7).any(-1), (cdf >= 0.7).argmax(-1) + 1, L)
    np.testing.assert_array_equal(out.exit_step, want)
    assert len(np.unique(want)) > 1
    step_logits = np.moveaxis(np.asarray(full.step_logits), 0, 2)
    sel = np.take_along_axis(step_logits, want[..., None, None] - 1, 2)[:, :, 0]
    np.testing.assert_allclose(out.logits, sel, atol=1e-5)
    np.testing.assert_allclose(out.gate_logits, full.gate_logits, atol=1e-6)
    assert int(out.n_iterations) == L


def test_run_all_loops_act_and_convergence_rules_match_numpy_decisions():
    model, tokens = _model(), _tokens()
    full = model(tokens, n_loops=L, return_steps=True)
    lam = 1 / (1 + np.exp(-np.asarray(full.gate_logits, np.float64)))
    fired = np.cumsum(lam, -1) >= 1 - 0.4
    fired[..., -1] = True
    out = model(tokens, n_loops=L, exit_rule=lj.ACTExit(0.4), run_all_loops=True)
    np.testing.assert_array_equal(out.exit_step, fired.argmax(-1) + 1)

    hs = np.concatenate([np.asarray(model.embed_tokens(tokens))[None], np.asarray(full.step_hidden)], 0)
    rel = np.linalg.norm(hs[1:] - hs[:-1], axis=-1) / np.linalg.norm(hs[1:], axis=-1)
    eps = float(np.median(rel[1:]))
    fired = np.moveaxis(rel < eps, 0, -1)
    fired[..., -1] = True
    out = model(tokens, n_loops=L, exit_rule=lj.ConvergenceExit(eps), run_all_loops=True)
    np.testing.assert_array_equal(out.exit_step, fired.argmax(-1) + 1)
    assert len(np.unique(np.asarray(out.exit_step))) > 1


def test_run_all_loops_is_differentiable():
    model, tokens = _model(), _tokens()
    graphdef, state = nnx.split(model)

    def loss(st):
        out = nnx.merge(graphdef, st)(tokens, exit_rule=lj.QExit(0.5), run_all_loops=True)
        return lj.final_step_loss(lj.step_cross_entropy(out.logits[None], jnp.roll(tokens, -1, 1)))

    grads = jax.tree.leaves(jax.jit(jax.grad(loss))(state))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert max(float(np.abs(np.asarray(g)).max()) for g in grads) > 0


# ------------------------------------------------------------------------------- random loop counts

def test_traced_loop_count_compiles_once_and_equals_fixed_calls():
    model, tokens = _model(n_layers=1), _tokens()
    graphdef, state = nnx.split(model)
    traces = []

    def f(st, n):
        traces.append(1)
        return nnx.merge(graphdef, st)(tokens, n_loops=n, max_loops=6, backprop_loops=2).logits

    f = jax.jit(f)
    for n in (1, 3):
        np.testing.assert_allclose(f(state, jnp.int32(n)), model(tokens, n_loops=n).logits, atol=1e-6)
    assert not np.allclose(f(state, jnp.int32(6)), f(state, jnp.int32(5)), atol=1e-4)
    assert len(traces) == 1


@pytest.mark.slow
def test_truncated_backprop_gradients_of_early_loops_are_zero():
    model = _model(tie_embeddings=False, n_layers=1)  # the embedding enters only through h_0
    tokens = _tokens()
    graphdef, state = nnx.split(model)
    labels = jnp.roll(tokens, -1, 1)

    def loss(st, n, k):
        logits = nnx.merge(graphdef, st)(tokens, n_loops=n, max_loops=5, backprop_loops=k).logits
        return lj.final_step_loss(lj.step_cross_entropy(logits[None], labels))

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    g_trunc = grad(state, jnp.int32(4), 2)
    assert float(jnp.abs(g_trunc["embed"][...]).max()) == 0.0
    assert float(jnp.abs(grad(state, jnp.int32(2), 2)["embed"][...]).max()) > 0

    def reference(st, n, k):  # first n−k loops on stop-gradient params and state, then k live loops
        m = nnx.merge(graphdef, st)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(st))
        s = tokens.shape[1]
        cos, sin, mask = m.rope_and_layout(jnp.broadcast_to(jnp.arange(s), tokens.shape))
        e = frozen.embed_tokens(tokens)
        h = frozen.core.initial_state(e)
        for _ in range(n - k):
            h, _, _ = frozen.core.step(h, e, cos, sin, mask)
        h = jax.lax.stop_gradient(h)
        e = m.embed_tokens(tokens)
        for _ in range(k):
            h, out, _ = m.core.step(h, e, cos, sin, mask)
        return lj.final_step_loss(lj.step_cross_entropy(m.readout(out, cos, sin, mask)[None], labels))

    g_ref = jax.jit(jax.grad(reference), static_argnums=(1, 2))(state, 4, 2)
    for (key, a), (_, b) in zip(nnx.to_flat_state(g_trunc), nnx.to_flat_state(g_ref)):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, rtol=1e-4, err_msg=str(key))


def test_sampled_loop_counts_follow_the_log_normal_poisson():
    """Histogram vs NumPy draws of clip(1 + Poisson(exp(N(log r̄ − σ²/2, σ))), 1, max)."""
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda k: jnp.stack([lj.sample_loop_count(k, 4.0, 64), lj.sample_loop_count(k, 4.0, 6)])))
    n = np.asarray(draw(keys))
    rng = np.random.default_rng(0)
    ref = 1 + rng.poisson(np.exp(np.log(4.0) - 0.125 + 0.5 * rng.normal(size=200000)))
    for col, hi in ((0, 64), (1, 6)):
        assert n[:, col].min() >= 1 and n[:, col].max() <= hi
        got = np.bincount(n[:, col], minlength=hi + 1) / len(n)
        want = np.bincount(np.clip(ref, 1, hi), minlength=hi + 1)[: hi + 1] / len(ref)
        assert 0.5 * np.abs(got[: hi + 1] - want).sum() < 0.02  # total variation
    assert abs(n[:, 0].mean() - 5.0) < 0.1  # E[1 + Poisson(e^τ)] = 1 + r̄
    hcfg = lj.HaltingConfig(random_loops=True, mean_loops=3.0, max_loops=8, backprop_loops=2)
    kw = halting.loop_kwargs(hcfg, jax.random.key(1))
    assert kw["max_loops"] == 8 and kw["backprop_loops"] == 2 and 1 <= int(kw["n_loops"]) <= 8
    assert halting.loop_kwargs(lj.HaltingConfig()) == {}


def test_parse_exit_rule_reads_every_rule_and_names_the_forms():
    assert lj.halting.parse_exit_rule("q=0.25") == lj.QExit(0.25)
    assert lj.halting.parse_exit_rule("fixed=3") == lj.FixedExit(3)
    assert lj.halting.parse_exit_rule(" none ") is None
    with pytest.raises(ValueError, match="'half': must be q=P, fixed=N, act=EPS, conv=EPS or none"):
        lj.halting.parse_exit_rule("half")
