"""Does the exit gate spend depth where it is needed? One looped model trained with the Ouro objective on a mixture
of difficulties (p-hop counts p, or numbers of addends n), then per difficulty: the mean exit step of the answer
under QExit(q) at several q, the accuracy at each q (accuracy vs mean depth: the Pareto curve), and the accuracy
when every token is forced to exit at a fixed step 1..L_max.

    python -m experiments.halting_depth --preset cpu      # the committed results: experiments/results/halting_depth/
    python -m experiments.halting_depth --preset paper    # p-hop at the paper's sizes, for a TPU / GPU
    python -m experiments.halting_depth --smoke           # an end-to-end check in seconds

The claim under test (Ouro, the seed of this project): easy inputs exit after 1-2 loops, hard ones run to L_max.
The script states whether it holds in the measured numbers (see ``claim_verdict``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import loopjax as lj
from experiments.common import (arch_label, experiment_parser, mean_pm, model_config, resolve_preset,
                                write_results)
from experiments.grid import enable_compile_cache
from loopjax.analysis.efficiency import EvalPoint, evaluate_rules, exit_rule_grid, pareto_frontier
from loopjax.analysis.plots import plot_pareto
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.data.tasks import Addition, PHop
from loopjax.data.tasks.base import Task
from loopjax.train.tasks import EVAL_SEED, fit_on_task

TRAIN = dict(schedule="cosine", weight_decay=0.1, grad_clip=1.0)
Q_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)

PRESETS = {
    "paper": dict(task="phop", alphabet=4, n=256, difficulties=(4, 8, 16), dense_labels=False, k=2, n_loops=8,
                  d_model=128, n_heads=8, d_ff=512, batch_size=256, steps=200_000, learning_rate=1e-3,
                  warmup_steps=2_000, beta=0.05, q_grid=Q_GRID, eval_count=2048, seeds=(0, 1, 2), **TRAIN),
    # p-hop with final-answer labels stayed near chance after 1000-1500 steps on a CPU; dense labels make it learnable.
    "cpu": dict(task="phop", alphabet=4, n=16, difficulties=(1, 2), dense_labels=True, k=1, n_loops=4, d_model=64,
                n_heads=4, d_ff=256, batch_size=32, steps=4000, learning_rate=3e-3, warmup_steps=100, beta=0.02,
                q_grid=Q_GRID, eval_count=512, seeds=(0, 1), **TRAIN),
    "smoke": dict(task="phop", alphabet=4, n=8, difficulties=(1, 2), dense_labels=True, k=1, n_loops=3, d_model=16,
                  n_heads=2, d_ff=32, batch_size=8, steps=3, learning_rate=1e-3, warmup_steps=1, beta=0.02,
                  q_grid=(0.5,), eval_count=16, seeds=(0,), **TRAIN),
}
TRAIN_KEYS = ("steps", "batch_size", "learning_rate", "warmup_steps", "schedule", "weight_decay", "grad_clip")


def difficulty_tasks(preset: dict) -> tuple[Task, dict[str, Task], str]:
    """The training mixture, one held-out task per difficulty (label -> task), and a sentence describing them.

    ``task="phop"``: difficulties are hop counts p (keys ``alphabet``, ``n``); ``task="addition"``: numbers of
    terms n (key ``digits``). Every per-difficulty task shares the mixture's vocabulary and row length.
    """
    diffs = tuple(preset["difficulties"])
    if preset["task"] == "phop":
        a, n = preset["alphabet"], preset["n"]
        train = PHop(alphabet=a, n=n, hops=diffs, dense_labels=preset["dense_labels"])
        evals = {f"p={p}": PHop(alphabet=a, n=n, hops=(p,), max_hops=max(diffs)) for p in diffs}
        text = (f"p-hop, alphabet {a}, n = {n}, trained on a uniform mixture of p in {list(diffs)}"
                + (" with every prefix's p-hop answer labelled (`dense_labels`; scored on the final answer only)"
                   if preset["dense_labels"] else ""))
    elif preset["task"] == "addition":
        train = Addition(n_terms=diffs, digits=preset["digits"])
        evals = {f"n={k}": Addition(n_terms=(k,), digits=preset["digits"], seq_len=train.length) for k in diffs}
        text = (f"n-ary addition of {preset['digits']}-digit numbers, trained on a uniform mixture of n in "
                f"{list(diffs)}")
    else:
        raise ValueError(f"task={preset['task']!r}: must be 'phop' or 'addition'")
    return train, evals, text


def train_config(preset: dict, seq_len: int, seed: int) -> TrainConfig:
    """The preset's optimisation keys with the Ouro objective Σ_t p_t·CE_t − β·H(p)."""
    keys = {key: preset[key] for key in TRAIN_KEYS}
    return TrainConfig(seq_len=seq_len, seed=seed, ckpt_every=0, log_every=max(1, preset["steps"] // 4),
                       log_loop_losses=False, objective=HaltingConfig(objective="ouro", beta=preset["beta"]),
                       **keys)


def average_points(groups: Sequence[Sequence[EvalPoint]], name: str, *, pooled: bool) -> list[EvalPoint]:
    """Rule by rule, the mean of several equal-count point lists (same rules, same order).

    pooled=True: the groups are disjoint example sets (the difficulties of the mixture), so the mean over them is
    exact for the pooled set (FLOPs are affine in the loop count) and n_examples adds up. pooled=False: the groups
    are seeds of the same examples.
    """
    points = []
    for same_rule in zip(*groups):
        fields = {f.name: float(np.mean([getattr(p, f.name) for p in same_rule]))
                  for f in dataclasses.fields(EvalPoint) if f.name not in ("model", "rule", "n_examples")}
        count = sum(p.n_examples for p in same_rule) if pooled else same_rule[0].n_examples
        points.append(EvalPoint(model=name, rule=same_rule[0].rule, n_examples=count, **fields))
    return points


def run_seed(preset: dict, seed: int, train_task: Task, eval_tasks: dict[str, Task],
             log=print) -> dict[str, list[EvalPoint]]:
    """Train one gated model; evaluate every exit rule on each difficulty. Returns name -> points (rule order)."""
    cfg = model_config(preset, preset["k"], preset["n_loops"], train_task.vocab_size, train_task.length,
                       exit_gate=True)
    start = time.perf_counter()
    model = fit_on_task(cfg, train_config(preset, train_task.length, seed), train_task, progress=False).model()
    seconds = time.perf_counter() - start
    rules = exit_rule_grid(preset["n_loops"], q_grid=preset["q_grid"])
    points = {}
    for name, task in eval_tasks.items():
        batch = task.eval_batch(seed=EVAL_SEED, count=preset["eval_count"])
        points[name] = evaluate_rules(model, batch, rules, n_loops=preset["n_loops"], name=name, batch_size=256)
    points["all"] = average_points(list(points.values()), "all", pooled=True)
    summary = " ".join(f"{pt.rule}:{100 * pt.accuracy:.0f}%@{pt.answer_loops:.2f}" for pt in points["all"])
    log(f"seed {seed}: trained in {seconds:.0f}s; mixture (accuracy @ answer exit step): {summary}")
    return {"points": points, "params": lj.count_params(model), "train_seconds": seconds}


def table(runs: Sequence[dict], names: Sequence[str]) -> tuple[list[str], list[dict]]:
    """One row per exit rule; per difficulty the accuracy and the mean exit step of the answer (mean ± std)."""
    columns = ["exit rule"]
    for name in names:
        columns += [f"acc {name} (%)", f"exit {name}"]
    columns.append("FLOPs/token (all)")
    rows = []
    for i, rule in enumerate(pt.rule for pt in runs[0]["points"]["all"]):
        row = {"exit rule": rule}
        for name in names:
            row[f"acc {name} (%)"] = mean_pm([r["points"][name][i].accuracy for r in runs])
            row[f"exit {name}"] = mean_pm([r["points"][name][i].answer_loops for r in runs], scale=1, digits=2)
        row["FLOPs/token (all)"] = f"{np.mean([r['points']['all'][i].flops_per_token for r in runs]):,.0f}"
        rows.append(row)
    return columns, rows


def _mean(runs: Sequence[dict], name: str, rule: str, field: str) -> float:
    return float(np.mean([getattr(next(p for p in r["points"][name] if p.rule == rule), field) for r in runs]))


def needed_depth(runs: Sequence[dict], name: str, n_loops: int, slack: float = 0.02) -> int:
    """The fewest forced steps whose accuracy (mean over seeds) is within ``slack`` of the best forced step's."""
    acc = [_mean(runs, name, f"fixed={t}", "accuracy") for t in range(1, n_loops + 1)]
    return next(t for t, a in enumerate(acc, 1) if a >= max(acc) - slack)


def claim_verdict(runs: Sequence[dict], names: Sequence[str], n_loops: int, q_grid: Sequence[float]) -> str:
    """Plain statement of whether easy inputs exit at 1-2 loops and hard ones at L_max, at each q."""
    easy, hard = names[0], names[-1]
    lines = []
    holds = []
    for q in q_grid:
        e, h = _mean(runs, easy, f"q={q:g}", "answer_loops"), _mean(runs, hard, f"q={q:g}", "answer_loops")
        ok = e <= 2.0 and h >= n_loops - 0.5
        holds.append(ok)
        lines.append(f"q={q:g}: {easy} exits at {e:.2f}, {hard} at {h:.2f} -> {'holds' if ok else 'does not hold'}")
    need = ", ".join(f"{n}: {needed_depth(runs, n, n_loops)}" for n in names)
    if all(holds):
        verdict = "The claim holds at every q tested."
    elif any(holds):
        verdict = (f"The claim holds only at q in {[q for q, ok in zip(q_grid, holds) if ok]}, not at the other "
                   "q tested.")
    else:
        verdict = "The claim does not hold at any q tested."
    return (f"**Claim (easy inputs exit after 1-2 loops, hard ones at L_max = {n_loops}):** {verdict} "
            f"Mean exit step of the answer (mean over seeds), easiest vs hardest difficulty:\n\n"
            + "\n".join(f"- {line}" for line in lines)
            + f"\n\nFewest forced steps within 2 points of the best forced accuracy (what each difficulty needs): "
            f"{need}.")


def plot(runs: Sequence[dict], names: Sequence[str], n_loops: int, q_grid: Sequence[float], path: Path) -> Path:
    """Left: accuracy per forced exit step, per difficulty. Right: mean answer exit step per q, per difficulty."""
    from loopjax.analysis.plots import _figure, _save

    fig = _figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    steps = np.arange(1, n_loops + 1)
    for i, name in enumerate(names):
        acc = np.array([[next(p for p in r["points"][name] if p.rule == f"fixed={t}").accuracy for t in steps]
                        for r in runs]) * 100
        ax1.errorbar(steps, acc.mean(0), yerr=acc.std(0) if len(runs) > 1 else None, marker="o", capsize=2,
                     color=f"C{i}", label=name)
        ex = np.array([[next(p for p in r["points"][name] if p.rule == f"q={q:g}").answer_loops for q in q_grid]
                       for r in runs])
        ax2.errorbar(q_grid, ex.mean(0), yerr=ex.std(0) if len(runs) > 1 else None, marker="o", capsize=2,
                     color=f"C{i}", label=name)
    ax1.set_xlabel("forced exit step")
    ax1.set_ylabel("held-out accuracy (%)")
    ax1.set_xticks(steps)
    ax1.set_ylim(0, 100)
    ax1.set_title("accuracy when every token exits at step t")
    ax1.legend(fontsize=8)
    ax2.axhline(n_loops, color="gray", lw=0.8, ls="--")
    ax2.set_xlabel("QExit threshold q")
    ax2.set_ylabel("mean exit step of the answer")
    ax2.set_ylim(0.8, n_loops + 0.2)
    ax2.set_title("where the gate exits")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    args = experiment_parser("halting_depth", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    start = time.perf_counter()
    n_loops = preset["n_loops"]
    train_task, eval_tasks, task_text = difficulty_tasks(preset)
    runs = [run_seed(preset, seed, train_task, eval_tasks) for seed in preset["seeds"]]
    names = list(eval_tasks)
    columns, rows = table(runs, [*names, "all"])
    out = Path(preset["out"])
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, names, n_loops, preset["q_grid"], out / "halting_depth.png")
    seed_mean = {name: average_points([r["points"][name] for r in runs], name, pooled=False)
                 for name in [*names, "all"]}
    plot_pareto([pt for pts in seed_mean.values() for pt in pts],
                out / "halting_depth_pareto.png", cost="answer_loops",
                title="accuracy vs mean exit step of the answer (QExit and forced steps)")
    frontier = pareto_frontier(seed_mean["all"], cost="answer_loops")
    minutes = (time.perf_counter() - start) / 60
    model = arch_label(preset["k"], n_loops)
    notes = (
        f"{claim_verdict(runs, names, n_loops, preset['q_grid'])}\n\n"
        f"Model: {model} (k = {preset['k']} shared layers, L_max = {n_loops} loops), d_model {preset['d_model']}, "
        f"{preset['n_heads']} heads, FFN {preset['d_ff']}, exit gate, {runs[0]['params']:,} parameters; trained with "
        f"the Ouro objective Σ_t p_t·CE_t − β·H(p), β = {preset['beta']}, {preset['steps']} steps of batch "
        f"{preset['batch_size']}, lr {preset['learning_rate']} ({preset['schedule']}). Task: {task_text}; each "
        f"difficulty scored on {preset['eval_count']} held-out examples.\n\n"
        "Rows `fixed=t`: every token exits at loop t (forced depth). Rows `q=…`: QExit, each token exits at the "
        "first loop whose exit CDF reaches q (at most L_max). `exit <difficulty>` is the mean exit step over the "
        "answer tokens (the scored positions); `all` is the uniform mixture of the difficulties; FLOPs/token "
        "counts every position's own exit step. Mean ± std over seeds "
        f"{list(preset['seeds'])}.\n\nPareto frontier of the mixture (mean over seeds, accuracy vs answer exit "
        "step): " + ", ".join(f"{p.rule} ({100 * p.accuracy:.1f}% at {p.answer_loops:.2f})" for p in frontier)
        + f".\n\nPlots: [halting_depth.png](halting_depth.png) (accuracy per forced step; exit step per q), "
        f"[halting_depth_pareto.png](halting_depth_pareto.png). Preset `{preset['preset']}`, "
        f"{minutes:.1f} min in all on {jax.devices()[0].platform}.")
    data = {"preset": {k: (str(v) if isinstance(v, Path) else v) for k, v in preset.items()},
            "params": runs[0]["params"],
            "seeds": [{"seed": s, "train_seconds": round(r["train_seconds"], 1),
                       "points": {name: [dataclasses.asdict(p) for p in pts] for name, pts in r["points"].items()}}
                      for s, r in zip(preset["seeds"], runs)],
            "needed_depth": {name: needed_depth(runs, name, n_loops) for name in names}}
    title = f"Halting depth per difficulty: {model} with the Ouro exit gate on {preset['task']}"
    return write_results(out, title=title,
                         columns=columns, rows=rows, notes=notes, data=data)


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
