"""``loopjax aot``: compile the real train step for a TPU topology on a CPU host and report per-chip memory, an
honest FLOP count, an estimated step time and MFU.

    loopjax aot ouro_1_4b --topology v5p:2x2x4 --seq 4096 --batch 16 --mesh fsdp=16 --json out.json

How the numbers are made (each compile runs in a worker subprocess started with ``TPU_ACCELERATOR_TYPE`` and
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``, so libtpu compiles for a topology it does not have):

- **Memory** comes from the real program: ``build_train_step`` (what ``Trainer`` runs: scans, remat, shardings,
  donated state) lowered inside ``use_rules`` and compiled. Per chip, ``memory_analysis()`` gives argument,
  output, alias (donated outputs reusing argument buffers) and temp bytes; total = argument + output − alias +
  temp. Where XLA refuses to compile because the temporaries exceed the chip's HBM ("RESOURCE_EXHAUSTED: Ran out
  of memory on HBM"), the report says so instead: ``fits`` False, ``oom`` (XLA's message), ``temp_gib`` (the
  temporaries XLA says it needs), no total and no cost.
- **FLOPs and time** cannot come from that program: XLA's ``cost_analysis`` counts a while-loop body once, and
  the step has several (the scan over loops, the chunked objective's scan over loops, gradient accumulation, and
  the "windowed einsum" loops the TPU compiler makes of FSDP all-gather / reduce-scatter matmuls). So a second
  worker, with windowed einsum switched off in ``LIBTPU_INIT_ARGS``, compiles costing variants of the same step
  with every ``lax.scan`` fully unrolled and remat recompute kept from CSE (``costing_trace``) for
  n_layers ∈ {1, 2} × n_loops ∈ {1, 2}, checks their HLO holds no while loop, and fits each quantity as
  a + b·L + c·T + d·L·T (per-layer optimizer work ∝ L, per-loop read-out ∝ T, layer work ∝ L·T), evaluated at
  the model's (L, T). ``cost_mode="full"`` compiles one
  unrolled variant at the model's own (L, T) instead (slow for big models; the tests compare the two).
- **Pallas kernels** are custom calls XLA cannot cost. Splash attention kernels are found by name in the
  variants' HLO (``splash_mha_fwd`` / ``_dq`` / ``_dkv``), counted and fitted like the rest (so remat
  recomputing the forward is counted), and costed analytically: one unit = 2·(attended pairs)·N·H FLOPs per
  sequence (causal: S²/2 pairs); fwd = 2 units, dq = 3, dkv = 4 (5 when fused with dq). Their time is their
  FLOPs at the calibrated peak: the FLOP/s ``optimal_seconds`` gives a bf16 8192³ matmul on that chip.
- est_step_s = fitted ``optimal_seconds`` + kernel time (``est_basis`` "optimal_seconds"); where XLA's cost model
  gives no time (negative ``optimal_seconds``: libtpu 0.0.42 counts −1 s for each op it cannot cost, e.g. every
  cross-slice DCN collective of a multi-slice topology and some ops of v5e / v6e train steps), all
  FLOPs at the calibrated peak (``est_basis`` "flops_at_peak", a warning says est_mfu is then an upper bound);
  est_mfu = model FLOPs / (chips · peak · est_step_s),
  where model FLOPs are ``train_flops(..., causal=True)`` (causal attention counted once, no remat).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

from loopjax.config import (MESH_AXES, SHARDING_PRESETS, HaltingConfig, LoopedConfig, MeshConfig, TrainConfig,
                            frey_200m, ouro_1_4b, ouro_2_6b, tiny)

GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip bf16 dense peak FLOP/s and HBM GiB of a TPU generation."""

    peak_flops: float
    hbm_gib: float


TPU_CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec(275e12, 32.0),
    "v5e": ChipSpec(197e12, 16.0),
    "v5p": ChipSpec(459e12, 95.0),
    "v6e": ChipSpec(918e12, 32.0),
}
PRESETS = {"tiny": tiny, "ouro_1_4b": ouro_1_4b, "ouro_2_6b": ouro_2_6b, "frey_200m": frey_200m}
NO_WINDOWED_EINSUM = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
COST_VARIANTS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (n_layers, n_loops) of the costing compiles
HEADROOM = 0.2  # --sweep-remat recommends the fastest policy leaving this fraction of HBM free
_KERNEL_UNITS = {"fwd": 2, "dq": 3, "dkv": 4}  # matmul units per splash kernel call (see module docstring)
_SPLASH_RE = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")
_WHILE_RE = re.compile(r"[\])}]\s+while\(")
INSTALL_HINT = ("install the TPU extra with `pip install -e '.[tpu]'` (from the loopjax checkout), or "
                "`pip install \"jax[tpu]=={jax}\"`")


