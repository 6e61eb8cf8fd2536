"""Decode throughput of ``lj.generate``: tokens/s and loop iterations per token, per KV mode and exit rule.

    python -m benchmarks.decode [--configs small medium] [--batches 1 16] [--qs 0.5 0.7 0.85] [--repeats 3]
                                [--modes per_step last_step compute_all] [--vs-rev GIT_REV] [--torch-ref DIR]
                                [--out benchmarks/results/decode.json]

For each config (the training benchmark's ``small`` / ``medium``, float32), batch size, exit rule (fixed L, then
``QExit(q)``) and KV mode it compiles ``generate`` for a 32-token prompt and 128 greedy new tokens, then times
whole calls (one dispatch each; modes interleaved so machine noise hits them alike). Decode tokens/s excludes the
prefill: (t(128 new) − t(1 new)) / 127 per row. The gate of an untrained model gives λ ≈ σ(0) = 0.5 per loop, so
the exit CDF is ≈ 0.5, 0.75, 0.875, 1 and q = 0.5 / 0.7 / 0.85 exit after 1 / 2 / 3 of 4 loops: a controlled
depth. Also: prefill tokens/s, cache bytes, and a measured copy bandwidth and matmul rate of the machine.

``--vs-rev REV`` also times ``loopjax/generate`` as it was at git revision REV (extracted to a temporary package,
same model and layers), interleaved call by call with the current code, and reports the speedup per row: a
side-by-side ratio that machine load affects alike. Each row also gives the *weight floor*: the time per token of
a jitted loop that does only the decode's weight matmuls (every loop's projections and MLP, and the head) for B
rows, no attention, no cache, no sampling: what streaming the weights and multiplying costs on this machine.

``--torch-ref DIR`` (DIR holds the published Ouro ``modeling_ouro.py``, fetched by the user; see
``benchmarks/torch_ouro.py``; needs torch and transformers): the PyTorch model of the same sizes decodes the same
prompt with its own ``generate`` (greedy, its layer-by-loop KV cache, all loops every token), its calls interleaved
with loopjax's, and the fixed-L rows give its decode tokens/s and the ratio. Without it those columns read "not
measured": no number from another machine. Every row records the load average it was timed under.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import loopjax as lj
from benchmarks import torch_ouro
from loopjax.generate import init_cache

CONFIGS = {
    "small": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1024, n_loops=4),
    "medium": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, n_loops=4),
}
MODES = ("per_step", "last_step", "compute_all")


def machine_rates() -> dict:
    """Measured copy bandwidth (GB/s, read + write) and float32 matmul rate (GFLOP/s) of this device."""
    x = jnp.ones((64 * 2 ** 20 // 4,), jnp.float32)
    a = jnp.ones((1024, 1024), jnp.float32)
    copy, mm = jax.jit(lambda v: v + 1.0), jax.jit(lambda m: m @ m)
    out = {}
    for name, fn, arg, work in (("copy_GBps", copy, x, 2 * x.nbytes / 1e9), ("matmul_GFLOPs", mm, a, 2 * 1024 ** 3 / 1e9)):
        jax.block_until_ready(fn(arg))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(arg))
            ts.append(time.perf_counter() - t0)
        out[name] = work / statistics.median(ts)
    return out


def weight_floor_ms(model, batch: int, n_loops: int, iters: int = 16) -> float:
    """ms per token of a jitted loop doing only a decode step's weight matmuls for ``batch`` rows (see module doc)."""
    graphdef, state = nnx.split(model)

    def token(x_BD, _):
        m = nnx.merge(graphdef, state)
        for _ in range(n_loops):
            for layer in m.core.layers:
                a = layer.attn
                q = jnp.einsum("bd,dnh->bnh", x_BD, a.wq[...])
                k = jnp.einsum("bd,dkh->bkh", x_BD, a.wk[...])
                v = jnp.einsum("bd,dkh->bkh", x_BD, a.wv[...])
                attn = q + jnp.tile(k + v, (1, q.shape[1] // k.shape[1], 1))
                x_BD = x_BD + jnp.einsum("bnh,nhd->bd", attn, a.wo[...])
                mlp = layer.mlp
                x_BD = x_BD + (jax.nn.silu(x_BD @ mlp.w_gate[...]) * (x_BD @ mlp.w_up[...])) @ mlp.w_down[...]
        return x_BD + m.head(x_BD)[:, : x_BD.shape[1]], None

    run = jax.jit(lambda x: jax.lax.scan(token, x, None, length=iters)[0])
    x = jnp.full((batch, model.cfg.d_model), 0.01, jnp.float32)
    jax.block_until_ready(run(x))
    return 1e3 * statistics.median(timed(lambda: run(x), 3)) / iters


def baseline_generate(rev: str):
    """``generate`` of ``loopjax/generate`` at git revision ``rev``, imported as a separate package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = "loopjax_generate_" + "".join(c for c in rev if c.isalnum())
    where = tempfile.mkdtemp(prefix="decode_baseline_")
    os.makedirs(os.path.join(where, name))
    files = subprocess.run(["git", "-C", root, "ls-tree", "--name-only", rev, "loopjax/generate/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        src = subprocess.run(["git", "-C", root, "show", f"{rev}:{f}"], check=True, capture_output=True,
                             text=True).stdout
        with open(os.path.join(where, name, os.path.basename(f)), "w") as out:
            out.write(src.replace("loopjax.generate", name))
    sys.path.insert(0, where)
    return importlib.import_module(name).generate


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def torch_generate_fn(torch_mod, ref: str, name: str, seq: int):
    """run(prompt [B, P] int32 numpy, n) -> None: greedy ``generate`` of the published PyTorch Ouro model (same
    sizes, float32, random init), n new tokens exactly, KV cache on."""
    import torch

    sizes = {k: v for k, v in CONFIGS[name].items() if k != "n_loops"}
    model = torch_mod.build(ref, sizes, CONFIGS[name]["n_loops"], seq).eval()

    def run(prompt, n):
        with torch.no_grad():
            model.generate(torch.from_numpy(np.asarray(prompt, np.int64)), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True)

    return run


def bench_config(name: str, batches, qs, repeats: int, prompt_len: int, new_tokens: int, modes=MODES,
                 baseline=None, torch_mod=None, torch_ref: str | None = None) -> list[dict]:
    cfg = lj.LoopedConfig(**CONFIGS[name], max_seq_len=prompt_len + new_tokens)
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
    torch_run = None if torch_mod is None else torch_generate_fn(torch_mod, torch_ref, name, prompt_len + new_tokens)
    impls = {"new": lj.generate} if baseline is None else {"new": lj.generate, "base": baseline}
    rows = []
    for b in batches:
        prompt = np.asarray(jax.random.randint(jax.random.key(b), (b, prompt_len), 0, cfg.vocab_size), np.int32)
        floor_ms = weight_floor_ms(model, b, cfg.n_loops)
        for rule in [None] + [lj.QExit(q) for q in qs]:
            calls = {}
            for mode in modes:
                for impl, gen in impls.items():
                    def run(n, mode=mode, gen=gen):
                        return gen(model, prompt, n, exit_rule=rule, kv_mode=mode)
                    out = run(new_tokens)  # compile + warm
                    run(1)
                    calls[mode, impl] = (run, out)
            with_torch = torch_run is not None and rule is None  # its generate runs all loops: fixed L only
            if with_torch:
                torch_run(prompt, new_tokens)  # warm
            times = {key: {"full": [], "prefill": []} for key in list(calls) + [("torch", "torch")] * with_torch}
            loads = []
            for _ in range(repeats):  # interleave modes and implementations
                loads.append(os.getloadavg()[0])
                for key, (run, _) in calls.items():
                    times[key]["full"] += timed(lambda: run(new_tokens).tokens, 1)
                    times[key]["prefill"] += timed(lambda: run(1).tokens, 1)
                if with_torch:
                    times["torch", "torch"]["full"] += timed(lambda: torch_run(prompt, new_tokens), 1)
                    times["torch", "torch"]["prefill"] += timed(lambda: torch_run(prompt, 1), 1)

            def step_s(key):
                t_full, t_pre = statistics.median(times[key]["full"]), statistics.median(times[key]["prefill"])
                return max(t_full - t_pre, 1e-9) / (new_tokens - 1), t_pre

            for m in modes:
                out = calls[m, "new"][1]
                decode_s, t_pre = step_s((m, "new"))
                iters = np.asarray(out.n_iterations)[1:]
                cache = jax.eval_shape(lambda: init_cache(cfg, b, prompt_len + new_tokens, n_loops=cfg.n_loops,
                                                          kv_mode=m))
                row = dict(config=name, batch=b, rule="fixed L" if rule is None else f"QExit({rule.q})",
                           kv_mode=m, decode_tok_s=b / decode_s, ms_per_step=1e3 * decode_s,
                           loop_iters_per_token=float(iters.mean()),
                           mean_exit=float(np.asarray(out.exit_steps)[:, 1:].mean()),
                           prefill_tok_s=b * prompt_len / t_pre,
                           cache_MB=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2 ** 20,
                           weight_floor_ms=floor_ms, load_avg=loads)
                if with_torch:
                    torch_s, _ = step_s(("torch", "torch"))
                    row.update(torch_decode_tok_s=b / torch_s, vs_torch=torch_s / decode_s)
                if baseline is not None:
                    base_s, _ = step_s((m, "base"))
                    base_out = calls[m, "base"][1]
                    row.update(base_ms_per_step=1e3 * base_s, speedup=base_s / decode_s,
                               same_tokens=bool(np.array_equal(np.asarray(base_out.tokens), np.asarray(out.tokens))))
                rows.append(row)
                print(_fmt(rows[-1]), flush=True)
    return rows


HEADER = (f"{'config':7} {'B':>3} {'rule':12} {'kv_mode':12} {'decode tok/s':>12} {'ms/step':>8} {'iters/tok':>9} "
          f"{'mean exit':>9} {'prefill tok/s':>13} {'cache MB':>8} {'floor ms':>8} {'load':>5} {'PyTorch tok/s':>13} "
          f"{'vs PyTorch':>12}")


def _fmt(r: dict) -> str:
    line = (f"{r['config']:7} {r['batch']:>3} {r['rule']:12} {r['kv_mode']:12} {r['decode_tok_s']:12.1f} "
            f"{r['ms_per_step']:8.2f} {r['loop_iters_per_token']:9.2f} {r['mean_exit']:9.2f} "
            f"{r['prefill_tok_s']:13.0f} {r['cache_MB']:8.2f} {r['weight_floor_ms']:8.2f} {max(r['load_avg']):5.1f} ")
    if "torch_decode_tok_s" in r:
        line += f"{r['torch_decode_tok_s']:13.1f} {r['vs_torch']:11.2f}x"
    else:
        line += f"{'-' if r['rule'] != 'fixed L' else 'not measured':>13} {'-':>12}"
    if "speedup" in r:
        line += f" {r['base_ms_per_step']:9.2f} {r['speedup']:7.2f}x {'same' if r['same_tokens'] else 'DIFF'}"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small"], choices=list(CONFIGS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--qs", type=float, nargs="*", default=[0.5, 0.7, 0.85])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--vs-rev", default=None, help="also time loopjax/generate at this git revision, interleaved")
    ap.add_argument("--torch-ref", default=None, metavar="DIR",
                    help="folder with the published Ouro modeling_ouro.py: time its generate side by side")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args(argv)
    baseline = None if args.vs_rev is None else baseline_generate(args.vs_rev)
    torch_mod, torch_why = torch_ouro.if_available(args.torch_ref)
    if torch_why:
        print(f"PyTorch Ouro: not measured ({torch_why})")

    rates = machine_rates()
    print(f"device: {jax.devices()[0].device_kind}, copy {rates['copy_GBps']:.1f} GB/s, "
          f"matmul {rates['matmul_GFLOPs']:.1f} GFLOP/s")
    print(HEADER + ("" if baseline is None else f" {'base ms':>9} {'speedup':>8} tokens"), flush=True)
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.batches, args.qs, args.repeats, args.prompt_len, args.new_tokens,
                             args.modes, baseline, torch_mod, args.torch_ref)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                                                     backend=jax.default_backend(), **rates),
                       torch=torch_why or "measured", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
