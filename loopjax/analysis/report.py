"""One call that runs every analysis on a model and writes a report folder.

    result = analyze(model, task=PHop(alphabet=4, n=32, hops=(4,)), out_dir="report")

writes into ``out_dir``: ``README.md`` (Markdown tables, the command and git revision), ``results.json`` (every
number, the same dict ``analyze`` returns) and PNG plots: per-layer convergence, attention change (loop × head),
one token's trajectory (PCA), a text coloured by exit depth and, with a task, accuracy against FLOPs per token.

Shapes: T recorded loops, k core layers, B batch, S sequence, D d_model, N heads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.analysis import fixed_points as fp
from loopjax.analysis import plots
from loopjax.analysis.efficiency import _forward, evaluate_rules, exit_rule_grid, pareto_mask, rule_name
from loopjax.analysis.specialisation import has_layer_profile, layer_profile
from loopjax.analysis.trajectory import record
from loopjax.halting import ConvergenceExit, QExit, validate_exit_rule
from loopjax.model import count_params

PLOTS = {"convergence": "convergence.png", "attention": "attention_change.png", "trajectory": "trajectory_pca.png",
         "exit_depth": "exit_depth_text.png", "pareto": "pareto.png", "layers": "layer_specialisation.png"}


def git_revision() -> str:
    """The commit of the checkout holding loopjax (``+dirty`` when tracked files differ), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _jsonable(x: Any) -> Any:
    """Nested lists of Python floats; non-finite floats become None so the JSON stays standard."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if not np.isfinite(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _default_depth_rule(has_gate: bool):
    return QExit(0.5) if has_gate else ConvergenceExit(1e-2)


def analyze(model, *, task=None, tokens: Any = None, out_dir: str | Path, n_loops: int | None = None,
            record_loops: int | None = None, examples: int = 64, record_rows: int = 8, seed: int = 0,
            q_grid: Sequence[float] = (0.25, 0.5, 0.75, 0.9), eps_grid: Sequence[float] = (1e-1, 1e-2, 1e-3),
            contraction_rows: int = 2, power_iters: int = 50, depth_rule: Any = None,
            decode: Callable[[int], str] | None = None, name: str = "model", command: str | None = None,
            title: str | None = None) -> dict:
    """Run every analysis on ``model`` (a ``LoopedLM``) and write the report into ``out_dir``; return its dict.

    Inputs: ``task`` (a ``loopjax.data`` task: ``examples`` rows of ``task.eval_batch(seed=seed)``) or ``tokens``
    (int [B, S], e.g. text or a random batch); exactly one. n_loops: the deepest exit rule of the accuracy grid
    (default ``cfg.n_loops``); record_loops: loops recorded for the trajectory metrics (default ``n_loops``; more
    than trained shows whether the loop settles). The first ``record_rows`` rows are recorded (attention for all
    heads and queries), the first ``contraction_rows`` of them enter the Jacobian power iteration
    (``power_iters`` steps) at the states entering loops 1, 2, T/2 + 1 and after loop T. With a task: accuracy,
    loops and FLOPs per token for FixedExit(1..n_loops), QExit(``q_grid``, gated models only) and
    ConvergenceExit(``eps_grid``), and their Pareto frontier. depth_rule: the rule whose exit steps colour the
    text plot (default QExit(0.5) with a gate, else ConvergenceExit(1e-2)); decode: token id -> text piece
    (default the task's ``decode``, else the id). command: recorded as the command (default ``sys.argv``).
    """
    cfg = model.cfg
    n_loops = cfg.n_loops if n_loops is None else n_loops
    record_loops = n_loops if record_loops is None else record_loops
    for field, value, lo in (("n_loops", n_loops, 1), ("record_loops", record_loops, 2), ("examples", examples, 1),
                             ("record_rows", record_rows, 1), ("contraction_rows", contraction_rows, 1),
                             ("power_iters", power_iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{field}={value!r}: must be an int >= {lo}")
    if (task is None) == (tokens is None):
        raise ValueError("give exactly one of task= (a loopjax.data task) or tokens= (int [B, S])")
    depth_rule = _default_depth_rule(cfg.exit_gate) if depth_rule is None else depth_rule
    validate_exit_rule(depth_rule, n_loops, cfg.exit_gate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if task is not None:
        if task.vocab_size > cfg.vocab_size:
            raise ValueError(f"task vocabulary {task.vocab_size}: must be <= the model's vocab_size={cfg.vocab_size}")
        batch = task.eval_batch(seed=seed, count=examples)
        tokens_np = np.asarray(batch["inputs"], np.int32)
        valid_BS = (tokens_np != task.pad_id).astype(np.float32)
        decode = decode or (lambda t: task.decode([t]))
    else:
        batch = None
        tokens_np = np.asarray(tokens, np.int32)
        if tokens_np.ndim != 2:
            raise ValueError(f"tokens.shape={tokens_np.shape}: must be [batch, seq]")
        valid_BS = np.ones(tokens_np.shape, np.float32)
        decode = decode or str
    if tokens_np.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens_np.shape[1]}: must be <= max_seq_len={cfg.max_seq_len}")

    rows = min(record_rows, tokens_np.shape[0])
    tok_BS, mask_BS = jnp.asarray(tokens_np[:rows]), jnp.asarray(valid_BS[:rows])
    # the recorder replays plain layers: a model with per-layer loops has no trajectory to record
    traceable = getattr(model.core, "layer_loops", None) is None
    traj = record(model, tok_BS, n_loops=record_loops) if traceable else None
    result: dict[str, Any] = {
        "name": name, "command": command or shlex.join(sys.argv), "revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {"params": count_params(model), **{k: getattr(cfg, k) for k in (
            "d_model", "n_layers", "n_heads", "n_loops", "vocab_size", "exit_gate", "norm_scheme", "step_norm",
            "input_injection")}},
        "inputs": {"source": type(task).__name__ if task is not None else "tokens",
                   "task": _jsonable(dataclasses.asdict(task)) if task is not None else None,
                   "batch": list(tokens_np.shape), "recorded_rows": rows, "seed": seed},
        "n_loops": n_loops, "record_loops": record_loops,
    }

    conv = attn = None
    result.update(convergence=None, attention_change=None, logit_lens=None, contraction=None)
    if traceable:
        # fixed points: per-layer convergence, distinct fixed points, cycles
        conv = fp.layer_convergence(traj, mask_BS)
        result["convergence"] = {
            "relative": conv["mean"], "absolute": conv["abs_mean"],
            "rate": fp.convergence_rate(conv["abs_mean"]) if record_loops > 2 else None,
            "fixed_point_distances": fp.fixed_point_distances(traj, mask_BS),
            "cyclic_score": fp.cyclic_score(traj, mask_BS),
        }
        attn = fp.attention_change(traj, mask_BS)
        result["attention_change"] = {"js": attn["js"], "tv": attn["tv"]}
        lens = fp.logit_lens(traj.step_logits_TBSV, mask_BS)
        result["logit_lens"] = {"kl": lens["kl"], "top1": lens["top1"]}
        if batch is not None:
            answer = jnp.asarray(np.asarray(batch["mask"][:rows]) > 0, jnp.float32)
            ans = fp.logit_lens(traj.step_logits_TBSV, answer)
            result["logit_lens"].update(answer_kl=ans["kl"], answer_top1=ans["top1"])

        # contraction of the loop map F at states along the trajectory (loops done: 0 = the initial state)
        t_done = sorted({0, 1, record_loops // 2, record_loops})
        states = jnp.concatenate([traj.state0_BSD[None], traj.state_TBSD])[jnp.asarray(t_done)]
        c_rows = min(contraction_rows, rows)
        sigma, change = fp.loop_contraction(model, tok_BS[:c_rows], states[:, :c_rows], key=jax.random.key(seed),
                                            iters=power_iters)
        result["contraction"] = {"loops_done": t_done, "sigma": sigma, "power_change": change, "rows": c_rows}

    # exit depth of every token under one rule
    graphdef, state = nnx.split(model)
    _, exit_BS, _ = _forward(graphdef, state, tok_BS, rule=depth_rule, n_loops=n_loops, run_all_loops=False)
    exit_BS = np.asarray(exit_BS)
    result["exit_depth"] = {"rule": rule_name(depth_rule), "mean": float(exit_BS[valid_BS[:rows] > 0].mean()),
                            "row0": exit_BS[0]}

    # accuracy per FLOP over the exit-rule grid
    if batch is not None:
        rules = exit_rule_grid(n_loops, q_grid=q_grid, eps_grid=eps_grid, has_gate=cfg.exit_gate)
        points = evaluate_rules(model, batch, rules, n_loops=n_loops, name=name, batch_size=min(examples, 64))
        keep = pareto_mask([p.flops_per_token for p in points], [p.accuracy for p in points])
        result["efficiency"] = {"points": [dataclasses.asdict(p) for p in points],
                                "frontier": [p.rule for p, k in zip(points, keep) if k]}
    else:
        points, result["efficiency"] = [], None

    # layer specialisation (per-layer loops, memory banks): E[n] and gate value per core layer, over the answer
    # positions with a task, else every valid token
    result["layer_specialisation"] = None
    if has_layer_profile(cfg):
        where_BS = np.asarray(batch["mask"]) > 0 if batch is not None else valid_BS > 0
        result["layer_specialisation"] = layer_profile(model, tokens_np, where_BS)

    result["files"] = _plots(out, traj, conv, attn, exit_BS[0], valid_BS[0], batch, tokens_np[0], decode, n_loops,
                             points, name)
    if result["layer_specialisation"] is not None:
        plots.plot_layer_specialisation({name: result["layer_specialisation"]}, out / PLOTS["layers"],
                                        title=f"{name}: layer specialisation")
        result["files"].append(PLOTS["layers"])
    result = _jsonable(result)
    (out / "results.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (out / "README.md").write_text(_markdown(result, title or f"Fixed-point analysis: {name}"))
    result["files"] = sorted([*result["files"], "README.md", "results.json"])
    return result


def _plots(out: Path, traj, conv, attn, exit_S, valid_S, batch, tokens_S, decode, n_loops, points,
           name) -> list[str]:
    files = []
    if traj is not None:
        plots.plot_convergence(conv["mean"], out / PLOTS["convergence"], title=f"{name}: per-layer convergence")
        plots.plot_attention_change(attn["js"], out / PLOTS["attention"],
                                    title=f"{name}: attention change (JS, bits)")
        # the first answer position of row 0 (the token the task is about), else the last one
        position = int(np.argmax(np.asarray(batch["mask"][0]) > 0)) if batch is not None else -1
        plots.plot_trajectory_pca(traj.layer_TkBSD, out / PLOTS["trajectory"], position=position)
        files += [PLOTS[k] for k in ("convergence", "attention", "trajectory")]
    n = int(valid_S.sum()) if valid_S.sum() > 0 else len(tokens_S)
    pieces = [decode(int(t)) for t in tokens_S[:n]]
    plots.plot_exit_depth_text(pieces, exit_S[:n], out / PLOTS["exit_depth"], n_loops=n_loops,
                               per_line=min(24, n), title=f"{name}: exit step per token")
    files.append(PLOTS["exit_depth"])
    if points:
        plots.plot_pareto(points, out / PLOTS["pareto"], title=f"{name}: accuracy per FLOP")
        files.append(PLOTS["pareto"])
    return files


def _trajectory_markdown(r: dict, k: int, t_rec: int) -> list[str]:
    conv, parts = r["convergence"], []
    rows = [[t + 2, *conv["relative"][t], *conv["absolute"][t]] for t in range(t_rec - 1)]
    parts += ["## Per-layer convergence",
              "‖h_{t,l} − h_{t−1,l}‖ / ‖h_{t,l}‖ (relative) and ‖h_{t,l} − h_{t−1,l}‖ (absolute), token means.",
              _table(["loop t", *[f"rel L{i}" for i in range(k)], *[f"abs L{i}" for i in range(k)]], rows)]
    if conv["rate"] is not None:
        parts.append("Geometric-mean contraction of the absolute change per loop: "
                     + ", ".join(f"layer {i}: {v:.4g}" for i, v in enumerate(conv["rate"])) + ".")
    parts += ["### Distances between the layers' points at the last loop",
              "‖h_l − h_m‖ / sqrt(‖h_l‖·‖h_m‖), token mean.",
              _table(["", *[f"L{i}" for i in range(k)]],
                     [[f"L{i}", *row] for i, row in enumerate(conv["fixed_point_distances"])]),
              "### Cyclic score", "spread / (spread + gap): 1 = the block revisits the same k points every loop.",
              _table(["loop t", "score"], [[t + 2, v] for t, v in enumerate(conv["cyclic_score"])])]

    for key, label in (("js", "Jensen–Shannon divergence (bits)"), ("tv", "total variation")):
        a = r["attention_change"][key]
        n_heads = len(a[0][0])
        rows = [[t + 2, layer, *a[t][layer]] for t in range(len(a)) for layer in range(k)]
        parts += [f"## Attention change: {label} between loops t−1 and t, per head",
                  _table(["loop t", "layer", *[f"head {h}" for h in range(n_heads)]], rows)]

    lens = r["logit_lens"]
    cols, keys = ["loop t", "KL(t‖T) nats", "top-1 = final"], ["kl", "top1"]
    if "answer_kl" in lens:
        cols, keys = cols + ["answer KL", "answer top-1 = final"], keys + ["answer_kl", "answer_top1"]
    parts += ["## Logit lens", _table(cols, [[t + 1, *(lens[c][t] for c in keys)] for t in range(t_rec)])]

    c = r["contraction"]
    parts += ["## Contraction of the loop map",
              f"Spectral norm of the Jacobian of one loop F (all k layers, full [B, S, D] state of the first "
              f"{c['rows']} rows) by power iteration; < 1 means locally contractive.",
              _table(["state after loop", "σ(∂F/∂h)", "power-iteration change"],
                     [[t, s, ch] for t, s, ch in zip(c["loops_done"], c["sigma"], c["power_change"])])]
    return parts


def _markdown(r: dict, title: str) -> str:
    m, conv = r["model"], r["convergence"]
    k, t_rec = m["n_layers"], r["record_loops"]
    parts = [f"# {title}", f"```\n{r['command']}\n```",
             f"Revision `{r['revision']}`, {r['date']}. Model: {m['params']:,} parameters, d_model {m['d_model']}, "
             f"k = {k} core layers, {m['n_heads']} heads, trained loops {m['n_loops']}, exit gate "
             f"{m['exit_gate']}. Inputs: {r['inputs']['source']} batch {r['inputs']['batch']}, trajectory metrics on "
             f"the first {r['inputs']['recorded_rows']} rows over {t_rec} loops; exit rules up to {r['n_loops']} "
             "loops."]

    if conv is None:
        parts.append("Trajectory metrics (convergence, attention change, logit lens, contraction): not recorded, "
                     "the model has per-layer loops (the recorder replays plain layers).")
    else:
        parts += _trajectory_markdown(r, k, t_rec)

    parts.append(f"## Exit depth\nRule {r['exit_depth']['rule']}: mean exit step {r['exit_depth']['mean']:.3g} "
                 f"over the recorded tokens (plot: {PLOTS['exit_depth']}).")
    if r["efficiency"] is not None:
        front = set(r["efficiency"]["frontier"])
        rows = [[p["rule"], p["accuracy"], p["mean_loops"], p["answer_loops"], p["iterations"], p["flops_per_token"],
                 "yes" if p["rule"] in front else ""] for p in r["efficiency"]["points"]]
        parts += ["## Accuracy per FLOP", f"{r['efficiency']['points'][0]['n_examples']} held-out examples; FLOPs "
                  "per token when every token stops at its exit (``forward_flops`` with the exit profile).",
                  _table(["rule", "accuracy", "mean loops", "answer loops", "iterations", "FLOPs/token",
                          "Pareto"], rows)]
    spec = r.get("layer_specialisation")
    if spec is not None:
        n_layers = max(len(v) for v in spec.values() if v is not None)
        cols = [("expected_steps", "E[n]"), ("gate_local", "gate local"), ("gate_global", "gate global")]
        rows = [[layer + 1, *(spec[key][layer] if spec[key] is not None else "-" for key, _ in cols)]
                for layer in range(n_layers)]
        parts += ["## Layer specialisation", "Per core layer, mean over the answer positions (all valid tokens "
                  "without a task): expected iterations E[n] of the per-layer loop and mean gate value of the local "
                  f"and global memory bank (plot: {PLOTS['layers']}).",
                  _table(["core layer", *(label for _, label in cols)], rows)]
    parts += ["## Files", ", ".join(f"[{f}]({f})" for f in r["files"])]
    return "\n\n".join(parts) + "\n"