@dataclasses.dataclass(frozen=True)
class AotTarget:
    """What is compiled: a model and its training run (the same pair ``loopjax train`` builds)."""

    model: LoopedConfig
    train: TrainConfig


# ------------------------------------------------------------------------------------------------ inputs

def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p:2x2x4"`` -> ("v5p", (2, 2, 4)); a ValueError naming ``--topology`` otherwise."""
    gen, sep, dims = str(name).partition(":")
    if gen not in TPU_CHIPS or not sep or not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", dims):
        raise ValueError(f"--topology={name!r}: must be GEN:AxB or GEN:AxBxC with GEN one of {tuple(TPU_CHIPS)}, "
                         "e.g. v5p:2x2x4, v5e:4x4, v6e:4x4")
    return gen, tuple(int(d) for d in dims.split("x"))


def parse_mesh(text: str) -> MeshConfig:
    """``"fsdp=16"`` / ``"data=2,fsdp=-1,tensor=2,rules=fsdp_tp"`` -> MeshConfig.

    Unnamed axes are 1. Without ``rules``: "fsdp_tp" if tensor > 1, else "fsdp" if fsdp != 1, else "dp".
    """
    fields: dict[str, Any] = {"data": 1, "fsdp": 1, "tensor": 1}
    rules = None
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in (*MESH_AXES, "rules"):
            raise ValueError(f"--mesh={text!r}: item {item!r} must be AXIS=SIZE with AXIS one of {MESH_AXES}, or "
                             f"rules=PRESET with PRESET one of {SHARDING_PRESETS}")
        if key == "rules":
            rules = value.strip()
            continue
        try:
            fields[key] = int(value)
        except ValueError:
            raise ValueError(f"--mesh={text!r}: {key}={value!r} must be an int >= 1 or -1") from None
    if rules is None:
        rules = "fsdp_tp" if fields["tensor"] > 1 else "fsdp" if fields["fsdp"] != 1 else "dp"
    try:
        return MeshConfig(**fields, rules=rules)
    except ValueError as err:
        raise ValueError(f"--mesh={text!r}: {err}") from None


def resolve_target(config: str, *, seq: int | None = None, batch: int | None = None,
                   mesh: MeshConfig | None = None, overrides: Sequence[str] = ()) -> AotTarget:
    """The model and run to compile.

    ``config``: a preset name (``tiny``, ``ouro_1_4b``, ``ouro_2_6b``, ``frey_200m``), trained as ``loopjax train``
    would (float32 master weights, bfloat16 compute, the Ouro objective with the chunked per-loop CE, AdamW;
    default seq 2048, batch 16, FSDP over every chip), or an experiment config as ``loopjax train`` takes it.
    ``overrides``: ``model.KEY=VALUE`` / ``train.KEY=VALUE`` (dotted paths, as ``--set``).
    """
    from loopjax.train.experiment import apply_overrides, load_experiment

    preset = config in PRESETS
    if preset:
        model = PRESETS[config](param_dtype="float32", compute_dtype="bfloat16")
        train = TrainConfig(batch_size=16, seq_len=2048, warmup_steps=100,
                            # the exit gate's objective where the model has one (frey_200m has none)
                            objective=HaltingConfig(objective="ouro" if model.exit_gate else "final",
                                                    chunked=True),
                            mesh=MeshConfig(data=1, fsdp=-1, rules="fsdp"))
        target = apply_overrides(AotTarget(model, train), overrides)
    else:
        exp = load_experiment(config, overrides)
        target = AotTarget(exp.model, exp.train)
    model, train = target.model, target.train
    for flag, field, value in (("--seq", "seq_len", seq), ("--batch", "batch_size", batch)):
        if value is not None:
            try:
                train = train.replace(**{field: value})
            except ValueError as err:
                raise ValueError(f"{flag}={value!r}: {err}") from None
    if mesh is not None:
        train = train.replace(mesh=mesh)
    if train.seq_len > model.max_seq_len:
        if not preset:
            raise ValueError(f"--seq={train.seq_len}: must be <= the model's max_seq_len={model.max_seq_len}")
        model = model.replace(max_seq_len=train.seq_len)
    return AotTarget(model, train)


