"""experiments.think_or_know: the arms are matched as the issue says, and --smoke / --capacity write their results."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import think_or_know as tok
from loopjax.config import LoopedConfig

needs_options = pytest.mark.skipif(
    not {"layer_loops", "memory_local_slots"} <= set(LoopedConfig.__dataclass_fields__),
    reason="needs issue 29's model options (LoopedConfig.layer_loops, memory_*)")


def test_closest_int_brackets_a_monotone_measure():
    assert tok.closest_int(lambda x: 3 * x, 100, 0, 1000) == 33
    assert tok.closest_int(lambda x: 3 * x, 101, 0, 1000) == 34
    assert tok.closest_int(lambda x: x * x, 50, 1, 100) == 7
    assert tok.closest_int(lambda x: x, -5, 0, 10) == 0 and tok.closest_int(lambda x: x, 99, 0, 10) == 10


@needs_options
@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_arms_differ_only_as_described_and_are_matched_within_tolerance(preset):
    p = tok.PRESETS[preset]
    stream = tok.make_stream(p)
    arms = tok.arm_configs(p, stream.vocab_size, stream.length)
    assert list(arms) == list(tok.ARMS)
    base = arms["Base"]
    params = {name: tok.params_of(cfg) for name, cfg in arms.items()}
    flops = {name: tok.train_flops_per_token(cfg, stream.length) for name, cfg in arms.items()}
    assert arms["Loop"] == dataclasses.replace(base, layer_loops=p["layer_loops"],
                                               layer_loop_scale_init=p["layer_loop_scale_init"])
    assert arms["Loop+Mem"].layer_loops == p["layer_loops"] and arms["Mem"].layer_loops == 1
    for name in ("Mem", "Loop+Mem"):
        assert (arms[name].memory_local_slots, arms[name].memory_global_slots) == (p["memory_local_slots"],
                                                                                   p["memory_global_slots"])
    # Per-layer loops add routers and scales only; every iteration is charged in the FLOPs.
    assert params["Base"] < params["Loop"] < 1.01 * params["Base"]
    assert flops["Loop"] > 2.5 * flops["Base"] if p["layer_loops"] == 3 else flops["Loop"] > flops["Base"]
    assert params["Mem"] > params["Base"] and flops["Mem"] > flops["Base"]
    assert abs(params["Base-wide"] / params["Mem"] - 1) <= 0.01 and arms["Base-wide"].d_ff > base.d_ff
    assert abs(flops["IsoFLOP-deep"] / flops["Loop"] - 1) <= 0.02 and arms["IsoFLOP-deep"].n_layers > base.n_layers
    assert abs(flops["IsoFLOP-M"] / flops["Loop+Mem"] - 1) <= 0.02
    assert arms["IsoFLOP-M"].n_layers == arms["IsoFLOP-deep"].n_layers
    for name in ("Base-wide", "IsoFLOP-deep", "IsoFLOP-M"):
        assert arms[name].layer_loops == 1 and arms[name].memory_local_slots == arms[name].memory_global_slots == 0


@needs_options
def test_smoke_run_in_two_parts_writes_table_json_and_plots(tmp_path, capsys):
    # Two invocations: the second trains the other arms and takes the first's from out/arms/ (same preset, configs).
    tok.main(["--smoke", "--arms", "Base", "Loop", "IsoFLOP-deep", "--out", str(tmp_path)])
    assert sorted(p.name for p in (tmp_path / "arms").iterdir()) == ["base.json", "isoflop-deep.json", "loop.json"]
    tok.main(["--smoke", "--arms", "Mem", "Loop+Mem", "Base-wide", "IsoFLOP-M", "--out", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    assert "(Base, Loop, IsoFLOP-deep) come from earlier runs" in readme
    header = next(line for line in readme.splitlines() if line.startswith("| arm"))
    for col in ("params", "train FLOPs/token", "phop (%)", "addition (%)", "facts (%)", "mean E[n]"):
        assert col in header
    for arm in tok.ARMS:
        assert f"| {arm} |" in readme
    data = json.loads((tmp_path / "results.json").read_text())
    arms = {a["name"]: a for a in data["data"]["arms"]}
    assert list(arms) == list(tok.ARMS)
    for a in arms.values():
        assert set(a["accuracy"]) == set(tok.FAMILIES) and all(0 <= v <= 1 for v in a["accuracy"].values())
        assert a["params"] > 0 and a["train_flops_per_token"] > 0
    n_layers = tok.PRESETS["smoke"]["n_layers"]
    n = tok.PRESETS["smoke"]["layer_loops"]
    for name in ("Loop", "Loop+Mem"):
        en = arms[name]["expected_steps"]
        assert len(en) == n_layers and all(1 <= e <= n for e in en)
    for name in ("Mem", "Loop+Mem"):
        assert all(0 < g < 1 for key in ("gate_local", "gate_global") for g in arms[name][key])
    assert arms["Base"]["expected_steps"] is None and arms["Base"]["gate_local"] is None
    assert abs(arms["Base-wide"]["params"] / arms["Mem"]["params"] - 1) <= 0.01
    for png in ("think_or_know.png", "layers.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--smoke" in (tmp_path / "command.txt").read_text()
    assert "| Loop+Mem |" in capsys.readouterr().out


def test_capacity_smoke_writes_recall_per_table_size(tmp_path):
    tok.main(["--smoke", "--capacity", "--set", "capacity_subjects=(12,)", "--out", str(tmp_path)])
    text = (tmp_path / "capacity.md").read_text()
    assert "| subjects | facts | recall (%)" in text and "--capacity" in text
    rows = json.loads((tmp_path / "capacity.json").read_text())["rows"]
    assert [r["n_facts"] for r in rows] == [24]
    assert all(0 <= r["accuracy"]["facts"] <= 1 for r in rows)


def test_stream_scores_every_fact_and_holds_out_reasoning():
    p = tok.PRESETS["smoke"]
    stream = tok.make_stream(p)
    facts = stream.member("facts")
    table = stream.tasks[tok.FAMILIES.index("facts")]
    from loopjax.train.tasks import EVAL_SEED

    scored = {tuple(facts.example(EVAL_SEED, i).prompt) for i in range(table.n_facts)}
    assert len(scored) == table.n_facts
    phop = stream.member("phop")
    train = {tuple(phop.example(0, i).prompt) for i in range(200)}
    held = [tuple(phop.example(EVAL_SEED, i).prompt) for i in range(200)]
    assert np.mean([h in train for h in held]) < 0.5  # a different stream (tiny task: some collide by chance)
