"""``loopjax aot``: TPU compiles from this CPU host (needs the ``tpu`` extra, libtpu; skipped without it)."""

import json

import pytest

from loopjax import aot
from loopjax.cli import main

NO_LIBTPU = aot.libtpu_problem()
pytestmark = pytest.mark.skipif(NO_LIBTPU is not None, reason=f"needs libtpu: {NO_LIBTPU}")

# Models small enough that each compile takes seconds. The CLI test uses seq 128, the shortest splash attention
# takes, so attention_impl="auto" picks the Pallas kernel XLA cannot cost; the fit test (3 layers x 3 loops,
# extrapolated from 1-2 x 1-2) keeps attention visible to XLA, as Mosaic-compiling 27 kernels would be slow.
SMALL = ["model.d_model=64", "model.vocab_size=128", "model.d_ff=128"]
SEQ = "128"
HAS_SPLASH = "attention_impl" in {f.name for f in aot.dataclasses.fields(aot.LoopedConfig)}


def test_cli_tiny_v5e_reports_memory_and_cost_above_analytic(tmp_path, capsys):
    out = tmp_path / "aot.json"
    code = main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", SEQ, "--batch", "8", "--mesh", "fsdp=4",
                 "--json", str(out), *SMALL, "model.n_layers=2", "model.n_loops=2",
                 "train.tpu_scheduler_memory_percent=20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| v5e:2x2 | 4 |" in printed
    r = json.loads(out.read_text())
    for key in ("topology", "chips", "mesh", "seq", "global_batch", "per_chip_total_gib", "temp_gib", "argument_gib",
                "hbm_gib", "fits", "headroom_frac", "compile_s", "model_tflop_per_step", "xla_tflop_per_chip",
                "est_step_s", "est_mfu"):
        assert key in r, key
    assert (r["topology"], r["chips"], r["seq"], r["global_batch"], r["hbm_gib"]) == ("v5e:2x2", 4, 128, 8, 16.0)
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "rules": "fsdp"}
    assert r["tpu_scheduler_memory_percent"] == 20  # compiled with the scheduler's memory limit option
    total = r["argument_gib"] + r["output_gib"] - r["alias_gib"] + r["temp_gib"]
    assert r["per_chip_total_gib"] == pytest.approx(total) and 0 < total < r["hbm_gib"] and r["fits"]
    # The real program scans (so XLA's raw count is low); the costed variants have no while loop left.
    assert r["real_program"]["while_loops"] > 0
    assert r["costing"]["while_loops_left"] == 0 and not r["warnings"]
    if HAS_SPLASH:  # the kernels run once per layer and loop, forward (and again under remat) and backward
        kernels = r["real_program"]["splash_kernels"]
        assert kernels["fwd"] >= 1 and kernels["dq"] + kernels["dkv"] >= 1
        calls = r["costing"]["kernel_calls_per_step"]
        assert calls["fwd"] == pytest.approx(2 * 2 * 2, abs=0.01)  # remat "full" recomputes the forward
        assert r["kernel_tflop_per_chip"] > 0
    # Remat recompute and masked (dense) attention only add to the work a step must do.
    assert r["xla_tflop_per_chip"] >= r["model_tflop_per_step"] / r["chips"]
    assert r["xla_tflop_per_chip"] > r["real_program"]["raw_xla_tflop_per_chip"]
    peak = r["peak_tflops_per_chip"] * 1e12
    assert r["est_mfu"] == pytest.approx(r["model_tflop_per_step"] * 1e12 / (4 * peak * r["est_step_s"]))
    assert 0 < r["est_mfu"] < 1


def test_fitted_cost_matches_fully_unrolled_compile():
    overrides = SMALL + ["model.n_layers=3", "model.n_loops=3"] + ["model.attention_impl=reference"] * HAS_SPLASH
    target = aot.resolve_target("tiny", seq=32, batch=8, mesh=aot.parse_mesh("fsdp=4"), overrides=overrides)
    job = {"model": aot.dataclasses.asdict(target.model), "train": aot.dataclasses.asdict(target.train),
           "topology": "v5e:2x2", "num_slices": 1, "mode": "cost",
           "variants": [list(v) for v in aot.COST_VARIANTS] + [[3, 3]]}
    variants = aot.run_worker(job)["variants"]
    full = variants[-1]
    assert full["while"] == 0
    for key in ("flops", "optimal_seconds"):
        fitted = aot.fit_bilinear(variants[:-1], key, 3, 3)
        assert fitted == pytest.approx(full[key], rel=0.10), key


