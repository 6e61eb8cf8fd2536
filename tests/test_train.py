"""Training: config validation, schedules, weight-decay mask, gradient accumulation, objectives through the
halting module, the non-finite guard, metric files."""

import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.config import HaltingConfig, MeshConfig, TrainConfig
from loopjax.sharding import make_mesh
from loopjax.train import NonFiniteError, Trainer, make_optimizer, make_schedule, make_train_step, objective_loss
from loopjax.train.state import model_graphdef, state_builder

VOCAB, SEQ = 32, 8


def tiny_model(**kw):
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=3,
                max_seq_len=SEQ)
    return lj.tiny(**{**base, **kw})


def random_batch(seed, b=4, mask=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (b, SEQ + 1)).astype(np.int32)
    out = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    if mask:
        out["mask"] = (rng.random((b, SEQ)) < 0.6).astype(np.float32)
    return out


def single_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(steps=10, warmup_steps=11), "warmup_steps=11"),
    (dict(batch_size=6, grad_accum=4), "grad_accum=4: must be a divisor of batch_size=6"),
    (dict(objective=HaltingConfig(objective="ouro", random_loops=True)), "random_loops"),
    (dict(keep_best=True), "keep_best"),
    (dict(schedule="cosin"), "did you mean 'cosine'"),
    (dict(b2=1.0), "b2=1.0"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(tpu_scheduler_memory_percent=101), "tpu_scheduler_memory_percent=101"),
])
def test_train_config_rejects_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_schedules_match_closed_form():
    peak, warm, total, ratio = 1e-3, 10, 100, 0.1
    cos = make_schedule(TrainConfig(steps=total, warmup_steps=warm, learning_rate=peak, min_lr_ratio=ratio))
    wsd = make_schedule(TrainConfig(steps=total, warmup_steps=warm, learning_rate=peak, min_lr_ratio=ratio,
                                    schedule="wsd", decay_fraction=0.2))
    const = make_schedule(TrainConfig(steps=total, warmup_steps=warm, learning_rate=peak, schedule="constant"))
    for t in [0, 5, 10, 30, 55, 79, 80, 90, 100]:
        warm_lr = peak * t / warm
        c = peak * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))
        w = peak if t < 80 else peak + (peak * ratio - peak) * (t - 80) / 20
        want = (warm_lr, warm_lr, warm_lr) if t < warm else (c, w, peak)
        np.testing.assert_allclose([float(cos(t)), float(wsd(t)), float(const(t))], want, rtol=1e-5, atol=1e-12)


def test_weight_decay_applies_to_matrices_only():
    tx, _ = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5,
                                       schedule="constant", grad_clip=0.0))
    params = {"w": nnx.Param(jnp.ones((3, 4))), "scale": nnx.Param(jnp.ones((4,)))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"][...], -0.1 * 0.5 * np.ones((3, 4)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"][...], np.zeros(4))


# --------------------------------------------------------------------------------------------- steps


def _one_step(model_cfg, tcfg, batch):
    tx, schedule = make_optimizer(tcfg)
    state = jax.jit(state_builder(model_cfg, tx, tcfg.seed))()
    step = jax.jit(make_train_step(model_graphdef(model_cfg), tcfg, tx, schedule))
    return step(state, jax.tree.map(jnp.asarray, batch))


