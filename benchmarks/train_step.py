"""Train-step throughput: tokens/s and model FLOP utilisation against a matmul peak measured in the same run.

    python -m benchmarks.train_step [--configs small medium] [--steps 5] [--remat none] [--out benchmarks/results/train_step.json]

Ouro-style models (sandwich norm, step norm, exit gate, untied head) trained with AdamW on Ouro's expected loss
Σ_t p_t·CE_t − β·H(p) over every loop's logits, so the LM head runs at every loop. One jitted step with donated
state. ``small`` = vocab 4096, d_model 256, 4 layers, 8 heads / 8 KV heads, d_ff 1024, 4 loops, batch 8 x 256;
``medium`` = vocab 8192, d_model 512, 8 layers, 8 heads, d_ff 1408, 4 loops, batch 4 x 256.

Model FLOPs are ``lj.train_flops(cfg, S, L, readouts=L)`` (matmuls only, 3x forward; remat recomputation is not
counted). The peak is the best FLOP/s of a square matmul in the compute dtype on the same device, measured just
before. float32 on CPU; on a GPU the same script computes in bfloat16 (parameters and AdamW state float32).
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
import optax
from flax import nnx

import loopjax as lj
from loopjax import halting

CONFIGS = {
    "small": (dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1024), 8, 256),
    "medium": (dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408), 4, 256),
}
# Published PyTorch Ouro implementation on this machine class (2 cores, fp32), from the issue.
ANCHOR_TOKENS_PER_S = {"small": 590.0, "medium": 125.0}
ENTROPY_BETA = 0.05


def model_config(name: str, compute_dtype: str, remat: str, seq: int) -> lj.LoopedConfig:
    sizes, _, _ = CONFIGS[name]
    return lj.LoopedConfig(**sizes, n_loops=4, max_seq_len=seq, norm_scheme="sandwich", step_norm=True,
                           exit_gate=True, tie_embeddings=False, rope_theta=1e6, param_dtype="float32",
                           compute_dtype=compute_dtype, remat_policy=remat)


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


def matmul_peak(dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an n x n @ n x n matmul (random data) in ``dtype``."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bench(name: str, compute_dtype: str, remat: str, steps: int, batch: int | None, seq: int | None) -> dict:
    _, b, s = CONFIGS[name]
    b, s = batch or b, seq or s
    cfg = model_config(name, compute_dtype, remat, s)
    step, state, n_params = make_train_step(cfg)
    tokens = [jax.random.randint(jax.random.key(10 + i), (b, s), 0, cfg.vocab_size) for i in range(steps + 1)]
    t0 = time.perf_counter()
    compiled = step.lower(state, tokens[0]).compile()
    compile_s = time.perf_counter() - t0
    state, loss = compiled(state, tokens[0])  # warm-up
    jax.block_until_ready(loss)
    times, losses = [], []
    for t in tokens[1:]:
        t0 = time.perf_counter()
        state, loss = compiled(state, t)
        losses.append(float(loss))  # forces completion of the step
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = b * lj.train_flops(cfg, s, cfg.n_loops, readouts=cfg.n_loops)
    return dict(config=name, batch=b, seq=s, params=n_params, compile_s=compile_s, step_s=step_s, step_s_all=times,
        tokens_per_s=b * s / step_s, model_flops_per_step=flops, achieved_flops=flops / step_s,
        losses=losses, remat=remat, compute_dtype=compute_dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["small", "medium"], choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots", "minimal", "save_qkv"])
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch (quick runs)")
    ap.add_argument("--seq", type=int, default=None, help="override the config's sequence length (quick runs)")
    ap.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 1024 CPU, 8192 GPU)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    on_accel = backend in ("gpu", "tpu")
    compute_dtype = "bfloat16" if on_accel else "float32"
    peak = matmul_peak(jnp.dtype(compute_dtype), args.matmul_n or (8192 if on_accel else 1024), repeats=10)
    rows = [bench(name, compute_dtype, args.remat, args.steps, args.batch, args.seq) for name in args.configs]
    for r in rows:
        r["mfu"] = r["achieved_flops"] / peak
        anchor = ANCHOR_TOKENS_PER_S.get(r["config"]) if not on_accel and not (args.batch or args.seq) else None
        r["vs_pytorch_anchor"] = r["tokens_per_s"] / anchor if anchor else None

    print(f"backend={backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"compute {compute_dtype}, remat={args.remat}, matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| config | params | batch x seq | compile (s) | step (s) | tokens/s | GFLOP/s | MFU | vs PyTorch anchor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_pytorch_anchor']:.2f}x" if r["vs_pytorch_anchor"] else "-"
        print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq']} | {r['compile_s']:.1f} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['achieved_flops'] / 1e9:.1f} | "
              f"{100 * r['mfu']:.1f}% | {ratio} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(backend=backend, device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                       jax=jax.__version__, platform=platform.platform(), matmul_peak_flops=peak,
                       load_avg=os.getloadavg(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
