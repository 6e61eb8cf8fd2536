"""Per-op time shares of a compiled JAX step from an XLA profiler trace (``jax.profiler``, Perfetto JSON).

Durations of the trace's complete events are summed per op name, with the instance suffix dropped
(``copy_bitcast_fusion.3`` -> ``copy_bitcast_fusion``); events that enclose other ops (control flow, the executable,
the thunk executor, thread-pool waits) are left out, so the shares are of op time, summed over threads.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable, Iterable

import jax

# Events that contain other ops or are not ops; counting them would count their contents twice.
_ENCLOSING = ("cond", "while", "conditional", "call", "end: ")
_NOT_OPS = ("PjitFunction", "PjRt", "ThunkExecutor", "Thunk", "TfrtCpu", "CommonPjRt", "SlinkyThreadPool",
            "ParseArguments", "MutexLock", "XlaCompile", "$", "jit_")


def op_name(event_name: str) -> str | None:
    """The op family of one trace event's name, or None for an event that is not a leaf op."""
    if event_name.startswith(_NOT_OPS):
        return None
    base = re.sub(r"[._]\d+$", "", event_name)
    if base in _ENCLOSING or event_name.startswith("end: "):
        return None
    return base


def op_shares(events: Iterable[dict[str, Any]], steps: int = 1) -> list[dict[str, Any]]:
    """[{op, seconds_per_step, share}] of the complete ("X") events, largest first."""
    total = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = op_name(str(e.get("name", "")))
        if name is not None:
            total[name] += float(e["dur"])  # microseconds
    all_us = sum(total.values()) or 1.0
    return [dict(op=k, seconds_per_step=v / 1e6 / steps, share=v / all_us) for k, v in total.most_common()]


def trace_steps(step: Callable, state: Any, batches: list, out_dir: str) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``state, _ = step(state, batch)`` over ``batches`` under ``jax.profiler.trace``: (state, op shares)."""
    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for batch in batches:
            state, out = step(state, batch)
            jax.block_until_ready(out)
    files = sorted(glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"no perfetto_trace.json.gz under {out_dir!r}: the profiler wrote no trace")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return state, op_shares(events, steps=len(batches))
