"""grain input pipelines: shard per process, shuffle per epoch, repeat, batch, optional worker processes.

``make_pipeline(source, ...)`` builds
  MapDataset.source(source)[: len - len % count][index::count]   this process's disjoint, equal-sized shard
    .shuffle(seed)                                               a fresh deterministic order every epoch
    .repeat(num_epochs)                                          (reseeded per epoch; None = endless)
    .batch(batch_size, drop_remainder=True)                      dict rows stacked to [B, ...]
    .to_iter_dataset()  [.mp_prefetch(worker_count)]
Batch k of the pipeline is a pure function of (source, seed, batch_size, process shard, k), so an iterator's
``get_state()`` (saved with a checkpoint) and ``set_state()`` resume the exact same sequence of batches.
"""

from __future__ import annotations

from typing import Any


def shard_bounds(length: int, process_index: int, process_count: int) -> slice:
    """The slice of a length-``length`` source that process ``process_index`` of ``process_count`` reads.

    Every process gets ``length // process_count`` rows (the last ``length % process_count`` rows are dropped, so
    all processes yield the same number of batches and none waits on a collective).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r}: must be in [0, process_count={process_count!r})")
    even = length - length % process_count
    if even == 0:
        raise ValueError(f"a source of {length} rows cannot give each of {process_count} processes a row")
    return slice(process_index, even, process_count)


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; mark them parsed when the program never called absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(source, *, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                  drop_remainder: bool = True, worker_buffer_size: int = 1) -> Any:
    """A grain ``IterDataset`` of batches {"inputs", "targets": int32 [B, S], "mask": float32 [B, S]} (the loss
    mask, 1 = counted), plus "segment_ids", "positions": int32 [B, S] from a packed source (``PackedTokenSource``).

    Args:
      source: a random-access source (``__len__``, ``__getitem__``), e.g. ``Task.source(...)``,
        ``ByteTextSource`` or ``PackedTokenSource``.
      batch_size: rows per batch *on this process* (the global batch is ``batch_size * process_count``).
      seed: shuffle seed; epoch e uses a seed derived from (seed, e).
      shuffle: False keeps source order (evaluation).
      num_epochs: passes over this process's shard; None repeats forever.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      worker_count: > 0 runs the pipeline in that many grain worker processes (``mp_prefetch``); call the
        iterator's ``close()`` when done to stop them promptly. Its ``get_state()`` differs in form from the
        in-process one, so resume with the same ``worker_count``.
      drop_remainder: drop a last partial batch (keep True for training: jitted steps want one shape).
    """
    import grain  # deferred: keeps `import loopjax` light for users without an input pipeline

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs!r}: must be None or >= 1")
    if worker_count < 0:
        raise ValueError(f"worker_count={worker_count!r}: must be >= 0")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count

    ds = grain.MapDataset.source(source)
    ds = ds[shard_bounds(len(ds), process_index, process_count)]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset()
    if worker_count > 0:
        ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    return it
