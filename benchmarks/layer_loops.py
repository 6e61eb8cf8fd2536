"""Per-layer loops and memory banks (issue 29): compile time and temp memory vs N, scan vs Python loop, adaptive exit.

    python -m benchmarks.layer_loops compile  [--loops 1 2 4 8]   # compile s + temp bytes of the train step vs N
    python -m benchmarks.layer_loops scan                          # Loop+Mem train tokens/s: scan vs Python for-loop
    python -m benchmarks.layer_loops adaptive                      # while-loop inference vs all N iterations

Each prints a Markdown table and writes JSON (``--out``, default ``benchmarks/results/layer_loops_MODE.json``).
``compile``: the train step (value_and_grad of the next-token CE, the model's remat policy) of a per-layer-looped
model (``n_loops=1, layer_loops=N``), lowered and compiled once per N; ``compiled.memory_analysis()`` gives the
temp bytes. Goal (issue 29): compile <= 1.5x and temp <= 3x at N = 8 vs N = 1.
``scan``: train tokens/s of a Loop+Mem step (value_and_grad + an SGD update) with the per-layer iterations as one
``lax.scan`` vs the same model and parameters with them traced as a Python for-loop; timed interleaved, minimum
over repeats (the CPU is shared). ``adaptive``: routers set (weights zeroed, bias chosen) so every token exits at
iteration d = 1, N/2, N, plus a random router (mixed exits), plus the model trained ``--train-steps`` steps
with a ponder cost (learned exits); the while-loop call timed interleaved with the all-N call. Goal: time ratio
<= 1.25x the depth ratio (iterations run / N) when tokens exit early.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import loopjax as lj


def base_config(args) -> lj.LoopedConfig:
    return lj.LoopedConfig(vocab_size=512, d_model=args.d_model, n_heads=4, n_kv_heads=4, d_ff=4 * args.d_model,
                           n_layers=args.layers, n_loops=1, max_seq_len=args.seq, exit_gate=False,
                           remat_scope=args.remat_scope, scan_layers=args.scan_layers)


def ce_loss(graphdef, st, tokens_BS, **call):
    logits = nnx.merge(graphdef, st)(tokens_BS, **call).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens_BS[:, 1:, None], -1).mean()


def compile_train_step(cfg: lj.LoopedConfig, tokens_BS):
    """(compiled value_and_grad step, params state, compile seconds, temp bytes)."""
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(jax.value_and_grad(lambda st, tok: ce_loss(graphdef, st, tok)))
    t0 = time.perf_counter()
    compiled = fn.lower(state, tokens_BS).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return compiled, state, seconds, getattr(mem, "temp_size_in_bytes", None)


def time_interleaved(calls, repeats):
    """(min, median) seconds per call of each function, calls interleaved round-robin (a shared CPU)."""
    for fn in calls:
        jax.block_until_ready(fn())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in times]


def bench_compile(args) -> list[dict]:
    """Compile each (model, N) ``--compile-repeats`` times, rounds interleaved over N after one discarded warm-up
    compile (the first compile in a process also pays one-time tracing/XLA start-up); min and median seconds."""
    base = base_config(args)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, base.vocab_size)
    cases = []
    for model in args.models:
        for n in args.loops:
            cfg = dataclasses.replace(base, layer_loops=n)
            if model == "Loop+Mem":
                cfg = dataclasses.replace(cfg, memory_local_slots=args.local_slots,
                                          memory_global_slots=args.global_slots)
            cases.append((model, n, cfg))
    compile_train_step(cases[0][2], tokens)
    seconds = {(m, n): [] for m, n, _ in cases}
    temps = {}
    for _ in range(args.compile_repeats):
        for model, n, cfg in cases:
            _, _, s, temps[model, n] = compile_train_step(cfg, tokens)
            seconds[model, n].append(s)
    rows = []
    for model, n, cfg in cases:
        rows.append(dict(model=model, N=n, compile_s=min(seconds[model, n]),
                         compile_median_s=statistics.median(seconds[model, n]), compile_all_s=seconds[model, n],
                         temp_bytes=temps[model, n],
                         params=lj.count_params(nnx.eval_shape(lambda cfg=cfg: lj.LoopedLM(cfg, rngs=nnx.Rngs(0))))))
        print(rows[-1], flush=True)
    print(f"\n{args.layers} layers, d_model {args.d_model}, batch {args.batch} x {args.seq}, remat 'full' scope "
          f"{args.remat_scope!r}, scan_layers={args.scan_layers}, {jax.devices()[0].platform}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | N | params | compile s (min) | compile s (median) | compile vs N=1 (min) | "
          "compile vs N=1 (median) | temp MiB | temp vs N=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = next(x for x in rows if x["model"] == r["model"] and x["N"] == args.loops[0])
        temp_ratio = r["temp_bytes"] / first["temp_bytes"] if first["temp_bytes"] else float("nan")
        r.update(compile_ratio=r["compile_s"] / first["compile_s"],
                 compile_median_ratio=r["compile_median_s"] / first["compile_median_s"], temp_ratio=temp_ratio)
        print(f"| {r['model']} | {r['N']} | {r['params']:,} | {r['compile_s']:.2f} | {r['compile_median_s']:.2f} | "
              f"{r['compile_ratio']:.2f}x | {r['compile_median_ratio']:.2f}x | {r['temp_bytes'] / 2**20:.2f} | "
              f"{temp_ratio:.2f}x |")
    return rows


@contextlib.contextmanager
def python_for_loop_iterations():
    """While active, ``LayerLoop.run`` traces its N iterations as a Python for-loop (the naive version: N copies of
    the layer in the program) instead of one ``lax.scan``; same parameters, same per-iteration function."""
    from loopjax.layer_loop import LayerLoop, LayerLoopStats

    def run_unrolled(self, step_fn, x_BSD):
        h, sums, scales, auxes = x_BSD, self.start(x_BSD), self.scales(), []
        for i in range(self.n_iterations):
            h, aux = step_fn(h, scales[i])
            sums = self.accumulate(sums, h, i)
            auxes.append(aux)
        out, en = self.finish(sums, x_BSD.dtype)
        n = self.n_iterations
        aux = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a).mean(0), *auxes)
        return out, LayerLoopStats(en, jnp.full(en.shape, n, jnp.int32), jnp.int32(n)), aux

    scanned = LayerLoop.run
    LayerLoop.run = run_unrolled
    try:
        yield
    finally:
        LayerLoop.run = scanned


def bench_scan(args) -> list[dict]:
    """Loop+Mem train step (value_and_grad + SGD update): scan over iterations vs a Python for-loop, tokens/s."""
    memory = (dict(memory_local_slots=args.local_slots, memory_global_slots=args.global_slots)
              if args.local_slots or args.global_slots else {})
    cfg = dataclasses.replace(base_config(args), layer_loops=args.n, **memory)
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)

    def make_step():  # a fresh function per version: jit's trace cache must not hand back the other one
        def step(st, tok):
            loss, grads = jax.value_and_grad(lambda p: ce_loss(graphdef, p, tok))(st)
            return jax.tree.map(lambda p, g: p - 1e-3 * g, st, grads), loss
        return step

    fns, compile_s = {}, {}
    for name in ("scan", "python for-loop"):
        ctx = python_for_loop_iterations() if name != "scan" else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            fns[name] = jax.jit(make_step()).lower(state, tokens).compile()
            compile_s[name] = time.perf_counter() - t0
    loss_scan, loss_loop = (float(fns[k](state, tokens)[1]) for k in fns)
    timed = time_interleaved([lambda f=f: f(state, tokens) for f in fns.values()], args.repeats)
    tokens_per_step = args.batch * args.seq
    rows = [dict(version=name, compile_s=compile_s[name], step_ms_min=1e3 * t, step_ms_median=1e3 * med,
                 tokens_per_s=tokens_per_step / t, loss=loss)
            for (name, (t, med)), loss in zip(zip(fns, timed), (loss_scan, loss_loop))]
    print(f"\n{'Loop+Mem' if memory else 'Loop'}: {args.layers} layers, N={args.n}, d_model {args.d_model}, "
          f"{args.local_slots}/{args.global_slots} slots, batch {args.batch} x {args.seq}, "
          f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}")
    print("| version | compile (s) | step ms (min) | step ms (median) | train tokens/s (min step) | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['version']} | {r['compile_s']:.2f} | {r['step_ms_min']:.1f} | {r['step_ms_median']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['loss']:.6f} |")
    print(f"scan / for-loop tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.3f}")
    return rows


def router_bias_for_exit(depth: int, n: int, threshold: float) -> float:
    """Router bias making every token's cumulative halting mass reach ``threshold`` at iteration ``depth`` when
    the router's weights are zero (λ constant: 1 − (1 − λ)^depth = threshold, with a margin); -30 for all N."""
    if depth >= n:
        return -30.0
    lam = 1.0 - (1.0 - threshold) ** (1.0 / depth) * 0.9  # 0.9: clear the threshold despite float32 rounding
    if depth > 1:  # and do not clear it one iteration earlier
        assert 1.0 - (1.0 - lam) ** (depth - 1) < threshold
    return math.log(lam / (1.0 - lam))


