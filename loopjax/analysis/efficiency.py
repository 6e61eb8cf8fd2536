"""Accuracy per FLOP: evaluate models on a task over a grid of exit rules, and the Pareto frontier.

A model is judged by task accuracy against the forward FLOPs it spends per token, not per output token: a
looped model that exits early on easy tokens should sit left of one that always runs every loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.data.tasks.base import answer_correct
from loopjax.flops import forward_flops
from loopjax.halting import ConvergenceExit, FixedExit, QExit


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    """One (model, exit rule) evaluation.

    accuracy: exact-match answer accuracy over the examples (``answer_correct``).
    mean_loops: mean exit step (1-based) over every position of every sequence: the exit profile.
    answer_loops: mean exit step over the answer positions (batch["mask"] > 0).
    iterations: loop iterations the batched executor ran, averaged over batch chunks (frozen tokens ride along).
    flops_per_token: ``forward_flops(cfg, S, mean_loops) / S``, the cost when each token stops at its exit
      (``n_loops`` for every token with ``run_all_loops``).
    executed_flops_per_token: ``forward_flops(cfg, S, iterations) / S``, what the batched executor computed.
    """

    model: str
    rule: str
    accuracy: float
    mean_loops: float
    answer_loops: float
    iterations: float
    flops_per_token: float
    executed_flops_per_token: float
    n_examples: int


def exit_rule_grid(max_loops: int, *, q_grid: Sequence[float] = (), eps_grid: Sequence[float] = (),
                   has_gate: bool = True) -> list[Any]:
    """FixedExit(1..max_loops), then QExit(q) for q in ``q_grid`` (only with a gate), ConvergenceExit(eps)."""
    rules: list[Any] = [FixedExit(n) for n in range(1, max_loops + 1)]
    if has_gate:
        rules += [QExit(float(q)) for q in q_grid]
    return rules + [ConvergenceExit(float(eps)) for eps in eps_grid]


def rule_name(rule: Any) -> str:
    """A short label: fixed=3, q=0.5, conv=0.01."""
    if isinstance(rule, FixedExit):
        return f"fixed={rule.n}"
    if isinstance(rule, QExit):
        return f"q={rule.q:g}"
    if isinstance(rule, ConvergenceExit):
        return f"conv={rule.eps:g}"
    return repr(rule)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule", "n_loops", "run_all_loops"))
def _forward(graphdef, state, inputs_BS, *, rule, n_loops, run_all_loops):
    out = nnx.merge(graphdef, state)(inputs_BS, n_loops=n_loops, exit_rule=rule, run_all_loops=run_all_loops)
    return out.logits.argmax(-1), out.exit_step, out.n_iterations


def evaluate_rules(model, batch: dict, rules: Iterable[Any], *, n_loops: int, name: str = "model",
                   run_all_loops: bool = False, batch_size: int | None = None) -> list[EvalPoint]:
    """Evaluate ``model`` (a ``LoopedLM``) on a task batch (``Task.eval_batch``: inputs, targets, mask) under each
    exit rule, running at most ``n_loops`` loops; ``batch_size`` splits the batch into chunks of that many rows."""
    inputs = np.asarray(batch["inputs"])
    b, s = inputs.shape
    chunk = b if batch_size is None else batch_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be None or an int >= 1")
    answer = np.asarray(batch["mask"]) > 0
    graphdef, state = nnx.split(model)
    points = []
    for rule in rules:
        preds, exits, iters = [], [], []
        for start in range(0, b, chunk):
            pred, exit_step, n_it = _forward(graphdef, state, jnp.asarray(inputs[start:start + chunk]),
                                             rule=rule, n_loops=n_loops, run_all_loops=run_all_loops)
            preds.append(np.asarray(pred))
            exits.append(np.asarray(exit_step))
            iters.append(int(n_it))
        exit_BS = np.concatenate(exits).astype(np.float64)
        mean_loops = float(exit_BS.mean())
        iterations = float(np.mean(iters))
        cost_loops = float(n_loops) if run_all_loops else mean_loops
        points.append(EvalPoint(
            model=name, rule=rule_name(rule),
            accuracy=float(answer_correct(np.concatenate(preds), batch).mean()),
            mean_loops=mean_loops, answer_loops=float(exit_BS[answer].mean()) if answer.any() else float("nan"),
            iterations=iterations,
            flops_per_token=forward_flops(model.cfg, s, cost_loops) / s,
            executed_flops_per_token=forward_flops(model.cfg, s, iterations) / s,
            n_examples=b))
    return points


def evaluate_models(models: dict[str, tuple[Any, Sequence[Any], int]], batch: dict, *,
                    run_all_loops: bool = False, batch_size: int | None = None) -> list[EvalPoint]:
    """Several models on the same task batch: ``models`` maps name -> (model, rules, n_loops)."""
    points = []
    for name, (model, rules, n_loops) in models.items():
        points += evaluate_rules(model, batch, rules, n_loops=n_loops, name=name, run_all_loops=run_all_loops,
                                 batch_size=batch_size)
    return points


def pareto_mask(cost: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Bool [P]: point i is on the frontier iff no other point has cost <= and accuracy >= with one strict;
    of exact duplicates only the first is kept."""
    cost, accuracy = np.asarray(cost, np.float64), np.asarray(accuracy, np.float64)
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -accuracy[i], i))
    keep = np.zeros(len(cost), bool)
    best = -np.inf
    for i in order:
        if accuracy[i] > best:
            keep[i], best = True, accuracy[i]
    return keep


def pareto_frontier(points: Sequence[EvalPoint], cost: str = "flops_per_token") -> list[EvalPoint]:
    """The non-dominated points (lower ``cost`` field, higher accuracy), in increasing cost."""
    keep = pareto_mask([getattr(p, cost) for p in points], [p.accuracy for p in points])
    return sorted((p for p, k in zip(points, keep) if k), key=lambda p: getattr(p, cost))


def points_table(points: Sequence[EvalPoint]) -> str:
    """A plain-text table of evaluation points, one row each."""
    head = f"{'model':<16} {'rule':<12} {'acc':>6} {'loops':>6} {'ans.loops':>9} {'iters':>6} {'FLOPs/tok':>11}"
    rows = [f"{p.model:<16} {p.rule:<12} {p.accuracy:>6.3f} {p.mean_loops:>6.2f} {p.answer_loops:>9.2f} "
            f"{p.iterations:>6.2f} {p.flops_per_token:>11.4g}" for p in points]
    return "\n".join([head, *rows])
