"""Each grid experiment's --smoke run writes its results folder: README table, results.json, command, PNG."""

import json

import numpy as np
import pytest

from experiments import addition, igsm, phop, recall
from experiments.grid import ArchResult, grid_rows


@pytest.mark.slow  # two compiles and fits per script: ~4 min each on the loaded shared CPU
@pytest.mark.parametrize("module, name, first_col", [(phop, "phop", "acc p=1 (%)"),
                                                     (addition, "addition", "acc n=2 (%)"),
                                                     (igsm, "igsm", "acc D1K1 (%)"),
                                                     (recall, "recall", "acc 3 pairs (%)")])
def test_smoke_run_writes_table_json_and_plot(module, name, first_col, tmp_path, capsys):
    module.main(["--smoke", "--out", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| model"))
    assert first_col in header and "FLOPs/token" in header and "params" in header
    assert "| Base 1⊗1 |" in readme and "| Loop 1⊗2 |" in readme
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["Base 1⊗1", "Loop 1⊗2"]
    archs = data["data"]["archs"]
    assert all(0.0 <= a <= 1.0 for arch in archs for accs in arch["accuracy"].values() for a in accs)
    # Same weights, twice the loops: the looped model has the base's parameters and about twice its core FLOPs.
    assert archs[0]["params"] == archs[1]["params"]
    assert archs[1]["flops_per_token"] > archs[0]["flops_per_token"]
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "--smoke" in (tmp_path / "command.txt").read_text()
    assert "| Base 1⊗1 |" in capsys.readouterr().out


def test_grid_rows_mean_and_std_over_seeds():
    acc = {2: [0.5, 0.7], 3: [0.25, 0.25]}
    r = ArchResult(k=1, n_loops=4, params=10, flops_per_token=1234.0, accuracy=acc, seeds=(0, 1),
                   train_seconds=[1.0, 1.0])
    columns, rows = grid_rows([r], lambda p: f"p={p}", paper={"Loop 1⊗4": 99.0})
    assert columns == ["model", "k", "L", "params", "FLOPs/token", "acc p=2 (%)", "acc p=3 (%)", "seeds",
                       "paper (%)"]
    std = np.std([50.0, 70.0], ddof=1)
    assert rows[0]["acc p=2 (%)"] == f"60.0 ± {std:.1f}"
    assert rows[0]["acc p=3 (%)"] == "25.0 ± 0.0"
    assert rows[0]["model"] == "Loop 1⊗4" and rows[0]["paper (%)"] == 99.0 and rows[0]["seeds"] == 2


def test_igsm_format_overrides_reach_the_tasks():
    from experiments.common import experiment_parser, resolve_preset
    argv = ["--set", "order=topological", "--set", "name_tokens=1", "--set", "eq_tokens=False",
            "--set", "reference_labels=True", "--set", "n_names=8"]
    preset = resolve_preset(experiment_parser("igsm", "", igsm.PRESETS).parse_args(argv), igsm.PRESETS)
    train, evals = igsm.make_tasks(preset)
    for task in (train, *evals.values()):
        assert (task.order, task.name_tokens, task.eq_tokens, task.n_names) == ("topological", 1, False, 8)
    assert train.reference_labels and not any(t.reference_labels for t in evals.values())  # training rows only
    assert sorted(evals) == sorted(preset["difficulties"])
    default_train, _ = igsm.make_tasks(igsm.PRESETS["cpu"])
    assert (default_train.order, default_train.name_tokens, default_train.eq_tokens) == ("shuffled", 2, True)