def test_step_time_falls_back_to_flops_at_peak_where_xla_gives_no_time():
    assert aot.step_time_estimate(0.5, 100e12, 20e12, 400e12, 0.01) == (0.5 + 0.05, "optimal_seconds")
    # libtpu's cost model returns negative optimal_seconds for v5e / v6e steps with collectives
    assert aot.step_time_estimate(-3000.0, 100e12, 20e12, 400e12, -28.0) == (0.3, "flops_at_peak")


def test_table_marks_flops_at_peak_estimates_as_bounds():
    row = {"topology": "v5e:1x1", "chips": 1, "est_step_s": 0.25, "est_mfu": 0.692}
    fitted = aot.format_table([{**row, "est_basis": "optimal_seconds"}]).splitlines()[-1]
    bound = aot.format_table([{**row, "est_basis": "flops_at_peak"}]).splitlines()[-1]
    assert "| 0.250 |" in fitted and "| 69.2% |" in fitted and "<=" not in fitted and ">=" not in fitted
    assert "| >= 0.250 |" in bound and "| <= 69.2% |" in bound


def test_sweep_remat_compares_policies_and_recommends_one_that_fits(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", SEQ, "--batch", "8", "--mesh", "fsdp=4",
                 "--json", str(out), *SMALL, "--sweep-remat", "--policies", "none,full,save_dots",
                 "--scopes", "layer"])
    assert code == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    got = [(row["remat_policy"], row["remat_scope"]) for row in r["rows"]]
    assert got == [("none", "loop"), ("full", "layer"), ("save_dots", "layer")]  # "none" has no scope to filter
    assert all(row["est_mfu"] > 0 and row["fits"] for row in r["rows"])
    best = max(r["rows"], key=lambda row: row["est_mfu"])
    assert r["recommended"] == {"remat_policy": best["remat_policy"], "remat_scope": best["remat_scope"]}
    assert f"recommended: remat_policy={best['remat_policy']}" in printed
    # More recompute is more work: full remat costs at least what saving the dots does, which is at least none.
    tflop = {row["remat_policy"]: row["xla_tflop_per_chip"] for row in r["rows"]}
    assert tflop["full"] >= tflop["save_dots"] >= tflop["none"]


def test_offload_of_a_nested_layer_scan_is_refused_on_tpu_and_the_sweep_goes_on(tmp_path, capsys):
    """libtpu cannot compile offloaded layer inputs of a layer scan inside the loop scan: a ValueError naming the
    fields before anything is traced; ``--sweep-remat`` lists the choice as not compiled and sweeps the rest."""
    nested = ["model.n_layers=2", "model.scan_layers=True"]
    assert main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", SEQ, "--batch", "8", "--mesh", "fsdp=4", *SMALL,
                 *nested, "model.remat_policy=offload", "model.remat_scope=layer", "--cost", "none"]) == 2
    err = capsys.readouterr().err
    assert "model.remat_policy='offload'" in err and "model.remat_scope='both'" in err
    out = tmp_path / "sweep.json"
    assert main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", SEQ, "--batch", "8", "--mesh", "fsdp=4", *SMALL,
                 *nested, "--cost", "none", "--sweep-remat", "--policies", "full,offload", "--scopes", "layer,both",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(row["remat_policy"], row["remat_scope"]) for row in r["rows"]] == [
        ("full", "layer"), ("full", "both"), ("offload", "both")]
    assert [(s["remat_policy"], s["remat_scope"]) for s in r["skipped"]] == [("offload", "layer")]
    assert "not compiled: remat_policy=offload, remat_scope=layer" in capsys.readouterr().out


