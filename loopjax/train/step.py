"""Pure, jittable steps: the objective on one batch, the train step (with gradient accumulation and the
non-finite guard) and the evaluation step.

Batches are dicts {"inputs": int32 [B, S], "targets": int32 [B, S], "mask": [B, S] optional (the loss mask:
1 = counted), "segment_ids", "positions": int32 [B, S] optional (packed documents; see ``LoopedLM``)}.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopjax import halting
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.partitioning import LOGITS_BSV, with_logical_constraint
from loopjax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def masked_mean(x_BS: jax.Array, mask_BS: jax.Array | None) -> jax.Array:
    if mask_BS is None:
        return x_BS.mean()
    m = mask_BS.astype(jnp.float32)
    return (x_BS * m).sum() / jnp.maximum(m.sum(), 1.0)


def token_weight(batch: Batch) -> jax.Array:
    """Counted tokens of a batch (float32 scalar)."""
    mask = batch.get("mask")
    if mask is None:
        return jnp.float32(batch["targets"].size)
    return mask.astype(jnp.float32).sum()


def layout_kwargs(batch: Batch) -> dict[str, jax.Array]:
    """The model keywords a batch's packing carries (``positions_BS``, ``segment_ids_BS``), when present."""
    return {f"{k}_BS": batch[k] for k in ("positions", "segment_ids") if batch.get(k) is not None}


def _readout_fns(model, batch: Batch) -> tuple[Callable[[jax.Array], jax.Array], Callable | None]:
    """(token-wise head: states [B, s, D] -> logits, sequence-wise coda or None) for a batch's layout."""
    if not model.coda:
        return model.token_logits, None
    b, s = batch["inputs"].shape
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin, layout = model.rope_and_layout(positions, None, batch.get("segment_ids"))
    return model.token_logits, lambda h_BSD: model.readout_state(h_BSD, cos, sin, layout)


def objective_loss(model, batch: Batch, hcfg: HaltingConfig, z_loss: float,
                   key: jax.Array | None) -> tuple[jax.Array, Metrics]:
    """(total loss, metrics) of ``hcfg.objective`` (+ z-loss) on one batch; the metrics are scalars.

    With ``hcfg.chunked`` no [B, S, V] logits are materialised: every CE (and the z-loss's logsumexp) runs over
    blocks of ``hcfg.ce_block`` positions from the read-out states.
    """
    inputs, targets, mask = batch["inputs"], batch["targets"], batch.get("mask")
    halting.check_ponder(hcfg, model.cfg.layer_loops)
    metrics: Metrics = {}
    if hcfg.random_loops:
        kwargs = halting.loop_kwargs(hcfg, key)
        out = model(inputs, **kwargs, **layout_kwargs(batch))
        metrics["n_loops"] = kwargs["n_loops"].astype(jnp.float32)
    else:
        out = model(inputs, return_steps=hcfg.objective != "final", **layout_kwargs(batch))
    head_fn, prepare_fn = _readout_fns(model, batch)
    if hcfg.chunked and hcfg.objective in ("ouro", "pondernet"):
        total, metrics = _fused_objective_loss(model, out, batch, hcfg, z_loss, prepare_fn)
        return _add_ponder(model, out, hcfg, mask, total, metrics)
    if hcfg.chunked:  # the read-out state's CE and logsumexp (ce_final, the z-loss) in one blocked pass
        ce_TBS, lse_TBS = halting.chunked_step_cross_entropy(
            out.hidden[None], head_fn, targets, block_tokens=hcfg.ce_block, prepare_fn=prepare_fn, return_lse=True)
        ce_BS, lse_BS = ce_TBS[0], lse_TBS[0]
    else:
        ce_BS, lse_BS = halting.cross_entropy(out.logits, targets), None
    ce_final = masked_mean(ce_BS, mask)
    if hcfg.objective == "final":
        loss = ce_final
    else:
        # the per-layer ponder term is added once for every objective, by ``_add_ponder``
        loss = halting.halting_loss(hcfg.replace(ponder_weight=0.0), gate_BST=out.gate_logits, labels_BS=targets,
                                    mask_BS=mask, step_logits_TBSV=out.step_logits, step_hidden_TBSD=out.step_hidden,
                                    head_fn=head_fn, prepare_fn=prepare_fn, gate_fn=model.core.gate)
    total = loss
    if z_loss > 0:
        lse = jax.nn.logsumexp(out.logits, axis=-1) if lse_BS is None else lse_BS
        z = masked_mean(jnp.square(lse), mask)
        total = total + z_loss * z
        metrics["z_loss"] = z
    metrics.update(loss=loss, ce_final=ce_final)
    metrics.update(_exit_metrics(out, mask))
    return _add_ponder(model, out, hcfg, mask, total, metrics)


