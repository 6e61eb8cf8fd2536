"""The looped-vs-deep grid of Saunshi et al. (ICLR 2025, Table 1), shared by the phop, addition and igsm scripts.

For each architecture (k distinct layers looped L times) and seed: train a fresh model on the task's mixture
(``fit_on_task``), score it on held-out examples of each difficulty (``task_accuracy``), and record its parameters
and forward FLOPs per token. ``grid_rows`` turns the scores into table rows (mean ± std over seeds), ``plot_grid``
draws accuracy per model, ``run_experiment`` does all of it and writes ``experiments/results/NAME/``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import jax
import numpy as np

import loopjax as lj
from experiments.common import arch_label, mean_pm, model_config, write_results
from loopjax.config import TrainConfig
from loopjax.data.tasks.base import Task
from loopjax.train.tasks import fit_on_task, task_accuracy

TRAIN_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps", "schedule", "weight_decay", "grad_clip")


@dataclasses.dataclass(frozen=True)
class ArchResult:
    """One architecture over its seeds: accuracy[difficulty] is a list, one value per seed."""

    k: int
    n_loops: int
    params: int
    flops_per_token: float
    accuracy: dict[Hashable, list[float]]
    seeds: tuple[int, ...]
    train_seconds: list[float]

    @property
    def label(self) -> str:
        return arch_label(self.k, self.n_loops)


def train_config(preset: dict, seq_len: int, seed: int) -> TrainConfig:
    """The preset's optimisation keys as a ``TrainConfig`` (no checkpoints, no per-loop loss logging)."""
    keys = {key: preset[key] for key in TRAIN_KEYS if key in preset}
    return TrainConfig(seq_len=seq_len, seed=seed, ckpt_every=0, log_every=max(1, preset["steps"] // 4),
                       log_loop_losses=False, **keys)


def run_grid(preset: dict, train_task: Task, eval_tasks: dict[Hashable, Task], *,
             log: Callable[[str], None] = print) -> list[ArchResult]:
    """Train every ``preset["archs"]`` (k, L) for every ``preset["seeds"]`` on ``train_task``; score each on
    ``eval_tasks`` (difficulty -> a task of that difficulty alone) with ``preset["eval_count"]`` examples."""
    seq_len = train_task.length
    results = []
    for k, n_loops in preset["archs"]:
        cfg = model_config(preset, k, n_loops, train_task.vocab_size, seq_len)
        accuracy: dict[Hashable, list[float]] = {d: [] for d in eval_tasks}
        seconds, params = [], 0
        for seed in preset["seeds"]:
            start = time.perf_counter()
            trainer = fit_on_task(cfg, train_config(preset, seq_len, seed), train_task, progress=False)
            seconds.append(time.perf_counter() - start)
            model = trainer.model()
            params = lj.count_params(model)
            for d, task in eval_tasks.items():
                accuracy[d].append(task_accuracy(model, task, count=preset["eval_count"]).accuracy)
            scores = " ".join(f"{d}:{100 * v[-1]:.1f}" for d, v in accuracy.items())
            log(f"{arch_label(k, n_loops):>12} seed {seed}: {seconds[-1]:6.1f}s  accuracy % {scores}")
        results.append(ArchResult(k=k, n_loops=n_loops, params=params,
                                  flops_per_token=lj.forward_flops(cfg, seq_len, n_loops) / seq_len,
                                  accuracy=accuracy, seeds=tuple(preset["seeds"]), train_seconds=seconds))
    return results


def training_summary(preset: dict) -> str:
    """"N steps of batch B, d_model D, H heads, FFN F": the training budget and model width of a preset."""
    return (f"{preset['steps']} steps of batch {preset['batch_size']}, d_model {preset['d_model']}, "
            f"{preset['n_heads']} heads, FFN {preset['d_ff']}")


def paper_column(archs: Sequence[tuple[int, int]], paper: dict[str, float], paper_depth: int) -> dict[str, str]:
    """Our label -> the paper's number for the same role, e.g. ``"99.9 (Loop 1⊗6)"`` for our Loop 1⊗4.

    Roles, with D the grid's depth (max k·L): shallow k⊗1 (k < D), looped k⊗(D/k) and deep D⊗1; the paper's grid
    has depth ``paper_depth``. Archs whose role the paper does not report get no entry.
    """
    depth = max(k * n for k, n in archs)
    out = {}
    for k, n in archs:
        if n > 1:
            theirs = arch_label(k, paper_depth // k)
        elif k == depth and depth > 1:
            theirs = arch_label(paper_depth, 1)
        else:
            theirs = arch_label(k, 1)
        if theirs in paper:
            ours = arch_label(k, n)
            out[ours] = f"{paper[theirs]}" + ("" if theirs == ours else f" ({theirs})")
    return out


def grid_rows(results: Sequence[ArchResult], difficulty_name: Callable[[Hashable], str],
              paper: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """Table columns and rows: model, k, L, params, FLOPs/token, accuracy per difficulty, seeds, paper."""
    difficulties = list(results[0].accuracy)
    acc_cols = [f"acc {difficulty_name(d)} (%)" for d in difficulties]
    columns = ["model", "k", "L", "params", "FLOPs/token", *acc_cols, "seeds"]
    if paper is not None:
        columns.append("paper (%)")
    rows = []
    for r in results:
        row = {"model": r.label, "k": r.k, "L": r.n_loops, "params": r.params,
               "FLOPs/token": f"{r.flops_per_token:,.0f}", "seeds": len(r.seeds)}
        for col, d in zip(acc_cols, difficulties):
            row[col] = mean_pm(r.accuracy[d])
        if paper is not None:
            row["paper (%)"] = paper.get(r.label)
        rows.append(row)
    return columns, rows


def plot_grid(results: Sequence[ArchResult], difficulty_name: Callable[[Hashable], str], title: str,
              path: str | os.PathLike) -> Path:
    """Grouped bars: accuracy (mean over seeds, std as error bar) per model, one bar per difficulty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    difficulties = list(results[0].accuracy)
    x = np.arange(len(results))
    width = 0.8 / len(difficulties)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(results)), 3.8), layout="constrained")
    for i, d in enumerate(difficulties):
        acc = np.array([r.accuracy[d] for r in results]) * 100
        err = acc.std(axis=1, ddof=1) if acc.shape[1] > 1 else None
        ax.bar(x + (i - (len(difficulties) - 1) / 2) * width, acc.mean(axis=1), width, yerr=err, capsize=2,
               label=difficulty_name(d))
    ax.set_xticks(x, [r.label for r in results], rotation=20)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=min(4, len(difficulties)))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def results_data(preset: dict, results: Sequence[ArchResult]) -> dict:
    """Everything behind the table, for results.json: the preset and the per-seed numbers."""
    return {"preset": {k: (str(v) if isinstance(v, Path) else v) for k, v in preset.items()},
            "archs": [{"model": r.label, "k": r.k, "L": r.n_loops, "params": r.params,
                       "flops_per_token": r.flops_per_token, "seeds": list(r.seeds),
                       "accuracy": {str(d): v for d, v in r.accuracy.items()},
                       "train_seconds": [round(s, 2) for s in r.train_seconds]} for r in results]}


def run_experiment(name: str, title: str, preset: dict, train_task: Task, eval_tasks: dict[Hashable, Task], *,
                   argv: Sequence[str], difficulty_name: Callable[[Hashable], str],
                   paper: dict[str, str] | None = None, notes: str = "") -> Path:
    """Run the grid, then write README.md, results.json, command.txt and ``NAME.png`` into ``preset["out"]``;
    ``argv`` (the script's flags) makes the recorded command, also when ``main(argv)`` runs in-process."""
    start = time.perf_counter()
    results = run_grid(preset, train_task, eval_tasks)
    columns, rows = grid_rows(results, difficulty_name, paper)
    out = Path(preset["out"])
    out.mkdir(parents=True, exist_ok=True)
    plot_grid(results, difficulty_name, title, out / f"{name}.png")
    minutes = (time.perf_counter() - start) / 60
    notes = (f"{notes.strip()}\n\nPreset `{preset['preset']}`, seeds {list(preset['seeds'])}, "
             f"{minutes:.1f} min in all on {jax.devices()[0].platform}. Plot: [{name}.png]({name}.png).")
    return write_results(out, title=title, columns=columns, rows=rows, notes=notes,
                         data=results_data(preset, results),
                         command=shlex.join(["python", "-m", f"experiments.{name}", *argv]))


def enable_compile_cache() -> None:
    """Keep compiled XLA programs on disk: the seeds of one architecture (and reruns) then skip compilation,
    which on a CPU costs more than training a small model. Honours JAX_COMPILATION_CACHE_DIR when set."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(os.path.expanduser("~"), ".cache", "loopjax", "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