def train_with_ponder(graphdef, state, cfg: lj.LoopedConfig, args):
    """The benchmark model trained by AdamW on a learnable stream (each row counts up by a random stride modulo
    the vocabulary) with next-token CE plus the ponder cost λ·(mean E[n] − 1)/(N − 1): routers learn to halt."""
    opt = optax.adamw(3e-3)

    def loss_fn(st, tok):
        out = nnx.merge(graphdef, st)(tok)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        ce = -jnp.take_along_axis(logp, tok[:, 1:, None], -1).mean()
        return ce + args.ponder_weight * (out.layer_expected_n.mean() - 1) / (cfg.layer_loops - 1)

    @jax.jit
    def step(st, opt_st, key):
        k1, k2 = jax.random.split(key)
        start = jax.random.randint(k1, (args.batch, 1), 0, cfg.vocab_size)
        stride = jax.random.randint(k2, (args.batch, 1), 1, 8)
        tok = (start + stride * jnp.arange(args.seq)) % cfg.vocab_size
        grads = jax.grad(loss_fn)(st, tok)
        updates, opt_st = opt.update(grads, opt_st, st)
        return optax.apply_updates(st, updates), opt_st

    st, opt_st = state, opt.init(state)
    for i in range(args.train_steps):
        st, opt_st = step(st, opt_st, jax.random.key(100 + i))
    return st


