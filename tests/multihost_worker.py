"""Worker for ``tests/test_multihost.py``: a few AdamW steps of a tiny model on a mesh over every process's devices.

    python tests/multihost_worker.py [--coordinator HOST:PORT --num-processes N --process-id I] [--steps 3]

Each process loads only its own rows of every global batch (``process_batch_rows``) and assembles the global
array with ``shard_batch``; without ``--coordinator`` it is a single process holding the whole batch. Prints one
JSON line: process index and count, global device count, the rows it loaded, the loss of every step and the
sum of squares of the final parameters.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import loopjax as lj
from loopjax.sharding import (create_sharded, init_distributed, make_mesh, param_shardings, process_batch_rows,
                              rules_for, shard_batch, use_rules)

CFG = lj.LoopedConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=2,
                      max_seq_len=16, norm_scheme="sandwich", step_norm=True, init_std=0.1)
GLOBAL_BATCH, SEQ = 8, 16


def loss_fn(model: lj.LoopedLM, tokens_BS: jax.Array) -> jax.Array:
    """Mean next-token CE over every loop's logits (the head runs at each loop)."""
    logits_TBSV = model(tokens_BS, return_steps=True).step_logits[:, :, :-1]
    logp = jax.nn.log_softmax(logits_TBSV)
    return -jnp.take_along_axis(logp, tokens_BS[None, :, 1:, None], axis=-1).mean()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    init_distributed(args.coordinator, args.num_processes, args.process_id)  # idempotent
    jax.config.update("jax_default_matmul_precision", "highest")

    mesh_cfg = lj.MeshConfig(data=2, fsdp=-1, rules="fsdp")
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg.rules)

    def build():
        model = lj.LoopedLM(CFG, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.1), wrt=nnx.Param)

    graphdef, state = nnx.split(create_sharded(build, mesh, rules))
    shardings = param_shardings(state, mesh, rules)
    scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, tokens_BS):
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens_BS)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    step = jax.jit(step, donate_argnums=0, out_shardings=(shardings, scalar))
    rows = process_batch_rows(mesh, rules, GLOBAL_BATCH)
    losses = []
    for i in range(args.steps):
        global_BS = np.random.default_rng(i).integers(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ), dtype=np.int32)
        with use_rules(mesh, rules):
            state, loss = step(state, shard_batch(global_BS[rows], mesh, rules))
        losses.append(float(loss))
    params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
    sq = jax.jit(lambda p: sum(jnp.sum(x * x) for x in jax.tree.leaves(p)), out_shardings=scalar)(params)
    print(json.dumps({"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
                      "rows": [rows.start, rows.stop], "losses": losses, "param_sq": float(sq)}), flush=True)


if __name__ == "__main__":
    main()
