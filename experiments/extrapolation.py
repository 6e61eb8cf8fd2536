"""Depth extrapolation: a looped model trained at L loops, evaluated at 1..2L loops, per task difficulty.

Two training recipes for the same architecture: ``fixed`` (every step runs exactly L loops, CE of the last loop)
and ``random`` (each step runs n ~ 1 + Poisson(LogNormal) loops with mean L, clipped to 2L, backpropagating
through the last ``backprop_loops``; the recurrent-depth recipe of Geiping et al. 2025, which is what the
literature uses to make extra loops at test time help rather than hurt).

    python -m experiments.extrapolation --preset cpu      # the committed results: experiments/results/extrapolation/
    python -m experiments.extrapolation --preset paper    # p-hop at the paper's sizes, for a TPU / GPU
    python -m experiments.extrapolation --smoke           # an end-to-end check in seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

import loopjax as lj
from experiments.common import arch_label, experiment_parser, mean_pm, model_config, resolve_preset, write_results
from experiments.grid import enable_compile_cache
from experiments.halting_depth import difficulty_tasks
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.train.tasks import accuracy_vs_loops, fit_on_task

TRAIN = dict(schedule="cosine", weight_decay=0.1, grad_clip=1.0)
RECIPES = ("fixed", "random")

PRESETS = {
    "paper": dict(task="phop", alphabet=4, n=256, difficulties=(4, 8, 16), dense_labels=False, k=2, n_loops=8,
                  d_model=128, n_heads=8, d_ff=512, exit_gate=False, recipes=RECIPES, backprop_loops=8, batch_size=256,
                  steps=200_000, learning_rate=1e-3, warmup_steps=2_000, eval_count=2048, seeds=(0, 1, 2), **TRAIN),
    # p-hop with final-answer labels stayed near chance after 1000-1500 steps on a CPU; dense labels make it learnable.
    "cpu": dict(task="phop", alphabet=4, n=16, difficulties=(1, 2), dense_labels=True, k=1, n_loops=4, d_model=64,
                n_heads=4, d_ff=256, exit_gate=False, recipes=RECIPES, backprop_loops=8, batch_size=32, steps=1500,
                learning_rate=3e-3, warmup_steps=100, eval_count=512, seeds=(0, 1), **TRAIN),
    "smoke": dict(task="phop", alphabet=4, n=8, difficulties=(1, 2), dense_labels=True, k=1, n_loops=2, d_model=16,
                  n_heads=2, d_ff=32, exit_gate=False, recipes=RECIPES, backprop_loops=4, batch_size=8, steps=3,
                  learning_rate=1e-3, warmup_steps=1, eval_count=16, seeds=(0,), **TRAIN),
}
TRAIN_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps", "schedule", "weight_decay", "grad_clip")


def objective(preset: dict, recipe: str) -> HaltingConfig:
    """``fixed``: CE of loop L. ``random``: loop counts with E[n] = L (n = 1 + Poisson(mean L − 1)), at most 2L."""
    if recipe == "fixed":
        return HaltingConfig(objective="final")
    if recipe == "random":
        max_loops = 2 * preset["n_loops"]
        return HaltingConfig(objective="final", random_loops=True, mean_loops=float(max(preset["n_loops"] - 1, 1)),
                             max_loops=max_loops, backprop_loops=min(preset["backprop_loops"], max_loops))
    raise ValueError(f"recipe={recipe!r}: must be one of {RECIPES}")


def train_config(preset: dict, recipe: str, seq_len: int, seed: int) -> TrainConfig:
    keys = {key: preset[key] for key in TRAIN_KEYS}
    return TrainConfig(seq_len=seq_len, seed=seed, ckpt_every=0, log_every=max(1, preset["steps"] // 4),
                       log_loop_losses=False, objective=objective(preset, recipe), **keys)


def run(preset: dict, log=print) -> dict:
    """accuracy[recipe][difficulty][loops] = one value per seed, plus parameters, training times, the task text."""
    n_loops = preset["n_loops"]
    train_task, eval_tasks, task_text = difficulty_tasks(preset)
    loops = range(1, 2 * n_loops + 1)
    cfg = model_config(preset, preset["k"], n_loops, train_task.vocab_size, train_task.length)
    accuracy = {r: {d: {n: [] for n in loops} for d in eval_tasks} for r in preset["recipes"]}
    seconds = {r: [] for r in preset["recipes"]}
    params = 0
    for recipe in preset["recipes"]:
        for seed in preset["seeds"]:
            start = time.perf_counter()
            model = fit_on_task(cfg, train_config(preset, recipe, train_task.length, seed), train_task,
                                progress=False).model()
            seconds[recipe].append(time.perf_counter() - start)
            params = lj.count_params(model)
            for d, task in eval_tasks.items():
                for n, score in accuracy_vs_loops(model, task, loops, count=preset["eval_count"]).items():
                    accuracy[recipe][d][n].append(score.accuracy)
            curve = " | ".join(f"{d}: " + " ".join(f"{100 * accuracy[recipe][d][n][-1]:.0f}" for n in loops)
                               for d in eval_tasks)
            log(f"{recipe:>6} seed {seed}: {seconds[recipe][-1]:.0f}s; accuracy % at loops 1..{2 * n_loops}: {curve}")
    return {"accuracy": accuracy, "seconds": seconds, "params": params, "loops": list(loops), "task": task_text}


def table(result: dict, preset: dict) -> tuple[list[str], list[dict]]:
    """One row per (recipe, difficulty); one column per evaluated loop count (mean ± std over seeds, %)."""
    n_loops = preset["n_loops"]
    loop_col = {n: f"{n} (trained)" if n == n_loops else str(n) for n in result["loops"]}
    columns = ["recipe", "difficulty", *loop_col.values()]
    rows = []
    for recipe, per_p in result["accuracy"].items():
        for d, per_n in per_p.items():
            rows.append({"recipe": recipe, "difficulty": d,
                         **{loop_col[n]: mean_pm(v) for n, v in per_n.items()}})
    return columns, rows


def summary(result: dict, preset: dict) -> str:
    """Per recipe and difficulty: accuracy at L vs the best and the last of L+1..2L (mean over seeds)."""
    n_loops = preset["n_loops"]
    lines = []
    for recipe, per_p in result["accuracy"].items():
        for d, per_n in per_p.items():
            at_l = 100 * np.mean(per_n[n_loops])
            beyond = {n: 100 * np.mean(per_n[n]) for n in result["loops"] if n > n_loops}
            best = max(beyond, key=beyond.get)
            lines.append(f"- {recipe}, {d}: {at_l:.1f}% at L = {n_loops}; beyond L the best is {beyond[best]:.1f}% "
                         f"at {best} loops, and {beyond[2 * n_loops]:.1f}% at 2L = {2 * n_loops}.")
    return "\n".join(lines)


def plot(result: dict, preset: dict, path: Path) -> Path:
    """Accuracy vs evaluated loop count: one panel per recipe, one line per difficulty; L marked."""
    from loopjax.analysis.plots import _figure, _save

    recipes = list(result["accuracy"])
    fig = _figure(5 * len(recipes), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(recipes), sharey=True))
    loops = np.array(result["loops"])
    for ax, recipe in zip(axes, recipes):
        for i, (d, per_n) in enumerate(result["accuracy"][recipe].items()):
            acc = np.array([per_n[n] for n in loops]) * 100  # [loops, seeds]
            err = acc.std(1) if acc.shape[1] > 1 else None
            ax.errorbar(loops, acc.mean(1), yerr=err, marker="o", capsize=2, color=f"C{i}", label=d)
        ax.axvline(preset["n_loops"], color="gray", lw=0.8, ls="--")
        ax.set_xticks(loops)
        ax.set_xlabel("loops at evaluation")
        ax.set_ylim(0, 100)
        ax.set_title(f"trained: {recipe} ({'L' if recipe == 'fixed' else 'mean L'} = {preset['n_loops']})")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out accuracy (%)")
    return _save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    args = experiment_parser("extrapolation", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    unknown = [r for r in preset["recipes"] if r not in RECIPES]
    if unknown or not preset["recipes"]:
        raise ValueError(f"recipes={preset['recipes']!r}: must be a non-empty subset of {RECIPES}")
    start = time.perf_counter()
    result = run(preset)
    columns, rows = table(result, preset)
    out = Path(preset["out"])
    out.mkdir(parents=True, exist_ok=True)
    plot(result, preset, out / "extrapolation.png")
    minutes = (time.perf_counter() - start) / 60
    n_loops, model = preset["n_loops"], arch_label(preset["k"], preset["n_loops"])
    random_obj = objective(preset, "random")
    notes = (
        f"Accuracy (%, mean ± std over seeds {list(preset['seeds'])}) of {model} (k = {preset['k']} shared layers) "
        f"evaluated at 1..{2 * n_loops} loops with the same weights; it was trained at L = {n_loops}.\n\n"
        f"{summary(result, preset)}\n\n"
        f"Recipes: `fixed` runs exactly L = {n_loops} loops every step (CE of the last loop). `random` samples each "
        f"step's loop count n = 1 + Poisson(LogNormal), E[n] = {1 + random_obj.mean_loops:g}, clipped to "
        f"{random_obj.max_loops}, backpropagating through the last {random_obj.backprop_loops} loops. Model: "
        f"d_model {preset['d_model']}, {preset['n_heads']} heads, FFN {preset['d_ff']}, no exit gate, "
        f"{result['params']:,} parameters; {preset['steps']} steps of batch {preset['batch_size']}, lr "
        f"{preset['learning_rate']} ({preset['schedule']}). Task: {result['task']}; each difficulty scored "
        f"on {preset['eval_count']} held-out examples.\n\nPlot: [extrapolation.png](extrapolation.png). Preset "
        f"`{preset['preset']}`, {minutes:.1f} min in all on {jax.devices()[0].platform}.")
    data = {"preset": {k: (str(v) if isinstance(v, Path) else v) for k, v in preset.items()},
            "params": result["params"], "loops": result["loops"],
            "accuracy": {r: {d: {str(n): v for n, v in per_n.items()} for d, per_n in per_p.items()}
                         for r, per_p in result["accuracy"].items()},
            "train_seconds": {r: [round(s, 1) for s in v] for r, v in result["seconds"].items()}}
    return write_results(out, title=f"Depth extrapolation: {model} trained at L = {n_loops}, evaluated at "
                         f"1..{2 * n_loops} loops ({preset['task']})", columns=columns, rows=rows, notes=notes,
                         data=data)


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
