"""Reference einsum attention vs chunked attention (and the C++ CPU kernel, cpu_flash, where it builds), causal,
fwd+bwd: time and compiled temp memory.

    python -m benchmarks.attention --seqs 1024 2048 4096 8192 16384 --repeats 3

Prints one table and writes benchmarks/results/attention.json.
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

from loopjax.attention import cpu_kernel
from loopjax.attention.chunked import chunked_attention, default_blocks

# Above this the reference is compiled but not run: at S=8192 (8.0 GiB temp) it reached 15 GiB RSS and was OOM-killed.
REFERENCE_TEMP_LIMIT = 8 * 2**30


def reference(q_BSNH, k_BTKH, v_BTKH, *, q_positions_BS, kv_positions_BT):
    """Naive causal attention with a [B, K, G, S, T] mask (the math of loopjax.attention.reference)."""
    b, s, n, h = q_BSNH.shape
    kh = k_BTKH.shape[2]
    q_BSKGH = q_BSNH.reshape(b, s, kh, n // kh, h)
    scores = jnp.einsum("bskgh,btkh->bkgst", q_BSKGH, k_BTKH, preferred_element_type=jnp.float32)
    visible = (kv_positions_BT[:, None, :] <= q_positions_BS[:, :, None])[:, None, None]
    scores = jnp.where(visible, scores * h**-0.5, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BTKH.dtype)
    return jnp.einsum("bkgst,btkh->bskgh", probs, v_BTKH).reshape(b, s, n, h)


def full_chunked(q, k, v, *, q_positions_BS, kv_positions_BT):
    """Chunked attention with every key visible (all key positions 0): the non-causal cost."""
    return chunked_attention(q, k, v, q_positions_BS=q_positions_BS,
                             kv_positions_BT=jnp.zeros_like(kv_positions_BT))


def fwd_bwd(attn):
    def loss(q, k, v, pos):
        out = attn(q, k, v, q_positions_BS=pos, kv_positions_BT=pos)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def temp_bytes(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--with-full", action="store_true",
                    help="also time chunked attention with no mask (to check causal costs about half)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for s in args.seqs:
        b, n, kh, h = args.batch, args.heads, args.kv_heads, args.head_dim
        q = jnp.asarray(rng.normal(size=(b, s, n, h)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        fns, row = {}, {"seq": s, "blocks": list(default_blocks(s, s))}
        variants = [("reference", reference), ("chunked", chunked_attention)]
        if args.with_full:
            variants.append(("chunked_full", full_chunked))
        if cpu_kernel.available() and jax.default_backend() == "cpu":
            variants.append(("cpu_flash", cpu_kernel.cpu_flash_attention))
        for name, attn in variants:
            compiled = fwd_bwd(attn).lower(q, k, v, pos).compile()
            row[f"{name}_temp_bytes"] = temp_bytes(compiled)
            if name == "reference" and row["reference_temp_bytes"] > REFERENCE_TEMP_LIMIT:
                row["reference_note"] = f"temp above {REFERENCE_TEMP_LIMIT >> 30} GiB: not run"
                continue
            jax.block_until_ready(compiled(q, k, v, pos))  # warm-up
            fns[name] = compiled
        times = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            for name, compiled in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v, pos))
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            row[f"{name}_s"] = min(ts)
        rows.append(row)
        print(f"done S={s}", flush=True)

    def fmt_s(row, name):
        return f"{row[name + '_s']:.3f}" if name + "_s" in row else "—"

    full = " chunked no-mask s | causal / no-mask |" if args.with_full else ""
    flash = any("cpu_flash_s" in row for row in rows)
    flash_head = " cpu_flash s | cpu_flash / chunked time | cpu_flash temp MiB |" if flash else ""
    print("| S | blocks (q, k) | reference s | chunked s | chunked / reference time "
          "| reference temp MiB | chunked temp MiB | temp ratio |" + full + flash_head)
    print("|" + "---|" * (8 + 2 * args.with_full + 3 * flash))
    for row in rows:
        ref_t, ch_t = row.get("reference_s"), row["chunked_s"]
        rt, ct = row["reference_temp_bytes"], row["chunked_temp_bytes"]
        ratio = f"{ch_t / ref_t:.2f}" if ref_t else "reference not run"
        line = (f"| {row['seq']} | {tuple(row['blocks'])} | {fmt_s(row, 'reference')} | {fmt_s(row, 'chunked')} "
                f"| {ratio} | {rt / 2**20:.0f} | {ct / 2**20:.1f} | 1/{rt / ct:.0f} |")
        if args.with_full:
            line += f" {row['chunked_full_s']:.3f} | {ch_t / row['chunked_full_s']:.2f} |"
        if flash:
            line += (f" {row['cpu_flash_s']:.3f} | {row['cpu_flash_s'] / ch_t:.2f} "
                     f"| {row['cpu_flash_temp_bytes'] / 2**20:.1f} |")
        print(line)
    if flash:
        print("(cpu_flash temp: XLA's buffers around the custom call; the kernel's own scratch is a few tiles of "
              f"{cpu_kernel.BLOCK_Q} x {cpu_kernel.BLOCK_K} floats per thread, outside memory_analysis)")
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "repeats": args.repeats, "with_full": args.with_full,
            "dtype": "float32", "mask": "causal", "measured": "fwd+bwd (value_and_grad wrt q, k, v)",
            "cpu_flash_blocks": [cpu_kernel.BLOCK_Q, cpu_kernel.BLOCK_K] if flash else None}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
