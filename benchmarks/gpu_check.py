"""One-shot GPU check: cuDNN attention against the chunked (flash-style, pure JAX) attention, then train-step
throughput and MFU of a ~350M-parameter looped model in bf16 compute.

    python -m benchmarks.gpu_check                 # on an H100 / H200; JSON to $OUT/gpu_check.json if $OUT is set
    python -m benchmarks.gpu_check --cpu-smoke     # tiny sizes on CPU, no cuDNN: checks the script runs

Part 1, for several shapes (causal, GQA, packed segments, sliding window): the outputs and the gradients w.r.t.
q, k, v of ``loopjax.attention.attend(..., impl="cudnn")`` and ``impl="chunked"`` in bf16, each compared with the
float32 ``impl="reference"``; cuDNN passes when its error is at most 2x chunked's plus a small absolute floor.
Part 2: the jitted train step ``loopjax train`` runs (``build_train_step``: float32 master weights, bfloat16
compute, the Ouro objective with the chunked per-loop CE, AdamW) on one device, for each attention backend;
tokens/s and MFU = model FLOPs (causal attention counted once, ``train_flops(causal=True)``) / step time / peak.
Prints one table per part and writes JSON. Imports nothing that needs grain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12, "l4": 121e12}


def device_peak(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind string (None when unknown)."""
    low = kind.lower()
    for name, peak in PEAK_BF16.items():
        if name in low:
            return peak
    return None


# ------------------------------------------------------------------------------------------------ part 1

def attention_cases(smoke: bool) -> list[dict]:
    """Shapes to compare: (B, S, N, K, H) with causal masking, packing and a sliding window."""
    if smoke:
        return [dict(name="causal", b=2, s=64, n=4, k=2, h=32)]
    return [dict(name="causal_mha", b=2, s=1024, n=8, k=8, h=128),
            dict(name="causal_gqa", b=2, s=2048, n=16, k=4, h=128),
            dict(name="causal_gqa_h64", b=4, s=1024, n=16, k=16, h=64),
            dict(name="packed_segments", b=2, s=1024, n=8, k=2, h=128, segments=3),
            dict(name="sliding_window", b=2, s=2048, n=8, k=8, h=128, window=512)]


def _inputs(case: dict, seed: int):
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    b, s, n, k, h = (case[x] for x in "bsnkh")
    q = jax.random.normal(kq, (b, s, n, h), jnp.float32)
    key = jax.random.normal(kk, (b, s, k, h), jnp.float32)
    v = jax.random.normal(kv, (b, s, k, h), jnp.float32)
    dout = jax.random.normal(kg, (b, s, n, h), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    seg = None
    if case.get("segments"):
        cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, s), case["segments"] - 1, replace=False))
        seg_np = np.zeros((b, s), np.int32)
        for c in cuts:
            seg_np[:, c:] += 1
        seg = jnp.asarray(seg_np)
        starts = np.concatenate([[0], cuts])
        pos = jnp.asarray(np.broadcast_to(np.arange(s) - starts[seg_np[0]], (b, s)).astype(np.int32))
    return q, key, v, dout, pos, seg


def _values_and_grads(attend, impl: str, dtype, case: dict, inputs):
    q, k, v, dout, pos, seg = inputs

    def f(q, k, v):
        return attend(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                      sliding_window=case.get("window"), impl=impl)

    def run(q, k, v):
        out, vjp = jax.vjp(f, q.astype(dtype), k.astype(dtype), v.astype(dtype))
        return (out, *vjp(dout.astype(out.dtype)))

    return [np.asarray(x, np.float32) for x in jax.jit(run)(q, k, v)]


