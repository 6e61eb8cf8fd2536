"""Scanned vs unrolled loops: compile time, step time (forward + backward) and XLA temp memory vs loop count.

    python -m benchmarks.scan_vs_unroll [--loops 1 2 4 8 16 32] [--repeats 5] [--out benchmarks/results/scan_vs_unroll.json]

For each loop count L it compiles a train step (value_and_grad of the next-token CE) four ways: scanned with remat
("full" policy), scanned without remat, and unrolled (a Python loop over L, same remat); it reports compile seconds,
median step seconds (scan and unrolled timed interleaved, so machine noise hits both alike) and
``compiled.memory_analysis().temp_size_in_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import loopjax as lj


def make_step(cfg: lj.LoopedConfig, n_loops: int, use_scan: bool):
    """A jitted (loss, grads) function of (params state, tokens) and the abstract state."""
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))

    def loss_fn(st, tokens_BS):
        logits = nnx.merge(graphdef, st)(tokens_BS, n_loops=n_loops, use_scan=use_scan).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens_BS[:, 1:, None], -1).mean()

    return jax.jit(jax.value_and_grad(loss_fn)), state


def compile_step(cfg, n_loops, use_scan, tokens):
    fn, state = make_step(cfg, n_loops, use_scan)
    t0 = time.perf_counter()
    compiled = fn.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return compiled, state, compile_s, temp


def time_interleaved(fns, repeats):
    """Median seconds per call of each (compiled, args) pair, calls interleaved round-robin."""
    for fn, args in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/scan_vs_unroll.json")
    args = ap.parse_args(argv)

    base = lj.LoopedConfig(vocab_size=512, d_model=args.d_model, n_heads=4, n_kv_heads=2, d_ff=4 * args.d_model,
                           n_layers=2, max_seq_len=args.seq, norm_scheme="sandwich", step_norm=True)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, base.vocab_size)
    rows = []
    for n in args.loops:
        cfg = base.replace(n_loops=n)
        scan, s_state, scan_c, scan_mem = compile_step(cfg, n, True, tokens)
        unrl, u_state, unrl_c, _ = compile_step(cfg, n, False, tokens)
        _, _, _, noremat_mem = compile_step(cfg.replace(remat_policy="none"), n, True, tokens)
        scan_t, unrl_t = time_interleaved([(scan, (s_state, tokens)), (unrl, (u_state, tokens))], args.repeats)
        row = dict(n_loops=n, scan_compile_s=scan_c, unrolled_compile_s=unrl_c, scan_step_s=scan_t,
                   unrolled_step_s=unrl_t, step_ratio=scan_t / unrl_t, temp_bytes_remat=scan_mem,
                   temp_bytes_no_remat=noremat_mem)
        rows.append(row)
        print(f"L={n:>2}: scan compile {scan_c:6.2f}s  unrolled {unrl_c:6.2f}s  step {scan_t * 1e3:8.1f} vs "
              f"{unrl_t * 1e3:8.1f} ms  temp {scan_mem} (remat) / {noremat_mem} (none)", flush=True)

    first = rows[0]
    print()
    print("| L | compile scan (s) | compile unrolled (s) | step scan (ms) | step unrolled (ms) | scan/unrolled | "
          "temp MiB remat | temp MiB no remat | temp vs L=1 (remat) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
        growth = (r["temp_bytes_remat"] / first["temp_bytes_remat"]) if first["temp_bytes_remat"] else float("nan")
        print(f"| {r['n_loops']} | {r['scan_compile_s']:.2f} | {r['unrolled_compile_s']:.2f} | "
              f"{r['scan_step_s'] * 1e3:.1f} | {r['unrolled_step_s'] * 1e3:.1f} | {r['step_ratio']:.3f} | "
              f"{mib(r['temp_bytes_remat'])} | {mib(r['temp_bytes_no_remat'])} | {growth:.2f}x |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = dict(backend=jax.default_backend(), devices=str(jax.devices()), jax=jax.__version__,
                python=platform.python_version(), args=vars(args))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
