"""Fixed points, attention stabilisation, contraction and accuracy per FLOP of a trained looped p-hop model and of
the Ouro reference checkpoint (Blayney et al., 2026's mechanistic picture, measured with ``loopjax.analysis``).

    python -m experiments.fixed_points [--preset cpu|smoke] [--smoke] [--out DIR] [--workdir DIR]

Trains a small looped p-hop model with the Ouro objective in ``--workdir`` (default ``runs/fixed_points/PRESET``;
a rerun resumes, or reuses the final checkpoint), then runs ``loopjax.analysis.analyze`` on it (p-hop task: every
exit rule up to the trained loop count) and on the Ouro reference in tests/data/ouro (a fixed random token
batch), both recording twice the trained loop count so the trajectory is followed past training depth. Writes
``OUT/README.md`` (a summary table and what the numbers show), ``OUT/phop/`` and ``OUT/ouro/`` (each subject's
tables, results.json and plots) and ``OUT/command.txt``. The same analysis of any run: ``loopjax analyze WORKDIR
--task phop --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import loopjax as lj
from loopjax.analysis.report import analyze, git_revision
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.data import PHop
from loopjax.train.experiment import DataConfig, Experiment, build_data

ROOT = Path(__file__).resolve().parent.parent
OURO = ROOT / "tests" / "data" / "ouro"

# cpu: about 3 minutes of training on an idle 2-core machine; smoke: an end-to-end check in seconds
PRESETS = {
    "cpu": dict(d_model=64, d_ff=128, n_heads=4, n_layers=2, n_loops=4,
                task=dict(alphabet=4, n=16, hops=(1, 2), dense_labels=True), steps=1000, batch_size=32,
                learning_rate=3e-3, warmup_steps=100, examples=256, record_rows=8,
                power_iters=60, q_grid=(0.25, 0.5, 0.75, 0.9), eps_grid=(1e-1, 1e-2, 1e-3), ouro_rows=8,
                ouro_seq=32),
    "smoke": dict(d_model=32, d_ff=64, n_heads=4, n_layers=2, n_loops=2,
                  task=dict(alphabet=4, n=12, hops=(2,), dense_labels=True), steps=4, batch_size=8,
                  learning_rate=1e-3, warmup_steps=1, examples=8, record_rows=8,
                  power_iters=10, q_grid=(0.5,), eps_grid=(1e-2,), ouro_rows=2, ouro_seq=8),
}


def experiment(preset: dict) -> Experiment:
    """The p-hop run: a looped model (k layers, L loops) with Ouro's sandwich norms and normed carried state
    (``step_norm``, so a bounded fixed point can exist), trained on the Ouro objective (entropy-regularised
    expected loss over exit steps)."""
    task = PHop(**preset["task"])
    model = lj.tiny(vocab_size=task.vocab_size, d_model=preset["d_model"], d_ff=preset["d_ff"],
                    n_heads=preset["n_heads"], n_kv_heads=preset["n_heads"], n_layers=preset["n_layers"],
                    n_loops=preset["n_loops"], max_seq_len=task.length, norm_scheme="sandwich", step_norm=True)
    train = TrainConfig(steps=preset["steps"], batch_size=preset["batch_size"], seq_len=task.length,
                        learning_rate=preset["learning_rate"], warmup_steps=preset["warmup_steps"],
                        weight_decay=0.0, objective=HaltingConfig(objective="ouro", beta=0.05),
                        log_every=max(1, preset["steps"] // 10), ckpt_every=max(1, preset["steps"] // 2),
                        keep_checkpoints=1, async_checkpointing=False)
    return Experiment(model=model, train=train, data=DataConfig(source="phop", task=dict(preset["task"])))


def train(exp: Experiment, workdir: Path):
    """Train to ``exp.train.steps`` in ``workdir`` (resuming; returns at once when already there)."""
    train_data, eval_data = build_data(exp)
    trainer = lj.train.Trainer(exp.model, exp.train, train_data=train_data, eval_data=eval_data,
                               workdir=str(workdir), config=exp.to_json())
    result = trainer.fit()
    model = trainer.model()
    trainer.close()
    return model, trainer.resumed_from, result


def _summary_row(name: str, r: dict) -> dict:
    conv, c = r["convergence"], r["contraction"]
    eff = r["efficiency"]
    best = max(eff["points"], key=lambda p: p["accuracy"]) if eff else None
    dist = np.asarray(conv["fixed_point_distances"], np.float64)
    k = dist.shape[0]
    return {
        "subject": name, "loops (trained / recorded)": f"{r['model']['n_loops']} / {r['record_loops']}",
        "rel. change per layer, loop 2": " / ".join(f"{v:.3g}" for v in conv["relative"][0]),
        "rel. change per layer, last loop": " / ".join(f"{v:.3g}" for v in conv["relative"][-1]),
        "layer distance (last loop)": f"{dist[~np.eye(k, dtype=bool)].mean():.3g}" if k > 1 else "-",
        "cyclic score (last)": f"{conv['cyclic_score'][-1]:.3g}",
        "attention JS (loop 2 / last), bits": f"{np.mean(r['attention_change']['js'][0]):.2g} / "
                                              f"{np.mean(r['attention_change']['js'][-1]):.2g}",
        "σ(∂F/∂h) at h_0 … h_T": " / ".join(f"{s:.3g}" for s in c["sigma"]),
        "best accuracy (rule)": f"{best['accuracy']:.3f} ({best['rule']})" if best else "-",
    }


def _facts(name: str, r: dict) -> list[str]:
    """Sentences that restate the numbers (computed, so they stay true when the run changes)."""
    conv, c, lens = r["convergence"], r["contraction"], r["logit_lens"]
    rel = np.asarray(conv["relative"], np.float64)  # [T-1, k]
    ab = np.asarray(conv["absolute"], np.float64)
    t_rec, t_train = r["record_loops"], r["model"]["n_loops"]
    settling = np.all(ab[-1] < 0.5 * ab[0]) and np.all(ab[-1] < ab[-2])
    facts = [f"{name}: from loop 2 to loop {t_rec} the relative change of each layer went "
             + ", ".join(f"{a:.3g} → {b:.3g}" for a, b in zip(rel[0], rel[-1])) + " and the absolute change "
             + ", ".join(f"{a:.3g} → {b:.3g}" for a, b in zip(ab[0], ab[-1]))
             + ("; every layer's absolute change is still shrinking at the last loop (it settles)." if settling else
                f"; the absolute change is still falling at loop {t_rec} but only to {ab[-1].max() / ab[0].max():.2g} "
                "of its loop-2 value, so no layer is shown to reach a fixed point within these loops."
                if ab.mean(1).argmin() == len(ab) - 1 else
                f"; the absolute change is smallest at loop {int(ab.mean(1).argmin()) + 2} "
                f"({ab.mean(1).min():.3g}, layer mean) and does not keep shrinking after it, so no layer is shown "
                "to reach a fixed point within these loops.")]
    dist = np.asarray(conv["fixed_point_distances"], np.float64)
    if dist.shape[0] > 1:
        off = dist[~np.eye(dist.shape[0], dtype=bool)]
        spread = f"{off.min():.3g}" if np.isclose(off.min(), off.max()) else f"{off.min():.3g}–{off.max():.3g}"
        facts.append(f"The layers' points at loop {t_rec} are {spread} apart (relative), "
                     f"{'more' if off.min() > rel[-1].max() else 'not more'} than the last loop moved them "
                     f"({rel[-1].max():.3g}); cyclic score {conv['cyclic_score'][-1]:.3g}.")
    sig = np.asarray(c["sigma"], np.float64)
    below = [t for t, s in zip(c["loops_done"], sig) if s < 1]
    facts.append("The loop map's Jacobian spectral norm σ(∂F/∂h) is " + ", ".join(
        f"{s:.3g} at h_{t}" for t, s in zip(c["loops_done"], sig)) + ": "
        + ("locally contractive (< 1) at every measured state." if len(below) == len(sig) else
           f"< 1 only at h_t for t in {below}." if below else "not contractive (>= 1) at any measured state."))
    top1 = np.asarray(lens["top1"], np.float64)
    facts.append(f"Logit lens: loop 1 already agrees with loop {t_rec}'s top-1 token on {top1[0]:.0%} of tokens, "
                 f"loop {min(t_train, t_rec)} on {top1[min(t_train, t_rec) - 1]:.0%}.")
    if r["efficiency"]:
        front = r["efficiency"]["frontier"]
        pts = {p["rule"]: p for p in r["efficiency"]["points"]}
        facts.append("Accuracy per FLOP: the Pareto frontier is " + ", ".join(
            f"{rule} ({pts[rule]['accuracy']:.3f} at {pts[rule]['flops_per_token']:.3g} FLOPs/token)" for rule in front)
            + ".")
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fixed_points", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset: an end-to-end check in seconds")
    parser.add_argument("--out", default=None, help="results folder (default experiments/results/fixed_points "
                        "for the cpu preset, runs/results/fixed_points-PRESET for the others)")
    parser.add_argument("--workdir", default=None, help="training run folder (default runs/fixed_points/PRESET)")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else args.preset
    preset = PRESETS[name]
    committed = ROOT / "experiments" / "results" / "fixed_points"
    out = Path(args.out) if args.out else (committed if name == "cpu"
                                           else ROOT / "runs" / "results" / f"fixed_points-{name}")
    workdir = Path(args.workdir) if args.workdir else ROOT / "runs" / "fixed_points" / name
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "experiments.fixed_points", *argv])
    t0 = time.perf_counter()

    exp = experiment(preset)
    model, resumed, fit = train(exp, workdir)
    train_s = time.perf_counter() - t0
    print(f"trained {fit.step} steps ({'resumed from ' + str(resumed) if resumed is not None else 'fresh'}) in "
          f"{train_s:.0f} s: {json.dumps({k: round(v, 4) for k, v in fit.metrics.items()})}", file=sys.stderr)
    n_loops = exp.model.n_loops
    task = PHop(seq_len=exp.train.seq_len, **preset["task"])
    phop = analyze(model, task=task, out_dir=out / "phop", n_loops=n_loops, record_loops=2 * n_loops,
                   examples=preset["examples"], record_rows=preset["record_rows"], power_iters=preset["power_iters"],
                   q_grid=preset["q_grid"], eps_grid=preset["eps_grid"],
                   name=f"p-hop Loop {exp.model.n_layers}⊗{n_loops}", command=command,
                   title=f"p-hop (hops {preset['task']['hops']}, n {preset['task']['n']}), looped model trained "
                         f"{fit.step} steps on the Ouro objective")
    ouro_model = lj.load_ouro(str(OURO), dtype="float32")
    tokens = np.random.default_rng(0).integers(0, ouro_model.cfg.vocab_size, (preset["ouro_rows"], preset["ouro_seq"]))
    ouro = analyze(ouro_model, tokens=tokens, out_dir=out / "ouro", record_loops=2 * ouro_model.cfg.n_loops,
                   record_rows=preset["ouro_rows"], power_iters=preset["power_iters"], name="Ouro reference",
                   command=command, title="Ouro reference checkpoint (tests/data/ouro), random tokens")

    rows = [_summary_row(f"p-hop Loop {exp.model.n_layers}⊗{n_loops}", phop), _summary_row("Ouro reference", ouro)]
    cols = list(rows[0])
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                      + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])
    rev = git_revision()
    facts = _facts("p-hop model", phop) + _facts("Ouro reference", ouro)
    text = (f"# Fixed points, attention, contraction, accuracy per FLOP\n\n```\n{command}\n```\n\n"
            f"Revision `{rev}`, preset `{name}`, training {fit.step} steps ({train_s:.0f} s"
            f"{', reused checkpoint' if resumed is not None else ''}), total {time.perf_counter() - t0:.0f} s. "
            f"Per-subject tables and plots: [phop/](phop/README.md), [ouro/](ouro/README.md). The Ouro reference "
            f"is the tiny test checkpoint in tests/data/ouro, analysed on {preset['ouro_rows']} random rows of "
            f"{preset['ouro_seq']} tokens.\n\n{table}\n\n## What the numbers show\n\n"
            + "\n".join(f"- {f}" for f in facts) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    (out / "command.txt").write_text(f"{command}\n# revision {rev}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