def libtpu_problem() -> str | None:
    """None when a libtpu matching the installed jax is importable, else what to do about it."""
    import importlib.metadata as md
    import importlib.util

    import jax

    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed: " + INSTALL_HINT.format(jax=jax.__version__)
    try:
        have = md.version("libtpu")
        want = [r.split(";")[0].split("==")[1].strip() for r in (md.requires("jax") or [])
                if r.startswith("libtpu") and "==" in r and 'extra == "tpu"' in r]
    except md.PackageNotFoundError:
        return None
    if want and not _version_matches(have, want[0]):
        return (f"libtpu {have} does not match jax {jax.__version__} (which wants libtpu=={want[0]}): "
                + INSTALL_HINT.format(jax=jax.__version__))
    return None


def _version_matches(have: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        prefix = pattern[:-2]
        return have == prefix or have.startswith(prefix + ".")
    return have == pattern


# ------------------------------------------------------------------------------------------------ worker side

@contextlib.contextmanager
def costing_trace() -> Iterator[None]:
    """While tracing inside: every ``lax.scan`` (and so ``lax.map`` and static ``fori_loop``) fully unrolls, and
    every ``jax.checkpoint`` prevents CSE.

    Used only for costing variants: their HLO then has no while loop that ``cost_analysis`` would count once,
    and XLA cannot merge a remat recompute with the original forward now that no loop boundary separates them
    (in the scanned program the forward and backward bodies are different while loops, so it never can).
    """
    import jax
    from jax._src.lax.control_flow import loops

    scan0, checkpoint0 = loops.scan, jax.checkpoint

    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
        return scan0(f, init, xs, length, reverse=reverse, unroll=True, _split_transpose=_split_transpose)

    def checkpoint(fun, *, prevent_cse=True, **kwargs):
        return checkpoint0(fun, prevent_cse=True, **kwargs)

    loops.scan, jax.lax.scan, jax.checkpoint = scan, scan, checkpoint
    try:
        yield
    finally:
        loops.scan, jax.lax.scan, jax.checkpoint = scan0, scan0, checkpoint0


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Abstract TPU devices of ``topology`` (``num_slices`` slices); needs libtpu."""
    from jax.experimental import topologies

    _, dims = parse_topology(topology)
    bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=num_slices)
    except Exception as err:  # libtpu raises its own runtime error type
        raise ValueError(f"--topology={topology!r} (--num-slices={num_slices}): libtpu rejects it: "
                         f"{str(err).splitlines()[0]}") from None
    return list(desc.devices)


def _compile(target: AotTarget, devices: list, unroll: bool, packed: bool = False) -> tuple[Any, float]:
    import numpy as np

    from loopjax import sharding as shd
    from loopjax.train.compiled import build_train_step

    tcfg = target.train
    try:
        mesh = shd.make_mesh(tcfg.mesh, devices)
    except ValueError as err:
        m = tcfg.mesh
        raise ValueError(f"--mesh data={m.data},fsdp={m.fsdp},tensor={m.tensor},rules={m.rules} on "
                         f"{len(devices)} chips: {err}") from None
    program = build_train_step(target.model, tcfg, mesh)
    shards = int(np.prod([mesh.shape[a] for a in program.rules.mesh_axes("activation_batch")]))
    if tcfg.batch_size % (shards * tcfg.grad_accum):
        raise ValueError(f"--batch={tcfg.batch_size}: must be a multiple of the mesh's {shards} batch shards times "
                         f"grad_accum={tcfg.grad_accum}")
    state, batch = program.abstract_args(tcfg.batch_size, tcfg.seq_len, packed)
    t0 = time.perf_counter()
    with shd.use_rules(mesh, program.rules), (costing_trace() if unroll else contextlib.nullcontext()):
        lowered = program.step.lower(state, batch)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def _cost(compiled: Any) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {"flops": float(ca.get("flops", 0.0)), "optimal_seconds": float(ca.get("optimal_seconds", 0.0)),
            "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def hlo_census(hlo_text: str) -> dict[str, int]:
    """While loops, windowed-einsum loops, splash kernel calls by phase and other Pallas calls in an HLO text."""
    out = {"while": len(_WHILE_RE.findall(hlo_text)),
           "windowed_einsum": len(set(re.findall(r"windowed_dot_general_body_\w+", hlo_text))),
           "splash_fwd": 0, "splash_dq": 0, "splash_dkv": 0, "other_kernels": 0}
    for line in hlo_text.splitlines():
        if "custom-call(" not in line or "tpu_custom_call" not in line:
            continue
        phase = _SPLASH_RE.search(line)
        out[f"splash_{phase.group(1)}" if phase else "other_kernels"] += 1
    return out


# XLA prints sizes with binary prefixes and no "iB": "21.00G" is 21 GiB.
_OOM_TEMP = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_PREFIX_GIB = {"": 1024.0 ** -3, "K": 1024.0 ** -2, "M": 1024.0 ** -1, "G": 1.0, "T": 1024.0}


def out_of_memory(message: str) -> dict[str, Any] | None:
    """XLA:TPU's compile-time "out of memory on HBM" error as {"oom": its line, "oom_temp_gib": the temporaries it
    needs, "oom_available_gib": what it has} (None for other errors; the figures only where the message has them)."""
    if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
        return None
    line = next(ln for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln)
    out: dict[str, Any] = {"oom": line[line.index("RESOURCE_EXHAUSTED"):].strip()}
    m = _OOM_TEMP.search(message)
    if m:
        out["oom_temp_gib"] = float(m.group(1)) * _PREFIX_GIB[m.group(2)]
        out["oom_available_gib"] = float(m.group(3)) * _PREFIX_GIB[m.group(4)]
    return out


def _calibrated_peak(devices: list) -> float:
    """FLOP/s that ``optimal_seconds`` assigns a bf16 8192³ matmul on one chip of this topology."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    one = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    x = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=one)
    cost = _cost(jax.jit(lambda a, b: a @ b).lower(x, x).compile())
    return cost["flops"] / cost["optimal_seconds"]


