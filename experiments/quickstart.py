"""Quickstart: build a tiny looped LM, print its size and FLOPs per loop, and read logits out after every loop.

    python -m experiments.quickstart
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import loopjax as lj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--loops", type=int, default=8)
    args = parser.parse_args(argv)

    cfg = lj.tiny(norm_scheme="sandwich", step_norm=True)
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
    tokens_BS = jax.random.randint(jax.random.key(1), (2, args.seq_len), 0, cfg.vocab_size)

    print(f"devices: {jax.devices()}")
    print(f"parameters: {lj.count_params(model):,} (independent of the loop count)")
    per_loop = lj.forward_flops(cfg, args.seq_len, 2) - lj.forward_flops(cfg, args.seq_len, 1)
    print(f"forward FLOPs per sequence of {args.seq_len}: 1 loop {lj.forward_flops(cfg, args.seq_len, 1):,}, "
          f"each extra loop {per_loop:,}")

    forward = nnx.jit(lambda m, t: m(t, n_loops=args.loops, return_steps=True), static_argnums=())
    out = forward(model, tokens_BS)
    targets = tokens_BS[:, 1:]
    print(f"{'loop':>4} {'CE vs next token':>16} {'mean exit p':>11} {'|Δh|/|h|':>9}")
    for t in range(args.loops):
        logp = jax.nn.log_softmax(out.step_logits[t, :, :-1])
        ce = -jnp.take_along_axis(logp, targets[..., None], -1).mean()
        p = out.exit_pdf[..., t].mean()
        delta = jnp.nan if t == 0 else (jnp.linalg.norm(out.step_hidden[t] - out.step_hidden[t - 1])
                                       / jnp.linalg.norm(out.step_hidden[t]))
        print(f"{t + 1:>4} {float(ce):>16.4f} {float(p):>11.4f} {float(delta):>9.4f}")


if __name__ == "__main__":
    main()
