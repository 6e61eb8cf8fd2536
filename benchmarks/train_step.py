"""Train-step throughput: tokens/s and model FLOP utilisation against a matmul peak measured in the same run.

    python -m benchmarks.train_step [--configs small medium] [--steps 5] [--remat none minimal] [--torch-ref DIR]
                                    [--scan-unroll 1 full] [--gemms] [--profile DIR]
                                    [--out benchmarks/results/train_step.json]

Ouro-style models (sandwich norm, step norm, exit gate, untied head) trained with AdamW on Ouro's expected loss
Σ_t p_t·CE_t − β·H(p) over every loop's logits, so the LM head runs at every loop. One jitted step with donated
state. One loopjax row per (``--remat``, ``--scan-unroll``) pair, their steps alternating: ``--remat`` values of
``LoopedConfig.remat_policy`` (default ``none``: every residual kept, as the PyTorch step keeps them, and
``minimal``: the matmul outputs kept, the elementwise work recomputed), ``--scan-unroll`` values of
``LoopedConfig.scan_unroll`` (1, the library default: the loops as a ``lax.scan``, and ``full``: the loops
unrolled; XLA:CPU then overlaps work across loop boundaries). ``small`` = vocab 4096, d_model 256, 4 layers, 8 heads / 8 KV heads, d_ff 1024,
4 loops, batch 8 x 256; ``medium`` = vocab 8192, d_model 512, 8 layers, 8 heads, d_ff 1408, 4 loops, batch 4 x 256.

Model FLOPs are ``lj.train_flops(cfg, S, L, readouts=L)`` (matmuls only, 3x forward; remat recomputation is not
counted; attention counted dense, S² pairs, for both frameworks). "MFU, causal count" counts only the causal
pairs (``causal=True``): both attention kernels skip fully masked blocks, so the dense count credits them with
some work they do not do. The peak is the best FLOP/s of square matmuls (1024³ and 2048³ on CPU) in the compute
dtype on the same device, measured just before. float32 on CPU; on a GPU the same script computes in bfloat16
(parameters and AdamW state float32).

``--torch-ref DIR``: DIR holds the published Ouro modelling code (``modeling_ouro.py``, fetched by the user; see
``benchmarks/torch_ouro.py``). With torch installed, the PyTorch model of the same sizes is trained on the same
objective (per-loop logits, stick-breaking exit distribution, the last position masked) in the same run, its steps
alternating with loopjax's so both see the same machine load, and the table gives both tokens/s and the ratio;
torch's own matmul peak on the same shapes is measured next to XLA's. Without it the PyTorch column reads "not
measured". ``--gemms`` also times every matmul shape of the step (forward, input and weight gradients) in both
frameworks: the step's time at each framework's GEMM rate, to split a gap into GEMM rate and everything else.
``--profile DIR`` traces two more loopjax steps with ``jax.profiler`` and prints each op family's share of the op
time (``benchmarks/xla_profile.py``).
The load average is recorded with every timed figure (a shared machine moves them all).
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
import numpy as np
import optax
from flax import nnx

import loopjax as lj
from benchmarks import torch_ouro, xla_profile
from loopjax import halting

CONFIGS = {
    "small": (dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1024), 8, 256),
    "medium": (dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408), 4, 256),
}
N_LOOPS = 4
ENTROPY_BETA = 0.05
NOT_MEASURED = "not measured"


def model_config(name: str, compute_dtype: str, remat: str, seq: int, scan_unroll: int | bool = 1
                 ) -> lj.LoopedConfig:
    sizes, _, _ = CONFIGS[name]
    return lj.LoopedConfig(**sizes, n_loops=N_LOOPS, max_seq_len=seq, norm_scheme="sandwich", step_norm=True,
                           exit_gate=True, tie_embeddings=False, rope_theta=1e6, param_dtype="float32",
                           compute_dtype=compute_dtype, remat_policy=remat, scan_unroll=scan_unroll)


def expected_loss(model: lj.LoopedLM, tokens_BS: jax.Array) -> jax.Array:
    """Ouro's objective with the library's own pieces: Σ_t p_t·CE_t − β·H(p), CE from every loop's logits."""
    out = model(tokens_BS, return_steps=True)
    b, s = tokens_BS.shape
    labels_BS = jnp.roll(tokens_BS, -1, axis=1)  # next token; the last position has none and is masked out
    mask_BS = jnp.broadcast_to(jnp.arange(s) < s - 1, (b, s))
    ce_TBS = halting.step_cross_entropy(out.step_logits, labels_BS)
    return halting.ouro_expected_loss(ce_TBS, out.gate_logits, mask_BS, beta=ENTROPY_BETA)


