"""The train-step benchmark's matmul accounting (no timing: speed is measured by the benchmarks themselves)."""

import numpy as np
import pytest

import loopjax as lj
from benchmarks import train_step


@pytest.mark.parametrize("name", sorted(train_step.CONFIGS))
def test_step_gemms_are_the_model_flops_less_the_exit_gate(name):
    _, b, s = train_step.CONFIGS[name]
    cfg = train_step.model_config(name, "float32", "none", s)
    listed = sum(2 * bt * m * k * n * count for _, m, k, n, _, _, bt, count in train_step.step_gemms(cfg, b, s))
    gate = 3 * 2 * s * cfg.d_model * cfg.n_loops  # the [D, 1] exit gate: forward and two gradients, not listed
    assert listed == b * (lj.train_flops(cfg, s, cfg.n_loops, readouts=cfg.n_loops) - gate)


def test_layer_loop_benchmark_for_loop_is_the_same_model():
    """The naive side of ``layer_loops scan`` (iterations as a Python for-loop) computes the shipped model."""
    import jax
    from flax import nnx

    from benchmarks import layer_loops

    cfg = lj.LoopedConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=2, n_loops=1,
                          max_seq_len=16, exit_gate=False, layer_loops=3, memory_local_slots=8,
                          memory_global_slots=4, layer_loop_scale_init=0.5)
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(3)))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    grad = jax.value_and_grad(lambda st, tok: layer_loops.ce_loss(graphdef, st, tok))
    loss, g = jax.jit(grad)(state, tokens)
    with layer_loops.python_for_loop_iterations():
        loss_for, g_for = jax.jit(lambda st, tok: grad(st, tok))(state, tokens)
    np.testing.assert_allclose(loss_for, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_for), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_xla_profile_shares_leave_out_enclosing_events_and_sum_instances():
    from benchmarks import xla_profile

    events = [dict(ph="X", name="ynn_fusion.3", dur=300.0), dict(ph="X", name="ynn_fusion", dur=100.0),
              dict(ph="X", name="copy_bitcast_fusion.12", dur=100.0), dict(ph="X", name="cond.7", dur=450.0),
              dict(ph="X", name="ThunkExecutor::Execute", dur=999.0), dict(ph="i", name="copy", dur=5.0)]
    shares = xla_profile.op_shares(events, steps=2)
    assert [(x["op"], x["seconds_per_step"], x["share"]) for x in shares] == [
        ("ynn_fusion", 200e-6, 0.8), ("copy_bitcast_fusion", 50e-6, 0.2)]


def test_xla_profile_traces_a_compiled_step(tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks import xla_profile

    step = jax.jit(lambda st, x: (st + 1, jnp.tanh(x @ x.T).sum()))
    x = jax.random.normal(jax.random.key(0), (64, 64))
    state, shares = xla_profile.trace_steps(step, jnp.int32(0), [x, x], str(tmp_path))
    assert int(state) == 2
    assert shares and abs(sum(s["share"] for s in shares) - 1) < 1e-9


def test_train_step_rows_per_remat_and_scan_unroll_train_the_same_model():
    """``--remat none minimal --scan-unroll 1 full``: one row per pair, the same losses step for step (both change
    the program only); without --torch-ref no PyTorch figure is made up."""
    import argparse

    rows = train_step.bench("small", "float32", ("none", "minimal"), steps=2, batch=1, seq=16, unrolls=(1, True))
    assert [(r["remat"], r["scan_unroll"]) for r in rows] == [("none", 1), ("none", True), ("minimal", 1),
                                                               ("minimal", True)]
    for r in rows[1:]:
        np.testing.assert_allclose(r["losses"], rows[0]["losses"], rtol=1e-5)
    assert all("torch_step_s" not in r and r["step_s"] > 0 for r in rows)
    assert [train_step.parse_unroll(v) for v in ("1", "3", "full")] == [1, 3, True]
    for bad in ("0", "auto", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--scan-unroll"):
            train_step.parse_unroll(bad)
