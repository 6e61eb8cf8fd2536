"""n-ary addition without chain of thought: looped (k⊗L) vs deep (kL⊗1) vs shallow (k⊗1), Saunshi et al. Table 1.

    python -m experiments.addition --preset cpu       # the committed results: experiments/results/addition/
    python -m experiments.addition --preset paper     # the paper's sizes, for a TPU / GPU

Every model trains on a mixture of term counts n (numbers of ``digits`` digits, zero-padded; 3 in the paper) and
is scored per n on held-out examples; an answer counts when every digit and the closing EOS are right (see
``loopjax.data.tasks.addition``).
"""

from __future__ import annotations

import dataclasses
import sys

from experiments.common import experiment_parser, resolve_preset
from experiments.grid import enable_compile_cache, paper_column, run_experiment, training_summary
from loopjax.data.tasks import Addition

L12_GRID = ((1, 1), (1, 12), (12, 1), (2, 1), (2, 6), (3, 1), (3, 4))
L4_GRID = ((1, 1), (1, 4), (4, 1), (2, 1), (2, 2))
TRAIN = dict(schedule="cosine", weight_decay=0.1, grad_clip=1.0)

PRESETS = {
    "paper": dict(n_terms=(8, 16, 24, 32), digits=3, place_tokens=False, dense_labels=False, archs=L12_GRID,
                  d_model=256, n_heads=8, d_ff=1024, exit_gate=False, batch_size=1024, steps=200_000,
                  learning_rate=1e-3, warmup_steps=2_000, eval_count=2048, seeds=(0, 1, 2), **TRAIN),
    "cpu": dict(n_terms=(1, 2, 4, 8), digits=2, place_tokens=True, dense_labels=False, archs=L4_GRID, d_model=64,
                n_heads=4, d_ff=256, exit_gate=False, batch_size=64, steps=1300,
                learning_rate=1e-2, warmup_steps=50, eval_count=256, seeds=(0, 1), **TRAIN),
    "smoke": dict(n_terms=(2, 3), digits=2, place_tokens=True, dense_labels=True, archs=((1, 1), (1, 2)),
                  d_model=16, n_heads=2, d_ff=32, exit_gate=False, batch_size=8, steps=3, learning_rate=1e-3,
                  warmup_steps=1, eval_count=16, seeds=(0,), **TRAIN),
}

# Saunshi et al. Table 1, n = 32 (trained on n in {8, 16, 24, 32}, 3-digit numbers); their grid uses L = 12.
PAPER = {"Base 1⊗1": 0.0, "Loop 1⊗12": 99.6, "Base 12⊗1": 100.0, "Base 2⊗1": 38.8, "Loop 2⊗6": 99.5}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = experiment_parser("addition", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    train_task = Addition(n_terms=preset["n_terms"], digits=preset["digits"], place_tokens=preset["place_tokens"],
                          dense_labels=preset["dense_labels"])
    # each difficulty alone, laid out as the training mixture (same answer width, place tokens and row length)
    eval_tasks = {n: dataclasses.replace(train_task, n_terms=(n,), answer_digits=train_task.answer_width,
                                         seq_len=train_task.length)
                  for n in preset["n_terms"]}
    notes = (f"Task: sums of n numbers of {preset['digits']} digits, trained on a mixture of n in "
             f"{list(preset['n_terms'])}"
             + (", every digit token tagged with its place and the answer zero-padded (`place_tokens`)"
                if preset["place_tokens"] else "")
             + (", training rows also labelled with every prefix sum (`dense_labels`)"
                if preset["dense_labels"] else "")
             + f", scored per n on {preset['eval_count']} held-out examples each (exact match "
             f"of all answer digits and EOS); {training_summary(preset)}. "
             "The paper column is Saunshi et al.'s Table 1 at n = 32 (trained on n in {8, 16, 24, 32}, d_model 256, "
             "FFN 1024, L = 12: Loop 1⊗12, Base 12⊗1, Loop 2⊗6); the CPU setting has far fewer terms, a smaller "
             "model, fewer loops and few steps, so its numbers compare the models' ordering, not the paper's values.")
    run_experiment("addition", "n-ary addition: looped vs deep vs shallow", preset, train_task, eval_tasks, argv=argv,
                   difficulty_name=lambda n: f"n={n}", notes=notes,
                   paper=paper_column(preset["archs"], PAPER, paper_depth=12))


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
