"""Evaluation by loop depth: cross-entropy and perplexity after every loop 1..L_max, and at adaptive depth under an
exit rule (mean exit step, FLOPs relative to running all L_max loops), on packed rows of a prepared corpus.

Batches are dicts of [B, S] arrays: "inputs", "targets", "mask" (the loss mask, 1 = counted) and, for packed rows,
"segment_ids" and "positions", which are passed to the model so no token attends across a document boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax import halting
from loopjax.flops import forward_flops
from loopjax.train.step import layout_kwargs


def rows_to_batches(source, batch_size: int, *, max_tokens: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Rows 0, 1, ... of a random-access source as batches of ``batch_size`` in order; the last batch is padded
    with mask-0 rows so every batch has one shape. ``max_tokens`` reads at most ceil(max_tokens / seq_len) rows."""
    n_rows = len(source)
    if max_tokens is not None:
        n_rows = min(n_rows, max(1, math.ceil(max_tokens / source.seq_len)))
    for lo in range(0, n_rows, batch_size):
        rows = [source[i] for i in range(lo, min(lo + batch_size, n_rows))]
        while len(rows) < batch_size:
            rows.append({**rows[0], "mask": np.zeros_like(rows[0]["mask"])})
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def evaluate_by_depth(model, batches: Iterable[dict], *, exit_rule=None, n_loops: int | None = None) -> dict:
    """Token-weighted CE and perplexity per loop, and under ``exit_rule`` (None: per-loop figures only).

    Returns {"loops": [{"loop": t, "ce": ..., "ppl": ...}, ...], "adaptive": {"rule", "ce", "ppl",
    "mean_exit_step", "flops_ratio"} or None, "tokens": counted targets, "n_loops": L_max}.
    """
    n_loops = model.cfg.n_loops if n_loops is None else n_loops
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, batch):
        m = nnx.merge(graphdef, state)
        kw = layout_kwargs(batch)
        mask = batch["mask"].astype(jnp.float32)
        out = m(batch["inputs"], n_loops=n_loops, return_steps=True, **kw)
        ce_T = jax.vmap(lambda logits: (halting.cross_entropy(logits, batch["targets"]) * mask).sum())(
            out.step_logits)
        res = {"ce_T": ce_T, "tokens": mask.sum()}
        if exit_rule is not None:
            ad = m(batch["inputs"], n_loops=n_loops, exit_rule=exit_rule, **kw)
            res["ce_exit"] = (halting.cross_entropy(ad.logits, batch["targets"]) * mask).sum()
            res["exit_steps"] = (ad.exit_step.astype(jnp.float32) * mask).sum()
        return res

    total = None
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        res = jax.device_get(step(state, batch))
        total = res if total is None else jax.tree.map(np.add, total, res)
    if total is None:
        raise ValueError("evaluate_by_depth: no batch")
    tokens = float(total["tokens"])
    if tokens == 0:
        raise ValueError("evaluate_by_depth: no counted target token (every mask is 0)")
    seq_len = batch["inputs"].shape[1]
    full = forward_flops(model.cfg, seq_len, n_loops)
    loops = [{"loop": t + 1, "ce": float(ce) / tokens, "ppl": math.exp(min(float(ce) / tokens, 700.0)),
              "flops_ratio": forward_flops(model.cfg, seq_len, t + 1) / full} for t, ce in enumerate(total["ce_T"])]
    adaptive = None
    if exit_rule is not None:
        mean_exit = float(total["exit_steps"]) / tokens
        ce = float(total["ce_exit"]) / tokens
        adaptive = {"rule": repr(exit_rule), "ce": ce, "ppl": math.exp(min(ce, 700.0)), "mean_exit_step": mean_exit,
                    "flops_ratio": forward_flops(model.cfg, seq_len, mean_exit) / full}
    return {"loops": loops, "adaptive": adaptive, "tokens": tokens, "n_loops": n_loops}


def depth_table(result: dict) -> str:
    """The result of ``evaluate_by_depth`` as a Markdown table."""
    lines = ["| depth | CE | PPL | mean exit step | FLOPs vs L_max |", "|---|---|---|---|---|"]
    for row in result["loops"]:
        lines.append(f"| {row['loop']} | {row['ce']:.4f} | {row['ppl']:.2f} | {row['loop']} | "
                     f"{row['flops_ratio']:.2f} |")
    ad = result["adaptive"]
    if ad is not None:
        lines.append(f"| {ad['rule']} | {ad['ce']:.4f} | {ad['ppl']:.2f} | {ad['mean_exit_step']:.2f} | "
                     f"{ad['flops_ratio']:.2f} |")
    return "\n".join(lines)
