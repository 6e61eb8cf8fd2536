"""AdamW with warmup + cosine / warmup-stable-decay / constant schedules and global-norm clipping."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from loopjax.config import TrainConfig


def make_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Learning rate as a function of the update count (0-based)."""
    peak, warm, total = tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps
    end = peak * tcfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    if tcfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total - warm, 1), alpha=tcfg.min_lr_ratio)
    elif tcfg.schedule == "wsd":
        n_decay = max(int(round(tcfg.decay_fraction * total)), 1)
        stable = max(total - warm - n_decay, 0)
        decay = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, n_decay)],
                                     [stable])
    else:
        decay = optax.constant_schedule(peak)
    if warm == 0:
        return decay
    return optax.join_schedules([warmup, decay], [warm])


def decays(param: nnx.Variable) -> bool:
    """The rule of ``decay_mask`` for one parameter: its ``weight_decay`` metadata when it has one, else
    whether it is a matrix (2+ dimensions)."""
    return bool(param.get_metadata().get("weight_decay", param.ndim >= 2))


def decay_mask(params):
    """Which parameters AdamW decays (``decays``): matrices, except those created with
    ``nnx.Param(..., weight_decay=False)``. So no decay on norm scales, the exit-gate vector and bias, the
    memory banks' keys and values, the memory gates' biases (``loopjax.memory``); a new parameter opts out by
    that tag (vectors and scalars, e.g. per-iteration residual scales, are already out)."""
    return jax.tree.map(lambda v: v.replace(decays(v)), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(tcfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, schedule): optional global-norm clipping, then AdamW."""
    schedule = make_schedule(tcfg)
    parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