def check_attention(smoke: bool) -> list[dict]:
    """Rows: per case, the max abs error of out / dq / dk / dv of cudnn and chunked (bf16) vs reference (f32)."""
    try:
        from loopjax.attention import attend
    except ImportError as err:
        return [{"case": "-", "status": f"skipped: loopjax.attention.attend not importable ({err})"}]
    impls = ["chunked"] if smoke else ["cudnn", "chunked"]
    rows = []
    for i, case in enumerate(attention_cases(smoke)):
        inputs = _inputs(case, seed=i)
        ref = _values_and_grads(attend, "reference", jnp.float32, case, inputs)
        errs = {}
        row = {"case": case["name"], **{k: case[k] for k in "bsnkh"}, "window": case.get("window"),
               "segments": case.get("segments", 1)}
        for impl in impls:
            try:
                got = _values_and_grads(attend, impl, jnp.bfloat16, case, inputs)
                errs[impl] = [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)]
                for name, e in zip(("out", "dq", "dk", "dv"), errs[impl]):
                    row[f"{impl}_{name}_err"] = e
            except Exception as err:  # report the failure and go on with the other backends / cases
                row[f"{impl}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if "cudnn" in errs and "chunked" in errs:
            ok = all(c <= 2 * h + 2e-2 for c, h in zip(errs["cudnn"], errs["chunked"]))
            row["status"] = "pass" if ok else "FAIL"
        else:
            row["status"] = "pass" if errs and not any(k.endswith("_error") for k in row) else "error"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ part 2

def bench_model(smoke: bool, **overrides):
    """A ~350M-parameter looped model (16 layers of width 1024 looped 4x, untied 32k vocab), or a tiny one."""
    from loopjax.config import LoopedConfig

    if smoke:
        base = dict(vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, n_loops=2,
                    max_seq_len=64)
    else:
        base = dict(vocab_size=32768, d_model=1024, n_heads=16, n_kv_heads=16, head_dim=64, d_ff=4096, n_layers=16,
                    n_loops=4, max_seq_len=4096, norm_scheme="sandwich", step_norm=True, tie_embeddings=False)
    base.update(param_dtype="float32", compute_dtype="bfloat16", remat_policy="full")
    base.update(overrides)
    return LoopedConfig(**base)


def time_train_step(model_cfg, seq_len: int, batch: int, steps: int, warmup: int) -> dict:
    """Compile and time the real train step on one device; returns step time, tokens/s, MFU."""
    from loopjax import sharding as shd
    from loopjax.config import HaltingConfig, MeshConfig, TrainConfig
    from loopjax.flops import train_flops
    from loopjax.train.compiled import build_train_step

    tcfg = TrainConfig(steps=1000, batch_size=batch, seq_len=seq_len, warmup_steps=10,
                       objective=HaltingConfig(objective="ouro", chunked=True), mesh=MeshConfig(data=1))
    device = jax.devices()[0]
    mesh = shd.make_mesh(tcfg.mesh, [device])
    program = build_train_step(model_cfg, tcfg, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state.params))
    with shd.use_rules(mesh, program.rules):
        state = jax.jit(program.build, out_shardings=program.state_shardings)()
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
        rows = shd.batch_sharding(mesh, program.rules)
        batch_d = {"inputs": jax.device_put(tokens[:, :-1], rows), "targets": jax.device_put(tokens[:, 1:], rows)}
        t0 = time.perf_counter()
        compiled = program.step.lower(state, batch_d).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = compiled(state, batch_d)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch_d)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
    mem = compiled.memory_analysis()
    flops = batch * train_flops(model_cfg, seq_len, readouts=model_cfg.n_loops, causal=True)
    peak = device_peak(device.device_kind)
    return {"params_m": n_params / 1e6, "seq": seq_len, "batch": batch, "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": batch * seq_len / step_s, "model_tflop_per_step": flops / 1e12,
            "tflops_per_s": flops / step_s / 1e12, "mfu": None if peak is None else flops / step_s / peak,
            "temp_gib": mem.temp_size_in_bytes / 2 ** 30 if mem is not None else None,
            "loss": float(metrics["loss"])}


def throughput_rows(smoke: bool, impls: list[str], seq: int, batch: int, steps: int) -> list[dict]:
    from loopjax.config import LoopedConfig

    has_impl = "attention_impl" in {f.name for f in dataclasses.fields(LoopedConfig)}
    rows = []
    for impl in (impls if has_impl else ["(default)"]):
        cfg = bench_model(smoke, **({"attention_impl": impl} if has_impl else {}))
        row = {"attention": impl, "layers": cfg.n_layers, "loops": cfg.n_loops, "d_model": cfg.d_model}
        try:
            row.update(time_train_step(cfg, seq, batch, steps, warmup=1 if smoke else 3))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            traceback.print_exc()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ output

def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    keys = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, chunked/reference only")
    p.add_argument("--seq", type=int, default=None, help="train-step sequence length (default 2048; smoke 32)")
    p.add_argument("--batch", type=int, default=None, help="train-step batch (default 8; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--impls", default=None, help="attention backends to time (default cudnn,chunked; smoke chunked)")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/gpu_check.json when $OUT is set)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    devices = jax.devices()
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
           "devices": len(devices), "peak_bf16_tflops": (device_peak(devices[0].device_kind) or 0) / 1e12,
           "python": sys.version.split()[0]}
    print(json.dumps(env))
    if not smoke and env["backend"] != "gpu":
        print("gpu_check: no GPU backend (pass --cpu-smoke to run the tiny CPU version)", file=sys.stderr)
        return 2
    attn = check_attention(smoke)
    print("\n## attention: bf16 backends vs float32 reference (max abs error)\n")
    print(table(attn, ["case", "b", "s", "n", "k", "h", "window", "segments", "cudnn_out_err", "chunked_out_err",
                       "cudnn_dq_err", "chunked_dq_err", "cudnn_dk_err", "chunked_dk_err", "cudnn_dv_err",
                       "chunked_dv_err", "cudnn_error", "chunked_error", "status"]))
    impls = (args.impls or ("chunked" if smoke else "cudnn,chunked")).split(",")
    perf = throughput_rows(smoke, impls, args.seq or (32 if smoke else 2048), args.batch or (2 if smoke else 8),
                           args.steps or (2 if smoke else 10))
    print("\n## train step (fp32 params, bf16 compute, Ouro objective, AdamW, remat full)\n")
    print(table(perf, ["attention", "params_m", "layers", "loops", "d_model", "seq", "batch", "compile_s", "step_s",
                       "tokens_per_s", "tflops_per_s", "mfu", "temp_gib", "loss", "error"]))
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"env": env, "attention": attn, "train_step": perf}, f, indent=1)
        print(f"\nwrote {path}")
    failed = any(r.get("status") == "FAIL" for r in attn) or any("error" in r for r in perf)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