def step_time_estimate(xla_seconds: float, xla_flops: float, kernel_flops: float, peak: float,
                       min_variant_seconds: float) -> tuple[float, str]:
    """(est step seconds, basis): XLA's fitted ``optimal_seconds`` plus the kernels at ``peak``; where XLA's cost
    model returns no usable time (a variant's ``optimal_seconds`` <= 0, as libtpu gives for v5e / v6e programs
    with collectives), all FLOPs at ``peak`` ("flops_at_peak", a lower bound on the time)."""
    if min_variant_seconds > 0 and xla_seconds > 0:
        return xla_seconds + kernel_flops / peak, "optimal_seconds"
    return (xla_flops + kernel_flops) / peak, "flops_at_peak"


def _target_from_json(d: dict) -> AotTarget:
    train = dict(d["train"])
    train["objective"] = HaltingConfig(**train["objective"])
    train["mesh"] = MeshConfig(**train["mesh"])
    return AotTarget(LoopedConfig(**d["model"]), TrainConfig(**train))


def worker(job: dict) -> dict:
    """Run one job in this (libtpu-enabled) process: "real" (memory of the real program) or "cost" (costing
    variants, each with its flops / optimal_seconds / HLO census, and the calibrated peak)."""
    target = _target_from_json(job)
    devices = topology_devices(job["topology"], job["num_slices"])
    out: dict[str, Any] = {"chips": len(devices), "chip_kind": devices[0].device_kind}
    if job["mode"] == "real":
        try:
            compiled, seconds = _compile(target, devices, unroll=False, packed=job.get("packed", False))
        except Exception as err:  # XLA's own verdict that the program cannot fit: a report, not a crash
            oom = out_of_memory(str(err))
            if oom is None:
                raise
            out.update(oom)
            return out
        m = compiled.memory_analysis()
        out.update(compile_s=seconds, argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                   alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                   peak=getattr(m, "peak_memory_in_bytes", 0), host_temp=getattr(m, "host_temp_size_in_bytes", 0),
                   census=hlo_census(compiled.as_text()), raw_cost=_cost(compiled))
        return out
    out["calibrated_peak"] = _calibrated_peak(devices)
    variants = []
    for n_layers, n_loops in job["variants"]:
        model = target.model.replace(n_layers=n_layers, n_loops=n_loops, scan_unroll=True)
        compiled, seconds = _compile(AotTarget(model, target.train), devices, unroll=True,
                                     packed=job.get("packed", False))
        variants.append({"n_layers": n_layers, "n_loops": n_loops, "compile_s": seconds, **_cost(compiled),
                         **hlo_census(compiled.as_text())})
        del compiled
    out["variants"] = variants
    return out


