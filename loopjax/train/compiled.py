"""The jitted train step exactly as ``Trainer`` runs it (shardings, donation), built in one place so that
``loopjax aot`` compiles the same function for a TPU topology that a training run executes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loopjax import sharding as shd
from loopjax.config import LoopedConfig, TrainConfig
from loopjax.looped import tpu_remat_problem
from loopjax.partitioning import LogicalRules
from loopjax.train.optim import make_optimizer
from loopjax.train.state import TrainState, abstract_target, model_graphdef, state_builder
from loopjax.train.step import make_train_step

BATCH_KEYS = ("inputs", "targets")  # what ``Trainer.device_batch`` passes for an unmasked token batch
PACKED_KEYS = ("mask", "segment_ids", "positions")  # added by packed corpora (documents packed into rows)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The pieces of a training run's compiled step.

    step: ``jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, replicated))``; trace it
      inside ``use_rules(mesh, rules)``. build: no-argument initial-state builder. abstract_state: its
      ``eval_shape``. state_shardings: NamedShardings of the state (one per Variable / leaf).
    """

    step: Callable
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    build: Callable[[], TrainState]
    abstract_state: Any
    state_shardings: Any
    mesh: Mesh
    rules: LogicalRules

    def abstract_args(self, batch_size: int, seq_len: int,
                      packed: bool = False) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
        """(state, batch) as sharded ``jax.ShapeDtypeStruct``s: what ``step.lower`` takes for an AOT compile.

        packed: the batch also carries a float32 loss mask, segment ids and positions (packed documents).
        """
        state = abstract_target(self.abstract_state, self.state_shardings)
        rows = shd.batch_sharding(self.mesh, self.rules)
        keys = BATCH_KEYS + (PACKED_KEYS if packed else ())
        batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jax.numpy.float32 if k == "mask" else
                                         jax.numpy.int32, sharding=rows) for k in keys}
        return state, batch


def compiler_options(train_cfg: TrainConfig, mesh: Mesh) -> dict[str, Any] | None:
    """XLA options of the train step on ``mesh``'s platform (the TPU scheduler's memory limit, when set)."""
    if mesh.devices.flat[0].platform == "tpu" and train_cfg.tpu_scheduler_memory_percent:
        return {"xla_tpu_scheduler_percent_shared_memory_limit": train_cfg.tpu_scheduler_memory_percent}
    return None


def build_train_step(model_cfg: LoopedConfig, train_cfg: TrainConfig, mesh: Mesh,
                     rules: LogicalRules | None = None) -> TrainProgram:
    """The train step of ``(model_cfg, train_cfg)`` on ``mesh`` (rules default to ``train_cfg.mesh.rules``)."""
    if mesh.devices.flat[0].platform == "tpu" and (problem := tpu_remat_problem(model_cfg)):
        raise ValueError(problem)
    rules = shd.rules_for(train_cfg.mesh.rules) if rules is None else rules
    tx, schedule = make_optimizer(train_cfg)
    graphdef = model_graphdef(model_cfg)
    build = state_builder(model_cfg, tx, train_cfg.seed)
    abstract = jax.eval_shape(build)
    state_shardings = shd.param_shardings(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(make_train_step(graphdef, train_cfg, tx, schedule), donate_argnums=0,
                   out_shardings=(state_shardings, replicated), compiler_options=compiler_options(train_cfg, mesh))
    return TrainProgram(step=step, graphdef=graphdef, tx=tx, schedule=schedule, build=build,
                        abstract_state=abstract, state_shardings=state_shardings, mesh=mesh, rules=rules)
