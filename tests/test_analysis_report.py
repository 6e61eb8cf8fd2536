"""loopjax.analysis.report (``analyze``), ``loopjax analyze`` and experiments.fixed_points end to end.

Every run uses the smoke preset's model config (experiments.fixed_points.PRESETS["smoke"]) and the same analysis
options, so the jitted recorder, metrics and exit-rule forwards compile once for the whole file.
"""

import json
import math

import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from experiments import fixed_points
from loopjax import cli
from loopjax.analysis.report import PLOTS, analyze
from loopjax.data import PHop

OURO = "tests/data/ouro"
SMOKE = fixed_points.PRESETS["smoke"]
TOP_KEYS = {"name", "command", "revision", "date", "model", "inputs", "n_loops", "record_loops", "convergence",
            "attention_change", "logit_lens", "contraction", "exit_depth", "efficiency", "layer_specialisation",
            "files"}


def _finite_leaves(x, path="result"):
    """Every number in the JSON tree, with its path; fails on None (a non-finite value) in a numeric list."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _finite_leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _finite_leaves(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def _check_report(out, files, *, k, t_rec, n_loops, heads, task):
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == TOP_KEYS
    for path, v in _finite_leaves(saved):
        assert math.isfinite(v), path
    conv = saved["convergence"]
    assert np.shape(conv["relative"]) == (t_rec - 1, k) and np.shape(conv["absolute"]) == (t_rec - 1, k)
    assert np.shape(conv["rate"]) == (k,) and np.shape(conv["fixed_point_distances"]) == (k, k)
    assert np.shape(conv["cyclic_score"]) == (t_rec - 1,)
    assert np.shape(saved["attention_change"]["js"]) == (t_rec - 1, k, heads)
    assert np.shape(saved["attention_change"]["tv"]) == (t_rec - 1, k, heads)
    assert saved["logit_lens"]["kl"][-1] == 0.0 and saved["logit_lens"]["top1"][-1] == 1.0
    c = saved["contraction"]
    assert c["loops_done"] == sorted({0, 1, t_rec // 2, t_rec}) and all(s > 0 for s in c["sigma"])
    assert 1 <= saved["exit_depth"]["mean"] <= n_loops
    plots = {PLOTS[p] for p in ("convergence", "attention", "trajectory", "exit_depth")}
    if task:
        plots.add(PLOTS["pareto"])
        rules = [p["rule"] for p in saved["efficiency"]["points"]]
        assert rules[:n_loops] == [f"fixed={n}" for n in range(1, n_loops + 1)]
        assert set(saved["efficiency"]["frontier"]) <= set(rules) and saved["efficiency"]["frontier"]
        assert "## Accuracy per FLOP" in (out / "README.md").read_text()
    else:
        assert saved["efficiency"] is None
    assert set(files) == plots | {"README.md", "results.json"}
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    readme = (out / "README.md").read_text()
    for section in ("## Per-layer convergence", "## Attention change", "## Logit lens", "## Contraction",
                    saved["revision"], saved["command"]):
        assert section in readme
    return saved


def test_analyze_random_model_on_phop_writes_every_table_and_plot(tmp_path):
    model = lj.LoopedLM(fixed_points.experiment(SMOKE).model, rngs=nnx.Rngs(1))
    task = PHop(**SMOKE["task"])
    n_loops = model.cfg.n_loops
    result = analyze(model, task=task, out_dir=tmp_path, n_loops=n_loops, record_loops=2 * n_loops,
                     examples=SMOKE["examples"], record_rows=SMOKE["record_rows"], power_iters=SMOKE["power_iters"],
                     q_grid=SMOKE["q_grid"], eps_grid=SMOKE["eps_grid"], command="test")
    assert set(result) == TOP_KEYS
    saved = _check_report(tmp_path, result["files"], k=model.cfg.n_layers, t_rec=2 * n_loops, n_loops=n_loops,
                          heads=model.cfg.n_heads, task=True)
    assert saved["inputs"]["batch"] == [SMOKE["examples"], task.length] and saved["record_loops"] == 2 * n_loops
    with pytest.raises(ValueError, match="exactly one"):
        analyze(model, out_dir=tmp_path)


def test_cli_analyze_on_a_trained_workdir_and_an_ouro_folder(tmp_path, capsys):
    config = tmp_path / "smoke_phop.py"
    config.write_text("from experiments.fixed_points import PRESETS, experiment\n\n\n"
                      "def get_config():\n    return experiment(PRESETS['smoke'])\n")
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "--workdir", str(run)]) == 0
    out = tmp_path / "report"
    n_loops = SMOKE["n_loops"]
    grids = ["--q-grid", ",".join(map(str, SMOKE["q_grid"])), "--eps-grid", ",".join(map(str, SMOKE["eps_grid"]))]
    argv = ["analyze", str(run), "--task", "phop", "--out", str(out), "--record-loops", str(2 * n_loops),
            "--examples", str(SMOKE["examples"]), "--power-iters", str(SMOKE["power_iters"]), *grids]
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_loops"] == n_loops and len(printed["sigma"]) == 4
    saved = _check_report(out, printed["files"], k=SMOKE["n_layers"], t_rec=2 * n_loops, n_loops=n_loops,
                          heads=SMOKE["n_heads"], task=True)
    assert saved["command"].startswith(f"loopjax analyze {run} --task phop")
    assert saved["inputs"]["task"]["seq_len"] == SMOKE["task"]["n"] + 1  # the run's own task settings

    ouro = tmp_path / "ouro"
    assert cli.main(["analyze", OURO, "--ouro", "--task", "none", "--out", str(ouro), "--record-loops", "8",
                     "--examples", str(SMOKE["ouro_rows"]), "--seq-len", str(SMOKE["ouro_seq"]),
                     "--power-iters", str(SMOKE["power_iters"])]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = _check_report(ouro, printed["files"], k=2, t_rec=8, n_loops=4, heads=4, task=False)
    assert saved["inputs"]["batch"] == [SMOKE["ouro_rows"], SMOKE["ouro_seq"]]
    # errors name what to pass
    assert cli.main(["analyze", str(tmp_path), "--task", "phop", "--out", str(ouro)]) == 2
    assert "--ouro" in capsys.readouterr().err
    assert cli.main(["analyze", str(run), "--task", "phop", "--out", str(out), "--set", "task.hopz=(2,)"]) == 2
    assert "nearest: ['hops'" in capsys.readouterr().err


def test_fixed_points_smoke_end_to_end(tmp_path):
    out = tmp_path / "results"
    assert fixed_points.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "run")]) == 0
    readme = (out / "README.md").read_text()
    assert "## What the numbers show" in readme and "p-hop model" in readme and "Ouro reference" in readme
    assert "python -m experiments.fixed_points --smoke" in (out / "command.txt").read_text()
    for subject in ("phop", "ouro"):
        saved = json.loads((out / subject / "results.json").read_text())
        assert set(saved) == TOP_KEYS
        assert (out / subject / PLOTS["trajectory"]).is_file()
    assert (out / "phop" / PLOTS["pareto"]).is_file() and not (out / "ouro" / PLOTS["pareto"]).exists()


needs_options = pytest.mark.skipif(
    not {"layer_loops", "memory_local_slots"} <= set(lj.LoopedConfig.__dataclass_fields__),
    reason="needs issue 29's model options (LoopedConfig.layer_loops, memory_*)")


@needs_options
def test_analyze_reports_layer_specialisation_of_per_layer_loops_and_memory(tmp_path):
    task = PHop(alphabet=3, n=8, hops=(1,))
    bias = 0.7
    cfg = lj.LoopedConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2, d_ff=32, n_layers=2, n_loops=1,
                          max_seq_len=task.length, exit_gate=False, layer_loops=3, memory_local_slots=4,
                          memory_global_slots=2, memory_gate_bias=bias)
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(3))
    result = analyze(model, task=task, out_dir=tmp_path, record_loops=2, examples=8, record_rows=2,
                     power_iters=2, q_grid=(), eps_grid=(0.1,))
    spec = result["layer_specialisation"]
    assert len(spec["expected_steps"]) == 2 and all(1 <= e <= 3 for e in spec["expected_steps"])
    # gate weights start at zero: every gate value is sigmoid(bias) (to float32 rounding), in every layer and bank
    expected = 1 / (1 + math.exp(-bias))
    np.testing.assert_allclose(spec["gate_local"], [expected] * 2, rtol=2e-5)
    np.testing.assert_allclose(spec["gate_global"], [expected] * 2, rtol=2e-5)
    assert PLOTS["layers"] in result["files"] and (tmp_path / PLOTS["layers"]).read_bytes()[:4] == b"\x89PNG"
    assert "## Layer specialisation" in (tmp_path / "README.md").read_text()
    base = analyze(lj.LoopedLM(lj.LoopedConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2, d_ff=32,
                                               n_layers=2, n_loops=2, max_seq_len=task.length, exit_gate=False),
                               rngs=nnx.Rngs(3)), task=task, out_dir=tmp_path / "base", examples=8, record_rows=2,
                   power_iters=2, q_grid=(), eps_grid=(0.1,))
    assert base["layer_specialisation"] is None and PLOTS["layers"] not in base["files"]
