"""Metric output: JSONL and TensorBoard event files (tensorboardX), a progress bar on terminals, and MFU."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device of common accelerators (vendor figures), matched by substring of device_kind.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v6": 918e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v4": 275e12,
}


def device_peak_flops(device: Any = None) -> float | None:
    """Known per-device peak FLOP/s of ``device`` (default the first device), None when unknown (e.g. CPUs)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


class MetricWriter:
    """Writes scalar metrics to ``workdir/metrics.jsonl`` (one JSON object per line, with ``step``) and to
    TensorBoard event files under ``workdir/tb``. Only process 0 writes; other processes get a no-op writer."""

    def __init__(self, workdir: str | os.PathLike | None, *, tensorboard: bool = True):
        self.enabled = workdir is not None and jax.process_index() == 0
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar when stderr is a terminal (and this is process 0); otherwise nothing."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty() and jax.process_index() == 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, n: int = 1, postfix: dict[str, float] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
