"""The train-step benchmark's matmul accounting (no timing: speed is measured by the benchmarks themselves)."""

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
