"""Checkpoints: orbax ``CheckpointManager`` with async saves, retention (last K, optionally the best by an eval
metric), the data iterator's state and the config saved with the train state, integrity fingerprints,
fallback past an unreadable latest checkpoint, and restore onto any mesh.

Layout of ``directory/<step>/``: ``state`` (the train-state pytree, OCDBT), ``data`` (grain iterator state, one
JSON per process), ``meta`` (step, a per-leaf fingerprint of the state, the config). A checkpoint whose files
are missing or damaged, or whose restored arrays do not match the fingerprint, is *unreadable*: ``restore``
moves it aside to ``<step>.unreadable-<time>`` with a warning and tries the next older one; it raises rather
than start from scratch when none is readable. A checkpoint whose shapes do not match the target (a changed
model config) is a user error and raises without touching anything.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm



class UnreadableCheckpointError(RuntimeError):
    """A checkpoint exists but none could be restored."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the restore target (written for another model / optimizer config)."""


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    return jnp.sum(bits, dtype=jnp.uint32)  # integer sum mod 2**32: independent of reduction order and sharding


_fingerprints = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def fingerprint(tree: Any) -> list[int]:
    """Per-leaf checksum of a pytree of arrays (sum of the bit patterns mod 2**32), as Python ints."""
    return [int(v) for v in jax.device_get(_fingerprints(jax.tree.leaves(tree)))]


class _IteratorState:
    """A snapshot of an iterator's state in the shape grain's checkpoint handler accepts (bytes).

    The snapshot is taken when ``save`` is called, so an async save cannot see a later iterator position.
    """

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after set_state; a captured state has nothing to prefetch."""


def _encode_iter_state(it: Any) -> bytes:
    state = it.get_state()
    return state if isinstance(state, bytes) else json.dumps(state).encode()


def _decode_iter_state(it: Any, raw: bytes) -> None:
    import grain

    it.set_state(json.loads(raw.decode()) if isinstance(it, grain.DatasetIterator) else raw)


def has_iterator_state(it: Any) -> bool:
    return callable(getattr(it, "get_state", None)) and callable(getattr(it, "set_state", None))


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class Checkpointer:
    """orbax-backed checkpoints of a train state (+ data iterator state + config) in ``directory``.

    max_to_keep: keep the last K checkpoints. best_metric / best_mode: also keep the best checkpoint by that
    metric (pass it in ``save(..., metrics=)``); "min" or "max". async_save: write in a background thread
    (``save`` returns once the arrays are copied off the devices). config: a JSON-able dict saved in every
    checkpoint's ``meta`` and as ``directory/config.json``.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, config: dict | None = None):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}: must be 'min' or 'max'")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep, self.best_metric, self.best_mode = max_to_keep, best_metric, best_mode
        self.async_save, self.config = async_save, config
        self._manager = self._make_manager()
        if config is not None and jax.process_index() == 0:
            with open(os.path.join(self.directory, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)

    def _make_manager(self) -> ocp.CheckpointManager:
        policy: Any = ocm.LatestN(n=self.max_to_keep)
        best_fn = None
        if self.best_metric is not None:
            sign, metric = (1.0 if self.best_mode == "max" else -1.0), self.best_metric
            best_fn = lambda m: float(m[metric])  # noqa: E731  (also makes orbax write the metrics to disk)
            best = ocm.BestN(get_metric_fn=lambda m: sign * float(m[metric]), n=1,
                             keep_checkpoints_without_metrics=False)
            policy = ocm.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=self.async_save,
                                               preservation_policy=policy, best_fn=best_fn,
                                               best_mode=self.best_mode)
        import grain

        handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
                        data=grain.checkpoint.CheckpointHandler())
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without metrics)."""
        if self.best_metric is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), step))
        if not scored:
            return None
        return (min(scored) if self.best_mode == "min" else max(scored))[1]

    def save(self, step: int, state: Any, *, data_iter: Any = None, metrics: dict | None = None) -> None:
        """Save ``state`` (a pytree of jax arrays) at ``step``, with the iterator's state and a fingerprint.

        Returns once the arrays are off the devices; the write finishes in the background (``wait``).
        """
        items = dict(state=ocp.args.StandardSave(state),
                     meta=ocp.args.JsonSave(dict(step=int(step), fingerprint=fingerprint(state),
                                                 config=self.config)))
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(_IteratorState(_encode_iter_state(data_iter)))
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _check_shapes(self, step: int, target: Any) -> None:
        """Raise ValueError when the saved tree does not fit ``target`` (a config change, not corruption)."""
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise FileNotFoundError(f"step {step}: no state metadata")
        saved_shapes = {x.name: tuple(x.shape) for x in jax.tree.leaves(saved.tree)}
        for path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
            name = ".".join(_key_name(k) for k in path)
            if name not in saved_shapes:
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} has no entry {name!r}: "
                                              "it was written for a different model / optimizer config")
            if saved_shapes[name] != tuple(want.shape):
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory}: {name!r} has shape "
                                              f"{saved_shapes[name]}, the current config gives {tuple(want.shape)}")

    def restore_step(self, step: int, target: Any, *, data_iter: Any = None) -> Any:
        """Restore ``step`` into ``target`` (``jax.ShapeDtypeStruct`` leaves with shardings: any mesh).

        Raises on a damaged checkpoint (missing files, undecodable data, fingerprint mismatch).
        """
        items = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        snapshot = _IteratorState()
        # A checkpoint saved without a data position (``loopjax convert import``) leaves the iterator at its start.
        if data_iter is not None and not os.path.isdir(os.path.join(self.directory, str(step), "data")):
            data_iter = None
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        state, meta = restored["state"], restored["meta"]
        if meta is None or fingerprint(state) != meta["fingerprint"]:
            raise UnreadableCheckpointError(f"step {step}: restored arrays do not match the saved fingerprint")
        if data_iter is not None:
            _decode_iter_state(data_iter, snapshot.state)
        return state

    def restore(self, target: Any, *, data_iter: Any = None, step: int | None = None) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint (or of ``step``), None when there is none.

        An unreadable checkpoint is moved aside with a warning and the next older one is tried; if checkpoints
        exist and none is readable this raises ``UnreadableCheckpointError`` (it never silently starts over).
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        if step is not None and step not in self.all_steps():
            raise ValueError(f"step={step}: no such checkpoint in {self.directory} (have {self.all_steps()})")
        for s in steps:
            try:
                self._check_shapes(s, target)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # unreadable metadata: a damaged checkpoint
                self._set_aside(s, err)
                continue
            try:
                return s, self.restore_step(s, target, data_iter=data_iter)
            except Exception as err:
                self._set_aside(s, err)
        if steps:
            raise UnreadableCheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps}); "
                                            "refusing to start from scratch: remove the directory to do so")
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        name = f"{step}.unreadable-{int(time.time())}"
        warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable ({type(err).__name__}: "
                      f"{str(err)[:300]}); moving it to {name} and falling back to an earlier checkpoint",
                      RuntimeWarning, stacklevel=3)
        self._manager.wait_until_finished()
        self._manager.close()
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"loopjax_checkpoint_set_aside_{step}")
        self._manager = self._make_manager()