def test_grad_accumulation_equals_full_batch_with_uneven_masks():
    model_cfg = tiny_model()
    batch = random_batch(1, b=4)
    batch["mask"][0] = 0.0  # micro-batches get very different token counts
    batch["mask"][2, :2] = 0.0
    tcfg = TrainConfig(steps=10, batch_size=4, seq_len=SEQ, warmup_steps=0, learning_rate=1e-2, grad_clip=0.0)
    full, m_full = _one_step(model_cfg, tcfg, batch)
    acc, m_acc = _one_step(model_cfg, tcfg.replace(grad_accum=2), batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ouro_objective_matches_float64_reference():
    model_cfg = tiny_model(norm_scheme="sandwich", step_norm=True)
    model = lj.LoopedLM(model_cfg, rngs=nnx.Rngs(3))
    model.core.gate.b[...] = jnp.float32(-0.7)  # a non-trivial exit distribution
    batch = jax.tree.map(jnp.asarray, random_batch(2))
    hcfg, beta, z = HaltingConfig(objective="ouro", beta=0.3), 0.3, 1e-2

    @nnx.jit
    def run(model, batch):
        total, metrics = objective_loss(model, batch, hcfg, z, None)
        return total, metrics, model(batch["inputs"], return_steps=True)

    total, metrics, out = run(model, batch)
    logits = np.asarray(out.step_logits, np.float64)  # [T, B, S, V]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[None, ..., None], -1)[..., 0]
    lam = 1 / (1 + np.exp(-np.asarray(out.gate_logits, np.float64)))  # [B, S, T]
    surv = np.cumprod(np.concatenate([np.ones_like(lam[..., :1]), 1 - lam[..., :-1]], -1), -1)
    p = surv * lam
    p[..., -1] = surv[..., -1]
    per_token = (p * np.moveaxis(ce, 0, -1)).sum(-1) + beta * (p * np.log(p)).sum(-1)
    m = np.asarray(batch["mask"], np.float64)
    want = (per_token * m).sum() / m.sum()
    z_want = ((lse[-1] ** 2) * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), want + z * z_want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["exit_depth"]), ((p * np.arange(1, 4)).sum(-1) * m).sum() / m.sum(),
                               rtol=1e-5)


@pytest.mark.parametrize("objective,n_coda", [("ouro", 1), ("pondernet", 1), ("final", 1), ("ouro", 0),
                                              ("pondernet", 0), ("final", 0)])
def test_chunked_objective_equals_materialised_logits_with_coda_and_z_loss(objective, n_coda):
    """hcfg.chunked: CE, z-loss and ce_final from blocks of positions (a block size not dividing S, a coda layer
    the blocks must not split; "ouro" / "pondernet" take the fused head + CE, its gradient formed in the forward
    pass, after the coda where there is one) give the values and gradients of the materialised-logits path."""
    model = lj.LoopedLM(tiny_model(n_coda=n_coda), rngs=nnx.Rngs(4))
    model.core.gate.b[...] = jnp.float32(-0.5)
    graphdef, params = nnx.split(model)
    batch = jax.tree.map(jnp.asarray, random_batch(5))

    def loss(params, hcfg):
        return objective_loss(nnx.merge(graphdef, params), batch, hcfg, 1e-2, None)

    hcfg = HaltingConfig(objective=objective, beta=0.2)
    (t0, m0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, hcfg)
    (t1, m1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, hcfg.replace(chunked=True, ce_block=3))
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-5)
    for k in m0:
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tpu_scheduler_memory_limit_is_a_tpu_compile_option_only():
    from loopjax.train.compiled import compiler_options

    tcfg = TrainConfig(tpu_scheduler_memory_percent=7)
    assert compiler_options(tcfg, single_device_mesh()) is None  # CPU: XLA:CPU has no such option

    class FakeTpu:
        platform = "tpu"

    class FakeMesh:
        devices = np.array([FakeTpu()])

    assert compiler_options(tcfg, FakeMesh()) == {"xla_tpu_scheduler_percent_shared_memory_limit": 7}
    assert compiler_options(TrainConfig(), FakeMesh()) is None


# --------------------------------------------------------------------------------------------- trainer


def _batches(n, nan_at=None, copy=False):
    for i in range(n):
        b = random_batch(100 + i, b=8, mask=not copy)
        if copy:  # a learnable task: predict the current token
            b["targets"] = b["inputs"].copy()
        if i == nan_at:
            b["mask"] = np.full((8, SEQ), np.nan, np.float32)
        yield b


def _quiet_trainer(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(*args, progress=False, **kwargs)


def test_nonfinite_loss_stops_naming_the_step_and_writes_no_checkpoint_after_it(tmp_path):
    tcfg = TrainConfig(steps=6, batch_size=8, seq_len=SEQ, warmup_steps=0, log_every=6, ckpt_every=1,
                       keep_checkpoints=10, async_checkpointing=False, log_loop_losses=False)
    trainer = _quiet_trainer(tiny_model(), tcfg, train_data=_batches(6, nan_at=2), workdir=tmp_path,
                             tensorboard=False, mesh=single_device_mesh())
    with pytest.raises(NonFiniteError, match="at step 3 "):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit()
    assert trainer.checkpointer.all_steps() == [1, 2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(trainer.state.params)))


