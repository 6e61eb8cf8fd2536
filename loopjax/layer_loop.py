"""Per-layer adaptive loops (Frey et al. 2026, "Think harder or know more?"): each core layer iterates its own state.

For one core layer with input x and N = ``cfg.layer_loops`` iterations t = 1..N (per token):

    h_0 = x;    h_t = layer(inject(h_{t-1}), residual_scale=s_t),    s_t = softplus(a_t)
    λ_t = σ(w · h_t + w_t · (t − 1)/(N − 1) + b)                         (halting router: Linear(D+1 → 1), bias)
    p_t = λ_t Π_{i<t}(1 − λ_i) for t < N,   p_N = Π_{i<N}(1 − λ_i)      (stick-breaking, remainder on the last)
    output = Σ_t p_t h_t,    E[n] = Σ_t p_t t

``inject`` is the hook where memory banks enter (identity without them); it sits in ``LoopedCore.core_layer``,
which builds the one per-iteration function ``step_fn(h, s)`` that everything here calls.

**The iteration index the router reads** is the 0-based index over N − 1: (t − 1)/(N − 1) runs over [0, 1] from
the first iteration to the last (THINK-OR-KNOW's t/(N_max − 1) with t counted from 0). E[n] counts iterations
from 1, so E[n] ∈ [1, N] and the ponder cost (E[n] − 1)/(N − 1) ∈ [0, 1]. The router of the last iteration is
computed but its λ is unused (the last iteration takes the remaining mass).

Parameters per core layer: the N scale logits a_t (initialised to ``cfg.layer_loop_scale_init``, softplus(−7) ≈
1e-3, so every layer starts near the identity) and the router's D + 2 weights (w ~ N(0, init_std²) over [h; t],
b = 0, so λ starts near 1/2). Nothing depends on the token count; only the N scale logits depend on N.

Training (``LayerLoop.run``): all N iterations as one ``lax.scan`` over the iteration index; the carry is the
state, the running Σ p_t h_t (float32), the log survival and E[n]; the layer's parameters are closed over, so the
program (and its compile time) does not grow with N. Differentiable, under every remat policy and scope (the
per-iteration function is the rematerialised layer).

Inference (``LayerLoop.run_adaptive``, the model's ``layer_exit_threshold``): a masked ``lax.while_loop`` over
iterations. After iteration t a token's cumulative halting mass is 1 − Π_{i<=t}(1 − λ_i) (1 at the last); once it
is >= the threshold the token stops: it takes the whole remaining mass Π_{i<t}(1 − λ_i) on its current state h_t
(so its output is Σ_{i<t} p_i h_i + remainder · h_t), its E[n] is read the same way, and it runs no more
iterations. The loop ends when no token is active or after N iterations. With threshold 1 no token stops before
N (unless its survival underflows to 0), which is the training-time expectation.

**What a stopped token shows to other tokens' attention.** Every iteration still runs the layer on the whole
[B, S] block, and a stopped token's input to it is its frozen state h_e (its last computed state). So in later
iterations the other tokens' attention sees the keys and values that the layer (with that iteration's residual
scale) computes from h_e -- what the token would show if it ran that iteration again from where it stopped, not
keys and values of iterations it never ran; its own result of those iterations is discarded. This is the
convention ``halting.py`` uses for block loops. A KV cache is only written by cached generation, which runs all
N iterations of every layer for every token (each iteration's keys and values in a slot of their own), so no
cache entry ever holds a skipped iteration.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax.config import LoopedConfig
from loopjax.layers import dtype, make_param

# step_fn(h_BSD, residual_scale) -> the layer's next state h_BSD: one iteration of one core layer.
IterationFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_threshold(threshold: object, layer_loops: int) -> None:
    """Raise ValueError for a ``layer_exit_threshold`` outside (0, 1] or on a model without per-layer loops."""
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold <= 1
    if not ok:
        raise ValueError(f"layer_exit_threshold={threshold!r}: must be a float in (0, 1]")
    if layer_loops < 2:
        raise ValueError(f"layer_exit_threshold={threshold!r}: needs per-layer loops (LoopedConfig.layer_loops >= 2,"
                         f" got {layer_loops})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerLoopStats:
    """What one layer's loop reports (extra leading axes when stacked over layers / block loops).

    expected_n_BS: float32 E[n] per token (1..N), differentiable (the ponder cost's input).
    exit_iteration_BS: int32, the last iteration each token computed (N when all iterations run).
    iterations: int32 scalar, iterations the layer executed for the block (the while loop's trip count).
    """

    expected_n_BS: jax.Array
    exit_iteration_BS: jax.Array
    iterations: jax.Array


class LayerLoop(nnx.Module):
    """One core layer's per-layer loop parameters: N residual-scale logits and the halting router."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        n, pd = cfg.layer_loops, cfg.param_dtype
        self.n_iterations = n
        self.scale_logits = nnx.Param(jnp.full((n,), cfg.layer_loop_scale_init, dtype(pd)), logical_axes=(None,))
        self.router_w = make_param(rngs, (cfg.d_model,), ("embed",), cfg.init_std, pd)  # weight on h_t
        self.router_t = make_param(rngs, (), (), cfg.init_std, pd)  # weight on the iteration index
        self.router_b = nnx.Param(jnp.zeros((), dtype(pd)), logical_axes=())

    def scales(self) -> jax.Array:
        """Residual scales softplus(a_t), float32 [N]."""
        return jax.nn.softplus(self.scale_logits[...].astype(jnp.float32))

    def router_logit(self, h_BSD: jax.Array, i: jax.Array | int) -> jax.Array:
        """Halting logit after 0-based iteration ``i`` from the new state: float32 [B, S]."""
        w = self.router_w[...].astype(h_BSD.dtype)
        index = jnp.asarray(i, jnp.float32) / max(self.n_iterations - 1, 1)
        return (jnp.einsum("bsd,d->bs", h_BSD, w, preferred_element_type=jnp.float32)
                + self.router_t[...].astype(jnp.float32) * index + self.router_b[...].astype(jnp.float32))

    # The expectation as a running sum (used by the scan here and by cached decoding, unrolled).
    def start(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Empty running sums: (Σ p_t h_t float32 [B, S, D], log survival [B, S], E[n] [B, S])."""
        zeros_BS = jnp.zeros(x_BSD.shape[:-1], jnp.float32)
        return jnp.zeros(x_BSD.shape, jnp.float32), zeros_BS, zeros_BS

    def accumulate(self, sums: tuple[jax.Array, jax.Array, jax.Array], h_BSD: jax.Array, i: jax.Array | int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Add 0-based iteration ``i``'s state h_{i+1} with its exit probability (the remainder at the last)."""
        acc, log_survive, en = sums
        g = self.router_logit(h_BSD, i)
        last = jnp.asarray(i) >= self.n_iterations - 1
        p = jnp.exp(log_survive + jnp.where(last, 0.0, jax.nn.log_sigmoid(g)))
        acc = acc + p[..., None] * h_BSD.astype(jnp.float32)
        en = en + p * (jnp.asarray(i, jnp.float32) + 1)
        return acc, log_survive + jax.nn.log_sigmoid(-g), en

    def finish(self, sums: tuple[jax.Array, jax.Array, jax.Array], out_dtype: jnp.dtype
               ) -> tuple[jax.Array, jax.Array]:
        """(Σ_t p_t h_t in ``out_dtype``, E[n] float32 [B, S]) from the running sums after the last iteration."""
        return sums[0].astype(out_dtype), sums[2]

    def run(self, step_fn: IterationFn, x_BSD: jax.Array) -> tuple[jax.Array, LayerLoopStats]:
        """All N iterations (training): (Σ_t p_t h_t [B, S, D] in x's dtype, stats)."""
        n = self.n_iterations

        def body(carry, xs):
            h, sums = carry
            scale, i = xs
            h = step_fn(h, scale)
            return (h, self.accumulate(sums, h, i)), None

        (_, sums), _ = jax.lax.scan(body, (x_BSD, self.start(x_BSD)), (self.scales(), jnp.arange(n, dtype=jnp.int32)))
        out, en = self.finish(sums, x_BSD.dtype)
        return out, LayerLoopStats(en, jnp.full(en.shape, n, jnp.int32), jnp.int32(n))

    def run_adaptive(self, step_fn: IterationFn, x_BSD: jax.Array, threshold: float
                     ) -> tuple[jax.Array, LayerLoopStats]:
        """Masked ``lax.while_loop`` (inference): a token stops once its cumulative halting mass is >= threshold
        (see the module doc); (output [B, S, D], stats). Not differentiable in reverse mode."""
        n, scales = self.n_iterations, self.scales()
        b, s, _ = x_BSD.shape
        carry = dict(i=jnp.int32(0), h=x_BSD, acc=jnp.zeros(x_BSD.shape, jnp.float32),
                     survive=jnp.ones((b, s), jnp.float32), en=jnp.zeros((b, s), jnp.float32),
                     active=jnp.ones((b, s), bool), exit=jnp.full((b, s), n, jnp.int32))

        def cond(c):
            return (c["i"] < n) & jnp.any(c["active"])

        def body(c):
            i, a, survive = c["i"], c["active"], c["survive"]
            new_h = step_fn(c["h"], scales[i])
            g = self.router_logit(new_h, i)
            survive_next = survive * jax.nn.sigmoid(-g)
            fires = (i >= n - 1) | (1.0 - survive_next >= threshold)
            p = jnp.where(a, jnp.where(fires, survive, survive - survive_next), 0.0)
            return dict(i=i + 1, h=jnp.where(a[..., None], new_h, c["h"]),
                        acc=c["acc"] + p[..., None] * new_h.astype(jnp.float32),
                        survive=jnp.where(a, jnp.where(fires, 0.0, survive_next), survive),
                        en=c["en"] + p * (i + 1).astype(jnp.float32), active=a & ~fires,
                        exit=jnp.where(a & fires, i + 1, c["exit"]))

        c = jax.lax.while_loop(cond, body, carry)
        return c["acc"].astype(x_BSD.dtype), LayerLoopStats(c["en"], c["exit"], c["i"])
