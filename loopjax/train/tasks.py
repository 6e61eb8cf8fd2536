"""Train a model on a synthetic task and score its answers: the building blocks of experiments and notebooks.

    trainer = fit_on_task(model_cfg, train_cfg, PHop(alphabet=4, n=24, hops=(2, 3)))
    score = task_accuracy(trainer.model(), PHop(alphabet=4, n=24, hops=(3,), max_hops=3), n_loops=6)
    score.accuracy, score.by_difficulty, score.answer_exit

Accuracy is exact match of every answer token under one teacher-forced forward (``answer_correct``), which equals
greedy decoding's exact match (see ``loopjax.data.tasks.base``). Evaluation examples come from a seed disjoint from
training's (``EVAL_SEED``), so the score is on held-out examples.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Hashable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.config import LoopedConfig, TrainConfig
from loopjax.data.pipeline import make_pipeline
from loopjax.data.tasks.base import Task, answer_correct
from loopjax.train.experiment import _jsonable
from loopjax.train.trainer import Trainer

EVAL_SEED = 1_000_003  # the held-out stream; training uses train_cfg.seed


def fit_on_task(model_cfg: LoopedConfig, train_cfg: TrainConfig, task: Task, *,
                workdir: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
                progress: bool | None = None, tensorboard: bool = False, eval_count: int = 0) -> Trainer:
    """Train a fresh model (seed ``train_cfg.seed``) on ``task``'s endless stream; return the fitted ``Trainer``.

    ``trainer.model()`` is the trained ``LoopedLM``. With a ``workdir`` the run checkpoints there and a rerun
    resumes (or returns at once when it already reached ``train_cfg.steps``). ``eval_count`` > 0 held-out examples
    give the Trainer an eval stream (used every ``train_cfg.eval_every`` steps). A run stopped by SIGTERM / SIGINT
    raises ``TrainingInterrupted`` rather than returning a partly trained model.
    """
    if task.length != train_cfg.seq_len:
        raise ValueError(f"train_cfg.seq_len={train_cfg.seq_len}: must equal the task's row length {task.length} "
                         "(set the task's seq_len or the TrainConfig's)")
    if task.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"model_cfg.vocab_size={model_cfg.vocab_size}: must be >= the task's vocabulary "
                         f"{task.vocab_size}")
    n_proc = jax.process_count()
    if train_cfg.batch_size % n_proc:
        raise ValueError(f"train_cfg.batch_size={train_cfg.batch_size}: must be a multiple of the {n_proc} processes")
    local = train_cfg.batch_size // n_proc
    train = make_pipeline(task.source(seed=train_cfg.seed), batch_size=local, seed=train_cfg.seed)
    eval_data = None
    if eval_count:
        eval_src = task.source(seed=EVAL_SEED, num_examples=max(eval_count, train_cfg.batch_size))
        eval_data = lambda: make_pipeline(eval_src, batch_size=local, seed=0, shuffle=False,  # noqa: E731
                                          num_epochs=1)
    config = {"model": dataclasses.asdict(model_cfg), "train": _jsonable(dataclasses.asdict(train_cfg)),
              "task": {"class": type(task).__name__, **_jsonable(dataclasses.asdict(task))}}
    trainer = Trainer(model_cfg, train_cfg, train_data=iter(train), eval_data=eval_data, workdir=workdir,
                      mesh=mesh, config=config, progress=progress, tensorboard=tensorboard)
    result = trainer.fit()
    if result.status == "preempted":
        raise TrainingInterrupted(result, train_cfg.steps, workdir)
    return trainer


class TrainingInterrupted(RuntimeError):
    """``fit_on_task`` stopped early on SIGTERM / SIGINT: the model is not trained to ``steps``, so it is not
    returned (with a ``workdir`` the stopped run is checkpointed there and a rerun resumes it)."""

    def __init__(self, result, steps: int, workdir):
        self.result = result
        saved = f"checkpointed in {workdir}: rerun to resume" if workdir is not None else "nothing saved (no workdir)"
        super().__init__(f"training stopped by signal {result.signal} at step {result.step} of {steps}; {saved}")


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """Held-out answer accuracy of one model under one loop setting.

    accuracy: exact-match fraction over all examples. by_difficulty: the same per difficulty label (p, n, or
    (depth, ops)), sorted by label. answer_exit: mean exit step (1-based) at the answer positions (the loop count
    itself for fixed loops). n_examples: examples scored.
    """

    accuracy: float
    by_difficulty: dict[Hashable, float]
    answer_exit: float
    n_examples: int


@functools.partial(jax.jit, static_argnums=0, static_argnames=("n_loops", "exit_rule", "run_all_loops"))
def _predict(graphdef, state, inputs_BS, *, n_loops, exit_rule, run_all_loops):
    out = nnx.merge(graphdef, state)(inputs_BS, n_loops=n_loops, exit_rule=exit_rule, run_all_loops=run_all_loops)
    exit_BS = out.exit_step if out.exit_step is not None else jnp.full(inputs_BS.shape, n_loops, jnp.int32)
    return out.logits.argmax(-1), exit_BS


def task_accuracy(model, task: Task, *, n_loops: int | None = None, exit_rule: Any = None,
                  run_all_loops: bool = False, count: int = 512, seed: int = EVAL_SEED,
                  batch_size: int = 256) -> TaskScore:
    """Score ``model`` (a ``LoopedLM``) on ``count`` held-out examples of ``task`` (stream ``seed``).

    n_loops: loops to run (default the model config's); with an ``exit_rule`` it is the most loops a token may run.
    The task's row length must fit the model's ``max_seq_len``.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count={count!r}: must be an int >= 1")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if task.length > model.cfg.max_seq_len:
        raise ValueError(f"task row length {task.length}: exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    n_loops = model.cfg.n_loops if n_loops is None else n_loops
    examples = list(task.examples(seed, count))
    labels = [ex.difficulty for ex in examples]
    rows = [task.eval_example(ex) for ex in examples]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    graphdef, state = nnx.split(model)
    correct, exits = [], []
    for start in range(0, count, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
        pred_BS, exit_BS = _predict(graphdef, state, jnp.asarray(chunk["inputs"]), n_loops=n_loops,
                                    exit_rule=exit_rule, run_all_loops=run_all_loops)
        correct.append(answer_correct(np.asarray(pred_BS), chunk))
        exits.append(np.asarray(exit_BS, np.float64))
    correct_B = np.concatenate(correct).astype(np.float64)
    exit_BS = np.concatenate(exits)
    answer_BS = batch["mask"] > 0
    by = {}
    for label in sorted(set(labels), key=lambda d: (str(type(d)), d)):
        rows_of = np.array([lab == label for lab in labels])
        by[label] = float(correct_B[rows_of].mean())
    return TaskScore(accuracy=float(correct_B.mean()), by_difficulty=by,
                     answer_exit=float(exit_BS[answer_BS].mean()), n_examples=count)


def accuracy_vs_loops(model, task: Task, loops: Iterable[int], **kwargs: Any) -> dict[int, TaskScore]:
    """``task_accuracy`` at each fixed loop count in ``loops`` (fewer or more than trained: same weights)."""
    return {int(n): task_accuracy(model, task, n_loops=int(n), **kwargs) for n in loops}
