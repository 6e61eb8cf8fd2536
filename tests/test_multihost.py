"""Two processes on localhost (gloo, 2 CPU devices each) train like one process with 4 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 420  # generous: three compiling processes share 2 busy cores in CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_devices: int, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=WORKER.parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    """The JSON line of each process; kills them all if any fails or the timeout passes, so CI never hangs."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"worker exited {p.returncode}:\n{err[-3000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices():
    coordinator = f"127.0.0.1:{free_port()}"
    workers = [launch(2, "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i))
               for i in range(2)]
    single = launch(4)
    (w0, w1), (ref,) = collect(workers), collect([single])

    assert (w0["process"], w1["process"]) == (0, 1)
    assert w0["count"] == w1["count"] == 2 and w0["devices"] == w1["devices"] == ref["devices"] == 4
    assert ref["count"] == 1 and ref["rows"] == [0, 8]
    assert w0["rows"] == [0, 4] and w1["rows"] == [4, 8]  # each process loaded only its half of the batch
    assert w0["losses"] == w1["losses"] and w0["param_sq"] == w1["param_sq"]  # one global computation
    np.testing.assert_allclose(w0["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(w0["param_sq"], ref["param_sq"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