def make_train_step(cfg: lj.LoopedConfig):
    """(jitted step(state, tokens) -> (state, loss), initial state, parameter count): AdamW, donated state."""
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
    n_params = lj.count_params(model)
    opt = nnx.Optimizer(model, optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state, tokens_BS):
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(expected_loss)(model, tokens_BS)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    return jax.jit(step, donate_argnums=0), state, n_params


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_matmul_rate(dtype, m: int, k: int, n: int, repeats: int, trans_a: bool = False,
                    trans_b: bool = False, batch: int = 1) -> float:
    """Best FLOP/s of a jitted [m, k] @ [k, n] matmul (random data; an operand stored transposed where asked;
    ``batch`` > 1: a batch of them, as one batched matmul)."""
    lead = (batch,) if batch > 1 else ()
    a = jax.random.normal(jax.random.key(1), lead + ((k, m) if trans_a else (m, k)), dtype)
    b = jax.random.normal(jax.random.key(2), lead + ((n, k) if trans_b else (k, n)), dtype)
    f = jax.jit(lambda x, y: (jnp.swapaxes(x, -1, -2) if trans_a else x)
                @ (jnp.swapaxes(y, -1, -2) if trans_b else y))
    return 2 * batch * m * k * n / _best_seconds(lambda: jax.block_until_ready(f(a, b)), repeats)


def matmul_peaks(dtype, sizes: list[int], repeats: int, torch_mod) -> dict:
    """Best square-matmul FLOP/s over ``sizes`` for XLA (and torch, alternating with it, where given)."""
    out = {"jax": 0.0, "torch": 0.0 if torch_mod else None, "by_size": {}}
    for n in sizes:
        for _ in range(2):  # alternate the frameworks twice per size
            j = jax_matmul_rate(dtype, n, n, n, repeats)
            t = torch_mod.matmul_rate(n, n, n, repeats) if torch_mod else None
            out["jax"] = max(out["jax"], j)
            if t is not None:
                out["torch"] = max(out["torch"], t)
            out["by_size"].setdefault(n, []).append(dict(jax=j, torch=t, load_avg=os.getloadavg()[0]))
    return out


def step_gemms(cfg: lj.LoopedConfig, b: int, s: int) -> list[tuple[str, int, int, int, bool, bool, int, int]]:
    """The step's weight and attention matmuls: (name, m, k, n, trans_a, trans_b, batch, count per step).

    Per weight matmul x[M, K] @ w[K, N]: the forward, the input gradient g @ wᵀ and the weight gradient xᵀ @ g.
    Attention is one batched matmul over (batch row, head) per layer application: S x S scores, forward and the
    two gradients of each of q·kᵀ and p·v (each timed as its forward shape).
    """
    d, h, f, v = cfg.d_model, cfg.d_head, cfg.d_ff, cfg.vocab_size
    per_loop = cfg.n_layers * N_LOOPS
    weights = [("q", d, cfg.n_heads * h, per_loop), ("k, v", d, cfg.kv_heads * h, 2 * per_loop),
               ("o", cfg.n_heads * h, d, per_loop), ("mlp_in", d, f, 2 * per_loop),
               ("mlp_out", f, d, per_loop), ("head", d, v, N_LOOPS)]
    out = []
    for name, k, n, count in weights:
        m = b * s
        out += [(f"{name} fwd", m, k, n, False, False, 1, count),
                (f"{name} dx", m, n, k, False, True, 1, count), (f"{name} dw", k, m, n, True, False, 1, count)]
    heads = b * cfg.n_heads
    out += [("scores q kᵀ", s, h, s, False, True, heads, 3 * per_loop),
            ("probs @ v", s, s, h, False, False, heads, 3 * per_loop)]
    return out


