"""A small training run in its own process, for the kill / preempt / resume tests in test_checkpoint.py.

    python tests/train_worker.py WORKDIR --steps 12 --ckpt-every 3 [--delay 0.3] [--dump out.npz]

Prints "resumed N" (or "fresh") once, then "step N" after every update (flushed), so a test can signal it at a
chosen step; ``--delay`` paces the updates. At the end the train state's leaves go to ``--dump`` (npz), and the
process exits with ``128 + signal`` when it was preempted.
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--ckpt-every", type=int, default=3)
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--dump", default=None)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--cache", default=None, help="persistent compilation cache directory")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if args.cache:
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import grain  # noqa: E402
import numpy as np  # noqa: E402

import loopjax as lj  # noqa: E402
from loopjax.config import MeshConfig, TrainConfig  # noqa: E402
from loopjax.train import Trainer  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 4


def make_example(i):
    rng = np.random.default_rng(int(i))
    x = rng.integers(0, VOCAB, SEQ + 1).astype(np.int32)
    return {"inputs": x[:-1], "targets": x[1:], "mask": (rng.random(SEQ) < 0.8).astype(np.float32)}


model_cfg = lj.tiny(vocab_size=VOCAB, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1, n_loops=2,
                    max_seq_len=SEQ)
train_cfg = TrainConfig(steps=args.steps, batch_size=BATCH, seq_len=SEQ, learning_rate=1e-2, warmup_steps=2,
                        log_every=4, ckpt_every=args.ckpt_every, keep_checkpoints=2, log_loop_losses=False,
                        mesh=MeshConfig(data=-1, rules="dp"))
data = grain.MapDataset.range(10_000).shuffle(seed=7).map(make_example).batch(BATCH).to_iter_dataset()


def on_step(step):
    print(f"step {step}", flush=True)
    time.sleep(args.delay)


trainer = Trainer(model_cfg, train_cfg, train_data=iter(data), workdir=args.workdir, on_step=on_step,
                  progress=False, tensorboard=False)
print("fresh" if trainer.resumed_from is None else f"resumed {trainer.resumed_from}", flush=True)
result = trainer.fit()
trainer.close()
if args.dump:
    leaves = jax.tree_util.tree_flatten_with_path(trainer.state)[0]
    np.savez(args.dump, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
print(f"done {result.step} {result.status}", flush=True)
sys.exit(128 + result.signal if result.signal else 0)
