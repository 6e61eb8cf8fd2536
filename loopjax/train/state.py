"""The train state: parameters, optimizer state and counters as one pytree, created directly sharded."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopjax.config import LoopedConfig
from loopjax.model import LoopedLM


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes (a pytree; the model's graphdef is kept beside it).

    step: int32 [] updates taken (including dropped non-finite ones). params: ``nnx.State`` of the model's
    ``nnx.Param`` variables (with their ``logical_axes`` metadata). opt_state: the optax state (its moments are
    Params with the same metadata, so they shard like their parameters). nonfinite: int32 [] updates dropped
    for a non-finite loss or gradient. first_nonfinite: int32 [] the first such step, -1 if none.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    nonfinite: jax.Array
    first_nonfinite: jax.Array


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def model_graphdef(model_cfg: LoopedConfig) -> nnx.GraphDef:
    """The static graph of ``LoopedLM(model_cfg)``, from a shape-only build."""
    abstract = nnx.eval_shape(lambda: LoopedLM(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("LoopedLM has non-Param state; the train state holds only nnx.Param variables")
    return graphdef


def state_builder(model_cfg: LoopedConfig, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
    """A no-argument function building the initial state (run it under jit / eval_shape)."""
    def build() -> TrainState:
        params = nnx.state(LoopedLM(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite=jnp.int32(0),
                          first_nonfinite=jnp.int32(-1))
    return build


def leafwise(prefix_tree: Any, tree: Any) -> Any:
    """Expand a prefix tree (e.g. one NamedSharding per Variable) to the full structure of ``tree``."""
    return jax.tree.map(lambda p, sub: jax.tree.map(lambda _: p, sub), prefix_tree, tree)


def abstract_target(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (a restore target on the current mesh)."""
    full = leafwise(shardings, abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, full)
