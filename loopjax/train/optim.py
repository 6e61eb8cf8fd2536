"""AdamW with warmup + cosine / warmup-stable-decay / constant schedules and global-norm clipping."""

from __future__ import annotations

import jax
import optax

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


def decay_mask(params):
    """Weight decay on matrices only (not norm scales, the gate vector or its bias)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(tcfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, schedule): optional global-norm clipping, then AdamW."""
    schedule = make_schedule(tcfg)
    parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
