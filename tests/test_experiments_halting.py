"""The halting_depth and extrapolation experiments: each --smoke run writes its README table, results.json, command
and PNGs; the table and verdict helpers on hand-made numbers. No accuracy is asserted (it is measured)."""

import json

import numpy as np
import pytest

from experiments import extrapolation, halting_depth
from loopjax.analysis.efficiency import EvalPoint

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1000


@pytest.mark.slow
def test_halting_depth_smoke_writes_table_json_and_plots(tmp_path, capsys):
    halting_depth.main(["--smoke", "--out", str(tmp_path)])
    preset = halting_depth.PRESETS["smoke"]
    n_loops, q_grid = preset["n_loops"], preset["q_grid"]
    readme = (tmp_path / "README.md").read_text()
    assert "| exit rule | acc p=1 (%) | exit p=1 | acc p=2 (%) | exit p=2 | acc all (%) | exit all |" in readme
    assert "**Claim (easy inputs exit after 1-2 loops" in readme
    data = json.loads((tmp_path / "results.json").read_text())
    rules = [r["exit rule"] for r in data["rows"]]
    assert rules == [f"fixed={t}" for t in range(1, n_loops + 1)] + [f"q={q:g}" for q in q_grid]
    points = data["data"]["seeds"][0]["points"]
    assert set(points) == {"p=1", "p=2", "all"}
    for name, pts in points.items():
        for pt in pts:
            assert 0.0 <= pt["accuracy"] <= 1.0 and 1.0 <= pt["answer_loops"] <= n_loops
            if pt["rule"].startswith("fixed="):  # a forced step is every token's exit step
                assert pt["answer_loops"] == pt["mean_loops"] == float(pt["rule"][6:])
    # the mixture is the equal-count mean of its difficulties
    for i, pt in enumerate(points["all"]):
        assert pt["accuracy"] == pytest.approx(np.mean([points[n][i]["accuracy"] for n in ("p=1", "p=2")]))
    assert _png_ok(tmp_path / "halting_depth.png") and _png_ok(tmp_path / "halting_depth_pareto.png")
    assert "# revision " in (tmp_path / "command.txt").read_text()
    assert "| fixed=1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_extrapolation_smoke_writes_table_json_and_plot(tmp_path, capsys):
    extrapolation.main(["--smoke", "--out", str(tmp_path)])
    n_loops = extrapolation.PRESETS["smoke"]["n_loops"]
    readme = (tmp_path / "README.md").read_text()
    assert "| recipe | difficulty | 1 | 2 (trained) | 3 | 4 |" in readme
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["difficulty"]) for r in data["rows"]] == [
        ("fixed", "p=1"), ("fixed", "p=2"), ("random", "p=1"), ("random", "p=2")]
    acc = data["data"]["accuracy"]
    assert all(len(acc[r][p]) == 2 * n_loops for r in acc for p in acc[r])
    assert all(0.0 <= a <= 1.0 for r in acc for p in acc[r] for v in acc[r][p].values() for a in v)
    assert _png_ok(tmp_path / "extrapolation.png")
    assert "# revision " in (tmp_path / "command.txt").read_text()
    assert "| random | p=2 |" in capsys.readouterr().out


def test_random_recipe_samples_loops_with_mean_l_up_to_2l():
    preset = extrapolation.PRESETS["cpu"]
    obj = extrapolation.objective(preset, "random")
    assert obj.random_loops and obj.objective == "final"
    assert 1 + obj.mean_loops == preset["n_loops"] and obj.max_loops == 2 * preset["n_loops"]
    assert not extrapolation.objective(preset, "fixed").random_loops
    with pytest.raises(ValueError, match="recipe='other'"):
        extrapolation.objective(preset, "other")


def _point(name, rule, acc, loops, n=10):
    return EvalPoint(model=name, rule=rule, accuracy=acc, mean_loops=loops, answer_loops=loops, iterations=loops,
                     flops_per_token=100.0 * loops, executed_flops_per_token=100.0 * loops, n_examples=n)


def test_average_points_pooled_and_over_seeds():
    a = [_point("p=1", "fixed=1", 0.9, 1.0), _point("p=1", "q=0.5", 0.8, 1.5)]
    b = [_point("p=2", "fixed=1", 0.3, 1.0), _point("p=2", "q=0.5", 0.6, 3.5)]
    pooled = halting_depth.average_points([a, b], "all", pooled=True)
    assert [p.rule for p in pooled] == ["fixed=1", "q=0.5"]
    assert pooled[1].accuracy == pytest.approx(0.7) and pooled[1].answer_loops == pytest.approx(2.5)
    assert pooled[1].n_examples == 20 and pooled[1].model == "all"
    assert halting_depth.average_points([a, b], "p", pooled=False)[0].n_examples == 10


def _runs(easy_exit, hard_exit, n_loops=4):
    rules = [f"fixed={t}" for t in range(1, n_loops + 1)] + ["q=0.5"]
    easy = [_point("p=1", r, 0.95, float(t)) for t, r in enumerate(rules[:-1], 1)] + [
        _point("p=1", "q=0.5", 0.95, easy_exit)]
    hard = [_point("p=3", r, 0.2 * t, float(t)) for t, r in enumerate(rules[:-1], 1)] + [
        _point("p=3", "q=0.5", 0.8, hard_exit)]
    return [{"points": {"p=1": easy, "p=3": hard}}]


def test_claim_verdict_and_needed_depth():
    held = halting_depth.claim_verdict(_runs(1.2, 3.8), ["p=1", "p=3"], 4, (0.5,))
    assert "The claim holds at every q tested." in held
    assert "p=1: 1, p=3: 4" in held  # easy needs one forced step, hard needs all four
    failed = halting_depth.claim_verdict(_runs(2.6, 3.8), ["p=1", "p=3"], 4, (0.5,))
    assert "does not hold at any q" in failed and "p=1 exits at 2.60" in failed
