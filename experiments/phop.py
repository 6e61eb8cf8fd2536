"""p-hop induction: looped (k⊗L) vs deep (kL⊗1, iso-FLOP) vs shallow (k⊗1, iso-param), Saunshi et al. Table 1.

    python -m experiments.phop --preset quick     # a few minutes on a CPU, prints the table
    python -m experiments.phop --preset cpu       # the committed results: experiments/results/phop/
    python -m experiments.phop --preset paper     # the paper's sizes, for a TPU / GPU

Every model trains on a mixture of hop counts p (the hop count is the prompt's first token) and is scored per p on
held-out examples; the answer is the single token hop_p(v) (see ``loopjax.data.tasks.phop``).
"""

from __future__ import annotations

import sys

from experiments.common import experiment_parser, resolve_preset
from experiments.grid import enable_compile_cache, paper_column, run_experiment, training_summary
from loopjax.data.tasks import PHop

L6_GRID = ((1, 1), (1, 6), (6, 1), (2, 1), (2, 3), (3, 1), (3, 2))
L4_GRID = ((1, 1), (1, 4), (4, 1), (2, 1), (2, 2))
MODEL = dict(d_model=64, n_heads=4, d_ff=256, exit_gate=False)
TRAIN = dict(schedule="cosine", weight_decay=0.1, grad_clip=1.0)

PRESETS = {
    "paper": dict(alphabet=4, n=256, hops=(16,), archs=L6_GRID, d_model=128, n_heads=8, d_ff=512, exit_gate=False,
                  batch_size=256, steps=200_000, learning_rate=1e-3, warmup_steps=2_000, eval_count=2048,
                  seeds=(0, 1, 2), dense_labels=False, **TRAIN),
    "cpu": dict(alphabet=4, n=16, hops=(1, 2), archs=L4_GRID, batch_size=32, steps=1000, learning_rate=3e-3,
                warmup_steps=50, eval_count=256, seeds=(0, 1), dense_labels=True, **MODEL, **TRAIN),
    "quick": dict(alphabet=4, n=16, hops=(1, 2), archs=((1, 1), (1, 4), (4, 1)), batch_size=32, steps=600,
                  learning_rate=3e-3, warmup_steps=50, eval_count=256, seeds=(0,), dense_labels=True, **MODEL,
                  **TRAIN),
    "smoke": dict(alphabet=4, n=8, hops=(1, 2), archs=((1, 1), (1, 2)), batch_size=8, steps=3, dense_labels=True,
                  learning_rate=1e-3, warmup_steps=1, eval_count=16, seeds=(0,), d_model=16, n_heads=2, d_ff=32,
                  exit_gate=False, **TRAIN),
}

# Saunshi et al. Table 1, p = 16 (alphabet 4, n = 256, 200k steps); their grid uses L = 6.
PAPER = {"Base 1⊗1": 48.9, "Loop 1⊗6": 99.9, "Base 6⊗1": 99.9, "Base 2⊗1": 68.8, "Loop 2⊗3": 99.9}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = experiment_parser("phop", __doc__, PRESETS).parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    train_task = PHop(alphabet=preset["alphabet"], n=preset["n"], hops=preset["hops"],
                      dense_labels=preset["dense_labels"])
    eval_tasks = {p: PHop(alphabet=preset["alphabet"], n=preset["n"], hops=(p,), max_hops=max(preset["hops"]))
                  for p in preset["hops"]}
    notes = (f"Task: alphabet {preset['alphabet']}, n = {preset['n']}, trained on a mixture of p in "
             f"{list(preset['hops'])}, scored per p on {preset['eval_count']} held-out examples each (the final "
             "answer only); "
             + ("training rows label every prefix's p-hop answer as well (`dense_labels`, Sanford et al.'s "
                "labelling; the paper's runs supervise the final answer alone); " if preset["dense_labels"] else "")
             + f"{training_summary(preset)}. "
             "The paper column is Saunshi et al.'s Table 1 at p = 16, n = 256, 200k steps of batch 256, d_model 128, "
             "and L = 6 (Loop 1⊗6, Base 6⊗1, Loop 2⊗3); the CPU setting is far smaller (short sequences, few hops, "
             "few steps), so its numbers compare the models' ordering, not the paper's values.")
    run_experiment("phop", "p-hop induction: looped vs deep vs shallow", preset, train_task, eval_tasks, argv=argv,
                   difficulty_name=lambda p: f"p={p}", notes=notes,
                   paper=paper_column(preset["archs"], PAPER, paper_depth=6))


if __name__ == "__main__":
    enable_compile_cache()
    main(sys.argv[1:])