def _add_ponder(model, out, hcfg: HaltingConfig, mask: jax.Array | None, total: jax.Array,
                metrics: Metrics) -> tuple[jax.Array, Metrics]:
    """The per-layer loops' ponder term added to the loss (when weighted) and their E[n] per layer as metrics."""
    if out.layer_expected_n is None:
        return total, metrics
    en_BSK = out.layer_expected_n
    for l in range(en_BSK.shape[-1]):
        metrics[f"layer{l}_expected_n"] = masked_mean(en_BSK[..., l], mask)
    metrics["layer_expected_n"] = masked_mean(en_BSK.mean(-1), mask)
    if hcfg.ponder_weight != 0:
        ponder = halting.layer_ponder_cost(en_BSK, model.cfg.layer_loops, mask)
        metrics["layer_ponder"] = ponder
        metrics["loss"] = metrics["loss"] + hcfg.ponder_weight * ponder
        total = total + hcfg.ponder_weight * ponder
    return total, metrics


def _exit_metrics(out, mask: jax.Array | None) -> Metrics:
    if out.exit_pdf is None:
        return {}
    pdf = out.exit_pdf
    entropy = -jnp.sum(pdf * jnp.log(jnp.maximum(pdf, 1e-30)), axis=-1)
    depth = jnp.sum(pdf * jnp.arange(1, pdf.shape[-1] + 1, dtype=pdf.dtype), axis=-1)
    return dict(exit_entropy=masked_mean(entropy, mask), exit_depth=masked_mean(depth, mask))


def _fused_objective_loss(model, out, batch: Batch, hcfg: HaltingConfig, z_loss: float,
                          prepare_fn: Callable | None) -> tuple[jax.Array, Metrics]:
    """``objective_loss`` for "ouro" / "pondernet" with ``chunked``: every loop's CE and its gradient in one
    blocked pass over the head (``halting.fused_step_cross_entropy``), the z-loss on the last loop's. Coda layers
    (``prepare_fn``, sequence-wise) run on each loop's state first, rematerialised in the backward pass."""
    targets, mask = batch["targets"], batch.get("mask")
    h_TBSD = out.step_hidden if prepare_fn is None else jax.lax.map(jax.checkpoint(prepare_fn), out.step_hidden)
    weight_TBS, regulariser = halting.expected_loss_terms(hcfg, out.gate_logits, mask)
    m = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    z_weight = z_loss * m / jnp.maximum(m.sum(), 1.0) if z_loss > 0 else None
    ce_part, ce_TBS, lse_TBS = halting.fused_step_cross_entropy(
        h_TBSD, model.head_weight(), targets, weight_TBS, z_weight, block_tokens=hcfg.ce_block,
        logits_fn=lambda x: with_logical_constraint(x, LOGITS_BSV),
        dw_fn=lambda x: with_logical_constraint(x, ("embed", "vocab")))
    total = ce_part + regulariser
    loss = jnp.sum(jax.lax.stop_gradient(weight_TBS) * ce_TBS) + regulariser
    metrics: Metrics = dict(loss=loss, ce_final=masked_mean(ce_TBS[-1], mask), **_exit_metrics(out, mask))
    if z_loss > 0:
        metrics["z_loss"] = masked_mean(jnp.square(lse_TBS[-1]), mask)
    return total, metrics


