"""Checkpoints: exact resume after SIGKILL, save on SIGTERM, fallback past a damaged latest checkpoint, restore
onto another device count (8 -> 4 -> 1)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from loopjax.checkpoint import Checkpointer, UnreadableCheckpointError, fingerprint

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
STEPS, CKPT_EVERY = 12, 3


def _worker(workdir, *extra, cache):
    cmd = [sys.executable, WORKER, str(workdir), "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY),
           "--cache", str(cache), *map(str, extra)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _run_until(proc, step, sig):
    """Read the worker's output; send ``sig`` once it reports ``step``. Returns (lines, exit code)."""
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == f"step {step}":
            proc.send_signal(sig)
    return lines, proc.wait(timeout=300)


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        bits_a, bits_b = (np.atleast_1d(x[k]).view(np.uint8) for x in (a, b))
        assert a[k].dtype == b[k].dtype and np.array_equal(bits_a, bits_b), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (and a compilation cache the other runs reuse)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = _worker(root / "ref", "--dump", root / "ref.npz", cache=root / "cache")
    lines, code = _run_until(proc, -1, None)
    assert code == 0 and lines[-1] == f"done {STEPS} done", lines
    return root, _load(root / "ref.npz")


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_is_bitwise_equal(reference):
    root, ref = reference
    kill_at = random.Random().randint(CKPT_EVERY + 3, STEPS - 2)  # >= 1.5 s after the first save
    workdir = root / f"killed{kill_at}"
    lines, code = _run_until(_worker(workdir, "--delay", 0.5, cache=root / "cache"), kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL, (kill_at, lines)
    assert f"done {STEPS} done" not in lines

    proc = _worker(workdir, "--dump", root / "resumed.npz", cache=root / "cache")
    lines, code = _run_until(proc, -1, None)
    assert code == 0, lines
    resumed_from = int(lines[0].split()[1]) if lines[0].startswith("resumed") else 0
    assert CKPT_EVERY <= resumed_from <= kill_at, (kill_at, lines[0])
    _assert_bitwise_equal(_load(root / "resumed.npz"), ref)


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_then_resume_matches(reference):
    root, ref = reference
    stop_at = 4  # not a multiple of CKPT_EVERY: the save must come from the signal
    workdir = root / "sigterm"
    lines, code = _run_until(_worker(workdir, "--delay", 0.5, cache=root / "cache"), stop_at, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, lines
    stopped = int([line for line in lines if line.startswith("done")][0].split()[1])
    assert stopped >= stop_at and stopped < STEPS
    assert Checkpointer(workdir / "checkpoints").latest_step() == stopped

    proc = _worker(workdir, "--dump", root / "after_term.npz", cache=root / "cache")
    lines, code = _run_until(proc, -1, None)
    assert code == 0 and lines[0] == f"resumed {stopped}", lines
    _assert_bitwise_equal(_load(root / "after_term.npz"), ref)


# ------------------------------------------------------------------------------------------- fallback


def _state(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((8,)), jnp.float32), "step": jnp.int32(seed)}


def _target(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(tmp_path, steps=(1, 2, 3)):
    ckpt = Checkpointer(tmp_path, max_to_keep=5)
    for s in steps:
        ckpt.save(s, _state(s))
    ckpt.close()
    return Checkpointer(tmp_path, max_to_keep=5)


@pytest.mark.parametrize("damage", ["array_data", "all_state_files"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    ckpt = _saved(tmp_path)
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "3" / "state") for f in fs
             if damage == "all_state_files" or os.path.basename(r) == "d"]
    assert files
    for i, f in enumerate(files):  # same sizes, random bytes: what a bad disk or a torn write leaves
        size = os.path.getsize(f)
        with open(f, "wb") as fh:
            fh.write(np.random.default_rng(i).bytes(size))
    with pytest.warns(RuntimeWarning, match="step 3 .* unreadable"):
        step, state = ckpt.restore(_target(_state(0)))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, state, _state(2))
    assert any(n.startswith("3.unreadable-") for n in os.listdir(tmp_path)) and not (tmp_path / "3").exists()
    ckpt.save(3, _state(33))  # the step number is free again
    ckpt.wait()
    step, state = ckpt.restore(_target(_state(0)))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(33))


