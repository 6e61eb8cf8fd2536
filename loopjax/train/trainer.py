"""``Trainer``: builds the sharded train state (or resumes it), runs the jitted step over a data iterator, logs,
evaluates, checkpoints, and stops cleanly on SIGTERM / SIGINT.

    trainer = Trainer(model_cfg, train_cfg, train_data=iterator, eval_data=lambda: eval_iterable,
                      workdir="runs/tiny")
    result = trainer.fit()          # resumes from workdir/checkpoints when a checkpoint is there

``train_data`` yields dict batches {"inputs", "targets": int [B, S], "mask" (loss mask), "segment_ids",
"positions": [B, S] optional} holding this
process's rows of the global batch; a grain ``DatasetIterator`` (anything with ``get_state`` / ``set_state``)
is checkpointed with the model, so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import warnings
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from loopjax import sharding as shd
from loopjax.checkpoint import Checkpointer, has_iterator_state
from loopjax.config import GATED_OBJECTIVES, LoopedConfig, TrainConfig
from loopjax.flops import train_flops
from loopjax.model import LoopedLM
from loopjax.train.metrics import MetricWriter, Progress, device_peak_flops
from loopjax.train.compiled import build_train_step
from loopjax.train.state import TrainState, abstract_target
from loopjax.train.step import loop_losses, make_eval_step


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient (``on_nonfinite="error"``)."""


@dataclasses.dataclass
class FitResult:
    """What ``Trainer.fit`` returns: the final step, why it stopped ("done" or "preempted"), the signal number
    when preempted, and the last logged train and eval metrics."""

    step: int
    status: str
    signal: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _state_from_params(init: nnx.State | LoopedLM, abstract: TrainState, tx, shardings: TrainState) -> TrainState:
    """A step-0 train state holding copies of ``init``'s parameters and a fresh optimizer state."""
    params = nnx.state(init, nnx.Param) if isinstance(init, nnx.Module) else init
    want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract.params)
    got = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.asarray(x).dtype), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError("init_params: must have the parameter names, shapes and dtypes of LoopedLM(model_cfg); "
                         f"got a different tree (first leaves {jax.tree.leaves(got)[:2]} vs "
                         f"{jax.tree.leaves(want)[:2]})")

    def build(p: nnx.State) -> TrainState:
        p = jax.tree.map(lambda x: x * jnp.ones((), x.dtype), p)  # a new buffer, never the caller's
        return TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p), nonfinite=jnp.int32(0),
                          first_nonfinite=jnp.int32(-1))
    return jax.jit(build, out_shardings=shardings)(params)


