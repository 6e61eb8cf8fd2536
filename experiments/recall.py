"""Associative recall: can a block learn the name lookup that every i-GSM operand needs? A diagnostic for igsm.

    python -m experiments.recall --preset cpu     # the committed results: experiments/results/recall/

Every model trains on multi-query associative recall (``loopjax.data.tasks.recall``: key-value statements, then
queries; training rows label every query's value with ``dense_labels``) and is scored on the last query's value of
held-out prompts. Base 1⊗1 cannot solve it (one attention layer cannot bind a value to the key before it and
match the query in the same pass); the question is which of the deeper and looped models learn it in the budget.
"""

from __future__ import annotations

import sys

from experiments.common import experiment_parser, resolve_preset
from experiments.grid import enable_compile_cache, run_experiment, training_summary
from loopjax.data.tasks import Recall

MODEL = dict(d_model=64, n_heads=4, d_ff=256, exit_gate=False)
TRAIN = dict(schedule="cosine", grad_clip=1.0)

PRESETS = {
    "cpu": dict(n_pairs=4, n_queries=4, n_keys=8, n_values=7, dense_labels=True,
                archs=((1, 1), (2, 1), (1, 2), (1, 4)), batch_size=32, steps=1500, learning_rate=1e-3,
                weight_decay=0.0, warmup_steps=50, eval_count=256, seeds=(0, 1), **MODEL, **TRAIN),
    "smoke": dict(n_pairs=3, n_queries=2, n_keys=6, n_values=5, dense_labels=True, archs=((1, 1), (1, 2)),
                  batch_size=8, steps=3, learning_rate=1e-3, weight_decay=0.0, warmup_steps=1, eval_count=16,
                  seeds=(0,), d_model=16, n_heads=2, d_ff=32, exit_gate=False, **TRAIN),
}


def make_tasks(preset: dict) -> tuple[Recall, dict[int, Recall]]:
    """The training task and the scoring task (the same prompts, the last query's answer alone)."""
    sizes = {key: preset[key] for key in ("n_pairs", "n_queries", "n_keys", "n_values")}
    return (Recall(dense_labels=preset["dense_labels"], **sizes),
            {preset["n_pairs"]: Recall(dense_labels=False, **sizes)})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = experiment_parser("recall", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    train_task, eval_tasks = make_tasks(preset)
    notes = (f"Task: {preset['n_pairs']} key-value statements over {preset['n_keys']} keys and {preset['n_values']} "
             f"values, then {preset['n_queries']} queries; scored on the last query of {preset['eval_count']} "
             f"held-out prompts (chance {100 / preset['n_values']:.1f}%); "
             + ("training rows label the value of every query (`dense_labels`); " if preset["dense_labels"]
                else "training rows label the last query alone; ")
             + f"{training_summary(preset)}. A diagnostic for the i-GSM experiment (each of its operands is such a "
             "lookup); not one of Saunshi et al.'s tasks, so there is no paper column.")
    run_experiment("recall", "associative recall: which blocks learn the lookup", preset, train_task, eval_tasks,
                   argv=argv, difficulty_name=lambda n: f"{n} pairs", notes=notes)


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
