"""Record a looped model's trajectory: the residual stream after every core layer at every loop, and attention.

The recorder re-runs the model's own submodules (``embed_tokens``, ``rope_and_layout``, prelude layers,
``core.inject``, each core layer's ``norm_in`` / ``attn.project`` / ``attn.attend`` / ``attn_residual`` /
``mlp_residual``, ``core.norm``, the step norm, ``core.gate``, ``readout``) in its own jitted ``lax.scan`` over
loops, so the model's normal path is untouched and costs nothing extra when not recording. Attention
probabilities come from ``Attention.probs``, the same softmax ``attend`` applies. Tests check that the recorded
step states and logits equal ``model(tokens, return_steps=True)``.

Shapes: T loops, k core layers, B batch, S sequence, D d_model, N recorded heads, Q recorded query positions,
V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trajectory:
    """What ``record`` returns.

    embed_BSD: the core's input e (embedding after the prelude), fixed across loops.
    state0_BSD: the carried state entering loop 1 (e, or zeros with input injection).
    layer_TkBSD: residual stream after core layer l at loop t (before the core's output norm).
    state_TBSD: carried state after each loop (what loop t + 1 starts from).
    out_TBSD: read-out state after each loop (= ``LoopedOutput.step_hidden``).
    gate_TBS: exit-gate logits per loop (None without a gate).
    attn_TkBNQS: attention probabilities of the recorded heads and query positions over all S keys (None when
      not recorded); rows of padded queries are whatever the masked softmax gives.
    step_logits_TBSV: logits read out after each loop (None when not recorded).
    heads_N, queries_Q: int32 indices of the recorded heads and query positions.
    """

    embed_BSD: jax.Array
    state0_BSD: jax.Array
    layer_TkBSD: jax.Array
    state_TBSD: jax.Array
    out_TBSD: jax.Array
    gate_TBS: jax.Array | None
    attn_TkBNQS: jax.Array | None
    step_logits_TBSV: jax.Array | None
    heads_N: jax.Array
    queries_Q: jax.Array


def _setup(model, tokens_BS, positions_BS, attention_mask_BS):
    """Rotary tables, mask and the core input e exactly as ``LoopedLM.__call__`` computes them."""
    b, s = tokens_BS.shape
    if positions_BS is None:
        positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin, mask = model.rope_and_layout(positions_BS, attention_mask_BS)
    e = model.embed_tokens(tokens_BS)
    for layer in model.prelude:
        e = layer(e, cos, sin, mask)
    return e, cos, sin, mask


def _check(model, tokens_BS, n_loops) -> int:
    n_loops = model.cfg.n_loops if n_loops is None else n_loops
    if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
        raise ValueError(f"n_loops={n_loops!r}: must be an int >= 1")
    if tokens_BS.ndim != 2:
        raise ValueError(f"tokens_BS.shape={tokens_BS.shape}: must be [batch, seq]")
    return n_loops


def _indices(name: str, idx: Sequence[int] | None, size: int) -> tuple[int, ...]:
    if idx is None:
        return tuple(range(size))
    idx = tuple(int(i) for i in idx)
    if not idx or any(not 0 <= i < size for i in idx):
        raise ValueError(f"{name}={idx!r}: must be a non-empty sequence of ints in [0, {size})")
    return idx


def record(model, tokens_BS: jax.Array, *, n_loops: int | None = None, positions_BS: jax.Array | None = None,
           attention_mask_BS: jax.Array | None = None, attention: bool = True,
           heads: Sequence[int] | None = None, query_positions: Sequence[int] | None = None,
           logits: bool = True) -> Trajectory:
    """Run ``n_loops`` loops of ``model`` (a ``LoopedLM``) on tokens [B, S] and record its trajectory.

    attention: record attention probabilities, for ``heads`` (default all) and ``query_positions`` (default
      all), so memory is T·k·B·N·Q·S floats. logits: also read out every loop ([T, B, S, V]).
    """
    n_loops = _check(model, tokens_BS, n_loops)
    heads = _indices("heads", heads, model.cfg.n_heads)
    queries = _indices("query_positions", query_positions, tokens_BS.shape[1])
    graphdef, state = nnx.split(model)
    return _record(graphdef, state, tokens_BS, positions_BS, attention_mask_BS, n_loops=n_loops,
                   heads=heads if attention else None, queries=queries, logits=logits)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("n_loops", "heads", "queries", "logits"))
def _record(graphdef, state, tokens_BS, positions_BS, attention_mask_BS, *, n_loops, heads, queries, logits):
    model = nnx.merge(graphdef, state)
    if model.core.layer_loops is not None:  # the recorder replays plain layers; it has no per-iteration record
        raise ValueError(f"layer_loops={model.cfg.layer_loops}: trajectories of per-layer loops are not recorded "
                         "(use layer_loops=1, or model(...).layer_expected_n for their depth)")
    e, cos, sin, mask = _setup(model, tokens_BS, positions_BS, attention_mask_BS)
    b, s = tokens_BS.shape
    core_graph, core_state = nnx.split(model.core)
    step_norm = model.cfg.step_norm

    def loop(h_BSD, _):
        core = nnx.merge(core_graph, core_state)
        x = core.inject(h_BSD, e)
        xs, ps = [], []
        for layer in core.layers:
            q, k, v = layer.attn.project(layer.norm_in(x), cos, sin)
            x = layer.mlp_residual(layer.attn_residual(x, layer.attn.attend(q, k, v, mask)))
            xs.append(x)
            if heads is not None:
                p_BNSS = layer.attn.probs(q, k, mask).reshape(b, -1, s, s)
                ps.append(p_BNSS[:, list(heads)][:, :, list(queries)])
        out = core.norm(x)
        new_h = out if step_norm else x
        gate = core.gate(out) if core.gate is not None else None
        return new_h, (jnp.stack(xs), new_h, out, gate, jnp.stack(ps) if ps else None)

    h0 = model.core.initial_state(e)
    _, (layers, states, outs, gates, attn) = jax.lax.scan(loop, h0, length=n_loops)
    step_logits = jax.vmap(lambda o: model.readout(o, cos, sin, mask))(outs) if logits else None
    return Trajectory(embed_BSD=e, state0_BSD=h0, layer_TkBSD=layers, state_TBSD=states, out_TBSD=outs,
                      gate_TBS=gates, attn_TkBNQS=attn, step_logits_TBSV=step_logits,
                      heads_N=jnp.asarray(heads if heads is not None else (), jnp.int32),
                      queries_Q=jnp.asarray(queries, jnp.int32))


def loop_map(model, tokens_BS: jax.Array, *, positions_BS: jax.Array | None = None,
             attention_mask_BS: jax.Array | None = None) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """The loop map F: carried state [B, S, D] -> next carried state (one ``core.step``, embedding input fixed),
    and the initial state h_0. F is a pure function of h (the model's weights are closed over); its attention is
    the reference backend's, so F has forward- and reverse-mode derivatives."""
    model = model.with_attention_impl("reference")
    e, cos, sin, mask = _setup(model, tokens_BS, positions_BS, attention_mask_BS)

    def f(h_BSD: jax.Array) -> jax.Array:
        return model.core.step(h_BSD, e, cos, sin, mask)[0]

    return f, model.core.initial_state(e)