def gemm_split(cfg: lj.LoopedConfig, b: int, s: int, repeats: int, torch_mod) -> list[dict]:
    """Time each of ``step_gemms``' shapes in XLA and (alternating) torch; seconds per step at each rate."""
    rows = []
    for name, m, k, n, ta, tb, bt, count in step_gemms(cfg, b, s):
        j = jax_matmul_rate(jnp.float32, m, k, n, repeats, ta, tb, bt)
        t = torch_mod.matmul_rate(m, k, n, repeats, ta, tb, bt) if torch_mod else None
        flops = 2 * bt * m * k * n * count
        rows.append(dict(name=name, m=m, k=k, n=n, trans_a=ta, trans_b=tb, batch=bt, count=count, flops=flops,
                         jax_flops_per_s=j, torch_flops_per_s=t, jax_s=flops / j,
                         torch_s=flops / t if t else None, load_avg=os.getloadavg()[0]))
    return rows


def parse_unroll(value: str) -> int | bool:
    """A ``--scan-unroll`` value: "full" -> True (the loops unrolled), else a positive int (1: the plain scan)."""
    if value == "full":
        return True
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--scan-unroll {value!r}: must be 'full' or a positive int")
    return int(value)


def bench(name: str, compute_dtype: str, remats: tuple, steps: int, batch: int | None, seq: int | None,
          torch_mod=None, torch_ref: str | None = None, torch_attn: str = "sdpa", profile_dir: str | None = None,
          unrolls: tuple = (1,)) -> list[dict]:
    """One row per (remat policy, ``scan_unroll``) pair; the loopjax variants' steps and PyTorch's alternate."""
    _, b, s = CONFIGS[name]
    b, s = batch or b, seq or s
    vocab = CONFIGS[name][0]["vocab_size"]
    tokens = [jax.random.randint(jax.random.key(10 + i), (b, s), 0, vocab) for i in range(steps + 1)]
    runs = []
    variants = [(remat, unroll) for remat in remats for unroll in unrolls]
    for remat, unroll in variants:
        cfg = model_config(name, compute_dtype, remat, s, scan_unroll=unroll)
        step, state, n_params = make_train_step(cfg)
        t0 = time.perf_counter()
        compiled = step.lower(state, tokens[0]).compile()
        compile_s = time.perf_counter() - t0
        state, loss = compiled(state, tokens[0])  # warm-up
        jax.block_until_ready(loss)
        runs.append(dict(cfg=cfg, compiled=compiled, state=state, n_params=n_params, compile_s=compile_s,
                         times=[], losses=[], loads=[]))
    torch_step = None
    if torch_mod is not None:
        import torch

        tmodel = torch_mod.build(torch_ref, CONFIGS[name][0], N_LOOPS, s, attn=torch_attn)
        torch_step = torch_mod.make_train_step(tmodel, ENTROPY_BETA)
        t_tokens = [torch.from_numpy(np.asarray(t, np.int64)) for t in tokens]
        torch_step(t_tokens[0])  # warm-up
    t_times, t_losses = [], []
    for i, t in enumerate(tokens[1:], 1):  # alternate: each loopjax variant's step i, then PyTorch's step i
        for run in (runs if i % 2 else runs[::-1]):
            run["loads"].append(os.getloadavg()[0])
            t0 = time.perf_counter()
            run["state"], loss = run["compiled"](run["state"], t)
            run["losses"].append(float(loss))  # forces completion of the step
            run["times"].append(time.perf_counter() - t0)
        if torch_step is not None:
            t0 = time.perf_counter()
            t_losses.append(torch_step(t_tokens[i]))
            t_times.append(time.perf_counter() - t0)
    rows = []
    for (remat, unroll), run in zip(variants, runs):
        cfg, times = run["cfg"], run["times"]
        step_s = statistics.median(times)
        flops = b * lj.train_flops(cfg, s, cfg.n_loops, readouts=cfg.n_loops)
        causal_flops = b * lj.train_flops(cfg, s, cfg.n_loops, readouts=cfg.n_loops, causal=True)
        row = dict(config=name, scan_unroll=unroll, batch=b, seq=s, params=run["n_params"],
                   compile_s=run["compile_s"], step_s=step_s, step_s_all=times, tokens_per_s=b * s / step_s,
                   model_flops_per_step=flops, achieved_flops=flops / step_s,
                   model_flops_per_step_causal=causal_flops, losses=run["losses"], remat=remat,
                   compute_dtype=compute_dtype, load_avg_per_step=run["loads"])
        if profile_dir is not None:  # after the timed steps: two more under the profiler
            out = os.path.join(profile_dir, f"{name}_remat-{remat}_unroll{unroll_label(unroll)}")
            run["state"], row["profile"] = xla_profile.trace_steps(run["compiled"], run["state"], tokens[1:3], out)
        if torch_step is not None:
            t_step = statistics.median(t_times)
            row.update(torch_step_s=t_step, torch_step_s_all=t_times, torch_tokens_per_s=b * s / t_step,
                       torch_losses=t_losses, torch_attn=torch_attn, torch_threads=torch.get_num_threads(),
                       ratio_vs_torch=t_step / step_s)
        rows.append(row)
    return rows