def bench_adaptive(args) -> list[dict]:
    """Inference: the masked while loop (``layer_exit_threshold``) vs all N iterations, at controlled exit depths."""
    n, threshold = args.n, args.threshold
    cfg = dataclasses.replace(base_config(args), layer_loops=n)
    graphdef, state = nnx.split(lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
    full = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok).logits)

    def with_routers(w_scale: float, bias: float):
        st = jax.tree.map(lambda x: x, state)
        for loop in st["core"]["layer_loops"].values():
            loop["router_w"][...] = loop["router_w"][...] * w_scale
            loop["router_t"][...] = loop["router_t"][...] * w_scale
            loop["router_b"][...] = jnp.asarray(bias, jnp.float32)
        return st

    cases = [(f"all exit at {d}", with_routers(0.0, router_bias_for_exit(d, n, threshold)), threshold)
             for d in sorted({1, n // 2, n})]
    cases.append(("mixed (random router)", with_routers(40.0, router_bias_for_exit(max(n // 2, 1), n, threshold)),
                  threshold))
    if args.train_steps:
        name = (f"trained ({args.train_steps} steps, ponder {args.ponder_weight}), threshold "
                f"{args.trained_threshold}")
        cases.append((name, train_with_ponder(graphdef, state, cfg, args), args.trained_threshold))
    rows = []
    for name, st, thr in cases:
        adaptive = jax.jit(lambda st, tok, thr=thr: nnx.merge(graphdef, st)(tok, layer_exit_threshold=thr))
        out = adaptive(st, tokens)
        iters = np.asarray(out.layer_iterations)  # [T, k] iterations each core layer executed
        exit_BSK = np.asarray(out.layer_exit_iteration)
        (t_adapt, med_adapt), (t_full, med_full) = time_interleaved(
            [lambda st=st: adaptive(st, tokens).logits, lambda st=st: full(st, tokens)], args.repeats)
        depth_ratio = float(iters.mean()) / n
        rows.append(dict(case=name, mean_exit=float(exit_BSK.mean()), iterations=iters.tolist(),
                         depth_ratio=depth_ratio, adaptive_ms=1e3 * t_adapt, full_ms=1e3 * t_full,
                         time_ratio=t_adapt / t_full, median_ratio=med_adapt / med_full,
                         vs_depth_scaled=(t_adapt / t_full) / depth_ratio))
    print(f"\nN={n}, threshold {threshold}, {args.layers} layers, d_model {args.d_model}, batch {args.batch} x "
          f"{args.seq}, {jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}")
    print("| case | mean exit iteration | iterations run per layer | depth ratio | while-loop ms (min) | all-N ms "
          "(min) | time ratio (min) | time ratio (median) | time / depth-scaled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_layer = ",".join(str(x) for x in np.asarray(r["iterations"]).mean(axis=0).round(2))
        print(f"| {r['case']} | {r['mean_exit']:.2f} | {per_layer} | {r['depth_ratio']:.3f} | "
              f"{r['adaptive_ms']:.1f} | {r['full_ms']:.1f} | {r['time_ratio']:.3f} | {r['median_ratio']:.3f} | "
              f"{r['vs_depth_scaled']:.2f}x |")
    return rows


MODES = {"compile": bench_compile, "scan": bench_scan, "adaptive": bench_adaptive}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=sorted(MODES))
    ap.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--models", nargs="+", default=["Loop", "Loop+Mem"], choices=["Loop", "Loop+Mem"],
                    help="compile: which models to sweep over N")
    ap.add_argument("--n", type=int, default=4, help="per-layer iterations (scan, adaptive)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--local-slots", type=int, default=256)
    ap.add_argument("--global-slots", type=int, default=128)
    ap.add_argument("--remat-scope", default="layer", choices=["loop", "layer", "both"],
                    help="where jax.checkpoint goes (LoopedConfig.remat_scope; policy 'full')")
    ap.add_argument("--scan-layers", action="store_true",
                    help="LoopedConfig.scan_layers: the core layers as one lax.scan (the frey_200m preset's setting)")
    ap.add_argument("--threshold", type=float, default=0.99, help="layer_exit_threshold (adaptive)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=300,
                    help="adaptive: also time a model trained this many steps with a ponder cost (0: skip)")
    ap.add_argument("--ponder-weight", type=float, default=1.0, help="adaptive: ponder cost weight when training")
    ap.add_argument("--trained-threshold", type=float, default=0.9,
                    help="adaptive: layer_exit_threshold for the trained model")
    ap.add_argument("--compile-repeats", type=int, default=3, help="compile: compiles per (model, N), interleaved")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = MODES[args.mode](args)
    out = args.out or f"benchmarks/results/layer_loops_{args.mode}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(args=vars(args), platform=platform.platform(), jax=jax.__version__,
                       device=str(jax.devices()[0]), load_average=os.getloadavg(), rows=rows), f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
