"""Fixed-point metrics of a recorded trajectory: convergence per layer, distinct fixed points, cycles, attention
stabilisation, the logit lens across loops, and the local contraction of the loop map.

All metrics are float32 and take an optional token weight ``mask_BS`` (1 for tokens to average over) for means.
Shapes: T loops, k core layers, B batch, S sequence, D d_model, N heads, Q query positions, V vocab.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.analysis.trajectory import Trajectory, loop_map

_TINY = 1e-30


def _norm(x: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


@jax.jit
def token_mean(x_XBS: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
    """Mean over the trailing [B, S] axes, weighted by ``mask_BS`` when given: [...]."""
    x = x_XBS.astype(jnp.float32)
    if mask_BS is None:
        return x.mean(axis=(-2, -1))
    m = jnp.broadcast_to(mask_BS.astype(jnp.float32), x.shape)
    return (x * m).sum(axis=(-2, -1)) / jnp.maximum(m.sum(axis=(-2, -1)), 1.0)


# --------------------------------------------------------------------------------------------- convergence

@jax.jit
def step_change(x_TXD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Change between consecutive loops: absolute ‖x_t − x_{t−1}‖ and relative ‖x_t − x_{t−1}‖ / ‖x_t‖, each
    [T−1, ...] for t = 2..T (any middle axes, e.g. [T, k, B, S, D] -> [T−1, k, B, S])."""
    delta = _norm(x_TXD[1:] - x_TXD[:-1])
    return delta, delta / jnp.maximum(_norm(x_TXD[1:]), _TINY)