def test_checkpoint_with_missing_files_falls_back(tmp_path):
    ckpt = _saved(tmp_path)
    shutil.rmtree(tmp_path / "3" / "state")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        step, state = ckpt.restore(_target(_state(0)))
    assert step == 2


def test_silently_altered_values_are_caught_by_the_fingerprint(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state(30)),  # values that are not the fingerprinted ones
                              meta=ocp.args.JsonSave(dict(step=3, fingerprint=fingerprint(_state(3)))))
    ckpt._manager.save(3, args=args, force=True)
    ckpt.wait()
    with pytest.warns(RuntimeWarning, match="fingerprint"):
        step, _ = ckpt.restore(_target(_state(0)))
    assert step == 2


def test_half_written_save_is_ignored(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2))
    ckpt.close()
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1234567"  # what a save killed mid-write leaves
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\x00" * 10)
    ckpt = Checkpointer(tmp_path, max_to_keep=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step, state = ckpt.restore(_target(_state(0)))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, state, _state(2))


def test_no_readable_checkpoint_raises_instead_of_starting_over(tmp_path):
    ckpt = _saved(tmp_path, steps=(1,))
    shutil.rmtree(tmp_path / "1" / "state")
    with pytest.warns(RuntimeWarning), pytest.raises(UnreadableCheckpointError, match="refusing to start"):
        ckpt.restore(_target(_state(0)))


def test_shape_mismatch_is_a_config_error_not_corruption(tmp_path):
    ckpt = _saved(tmp_path, steps=(1,))
    wrong = dict(_target(_state(0)), w=jax.ShapeDtypeStruct((16, 9), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(16, 8\).*\(16, 9\)"):
        ckpt.restore(wrong)
    assert (tmp_path / "1").exists()


def test_keep_last_k_plus_best(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/loss", best_mode="min")
    for s, loss in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 6.0)]:
        ckpt.save(s, _state(s), metrics={"eval/loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
    ckpt.close()
    again = Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/loss", best_mode="min")  # metrics on disk
    again.save(6, _state(6), metrics={"eval/loss": 7.0})
    again.wait()
    assert again.all_steps() == [2, 5, 6] and again.best_step() == 2


# ------------------------------------------------------------------------------------------- resharding


@pytest.mark.slow
def test_restore_onto_fewer_devices_matches(tmp_path):
    import grain

    import loopjax as lj
    from loopjax import sharding as shd
    from loopjax.config import MeshConfig, TrainConfig
    from loopjax.train import Trainer
    from loopjax.train.state import leafwise

    cfg = lj.tiny(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=2, max_seq_len=8)

    def make(i):
        x = np.random.default_rng(int(i)).integers(0, 64, 9).astype(np.int32)
        return {"inputs": x[:-1], "targets": x[1:]}

    data = grain.MapDataset.range(1000).map(make).batch(8).to_iter_dataset()
    tcfg = TrainConfig(steps=2, batch_size=8, seq_len=8, warmup_steps=1, log_every=1, log_loop_losses=False,
                       ckpt_every=0, mesh=MeshConfig(data=1, fsdp=-1, rules="fsdp"))
    first = Trainer(cfg, tcfg, train_data=iter(data), workdir=tmp_path, progress=False, tensorboard=False)
    first.fit()
    first.close()
    saved = jax.device_get(first.state)
    for n in (4, 1):
        mesh = shd.make_mesh(tcfg.mesh, devices=jax.devices()[:n])
        resumed = Trainer(cfg, tcfg, train_data=iter(data), workdir=tmp_path, mesh=mesh, progress=False,
                          tensorboard=False)
        assert resumed.resumed_from == 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), saved)
        want = leafwise(shd.param_shardings(resumed.state, mesh, shd.rules_for("fsdp")), resumed.state)
        for x, w in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(want)):
            assert x.sharding.mesh.devices.size == n and x.sharding.is_equivalent_to(w, x.ndim), (x.sharding, w)
        assert any(w.spec != () and "fsdp" in str(w.spec) for w in jax.tree.leaves(want))
        resumed.close()