# ------------------------------------------------------------------------------------------------ driver side

def _worker_env(mode: str) -> dict[str, str]:
    import loopjax

    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # the worker needs the TPU plugin for the topology (execution stays on CPU)
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any value: libtpu then initialises without a TPU
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    if mode == "cost":
        env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + NO_WINDOWED_EINSUM).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(loopjax.__file__)))  # this checkout, not another
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_worker(job: dict) -> dict:
    """Run ``worker(job)`` in a fresh subprocess with the libtpu environment; raises ValueError for bad input."""
    with tempfile.TemporaryDirectory(prefix="loopjax_aot_") as tmp:
        job_path, out_path, log_path = (os.path.join(tmp, n) for n in ("job.json", "out.json", "worker.log"))
        with open(job_path, "w") as f:
            json.dump(job, f)
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "loopjax.aot", "--worker", job_path, out_path],
                                  env=_worker_env(job["mode"]), stdout=log, stderr=subprocess.STDOUT)
        result = json.load(open(out_path)) if os.path.exists(out_path) else {}
        if "error" in result:
            raise ValueError(result["error"])
        if proc.returncode != 0 or not result:
            tail = "".join(open(log_path).readlines()[-25:])
            raise RuntimeError(f"aot worker ({job['mode']}) failed with exit code {proc.returncode}:\n{tail}")
        return result


def fit_bilinear(variants: list[dict], key: str, n_layers: int, n_loops: int) -> float:
    """Fit ``key`` over the variants as a + b·L + c·T + d·L·T and evaluate at (n_layers, n_loops)."""
    import numpy as np

    a = np.array([[1.0, v["n_layers"], v["n_loops"], v["n_layers"] * v["n_loops"]] for v in variants])
    y = np.array([float(v[key]) for v in variants])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(coef @ np.array([1.0, n_layers, n_loops, n_layers * n_loops]))


