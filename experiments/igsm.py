"""Synthetic GSM (i-GSM style): Loop 1⊗L vs Base k⊗1, as in Saunshi et al.'s i-GSM experiment.

    python -m experiments.igsm --preset cpu       # the committed results: experiments/results/igsm/
    python -m experiments.igsm --preset paper     # Loop 1⊗{2,4,8} vs Base {1,2,4,8}⊗1, for a TPU / GPU

The paper grid is Saunshi et al.'s (Loop 1⊗{2,4,8} vs Base {1,2,4,8}⊗1); the paper preset's problem and model
sizes are this project's choice (the issue lists none for i-GSM).

Every model trains on a mixture of difficulties (depth D, operations K) and is scored per difficulty on held-out
problems; the answer is the query's value mod 7 (see ``loopjax.data.tasks.igsm``).
"""

from __future__ import annotations

import sys

from experiments.common import experiment_parser, resolve_preset
from experiments.grid import enable_compile_cache, run_experiment, training_summary
from loopjax.data.tasks import IGSM

PAPER_GRID = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8))
CPU_GRID = ((1, 1), (2, 1), (4, 1), (1, 2), (1, 4))
TRAIN = dict(schedule="cosine", weight_decay=0.1, grad_clip=1.0)
# The problem format (``IGSM`` fields; the defaults are i-GSM's: a 4 x 4 entity hierarchy, two-token names,
# shuffled statements), settable with ``--set`` to reproduce the variants in experiments/results/igsm/README.md.
FORMAT = dict(n_levels=4, level_width=4, n_names=32, name_tokens=2, order="shuffled", eq_tokens=True,
              reference_labels=False)

PRESETS = {
    "paper": dict(difficulties=((2, 2), (3, 4), (4, 6)), n_distractors=4, archs=PAPER_GRID, d_model=256, n_heads=8,
                  d_ff=1024, exit_gate=False, dense_labels=False, batch_size=256, steps=100_000, learning_rate=1e-3,
                  warmup_steps=2_000, eval_count=2048, seeds=(0, 1, 2), **TRAIN, **FORMAT),
    "cpu": dict(difficulties=((1, 1), (2, 2)), n_distractors=1, archs=CPU_GRID, d_model=64, n_heads=4, d_ff=256,
                exit_gate=False, dense_labels=True, batch_size=32, steps=1000, learning_rate=3e-3, warmup_steps=50,
                eval_count=256, seeds=(0, 1), **TRAIN, **FORMAT),
    "smoke": dict(difficulties=((1, 1), (2, 2)), n_distractors=1, archs=((1, 1), (1, 2)), d_model=16, n_heads=2,
                  d_ff=32, exit_gate=False, dense_labels=True, batch_size=8, steps=3, learning_rate=1e-3,
                  warmup_steps=1, eval_count=16, seeds=(0,), **TRAIN, **FORMAT),
}


def make_tasks(preset: dict) -> tuple[IGSM, dict[tuple[int, int], IGSM]]:
    """The training mixture and one scoring task per difficulty (without the training-only labels)."""
    common = dict(n_distractors=preset["n_distractors"],
                  **{key: preset[key] for key in FORMAT if key != "reference_labels"})
    train_task = IGSM(difficulties=preset["difficulties"], dense_labels=preset["dense_labels"],
                      reference_labels=preset["reference_labels"], **common)
    return train_task, {d: IGSM(difficulties=(d,), **common) for d in preset["difficulties"]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = experiment_parser("igsm", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    train_task, eval_tasks = make_tasks(preset)
    notes = (f"Task: i-GSM-style problems mod 7 with {preset['n_distractors']} distractor parameters, trained on a "
             f"mixture of (depth, operations) in {list(preset['difficulties'])}, scored per difficulty on "
             f"{preset['eval_count']} held-out problems each (chance ≈ 14.3%); "
             + ("training rows also label the value of every statement its prefix determines (`dense_labels`); "
                if preset["dense_labels"] else "")
             + ("training rows also label each operand reference with its value (`reference_labels`); "
                if preset["reference_labels"] else "")
             + "".join(f"`{key}={preset[key]!r}` (i-GSM's default: {default!r}); "
                       for key, default in FORMAT.items() if key != "reference_labels" and preset[key] != default)
             + f"{training_summary(preset)}. "
             "Saunshi et al. train Loop 1⊗{2,4,8} and Base {1,2,4,8}⊗1 on much larger i-GSM problems (the issue lists "
             "no per-model numbers for it, so there is no paper column); the CPU grid stops at 4 loops / 4 layers and "
             "uses shallow problems and few steps.")
    run_experiment("igsm", "synthetic GSM: looped vs deep vs shallow", preset, train_task, eval_tasks, argv=argv,
                   difficulty_name=lambda d: f"D{d[0]}K{d[1]}", notes=notes)


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
