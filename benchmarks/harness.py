"""lm-eval log-likelihood scoring: the bucketed all-depths pass vs scoring each request alone at each depth.

    python -m benchmarks.harness [--requests 1000] [--baseline-requests 60] [--batch-size 16]
        [--out benchmarks/results/harness.json]

A random byte-level model (d_model 128, 2 core layers, L = 4 loops, exit gate) scores N (context, continuation)
requests shaped like a multiple-choice task (contexts of 8..200 tokens, continuations of 1..8) at every depth
1..L and under QExit(0.5) (Ouro's read-out): L + 1 = 5 depth entries.

- bucketed: ``loopjax.evaluation.Scorer`` (what ``LoopjaxLM`` runs): requests sorted by length, padded to
  power-of-two buckets, fixed batches, one pass per batch giving all 5 depth entries. Timed cold (compiles
  included) and warm (same shapes again).
- alone (also "padded to the buckets", which compiles only per bucket and depth): each request on its own at
  its exact length, one jitted forward per depth entry (the model at n_loops
  = d, and the exit-rule call) -- what a per-request backend does. It compiles per (length, depth); it is run
  on the first ``--baseline-requests`` requests and its rate extrapolated (stated in the table).

Rates are requests per second with every depth entry scored. The CPU is shared with other work: figures vary run
to run; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import loopjax as lj
from loopjax.evaluation.scoring import Scorer, TokenRequest, length_buckets
from loopjax.sharding import make_mesh, rules_for

CFG = lj.LoopedConfig(vocab_size=258, d_model=128, n_heads=4, n_kv_heads=2, d_ff=512, n_layers=2, n_loops=4,
                      max_seq_len=256, exit_gate=True, init_std=0.05)
RULE = lj.QExit(0.5)


def make_requests(n: int, seed: int = 0) -> list[TokenRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = rng.integers(0, 256, rng.integers(8, 201)).tolist()
        cont = rng.integers(0, 256, rng.integers(1, 9)).tolist()
        out.append(TokenRequest(tuple([256] + ctx + cont), len(cont)))
    return out


def run_bucketed(model, reqs, batch_size: int, max_length: int) -> dict:
    mesh, rules = make_mesh(lj.MeshConfig(), devices=jax.devices()[:1]), rules_for("dp")
    scorer = Scorer(model, mesh, rules, loops=CFG.n_loops, exit_rule=RULE, rule_loops=CFG.n_loops)
    buckets = length_buckets(max_length)
    t0 = time.perf_counter()
    scorer.run(reqs, batch_size=batch_size, buckets=buckets)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = scorer.run(reqs, batch_size=batch_size, buckets=buckets)
    warm = time.perf_counter() - t0
    return {"cold_s": cold, "warm_s": warm, "compiles": scorer.compiles["all_depths"], "buckets": list(buckets),
            "logp_T": res["logp_T"], "logp_exit": res["logp_exit"]}


def run_alone(model, reqs, buckets=None, fn=None) -> dict:
    graphdef, state = nnx.split(model)
    traces = {"n": 0}

    def score(state, x_1S, tgt_1S, w_1S, *, n_loops, rule):
        traces["n"] += 1
        m = nnx.merge(graphdef, state)
        if rule is None:
            logits = m(x_1S, n_loops=n_loops).logits
        else:
            logits = m(x_1S, n_loops=n_loops, exit_rule=rule, run_all_loops=True).logits
        lp = jax.nn.log_softmax(logits, -1)
        return (jnp.take_along_axis(lp, tgt_1S[..., None], -1)[..., 0] * w_1S).sum()

    fn = jax.jit(score, static_argnames=("n_loops", "rule")) if fn is None else fn
    entries = [(d, None) for d in range(1, CFG.n_loops + 1)] + [(CFG.n_loops, RULE)]
    out = np.zeros((len(reqs), len(entries)))
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        toks = np.asarray(r.tokens, np.int32)
        n = len(toks) - 1
        s = n if buckets is None else min(b for b in buckets if b >= n)  # right padding: causal, changes nothing
        x, tgt, w = np.zeros((1, s), np.int32), np.zeros((1, s), np.int32), np.zeros((1, s), np.float32)
        x[0, :n], tgt[0, :n], w[0, n - r.n_cont:n] = toks[:-1], toks[1:], 1
        x, tgt, w = jnp.asarray(x), jnp.asarray(tgt), jnp.asarray(w)
        for j, (d, rule) in enumerate(entries):
            out[i, j] = float(fn(state, x, tgt, w, n_loops=d, rule=rule))
    return {"s": time.perf_counter() - t0, "compiles": traces["n"], "scores": out, "fn": fn}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--baseline-requests", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/harness.json")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    model = lj.LoopedLM(CFG, rngs=nnx.Rngs(0))
    reqs = make_requests(args.requests)
    b = run_bucketed(model, reqs, args.batch_size, CFG.max_seq_len)
    n_base = min(args.baseline_requests, len(reqs))
    a = run_alone(model, reqs[:n_base])
    p = run_alone(model, reqs[:n_base], buckets=b["buckets"])
    pw = run_alone(model, reqs[:n_base], buckets=b["buckets"], fn=p["fn"])  # same shapes again: no compile
    # same numbers either way (float32; different shapes round differently)
    got = np.concatenate([b["logp_T"][:n_base], b["logp_exit"][:n_base, None]], axis=1)
    max_diff = float(max(np.abs(got - a["scores"]).max(), np.abs(got - p["scores"]).max()))
    rows = [
        {"method": "bucketed all-depths pass, cold (compiles included)", "requests": len(reqs),
         "seconds": b["cold_s"], "requests_per_s": len(reqs) / b["cold_s"], "compiles": b["compiles"]},
        {"method": "bucketed all-depths pass, warm", "requests": len(reqs), "seconds": b["warm_s"],
         "requests_per_s": len(reqs) / b["warm_s"], "compiles": 0},
        {"method": f"each request alone x {CFG.n_loops + 1} depth entries (first {n_base}, extrapolated)",
         "requests": n_base, "seconds": a["s"], "requests_per_s": n_base / a["s"], "compiles": a["compiles"]},
        {"method": f"each request alone x {CFG.n_loops + 1}, padded to the buckets (first {n_base}, extrapolated)",
         "requests": n_base, "seconds": p["s"], "requests_per_s": n_base / p["s"], "compiles": p["compiles"]},
        {"method": f"each request alone x {CFG.n_loops + 1}, padded to the buckets, warm (first {n_base})",
         "requests": n_base, "seconds": pw["s"], "requests_per_s": n_base / pw["s"], "compiles": 0},
    ]
    speedup_cold = rows[0]["requests_per_s"] / rows[2]["requests_per_s"]
    speedup_warm = rows[1]["requests_per_s"] / rows[2]["requests_per_s"]
    speedup_padded = rows[0]["requests_per_s"] / rows[3]["requests_per_s"]
    speedup_padded_warm = rows[1]["requests_per_s"] / rows[4]["requests_per_s"]
    print(f"{len(reqs)} requests, contexts 8..200 tokens, continuations 1..8; depths 1..{CFG.n_loops} + adaptive; "
          f"batch {args.batch_size}, buckets {b['buckets']}; {jax.devices()[0].platform}, 1 device")
    print("| method | requests | seconds | requests/s | compiles |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['requests']} | {r['seconds']:.1f} | {r['requests_per_s']:.3g} | {r['compiles']} |")
    print(f"speed-up of the bucketed pass: {speedup_cold:.1f}x cold, {speedup_warm:.1f}x warm vs alone at exact "
          f"length; {speedup_padded:.1f}x cold / {speedup_padded_warm:.1f}x warm vs alone padded to buckets; "
          f"max |score difference| {max_diff:.2e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "speedup_cold": speedup_cold, "speedup_warm": speedup_warm,
                   "speedup_cold_vs_padded_alone": speedup_padded,
                   "speedup_warm_vs_padded_alone_warm": speedup_padded_warm, "max_abs_diff": max_diff,
                   "config": {"requests": len(reqs), "batch_size": args.batch_size, "buckets": b["buckets"],
                              "n_loops": CFG.n_loops, "d_model": CFG.d_model, "n_layers": CFG.n_layers},
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg(), "jax": jax.__version__}}, f, indent=1)


if __name__ == "__main__":
    main()