def unroll_label(unroll: int | bool) -> str:
    return "full" if unroll is True else str(unroll)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small", "medium"], choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps (per framework) after one warm-up step")
    ap.add_argument("--remat", nargs="+", default=["none", "minimal"],
                    choices=["none", "full", "save_dots", "minimal", "save_qkv"],
                    help="remat policies, one loopjax row each (default: none minimal)")
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch (quick runs)")
    ap.add_argument("--seq", type=int, default=None, help="override the config's sequence length (quick runs)")
    ap.add_argument("--matmul-n", type=int, nargs="+", default=None,
                    help="square peak-matmul sizes (default 1024 2048 on CPU, 8192 on GPU)")
    ap.add_argument("--torch-ref", default=None, metavar="DIR",
                    help="folder with the published Ouro modeling_ouro.py: time PyTorch side by side")
    ap.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--gemms", action="store_true", help="also time every matmul shape of the step")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also trace 2 loopjax steps per config into DIR and print each op family's share of op time")
    ap.add_argument("--scan-unroll", nargs="+", type=parse_unroll, default=[1, True], metavar="U",
                    help="the loop scan's unroll, one loopjax row each: 1 (the library default, a scan over the "
                         "loops) and/or 'full' (the loops unrolled) or another int (default: 1 full)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    on_accel = backend in ("gpu", "tpu")
    compute_dtype = "bfloat16" if on_accel else "float32"
    torch_mod, torch_why = torch_ouro.if_available(args.torch_ref)
    if torch_mod is not None and on_accel:
        torch_mod, torch_why = None, f"backend {backend}: the PyTorch reference runs on the CPU only"
    peaks = matmul_peaks(jnp.dtype(compute_dtype), args.matmul_n or ([8192] if on_accel else [1024, 2048]),
                         repeats=10, torch_mod=torch_mod)
    peak = peaks["jax"]
    rows = []
    for name in args.configs:
        config_rows = bench(name, compute_dtype, tuple(args.remat), args.steps, args.batch, args.seq, torch_mod,
                            args.torch_ref, args.torch_attn, args.profile, tuple(args.scan_unroll))
        for r in config_rows:
            r["mfu"] = r["achieved_flops"] / peak
            r["mfu_causal"] = r["model_flops_per_step_causal"] / r["step_s"] / peak
            if "torch_step_s" in r:
                r["torch_mfu"] = r["model_flops_per_step"] / r["torch_step_s"] / peaks["torch"]
        if args.gemms:  # the matmul shapes do not depend on the unroll: once per config
            _, b, s = CONFIGS[name]
            cfg = model_config(name, compute_dtype, args.remat[0], args.seq or s)
            config_rows[0]["gemms"] = gemm_split(cfg, args.batch or b, args.seq or s, 3, torch_mod)
        rows.extend(config_rows)

    loads = [x for r in rows for x in r["load_avg_per_step"]]
    torch_peak = f"{peaks['torch'] / 1e9:.1f}" if peaks["torch"] else NOT_MEASURED
    print(f"backend={backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"compute {compute_dtype}; matmul peak (best of {args.matmul_n or 'default'} squares) "
          f"XLA {peak / 1e9:.1f} GFLOP/s, torch {torch_peak}; load average during the steps "
          f"{min(loads):.1f}-{max(loads):.1f}" + (f"; PyTorch {torch_why}" if torch_why else ""))
    print("| config | remat | scan_unroll | params | batch x seq | compile (s) | step (s) | tokens/s | GFLOP/s "
          "| MFU (XLA peak) | MFU, causal count | PyTorch Ouro tokens/s | PyTorch MFU (torch peak) "
          "| loopjax / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "torch_step_s" in r:
            tcols = (f"{r['torch_tokens_per_s']:.0f} ({r['torch_attn']}) | {100 * r['torch_mfu']:.1f}% | "
                     f"{r['ratio_vs_torch']:.2f}x")
        else:
            tcols = f"{NOT_MEASURED} | {NOT_MEASURED} | {NOT_MEASURED}"
        print(f"| {r['config']} | {r['remat']} | {unroll_label(r['scan_unroll'])} | {r['params'] / 1e6:.1f}M | "
              f"{r['batch']} x {r['seq']} | {r['compile_s']:.1f} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['achieved_flops'] / 1e9:.1f} | "
              f"{100 * r['mfu']:.1f}% | {100 * r['mfu_causal']:.1f}% | {tcols} |")
    for r in rows:
        if "gemms" not in r:
            continue
        g = r["gemms"]
        js = sum(x["jax_s"] for x in g)
        ts = sum(x["torch_s"] for x in g) if torch_mod else None
        print(f"\n{r['config']}: the step's matmuls, {sum(x['flops'] for x in g) / 1e9:.1f} GFLOP: "
              f"{js:.3f} s at XLA's rates" + (f", {ts:.3f} s at torch's" if ts else "") +
              f"; loopjax step {r['step_s']:.3f} s, so {r['step_s'] - js:.3f} s outside its matmuls" +
              (f"; PyTorch step {r['torch_step_s']:.3f} s, {r['torch_step_s'] - ts:.3f} s outside" if ts else ""))
        print("| matmul | m x k x n | count | XLA GFLOP/s | torch GFLOP/s | XLA s/step | torch s/step |")
        print("|---|---|---|---|---|---|---|")
        for x in g:
            tr = "".join(("ᵀa" if x["trans_a"] else "", "ᵀb" if x["trans_b"] else ""))
            tt = (f"{x['torch_flops_per_s'] / 1e9:.1f} | {x['torch_s']:.3f}" if x["torch_s"] else "- | -")
            t_rate, t_s = tt.split(" | ")
            bt = f"{x['batch']} x " if x["batch"] > 1 else ""
            print(f"| {x['name']} | {bt}{x['m']} x {x['k']} x {x['n']}{' ' + tr if tr else ''} | {x['count']} | "
                  f"{x['jax_flops_per_s'] / 1e9:.1f} | {t_rate} | {x['jax_s']:.3f} | {t_s} |")
    for r in rows:
        if "profile" not in r:
            continue
        prof = r["profile"]
        print(f"\n{r['config']} (remat={r['remat']}, scan_unroll={unroll_label(r['scan_unroll'])}): XLA profile, "
              f"{sum(x['seconds_per_step'] for x in prof):.3f} s of op time per step "
              "(summed over threads)")
        print("| op | s/step | share |")
        print("|---|---|---|")
        for x in prof[:15]:
            print(f"| {x['op']} | {x['seconds_per_step']:.3f} | {100 * x['share']:.1f}% |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), backend=backend, device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                       jax=jax.__version__, platform=platform.platform(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                       matmul_peak_flops=peak, torch_matmul_peak_flops=peaks["torch"], matmul_peaks=peaks,
                       torch=torch_why or "measured", load_avg_end=os.getloadavg(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