def analyze(target: AotTarget, topology: str, num_slices: int = 1, cost_mode: str = "fit", log=None,
            packed: bool = False) -> dict[str, Any]:
    """Compile ``target`` for ``topology`` (real program + costing) and return the report dict (see module doc).

    cost_mode: "fit" (costing variants L ∈ {1, 2} × T ∈ {1, 2}, fitted), "full" (one unrolled variant at the
    model's own L and T) or "none" (memory only). packed: batches carry a loss mask, segment ids and positions.
    """
    from loopjax.flops import attended_pairs, train_flops

    if cost_mode not in ("fit", "full", "none"):
        raise ValueError(f"cost_mode={cost_mode!r}: must be one of ('fit', 'full', 'none')")
    gen, _ = parse_topology(topology)
    chip = TPU_CHIPS[gen]
    model, tcfg = target.model, target.train
    job = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(tcfg), "topology": topology,
           "num_slices": num_slices, "packed": packed}
    say = log or (lambda msg: None)
    say(f"compiling the train step for {topology} x{num_slices} (seq {tcfg.seq_len}, batch {tcfg.batch_size}, "
        f"remat {model.remat_policy})")
    real = run_worker({**job, "mode": "real"})
    chips = real["chips"]
    readouts = 1 if tcfg.objective.objective in ("final", "act") else model.n_loops
    model_flops = tcfg.batch_size * train_flops(model, tcfg.seq_len, readouts=readouts, causal=True)
    report: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "chips": chips, "chip_kind": real["chip_kind"],
        "mesh": dataclasses.asdict(tcfg.mesh), "seq": tcfg.seq_len, "global_batch": tcfg.batch_size,
        "grad_accum": tcfg.grad_accum, "packed": packed, "remat_policy": model.remat_policy,
        "remat_scope": getattr(model, "remat_scope", None), "attention_impl": getattr(model, "attention_impl", None),
        "scan_layers": getattr(model, "scan_layers", None), "ce_block": getattr(tcfg.objective, "ce_block", None),
        "tpu_scheduler_memory_percent": getattr(tcfg, "tpu_scheduler_memory_percent", None),
        "hbm_gib": chip.hbm_gib, "model_tflop_per_step": model_flops / 1e12,
        "analytic_tflop_per_chip": model_flops / chips / 1e12, "peak_tflops_per_chip": chip.peak_flops / 1e12,
        "warnings": [],
    }
    if "oom" in real:  # XLA refused to compile it for this HBM: no memory analysis, no cost
        say(f"does not fit: {real['oom']}")
        report.update(fits=False, oom=real["oom"], temp_gib=real.get("oom_temp_gib"),
                      oom_available_gib=real.get("oom_available_gib"))
        return report
    total = real["argument"] + real["output"] - real["alias"] + real["temp"]
    say(f"memory per chip: {total / GIB:.2f} GiB of {chip.hbm_gib:.0f} (temp {real['temp'] / GIB:.2f} GiB), "
        f"compiled in {real['compile_s']:.0f} s")
    report.update({
        "per_chip_total_gib": total / GIB, "argument_gib": real["argument"] / GIB,
        "output_gib": real["output"] / GIB, "alias_gib": real["alias"] / GIB, "temp_gib": real["temp"] / GIB,
        "xla_peak_gib": real["peak"] / GIB, "host_temp_gib": real["host_temp"] / GIB,
        "fits": total <= chip.hbm_gib * GIB, "headroom_frac": 1.0 - total / (chip.hbm_gib * GIB),
        "compile_s": real["compile_s"],
        "real_program": {"while_loops": real["census"]["while"],
                         "windowed_einsum_loops": real["census"]["windowed_einsum"],
                         "raw_xla_tflop_per_chip": real["raw_cost"]["flops"] / 1e12,
                         "splash_kernels": {k: real["census"][f"splash_{k}"] for k in _KERNEL_UNITS}},
    })
    if tcfg.objective.random_loops:
        report["warnings"].append("objective.random_loops: the cost is fitted over n_loops, not the sampled counts")
    if cost_mode == "none":
        return report
    variants = COST_VARIANTS if cost_mode == "fit" else ((model.n_layers, model.n_loops),)
    say(f"costing {len(variants)} unrolled variant(s) {list(variants)} with windowed einsum off")
    cost = run_worker({**job, "mode": "cost", "variants": [list(v) for v in variants]})
    vs = cost["variants"]
    fit = lambda key: fit_bilinear(vs, key, model.n_layers, model.n_loops)  # noqa: E731
    xla_flops, xla_seconds = fit("flops"), fit("optimal_seconds")
    calls = {k: max(fit(f"splash_{k}"), 0.0) for k in _KERNEL_UNITS}
    units = dict(_KERNEL_UNITS, dkv=5 if calls["dq"] < 0.5 <= calls["dkv"] else 4)  # fused dkv also computes dq
    unit_flops = (2.0 * attended_pairs(model, tcfg.seq_len, causal=True) * model.n_heads * model.d_head
                  * tcfg.batch_size / tcfg.grad_accum / chips)  # one kernel call covers a micro-batch's share
    kernel_flops = sum(calls[k] * units[k] * unit_flops for k in calls)
    peak_cal = cost["calibrated_peak"]
    est_step, basis = step_time_estimate(xla_seconds, xla_flops, kernel_flops, peak_cal,
                                         min(v["optimal_seconds"] for v in vs))
    if basis != "optimal_seconds":
        report["warnings"].append("XLA's cost model gives no step time here (optimal_seconds < 0 in a costing "
                                  "variant: -1 s per op it cannot cost, such as cross-slice collectives): est_step_s "
                                  "is all FLOPs at the calibrated peak, so est_mfu is an upper bound (memory-bound "
                                  "work and collectives not counted)")
    whiles = max(v["while"] for v in vs)
    if whiles:
        report["warnings"].append(f"{whiles} while loop(s) left in a costing variant: their bodies are counted once, "
                                  "so the cost is underestimated")
    if any(v["other_kernels"] for v in vs):
        report["warnings"].append("Pallas kernels other than splash attention found: their cost is not counted")
    report.update({
        "xla_tflop_per_chip": (xla_flops + kernel_flops) / 1e12, "xla_seen_tflop_per_chip": xla_flops / 1e12,
        "kernel_tflop_per_chip": kernel_flops / 1e12, "calibrated_peak_tflops": peak_cal / 1e12,
        "est_step_s": est_step, "est_basis": basis,
        "est_mfu": model_flops / (chips * chip.peak_flops * est_step),
        "est_tokens_per_s": tcfg.batch_size * tcfg.seq_len / est_step,
        "costing": {"mode": cost_mode, "while_loops_left": whiles, "kernel_calls_per_step": calls,
                    "variants": vs},
    })
    return report