@jax.jit
def layer_convergence(traj: Trajectory, mask_BS: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-layer convergence ‖h_{t,l} − h_{t−1,l}‖ / ‖h_{t,l}‖ over loops t = 2..T.

    Returns per_token [T−1, k, B, S], mean [T−1, k] (token mean), and abs_mean [T−1, k] (absolute change).
    """
    delta, rel = step_change(traj.layer_TkBSD)
    return {"per_token": rel, "mean": token_mean(rel, mask_BS), "abs_mean": token_mean(delta, mask_BS)}


@jax.jit
def convergence_rate(change_TX: jax.Array) -> jax.Array:
    """Geometric-mean ratio of successive changes, (c_T / c_1)^(1/(T−1)) along axis 0: [...]. For a map
    contracting at rate ρ near its fixed point this tends to ρ."""
    c = jnp.maximum(change_TX.astype(jnp.float32), _TINY)
    return jnp.exp((jnp.log(c[-1]) - jnp.log(c[0])) / (c.shape[0] - 1))


@functools.partial(jax.jit, static_argnames="loop")
def fixed_point_distances(traj: Trajectory, mask_BS: jax.Array | None = None, loop: int = -1) -> jax.Array:
    """[k, k] token-mean of ‖h_{t,l} − h_{t,m}‖ / sqrt(‖h_{t,l}‖·‖h_{t,m}‖) at loop ``loop`` (default the last):
    how far apart the (approximate) fixed points of different layers are; 0 on the diagonal."""
    h = traj.layer_TkBSD[loop].astype(jnp.float32)  # [k, B, S, D]
    dist = _norm(h[:, None] - h[None, :])
    n = _norm(h)
    scale = jnp.sqrt(jnp.maximum(n[:, None] * n[None, :], _TINY))
    return token_mean(dist / scale, mask_BS)


@jax.jit
def cyclic_score(traj: Trajectory, mask_BS: jax.Array | None = None) -> jax.Array:
    """[T−1] how exactly loop t revisits loop t−1's sequence of k layer points: spread / (spread + gap), where
    gap = mean_l ‖h_{t,l} − h_{t−1,l}‖ and spread = mean_{l≠m} ‖h_{t,l} − h_{t,m}‖ (token means). 1 means the
    block cycles through the same k distinct points every loop; near 0, the points move between loops by more
    than they differ within one (or all layers collapse onto one point, as always for k = 1)."""
    h = traj.layer_TkBSD.astype(jnp.float32)
    k = h.shape[1]
    gap = token_mean(_norm(h[1:] - h[:-1]).mean(axis=1), mask_BS)
    if k == 1:
        return jnp.zeros_like(gap)
    pair = _norm(h[1:, :, None] - h[1:, None, :])  # [T-1, k, k, B, S]
    spread = token_mean(pair.sum(axis=(1, 2)) / (k * (k - 1)), mask_BS)
    return spread / jnp.maximum(spread + gap, _TINY)


# --------------------------------------------------------------------------------------------- attention

def _xlogy_ratio(p: jax.Array, q: jax.Array) -> jax.Array:
    """p·log2(p/q) with 0·log 0 = 0."""
    safe = jnp.where(p > 0, p, 1.0)
    return jnp.where(p > 0, p * jnp.log2(safe / jnp.where(p > 0, q, 1.0)), 0.0)


@jax.jit
def js_divergence(p_XS: jax.Array, q_XS: jax.Array) -> jax.Array:
    """Jensen–Shannon divergence in bits over the last axis, in [0, 1]: [...]; exactly 0 when p == q."""
    p, q = p_XS.astype(jnp.float32), q_XS.astype(jnp.float32)
    m = 0.5 * (p + q)
    return 0.5 * (_xlogy_ratio(p, m).sum(-1) + _xlogy_ratio(q, m).sum(-1))


@jax.jit
def total_variation(p_XS: jax.Array, q_XS: jax.Array) -> jax.Array:
    """½ Σ |p − q| over the last axis, in [0, 1]: [...]."""
    return 0.5 * jnp.abs(p_XS.astype(jnp.float32) - q_XS.astype(jnp.float32)).sum(-1)


@jax.jit
def attention_change(traj: Trajectory, query_mask_BQ: jax.Array | None = None) -> dict[str, jax.Array]:
    """Attention stabilisation: per head, the divergence between loops t−1 and t of each query's distribution.

    Returns js / tv [T−1, k, N] (mean over batch and recorded queries, weighted by ``query_mask_BQ``) and
    js_per_query [T−1, k, B, N, Q].
    """
    if traj.attn_TkBNQS is None:
        raise ValueError("traj.attn_TkBNQS is None: record with attention=True")
    a = traj.attn_TkBNQS
    js = js_divergence(a[1:], a[:-1])  # [T-1, k, B, N, Q]
    tv = total_variation(a[1:], a[:-1])
    def mean(x):  # over B and Q, keeping N
        return token_mean(jnp.moveaxis(x, 3, 2), query_mask_BQ)

    return {"js": mean(js), "tv": mean(tv), "js_per_query": js}


# --------------------------------------------------------------------------------------------- logit lens

@jax.jit
def logit_lens(step_logits_TBSV: jax.Array, mask_BS: jax.Array | None = None) -> dict[str, jax.Array]:
    """Each loop's read-out against the final one: KL(p_t ‖ p_T) in nats and top-1 agreement, per token
    ([T, B, S]) and token-mean ([T])."""
    logp = jax.nn.log_softmax(step_logits_TBSV.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logp[-1]), axis=-1)
    top1 = step_logits_TBSV.argmax(-1)
    agree = (top1 == top1[-1]).astype(jnp.float32)
    return {"kl_per_token": kl, "kl": token_mean(kl, mask_BS), "top1_per_token": agree,
            "top1": token_mean(agree, mask_BS)}


# --------------------------------------------------------------------------------------------- contraction

def spectral_norm(fn: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array,
                  iters: int = 100) -> tuple[jax.Array, jax.Array]:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` by power iteration on JᵀJ with ``jax.jvp`` /
    ``jax.vjp`` (the Jacobian is never formed). Returns (σ, last relative change of the σ estimate)."""
    _, vjp_fn = jax.vjp(fn, x)

    def jvp(v):
        return jax.jvp(fn, (x,), (v,))[1]

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v.astype(jnp.float32)), _TINY).astype(v.dtype)

    def body(_, carry):
        v, sigma, _ = carry
        w = vjp_fn(jvp(v))[0]
        new_sigma = jnp.sqrt(jnp.linalg.norm(w.astype(jnp.float32)))  # ‖JᵀJv‖ -> σ² for the top vector
        return unit(w), new_sigma, jnp.abs(new_sigma - sigma) / jnp.maximum(new_sigma, _TINY)

    v0 = unit(jax.random.normal(key, x.shape, x.dtype))
    v, _, change = jax.lax.fori_loop(0, iters, body, (v0, jnp.float32(0), jnp.float32(1)))
    return jnp.linalg.norm(jvp(v).astype(jnp.float32)), change


def loop_contraction(model, tokens_BS: jax.Array, states_XBSD: jax.Array, *, key: jax.Array, iters: int = 100,
                     positions_BS: jax.Array | None = None,
                     attention_mask_BS: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Spectral norm of the loop map's Jacobian (the whole k-layer block on the full [B, S, D] state, embedding
    input fixed) at each state in ``states_XBSD``: (σ [X], last relative change [X]). σ < 1: locally
    contractive. Pass ``jnp.concatenate([traj.state0_BSD[None], traj.state_TBSD])`` for every loop's input."""
    graphdef, state = nnx.split(model)
    return _loop_contraction(graphdef, state, tokens_BS, positions_BS, attention_mask_BS, states_XBSD, key,
                             iters=iters)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("iters",))
def _loop_contraction(graphdef, state, tokens_BS, positions_BS, attention_mask_BS, states_XBSD, key, *, iters):
    f, _ = loop_map(nnx.merge(graphdef, state), tokens_BS, positions_BS=positions_BS,
                    attention_mask_BS=attention_mask_BS)
    keys = jax.random.split(key, states_XBSD.shape[0])
    return jax.lax.map(lambda hk: spectral_norm(f, hk[0], hk[1], iters), (states_XBSD, keys))