class Trainer:
    """Training loop for a ``LoopedLM`` (see the module docstring).

    model_cfg, train_cfg: the model and the run. train_data: iterator (or iterable) of this process's batches.
    eval_data: None, a callable returning a fresh iterable of eval batches, or an iterable re-iterated at every
      evaluation (``train_cfg.eval_batches`` batches are used). workdir: where checkpoints (``checkpoints/``),
      ``metrics.jsonl``, TensorBoard files (``tb/``) and ``config.json`` go; None = no files, no resume.
    mesh: a device mesh (default ``make_mesh(train_cfg.mesh)``). config: JSON-able dict of the whole experiment,
      saved beside and inside every checkpoint. on_step: called with the step number after every update.
    progress: force the progress bar on / off (default: on when stderr is a terminal). tensorboard: also write
      TensorBoard event files. restore_step: resume from this checkpoint step instead of the newest readable one.
    init_params: start from these weights (a ``LoopedLM`` or its ``nnx.Param`` state, e.g. a previous stage's
      ``trainer.state.params``) with a fresh optimizer state, instead of a random init; they are copied, so the
      caller's arrays stay valid. Ignored when a checkpoint in ``workdir`` is resumed.
    """

    def __init__(self, model_cfg: LoopedConfig, train_cfg: TrainConfig, *, train_data: Iterable[dict],
                 eval_data: Callable[[], Iterable[dict]] | Iterable[dict] | None = None,
                 workdir: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
                 config: dict | None = None, on_step: Callable[[int], None] | None = None,
                 progress: bool | None = None, tensorboard: bool = True, restore_step: int | None = None,
                 init_params: nnx.State | LoopedLM | None = None):
        self.model_cfg, self.cfg = model_cfg, train_cfg
        hcfg = train_cfg.objective
        if hcfg.objective in GATED_OBJECTIVES and not model_cfg.exit_gate:
            raise ValueError(f"objective.objective={hcfg.objective!r}: needs the exit gate (model exit_gate=True), "
                             "or use objective='final'")
        if train_cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len={train_cfg.seq_len}: must be <= the model's max_seq_len="
                             f"{model_cfg.max_seq_len}")
        self.mesh = mesh if mesh is not None else shd.make_mesh(train_cfg.mesh)
        self.rules = shd.rules_for(train_cfg.mesh.rules)
        batch_shards = int(np.prod([self.mesh.shape[a] for a in self.rules.mesh_axes("activation_batch")]))
        if train_cfg.batch_size % (batch_shards * train_cfg.grad_accum):
            raise ValueError(f"batch_size={train_cfg.batch_size}: must be a multiple of the {batch_shards} batch "
                             f"shards of the mesh times grad_accum={train_cfg.grad_accum}")
        if restore_step is not None and workdir is None:
            raise ValueError(f"restore_step={restore_step}: needs a workdir holding checkpoints")
        self.workdir = None if workdir is None else os.path.abspath(os.fspath(workdir))
        self.data_iter = iter(train_data)
        self.eval_data = eval_data
        self.on_step, self._progress_flag, self._tensorboard = on_step, progress, tensorboard

        program = build_train_step(model_cfg, train_cfg, self.mesh, self.rules)  # also what `loopjax aot` compiles
        tx, build, abstract = program.tx, program.build, program.abstract_state
        self.graphdef, self.state_shardings = program.graphdef, program.state_shardings
        self._replicated = NamedSharding(self.mesh, PartitionSpec())

        self.checkpointer = None
        restored = None
        if self.workdir is not None:
            self.checkpointer = Checkpointer(
                os.path.join(self.workdir, "checkpoints"), max_to_keep=train_cfg.keep_checkpoints,
                best_metric=train_cfg.best_metric if train_cfg.keep_best else None, best_mode=train_cfg.best_mode,
                async_save=train_cfg.async_checkpointing, config=config)
            data_iter = self.data_iter if has_iterator_state(self.data_iter) else None
            restored = self.checkpointer.restore(abstract_target(abstract, self.state_shardings),
                                                 data_iter=data_iter, step=restore_step)
        self.resumed_from = None if restored is None else restored[0]
        if restored is not None:
            self.state: TrainState = restored[1]
        elif init_params is not None:
            self.state = _state_from_params(init_params, abstract, tx, self.state_shardings)
        else:
            self.state = jax.jit(build, out_shardings=self.state_shardings)()
        self._last_saved = self.resumed_from

        self._train_step = program.step
        self._eval_step = jax.jit(make_eval_step(self.graphdef, train_cfg, model_cfg.n_loops,
                                                 train_cfg.log_loop_losses), out_shardings=self._replicated)
        graphdef = self.graphdef
        self._loop_losses = jax.jit(lambda p, b: loop_losses(nnx.merge(graphdef, p), b),
                                    out_shardings=self._replicated)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def step(self) -> int:
        return int(self.state.step)

    def model(self) -> LoopedLM:
        """The model with the current parameters (shares their arrays)."""
        return nnx.merge(self.graphdef, self.state.params)

    def device_batch(self, batch: dict) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the mesh's batch axes."""
        out = {}
        for key in ("inputs", "targets", "mask", "segment_ids", "positions"):
            if key in batch and batch[key] is not None:
                x = np.asarray(batch[key], np.float32 if key == "mask" else np.int32)
                out[key] = shd.shard_batch(x, self.mesh, self.rules)
        return out

    def _check_finite(self) -> None:
        if self.cfg.on_nonfinite != "error":
            return
        first = int(self.state.first_nonfinite)
        if first >= 0:
            raise NonFiniteError(f"non-finite loss or gradient at step {first + 1} (the update from step {first}); "
                                 f"that update and all later ones were not applied, and no checkpoint after step "
                                 f"{first} was written. Lower the learning rate, enable grad_clip, or set "
                                 "on_nonfinite='skip'")

    def save(self, metrics: dict | None = None) -> None:
        """Checkpoint the current state (and data position); refuses a state after a non-finite step."""
        if self.checkpointer is None:
            return
        self._check_finite()
        step = self.step
        data_iter = self.data_iter if has_iterator_state(self.data_iter) else None
        self.checkpointer.save(step, self.state, data_iter=data_iter, metrics=metrics)
        self._last_saved = step

    def evaluate(self, eval_data: Callable[[], Iterable[dict]] | Iterable[dict] | None = None,
                 n_batches: int | None = None) -> dict[str, float]:
        """Token-weighted mean of the eval metrics over ``n_batches`` (default ``eval_batches``) batches."""
        source = self.eval_data if eval_data is None else eval_data
        if source is None:
            raise ValueError("evaluate: no eval_data given (to the Trainer or to evaluate)")
        n = self.cfg.eval_batches if n_batches is None else n_batches
        batches = iter(source() if callable(source) else source)
        results = []
        with shd.use_rules(self.mesh, self.rules):
            for _, batch in zip(range(n), batches):
                results.append(self._eval_step(self.state.params, self.device_batch(batch)))
        if not results:
            raise ValueError("evaluate: eval_data yielded no batch")
        host = jax.device_get(results)
        w = np.array([r["tokens"] for r in host], np.float64)
        w = w / max(w.sum(), 1.0) if w.sum() > 0 else np.full(len(host), 1.0 / len(host))
        out = {f"eval/{k}": float(sum(wi * r[k] for wi, r in zip(w, host))) for k in host[0] if k != "tokens"}
        out["eval/tokens"] = float(sum(r["tokens"] for r in host))
        return out

    def _perf(self, n_steps: int, seconds: float, tokens_per_step: int, seq_len: int,
              n_loops: float) -> dict[str, float]:
        per_step_flops = self.cfg.batch_size * train_flops(
            self.model_cfg, seq_len, n_loops,
            readouts=1 if self.cfg.objective.objective in ("final", "act") else n_loops)
        out = {"perf/step_time_s": seconds / n_steps, "perf/tokens_per_s": n_steps * tokens_per_step / seconds}
        peak = self.cfg.peak_flops or device_peak_flops(self.mesh.devices.flat[0])
        out["perf/tflops_per_s"] = n_steps * per_step_flops / seconds / 1e12
        if peak:
            out["perf/mfu"] = n_steps * per_step_flops / seconds / (peak * self.mesh.devices.size)
        return out

    # --------------------------------------------------------------------------------------------- the loop

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        flag = self._stop_signal is not None
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def fit(self) -> FitResult:
        """Train to ``train_cfg.steps`` (from the restored step, if any); see the class docstring."""
        cfg = self.cfg
        if self.checkpointer is not None and not has_iterator_state(self.data_iter):
            warnings.warn("train_data has no get_state/set_state: a resumed run restarts the data stream "
                          "(use a grain pipeline for exact resumption)", stacklevel=2)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        writer = MetricWriter(self.workdir, tensorboard=self._tensorboard)
        step = self.step
        progress = Progress(cfg.steps, step, self._progress_flag)
        result = FitResult(step=step, status="done")
        pending: list[dict[str, jax.Array]] = []
        loop_ce = None
        t_last, steps_since = time.perf_counter(), 0
        try:
            while step < cfg.steps and not self._stop_requested():
                try:
                    host_batch = next(self.data_iter)
                except StopIteration:
                    raise RuntimeError(f"train_data ran out at step {step} of {cfg.steps}; use a repeating "
                                       "pipeline (num_epochs=None) or fewer steps") from None
                batch = self.device_batch(host_batch)
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                with shd.use_rules(self.mesh, self.rules):
                    if log_now and cfg.log_loop_losses:
                        loop_ce = self._loop_losses(self.state.params, batch)
                    self.state, metrics = self._train_step(self.state, batch)
                pending.append(metrics)
                step, steps_since = step + 1, steps_since + 1
                if log_now:
                    self._check_finite()
                    logged = {f"train/{k}": v for k, v in _mean_metrics(pending).items()}
                    logged["train/nonfinite_steps"] = float(self.state.nonfinite)
                    if loop_ce is not None:
                        ce_T = jax.device_get(loop_ce)
                        logged.update({f"train/ce_loop{t + 1}": float(v) for t, v in enumerate(ce_T)})
                    b, s = batch["inputs"].shape
                    n_loops = logged.get("train/n_loops", float(self.model_cfg.n_loops))
                    logged.update(self._perf(steps_since, time.perf_counter() - t_last, b * s, s, n_loops))
                    writer.write(step, logged)
                    result.metrics = logged
                    progress.update(0, {"loss": logged["train/loss"]})
                    pending, loop_ce = [], None
                    t_last, steps_since = time.perf_counter(), 0
                eval_metrics = None
                if cfg.eval_every and self.eval_data is not None and step % cfg.eval_every == 0:
                    eval_metrics = self.evaluate()
                    writer.write(step, eval_metrics)
                    result.eval_metrics = eval_metrics
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or (eval_metrics and cfg.keep_best):
                    self.save(metrics=eval_metrics if cfg.keep_best else None)
                progress.update(1)
                if self.on_step is not None:
                    self.on_step(step)
            if self._stop_signal is not None or (jax.process_count() > 1 and step < cfg.steps):
                result.status, result.signal = "preempted", self._stop_signal
            if self._last_saved != step:
                self.save()
            if self.checkpointer is not None:
                self.checkpointer.wait()
            self._check_finite()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            writer.close()
            progress.close()
        result.step = step
        return result

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
