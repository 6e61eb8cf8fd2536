"""Worker for ``tests/test_data_multihost.py``: one process of a multi-process run reading a prepared corpus.

    python tests/data_multihost_worker.py CORPUS CKPT_DIR --coordinator HOST:PORT --num-processes N --process-id I

Reads one shuffled epoch of packed rows through ``make_pipeline`` (this process's shard), then a resumed stream:
3 batches, a checkpoint (``loopjax.checkpoint.Checkpointer`` with the grain iterator state), 4 more batches; a
fresh pipeline restored from that checkpoint must yield the same 4. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import numpy as np

from loopjax.checkpoint import Checkpointer
from loopjax.data import PackedTokenSource, make_pipeline
from loopjax.sharding import init_distributed

SEQ, BATCH, SEED = 16, 2, 11


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("ckpt")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args(argv)
    init_distributed(args.coordinator, args.num_processes, args.process_id)

    src = PackedTokenSource(args.corpus, SEQ)
    epoch = [row.tobytes().hex() for b in make_pipeline(src, batch_size=BATCH, seed=SEED, num_epochs=1)
             for row in b["inputs"]]

    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"x": jax.make_array_from_process_local_data(replicated, np.arange(4, dtype=np.float32))}
    it = iter(make_pipeline(src, batch_size=BATCH, seed=SEED))
    list(itertools.islice(it, 3))
    ckpt = Checkpointer(args.ckpt, async_save=False)
    ckpt.save(3, state, data_iter=it)
    ckpt.wait()
    after = [next(it) for _ in range(4)]
    ckpt.close()

    fresh = iter(make_pipeline(src, batch_size=BATCH, seed=SEED))
    ckpt = Checkpointer(args.ckpt, async_save=False)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    step, _ = ckpt.restore(target, data_iter=fresh)
    ckpt.close()
    resumed = [next(fresh) for _ in range(4)]
    same = all(np.array_equal(a[k], b[k]) for a, b in zip(after, resumed) for k in a)
    print(json.dumps({"process": jax.process_index(), "count": jax.process_count(), "epoch": epoch,
                      "restored_step": step, "resume_identical": same,
                      "keys": sorted(after[0])}), flush=True)


if __name__ == "__main__":
    main()
