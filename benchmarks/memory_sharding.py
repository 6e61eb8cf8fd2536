"""Memory banks under FSDP: shard the banks' slot axis or their model axis? Compiled train-step memory and
collectives on an 8-device host mesh, per rule.

    python -m benchmarks.memory_sharding [--d-model 256] [--slots 1024,512] [--json out.json]
    python -m benchmarks.memory_sharding --topology v5p:2x2x4 --seq 2048 --batch 16   # frey_200m, TPU AOT

For each placement of the [slots, D] banks ("slots": memory_slots -> fsdp; "model": memory_embed -> fsdp) it
compiles one AdamW train step (the Trainer's) of a small memory model with rules "fsdp" on fsdp=8 and prints
per-device argument / temp bytes from ``memory_analysis()``, the collectives in the HLO and the step time.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import loopjax as lj  # noqa: E402
from loopjax import sharding as shd  # noqa: E402
from loopjax.config import MeshConfig, TrainConfig  # noqa: E402
from loopjax.train.optim import make_optimizer  # noqa: E402
from loopjax.train.state import model_graphdef, state_builder  # noqa: E402
from loopjax.train.step import make_train_step  # noqa: E402

PLACEMENTS = {"slots": dict(memory_slots="fsdp", memory_embed=None),
              "model": dict(memory_slots=None, memory_embed="fsdp")}


def measure(cfg: lj.LoopedConfig, placement: str, batch: int, seq: int) -> dict:
    tcfg = TrainConfig(steps=10, batch_size=batch, seq_len=seq, warmup_steps=0,
                       mesh=MeshConfig(data=1, fsdp=8, rules="fsdp"))
    mesh, rules = shd.make_mesh(tcfg.mesh), shd.rules_for("fsdp").replace(**PLACEMENTS[placement])
    tx, schedule = make_optimizer(tcfg)
    abstract = jax.eval_shape(state_builder(cfg, tx, 0))
    shardings = shd.param_shardings(abstract, mesh, rules)
    from loopjax.train.state import leafwise
    state_sh = leafwise(shardings, abstract)
    step = make_train_step(model_graphdef(cfg), tcfg, tx, schedule)
    batch_sh = shd.batch_sharding(mesh, rules)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    with shd.use_rules(mesh, rules):
        jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = jitted.lower(abstract, jax.eval_shape(lambda: data)).compile()
        compile_s = time.perf_counter() - t0
        state = jax.jit(state_builder(cfg, tx, 0), out_shardings=state_sh)()
        batch_arr = jax.device_put(data, batch_sh)
        state, _ = compiled(state, batch_arr)
        jax.block_until_ready(state)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch_arr)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    return dict(placement=placement, argument_mib=mem.argument_size_in_bytes / 2**20,
                temp_mib=mem.temp_size_in_bytes / 2**20, **_collectives(compiled.as_text()),
                compile_s=compile_s, step_s=float(np.median(times)))


def measure_tpu(placement: str, topology: str, batch: int, seq: int) -> dict:
    """``frey_200m``'s train step compiled for a TPU topology (``loopjax aot``'s compile, FSDP over every chip)
    with the banks placed by ``placement``: per-chip argument and temp bytes."""
    from loopjax import aot

    n = int(np.prod(aot.parse_topology(topology)[1]))
    target = aot.resolve_target("frey_200m", seq=seq, batch=batch, mesh=MeshConfig(data=1, fsdp=n, rules="fsdp"))
    saved = dict(shd._RULE_TABLE)
    for name, axis in PLACEMENTS[placement].items():
        shd._RULE_TABLE[name] = ((), (() if axis is None else (axis,)), (() if axis is None else (axis,)))
    try:
        compiled, compile_s = aot._compile(target, aot.topology_devices(topology), unroll=False)
    finally:
        shd._RULE_TABLE.clear()
        shd._RULE_TABLE.update(saved)
    mem = compiled.memory_analysis()
    return dict(placement=placement, argument_mib=mem.argument_size_in_bytes / 2**20,
                temp_mib=mem.temp_size_in_bytes / 2**20, **_collectives(compiled.as_text()),
                compile_s=compile_s, step_s=float("nan"))


def _collectives(hlo: str) -> dict[str, int]:
    return {f"{name.replace('-', '_')}s": len(re.findall(rf"= \S+ {name}(?:-start)?\(", hlo))
            for name in ("all-gather", "reduce-scatter", "all-reduce")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--slots", default="1024,512", help="local,global slots")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--topology", help="compile frey_200m for this TPU topology instead (needs libtpu)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.topology:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
        os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        rows = [measure_tpu(p, args.topology, args.batch, args.seq) for p in PLACEMENTS]
        print(f"frey_200m on {args.topology}, batch={args.batch} seq={args.seq}, FSDP over every chip")
        _table(rows, args.json, dict(topology=args.topology, batch=args.batch, seq=args.seq))
        return
    local, glob = map(int, args.slots.split(","))
    d = args.d_model
    cfg = lj.LoopedConfig(vocab_size=512, d_model=d, n_heads=4, d_ff=4 * d, n_layers=2, n_loops=2,
                          max_seq_len=args.seq, memory_local_slots=local, memory_global_slots=glob,
                          exit_gate=False)
    rows = [measure(cfg, p, args.batch, args.seq) for p in PLACEMENTS]
    print(f"d_model={d} slots={local}/{glob} batch={args.batch} seq={args.seq}, fsdp=8 host devices")
    _table(rows, args.json, dict(d_model=d, local=local, glob=glob, batch=args.batch, seq=args.seq))


def _table(rows: list[dict], json_path: str | None, config: dict) -> None:
    print("| banks sharded over | args MiB/dev | temp MiB/dev | all-gather | reduce-scatter | all-reduce | compile s "
          "| step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['placement']} axis | {r['argument_mib']:.2f} | {r['temp_mib']:.2f} | {r['all_gathers']} | "
              f"{r['reduce_scatters']} | {r['all_reduces']} | {r['compile_s']:.1f} | {r['step_s']:.3f} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(config=config, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