def test_a_program_xla_cannot_fit_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    """XLA:TPU refuses to compile a step whose temporaries exceed HBM: the report says it does not fit, with the
    temporaries XLA asked for, and a sweep reports the choice and compiles the next."""
    # reference attention materialises fp32 scores [16 rows, 4 heads, S, S] per chip: 4 GiB a copy at seq 4096
    big = [*SMALL, "model.max_seq_len=4096", "model.attention_impl=reference"]
    out = tmp_path / "sweep.json"
    assert main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", "4096", "--batch", "64", "--mesh", "fsdp=4", *big,
                 "--cost", "none", "--sweep-remat", "--policies", "none,full", "--scopes", "layer",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    none, full = json.loads(out.read_text())["rows"]
    assert (none["remat_policy"], none["fits"]) == ("none", False)
    assert "Ran out of memory" in none["oom"] and none["temp_gib"] > none["oom_available_gib"] > 15
    assert none.get("per_chip_total_gib") is None and "costing" not in none
    assert (full["remat_policy"], full["fits"], "oom" in full) == ("full", True, False)
    assert 0 < full["per_chip_total_gib"] < 16 < none["temp_gib"]
    assert "does not fit: remat_policy=none, remat_scope=loop: RESOURCE_EXHAUSTED" in printed
    assert "no recommendation: it needs est MFU" in printed


def test_out_of_memory_reads_xla_message():
    msg = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
           "for HLO temporaries (21.00G) exceeds available HBM (15.75G).")
    assert aot.out_of_memory(msg) == {"oom": msg[msg.index("RESOURCE"):], "oom_temp_gib": 21.0,
                                      "oom_available_gib": 15.75}
    assert aot.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem") == {
        "oom": "RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem"}
    assert aot.out_of_memory("INVALID_ARGUMENT: Bitcast cannot have different memory spaces") is None


def test_sweep_filters_name_the_flag(capsys):
    for flag, value in (("--policies", "fulll"), ("--scopes", "block")):
        assert main(["aot", "tiny", "--topology", "v5e:2x2", "--seq", SEQ, "--mesh", "fsdp=4", "--sweep-remat",
                     flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and repr(value) in err


def test_bad_topology_and_mesh_name_the_flag(capsys):
    assert main(["aot", "tiny", "--topology", "v9x:2x2"]) == 2
    assert "--topology='v9x:2x2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--topology"):
        aot.parse_topology("v5p:2x2xq")
    with pytest.raises(ValueError, match="--mesh"):
        aot.parse_mesh("fsdp=4,pipeline=2")
    assert main(["aot", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=3", "--seq", SEQ]) == 2
    err = capsys.readouterr().err
    assert "--mesh" in err and "fsdp=3" in err and "4" in err


_CE_SHARDING_PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from loopjax import halting
from loopjax.aot import topology_devices

devs = topology_devices("v5e:2x2", 2)
mesh = Mesh(np.array(devs).reshape(2, 4), ("data", "fsdp"))
T, B, S, D, V = 4, 64, 1024, 256, 2048
sh = lambda *p: NamedSharding(mesh, P(*p))
bat = ("data", "fsdp")
h = jax.ShapeDtypeStruct((T, B, S, D), jnp.bfloat16, sharding=sh(None, bat))
w = jax.ShapeDtypeStruct((D, V), jnp.bfloat16, sharding=sh("fsdp"))
y = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sh(bat))
wt = jax.ShapeDtypeStruct((T, B, S), jnp.float32, sharding=sh(None, bat))
losses = {
    "fused": lambda h, w, y, wt: halting.fused_step_cross_entropy(h, w, y, wt, block_tokens=256)[0],
    "chunked": lambda h, w, y, wt: (halting.chunked_step_cross_entropy(h, lambda x: x @ w, y, block_tokens=256)
                                    * wt).sum(),
}
out = {}
for name, loss in losses.items():
    step = jax.jit(jax.grad(loss, argnums=(0, 1)), out_shardings=(sh(None, bat), sh("fsdp")))
    out[name] = step.lower(h, w, y, wt).compile().memory_analysis().temp_size_in_bytes / (T * B * S * D * 2 / 8)
json.dump(out, sys.stdout)
"""


def test_blocked_ce_keeps_the_batch_sharded_on_a_two_slice_topology(tmp_path):
    """The CE's position blocks must not gather the global batch: on 2 slices x 4 chips with the batch over
    (data, fsdp), temp memory stays below one chip's shard of the step states (reshaping into blocks made it
    4.3x; the Ouro-1.4B pod row went from 52 to 4 GiB per chip with the fix)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_CE_SHARDING_PROBE)
    proc = subprocess.run([sys.executable, str(script)], env=aot._worker_env("real"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    temp_per_shard = json.loads(proc.stdout.strip().splitlines()[-1])
    assert temp_per_shard["fused"] < 0.5, temp_per_shard
    assert temp_per_shard["chunked"] < 1.0, temp_per_shard