def test_nonfinite_skip_mode_drops_and_counts_with_random_loop_counts(tmp_path):
    hcfg = HaltingConfig(objective="final", random_loops=True, mean_loops=2.0, max_loops=4, backprop_loops=2)
    tcfg = TrainConfig(steps=5, batch_size=8, seq_len=SEQ, warmup_steps=0, log_every=5, ckpt_every=0,
                       on_nonfinite="skip", objective=hcfg, log_loop_losses=False)
    trainer = _quiet_trainer(tiny_model(), tcfg, train_data=_batches(5, nan_at=1), workdir=tmp_path,
                             tensorboard=False, mesh=single_device_mesh())
    result = trainer.fit()
    assert result.step == 5 and int(trainer.state.nonfinite) == 1
    assert result.metrics["train/nonfinite_steps"] == 1.0
    assert 1.0 <= result.metrics["train/n_loops"] <= 4.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(trainer.state.params)))


def test_trainer_learns_and_writes_jsonl_and_tensorboard(tmp_path):
    tcfg = TrainConfig(steps=24, batch_size=8, seq_len=SEQ, warmup_steps=2, learning_rate=1e-2, log_every=4,
                       eval_every=12, eval_batches=2, ckpt_every=12, objective=HaltingConfig(objective="ouro"),
                       grad_accum=2)
    eval_batches = list(_batches(2, copy=True))
    trainer = _quiet_trainer(tiny_model(), tcfg, train_data=_batches(24, copy=True), eval_data=eval_batches,
                             workdir=tmp_path, mesh=single_device_mesh())
    result = trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24]
    for key in ["train/grad_norm", "train/lr", "train/exit_entropy", "train/exit_depth", "train/ce_loop1",
                "train/ce_loop3", "perf/tokens_per_s", "perf/tflops_per_s"]:
        assert key in train_rows[0], key
    assert train_rows[-1]["train/loss"] < 0.7 * train_rows[0]["train/loss"]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and "eval/exact_match" in evals[0]
    assert result.eval_metrics["eval/accuracy"] > 0.5  # copying is learnt
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert trainer.checkpointer.all_steps() == [12, 24]


def test_init_params_starts_from_given_weights_with_a_fresh_optimizer():
    """Stage II style: a second Trainer starts from the first one's weights; the caller's arrays stay valid and
    the result equals continuing the same weights by hand with a fresh optimizer."""
    tcfg = TrainConfig(steps=3, batch_size=8, seq_len=SEQ, warmup_steps=0, log_every=3, ckpt_every=0,
                       log_loop_losses=False)
    mesh = single_device_mesh()
    first = _quiet_trainer(tiny_model(), tcfg, train_data=_batches(3), tensorboard=False, mesh=mesh)
    first.fit()
    given = first.state.params
    before = jax.device_get(given)
    second = _quiet_trainer(tiny_model(), tcfg.replace(seed=5), train_data=_batches(3), tensorboard=False, mesh=mesh,
                            init_params=given)
    assert int(second.state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state.params), before)
    zeros = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(second.state.opt_state) if np.ndim(x) > 0]
    assert zeros and max(zeros) == 0.0  # fresh Adam moments
    second.fit()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(given), before)  # not donated away
    # a LoopedLM is taken as its Param state
    third = _quiet_trainer(tiny_model(), tcfg.replace(seed=5), train_data=_batches(3), tensorboard=False, mesh=mesh,
                           init_params=first.model())
    third.fit()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(third.state.params),
                 jax.device_get(second.state.params))
    with pytest.raises(ValueError, match="init_params"):
        _quiet_trainer(tiny_model(d_model=16), tcfg, train_data=_batches(1), tensorboard=False, mesh=mesh,
                       init_params=given)