def loop_losses(model, batch: Batch, n_loops: int | None = None, block_tokens: int = 1024) -> jax.Array:
    """Masked-mean CE after every loop, float32 [T], from step states one [B, block_tokens, V] block at a time."""
    out = model(batch["inputs"], n_loops=n_loops, return_steps=True, **layout_kwargs(batch))
    head_fn, prepare_fn = _readout_fns(model, batch)
    ce_TBS = halting.chunked_step_cross_entropy(out.step_hidden, head_fn, batch["targets"],
                                                block_tokens=block_tokens, prepare_fn=prepare_fn)
    return jax.vmap(lambda ce: masked_mean(ce, batch.get("mask")))(ce_TBS)


def _micro_batches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...]; micro-batch a takes rows a, a + n, ... so each device's rows split evenly."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(graphdef: nnx.GraphDef, tcfg: TrainConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure ``train_step(state, batch) -> (state, metrics)`` (jit it with the state donated).

    The gradient of a step is the token-weighted mean of its ``grad_accum`` micro-batch gradients (equal to the
    full-batch gradient for the token-mean objectives). A non-finite loss or gradient norm leaves params and
    optimizer state unchanged and is counted; with ``on_nonfinite="error"`` every later update is dropped too.
    """
    hcfg, n_micro = tcfg.objective, tcfg.grad_accum

    def loss_fn(params, batch, key):
        total, metrics = objective_loss(nnx.merge(graphdef, params), batch, hcfg, tcfg.z_loss, key)
        return total, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, batch, key):
        if n_micro == 1:
            (total, metrics), grads = grad_fn(params, batch, key)
            return grads, dict(metrics, total_loss=total)

        def body(acc, mb):
            (total, metrics), grads = grad_fn(params, mb, key)
            w = token_weight(mb)
            metrics = dict(metrics, total_loss=total)
            return jax.tree.map(lambda a, x: a + w * x, acc, (grads, metrics)), w

        micro = _micro_batches(batch, n_micro)
        names = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), key)[0][1])
        zeros = (jax.tree.map(jnp.zeros_like, params),
                 {k: jnp.zeros((), jnp.float32) for k in [*names, "total_loss"]})
        (grads, metrics), weights = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(weights.sum(), 1.0)
        return jax.tree.map(lambda x: x / denom, (grads, metrics))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(jax.random.PRNGKey(tcfg.seed), state.step)
        grads, metrics = grads_and_metrics(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        apply = finite if tcfg.on_nonfinite == "skip" else finite & (state.first_nonfinite < 0)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        first = jnp.where(~finite & (state.first_nonfinite < 0), state.step, state.first_nonfinite)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               nonfinite=state.nonfinite + (~finite).astype(jnp.int32), first_nonfinite=first)
        metrics = dict(metrics, grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32),
                       finite=finite.astype(jnp.float32), tokens=token_weight(batch))
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, tcfg: TrainConfig, n_loops: int,
                   with_loops: bool) -> Callable[[nnx.State, Batch], Metrics]:
    """``eval_step(params, batch) -> metrics``: objective loss, final CE, token accuracy, exact match (rows
    whose every counted target is the argmax), per-loop CE when ``with_loops``, and the token weight."""
    hcfg = tcfg.objective.replace(random_loops=False)

    def eval_step(params: nnx.State, batch: Batch) -> Metrics:
        model = nnx.merge(graphdef, params)
        _, metrics = objective_loss(model, batch, hcfg, 0.0, None)
        logits = model(batch["inputs"], **layout_kwargs(batch)).logits
        mask = batch.get("mask")
        right = jnp.argmax(logits, -1) == batch["targets"]
        metrics["accuracy"] = masked_mean(right.astype(jnp.float32), mask)
        counted = jnp.ones_like(right) if mask is None else mask > 0
        metrics["exact_match"] = jnp.mean(jnp.all(right | ~counted, axis=-1).astype(jnp.float32))
        if with_loops:
            for t, ce in enumerate(loop_losses(model, batch, n_loops)):
                metrics[f"ce_loop{t + 1}"] = ce
        metrics["tokens"] = token_weight(batch)
        return metrics

    return eval_step
