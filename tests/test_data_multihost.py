"""Two processes (jax.distributed on localhost, gloo) read a prepared corpus: disjoint rows whose union is the whole
epoch, and a checkpoint restores the exact batch sequence on each process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loopjax.data import PackedTokenSource
from loopjax.data.prepare import PrepareConfig, prepare
from tests.test_multihost import collect, free_port

WORKER = Path(__file__).with_name("data_multihost_worker.py")


def launch(*args: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=WORKER.parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_rows_covering_the_epoch_and_resume_exactly(tmp_path):
    rng = np.random.default_rng()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for n in [30] * 20 + [0]:  # 641 tokens: 40 rows of 16 (+1 target), a multiple of 2 processes x batch 2
            f.write(json.dumps({"text": bytes(rng.integers(97, 123, n, dtype=np.uint8)).decode()}) + "\n")
    corpus = str(tmp_path / "corpus")
    prepare(PrepareConfig(inputs=(str(tmp_path / "docs.jsonl"),), tokenizer="bytes", out=corpus, val_fraction=0.0,
                          unit_bytes=100))
    src = PackedTokenSource(corpus, 16)
    assert len(src) == 40
    every_row = sorted(src[i]["inputs"].tobytes().hex() for i in range(len(src)))

    coordinator = f"127.0.0.1:{free_port()}"
    w0, w1 = collect([launch(corpus, str(tmp_path / "ckpt"), "--coordinator", coordinator, "--num-processes", "2",
                             "--process-id", str(i)) for i in range(2)])
    assert (w0["process"], w1["process"]) == (0, 1) and w0["count"] == w1["count"] == 2
    assert len(w0["epoch"]) == len(w1["epoch"]) == 20
    assert not set(w0["epoch"]) & set(w1["epoch"])  # disjoint
    assert sorted(w0["epoch"] + w1["epoch"]) == every_row  # together: the whole epoch, each row once
    for w in (w0, w1):
        assert w["restored_step"] == 3 and w["resume_identical"]
        assert w["keys"] == ["inputs", "mask", "positions", "segment_ids", "targets"]
