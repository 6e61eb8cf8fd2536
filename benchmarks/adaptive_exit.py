"""Adaptive early exit vs a fixed L_max forward: time and executed FLOPs at controlled exit depths.

    python -m benchmarks.adaptive_exit [--loops 8] [--repeats 7] [--out benchmarks/results/adaptive_exit.json]

The exit depth is set through the exit gate: its weight is zeroed and its bias chosen so that Ouro's QExit(0.5)
fires at exactly loop d for every token (λ = σ(b) with (1 − λ)^d = 0.45, or b = −30 for the last loop), for
d = 1, L/2 and L. A last row keeps a random gate weight, so tokens exit at mixed depths and the while loop runs
until the deepest one. Each adaptive call is timed interleaved with the fixed-L call (same jitted model, same
batch); times are the minimum over repeats (the CPU is shared), with the median ratio beside it. "depth ratio"
is iterations executed / L; the target is time ratio within 20% of it when the whole batch exits early. FLOPs
are ``lj.forward_flops`` at the executed iteration count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import loopjax as lj


def gate_bias_for_depth(depth: int, n_loops: int) -> float:
    """Gate bias making QExit(0.5) fire at loop ``depth`` when the gate weight is zero."""
    if depth >= n_loops:
        return -30.0
    lam = 1.0 - 0.45 ** (1.0 / depth)
    return math.log(lam / (1.0 - lam))


def time_interleaved(calls, repeats):
    """(min, median) seconds per call of each function, calls interleaved round-robin; on a shared CPU the
    minimum is the least disturbed figure."""
    for fn in calls:
        jax.block_until_ready(fn())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/adaptive_exit.json")
    args = ap.parse_args(argv)

    n = args.loops
    cfg = lj.LoopedConfig(vocab_size=512, d_model=args.d_model, n_heads=4, n_kv_heads=2, d_ff=4 * args.d_model,
                          n_layers=2, n_loops=n, max_seq_len=args.seq, norm_scheme="sandwich", step_norm=True)
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
    rule = lj.QExit(0.5)
    fixed = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok, n_loops=n).logits)
    adaptive = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok, n_loops=n, exit_rule=rule))

    def with_gate(w_scale, bias):
        st = jax.tree.map(lambda x: x, state)
        gate = st["core"]["gate"]
        gate["w"][...] = gate["w"][...] * w_scale
        gate["b"][...] = jnp.asarray(bias, jnp.float32)
        return st

    cases = [(f"all exit at {d}", with_gate(0.0, gate_bias_for_depth(d, n))) for d in sorted({1, n // 2, n})]
    cases.append(("mixed (random gate)", with_gate(40.0, gate_bias_for_depth(n // 2, n))))
    flops_fixed = args.batch * lj.forward_flops(cfg, args.seq, n)

    rows = []
    for name, st in cases:
        out = adaptive(st, tokens)
        exit_np = np.asarray(out.exit_step)
        iters = int(out.n_iterations)
        (t_adapt, med_adapt), (t_fixed, med_fixed) = time_interleaved(
            [lambda: adaptive(st, tokens).logits, lambda: fixed(st, tokens)], args.repeats)
        rows.append(dict(case=name, mean_exit=float(exit_np.mean()), min_exit=int(exit_np.min()),
                         max_exit=int(exit_np.max()), iterations=iters, depth_ratio=iters / n,
                         adaptive_ms=1e3 * t_adapt, fixed_ms=1e3 * t_fixed, time_ratio=t_adapt / t_fixed,
                         median_ratio=med_adapt / med_fixed,
                         gflops_adaptive=args.batch * lj.forward_flops(cfg, args.seq, iters) / 1e9,
                         gflops_fixed=flops_fixed / 1e9))

    print(f"L_max={n}, batch {args.batch} x {args.seq}, d_model {args.d_model}, QExit(0.5), {jax.devices()[0].platform}")
    print("| case | mean exit | exit range | iterations | depth ratio | adaptive ms (min) | fixed-L ms (min) "
          "| time ratio (min) | time ratio (median) | GFLOP adaptive | GFLOP fixed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mean_exit']:.2f} | {r['min_exit']}-{r['max_exit']} | {r['iterations']} | "
              f"{r['depth_ratio']:.3f} | {r['adaptive_ms']:.1f} | {r['fixed_ms']:.1f} | {r['time_ratio']:.3f} | "
              f"{r['median_ratio']:.3f} | "
              f"{r['gflops_adaptive']:.3f} | {r['gflops_fixed']:.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), platform=platform.platform(), jax=jax.__version__,
                       device=str(jax.devices()[0]), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