TABLE_COLUMNS = (("topology", "topology", "{}"), ("chips", "chips", "{}"), ("attention", "attention_impl", "{}"),
                 ("remat", "remat_policy", "{}"), ("scope", "remat_scope", "{}"),
                 ("seq", "seq", "{}"), ("batch", "global_batch", "{}"), ("total GiB", "per_chip_total_gib", "{:.2f}"),
                 ("temp GiB", "temp_gib", "{:.2f}"), ("HBM GiB", "hbm_gib", "{:.0f}"), ("fits", "fits", "{}"),
                 ("headroom", "headroom_frac", "{:.0%}"), ("TFLOP/chip", "xla_tflop_per_chip", "{:.1f}"),
                 ("model TFLOP", "model_tflop_per_step", "{:.1f}"), ("est step s", "est_step_s", "{:.3f}"),
                 ("est MFU", "est_mfu", "{:.1%}"), ("compile s", "compile_s", "{:.0f}"))


# Where est_basis is "flops_at_peak" the step time is a lower bound and est MFU an upper bound: the cells say so.
BOUND_PREFIX = {"est_mfu": "<= ", "est_step_s": ">= "}


def format_table(rows: Sequence[dict], extra: Sequence[tuple[str, str, str]] = ()) -> str:
    """A markdown table of reports (missing values as '-'; bounds as '<= x' / '>= x')."""
    cols = list(extra) + list(TABLE_COLUMNS)

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        bound = BOUND_PREFIX.get(key, "") if row.get("est_basis") == "flops_at_peak" else ""
        return bound + fmt.format(value)

    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def remat_choices(model: LoopedConfig) -> list[dict[str, str]]:
    """Every remat policy (× scope, where the config has ``remat_scope``) the model config accepts."""
    from loopjax import config as C

    policies = list(C.REMAT_POLICIES)
    scopes = list(getattr(C, "REMAT_SCOPES", ())) if hasattr(model, "remat_scope") else []
    if not scopes:
        return [{"remat_policy": p} for p in policies]
    return [{"remat_policy": p, "remat_scope": s} for p in policies for s in scopes
            if not (p == "none" and s != scopes[0])]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loopjax aot`` arguments."""
    p.add_argument("config", help="model preset (tiny, ouro_1_4b, ouro_2_6b) or experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.remat_policy=full")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:2x2x4, v5e:4x4, v6e:4x4")
    p.add_argument("--num-slices", type=int, default=1, help="slices (laid along the mesh's data axis)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the config's; presets 2048)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's; presets 16)")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=16 or data=2,fsdp=8[,rules=fsdp] (presets: fsdp=-1)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report (a list with --sweep-remat)")
    p.add_argument("--packed", action="store_true", help="batches of packed documents (mask, segment ids, "
                   "positions), as prepared corpora give")
    p.add_argument("--sweep-remat", action="store_true", help="compile every remat policy (and scope) and compare")
    p.add_argument("--policies", default=None, metavar="P1,P2", help="--sweep-remat: only these remat policies")
    p.add_argument("--scopes", default=None, metavar="S1,S2", help="--sweep-remat: only these remat scopes "
                   "(loop, layer, both)")
    p.add_argument("--cost", choices=("fit", "full", "none"), default="fit",
                   help="fit: unrolled L∈{1,2}×T∈{1,2} variants, fitted (default); full: one fully unrolled "
                        "compile at the model's L, T; none: memory only")


def cmd_aot(args: argparse.Namespace) -> int:
    """``loopjax aot``: print the table, write ``--json``; exit 2 with a message for bad input or no libtpu."""
    problem = libtpu_problem()
    if problem:
        print(f"loopjax aot: {problem}", file=sys.stderr)
        return 2
    if isinstance(args.num_slices, bool) or args.num_slices < 1:
        raise ValueError(f"--num-slices={args.num_slices}: must be an int >= 1")
    parse_topology(args.topology)
    mesh = parse_mesh(args.mesh) if args.mesh is not None else None
    target = resolve_target(args.config, seq=args.seq, batch=args.batch, mesh=mesh, overrides=args.overrides)
    log = lambda msg: print(f"loopjax aot: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if not args.sweep_remat:
        report = analyze(target, args.topology, args.num_slices, args.cost, log=log, packed=args.packed)
        report["config"] = args.config
        print(format_table([report]))
        if "oom" in report:
            print(f"does not fit: {report['oom']}")
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        out: Any = report
    else:
        rows = []
        choices = remat_choices(target.model)
        for flag, key, text in (("--policies", "remat_policy", args.policies),
                                ("--scopes", "remat_scope", getattr(args, "scopes", None))):
            if not text:
                continue
            wanted = [p.strip() for p in text.split(",") if p.strip()]
            known = {c[key] for c in choices if key in c}
            for name in wanted:
                if name not in known:
                    raise ValueError(f"{flag}: {name!r} is not a {key.replace('_', ' ')}; known: {sorted(known)}")
            # with no remat there is no scope: "none" stays in a scope-filtered sweep
            choices = [c for c in choices if c.get(key) in wanted
                       or (key == "remat_scope" and c["remat_policy"] == "none")]
        skipped = []
        for choice in choices:
            model = target.model.replace(**choice)
            try:
                row = analyze(AotTarget(model, target.train), args.topology, args.num_slices, args.cost, log=log,
                              packed=args.packed)
            except ValueError as err:  # a choice this topology cannot compile: reported, the sweep goes on
                skipped.append({**choice, "error": str(err)})
                continue
            row["config"] = args.config
            rows.append(row)
        print(format_table(rows))
        for r in rows:
            if "oom" in r:
                print(f"does not fit: remat_policy={r['remat_policy']}, remat_scope={r.get('remat_scope')}: "
                      f"{r['oom']}")
        for s in skipped:
            print(f"not compiled: remat_policy={s['remat_policy']}, remat_scope={s.get('remat_scope')}: {s['error']}")
        ok = [r for r in rows if r.get("est_mfu") is not None and r["headroom_frac"] >= HEADROOM]
        best = max(ok, key=lambda r: r["est_mfu"]) if ok else None
        if best is None and args.cost == "none":
            print("no recommendation: it needs est MFU (--cost fit or full)")
        elif best is None:
            print(f"no remat choice fits with {HEADROOM:.0%} HBM headroom")
        else:
            scope = f", remat_scope={best['remat_scope']}" if best.get("remat_scope") else ""
            bound = BOUND_PREFIX["est_mfu"] if best.get("est_basis") == "flops_at_peak" else ""
            print(f"recommended: remat_policy={best['remat_policy']}{scope} (est MFU {bound}{best['est_mfu']:.1%}, "
                  f"{best['per_chip_total_gib']:.2f} GiB of {best['hbm_gib']:.0f} per chip)")
        out = {"rows": rows, "skipped": skipped, "recommended": None if best is None else
               {k: best.get(k) for k in ("remat_policy", "remat_scope")}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _worker_main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    try:
        result = worker(job)
    except ValueError as err:
        result = {"error": str(err)}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 2 if "error" in result else 0


def take_trailing_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """KEY=VALUE overrides may follow the options, where argparse leaves them over: add them to ``args.overrides``;
    anything else left over is a usage error."""
    if any(a.startswith("-") or "=" not in a for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loopjax.aot ...``: the same options as ``loopjax aot`` (KEY=VALUE overrides may follow them)."""
    parser = argparse.ArgumentParser(prog="python -m loopjax.aot", description="compile the train step for a TPU "
                                     "topology: memory, cost, est MFU")
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    take_trailing_overrides(parser, args, extra)
    try:
        return cmd_aot(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"loopjax aot: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
