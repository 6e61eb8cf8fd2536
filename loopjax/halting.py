"""Halting: exit distributions, training objectives, exit rules and the loop executors that apply them.

Exit distribution (Ouro's stick-breaking): λ_t = σ(g_t); p_t = λ_t Π_{j<t}(1 − λ_j) for t < T; the last step
takes the remainder Π_{j<T}(1 − λ_j). Computed per token in float32, in log space for the survival product.

Exit rules (``FixedExit``, ``QExit``, ``ACTExit``, ``ConvergenceExit``) are frozen, hashable dataclasses with
``fires(t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> bool[...]``, evaluated after 0-based loop ``t``; every rule
fires at the last loop. Any object with ``needs_gate``, ``validate(n_loops)`` and ``fires`` works as a rule.
``RowExit`` holds traced per-row values (a depth cap, a QExit threshold): ``generate``'s per-row depth dial.

Executors take a step function ``step_fn(h_BSD) -> (new_h_BSD, out_BSD, gate_BS | None)`` (one application of
the shared core, as ``LoopedCore.step`` with its other arguments bound) and never import the model:

- ``adaptive_loop``: a ``lax.while_loop`` over t carrying the states, ``active_BS``, the exit step per token and
  the iteration count. A token whose rule fires is frozen: its carried and read-out states stop changing. It
  stops when no token is active or at ``n_loops``; iterations executed = the largest exit step.
  **What a frozen token shows to others.** Every iteration still runs the step on the whole [B, S] block, and a
  frozen token's input to it is its frozen carried state. So in later iterations the other tokens' attention
  sees the keys and values that the frozen token's *frozen state* produces at each layer (what it would show
  if it ran that iteration again from where it stopped), not those of deeper loops it never ran; its own
  result of that iteration is discarded. This is the Universal Transformer's ACT convention. A KV cache filled
  by such a pass holds, for the steps a token skipped, the entries its frozen state produces.
  Not differentiable in reverse mode (``while_loop``); train with the scan executors.
- ``all_loops``: a ``lax.scan`` where every token runs every loop and the rule only picks the loop whose read-out
  state is returned (the published Ouro code's behaviour). Differentiable.
- ``truncated_loop``: a traced loop count ``n <= max_loops`` (random loop-count training without retracing), a
  scan to ``max_loops`` that skips iterations t >= n with ``lax.cond`` and cuts the gradient before the last
  ``backprop_loops`` iterations (truncated backpropagation, as in the recurrent-depth recipe).

Objectives take per-token CE per step, ``ce_TBS``, which comes either from step logits [T, B, S, V]
(``step_cross_entropy``: logsumexp and a gather, fused, so no second [T, B, S, V] tensor in the forward pass;
the backward pass holds one [T, B, S, V] gradient) or, for long sequences and large vocabularies, from step
states and a head function (``chunked_step_cross_entropy``: a map over T and over blocks of positions with each
block rematerialised, so only one [B, block, V] logits block is live at a time and the backward pass saves just
the [T, B, S, D] states).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from loopjax.config import HaltingConfig

# A loop step: h -> (new h, read-out state, gate logit or None[, aux]); an optional 4th element (any pytree of
# arrays, e.g. per-layer statistics) is recorded per loop in ``LoopResult.aux_T``.
StepFn = Callable[[jax.Array], tuple]
HeadFn = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------------------------- distributions

def exit_distribution(gate_logits_BST: jax.Array) -> jax.Array:
    """Stick-breaking exit pdf [B, S, T] from gate logits [B, S, T]; sums to 1 over T.

    The last step's gate is ignored (it takes the remaining mass), as in the published Ouro code.
    """
    g = gate_logits_BST.astype(jnp.float32)
    lam = jax.nn.sigmoid(g)
    log_survive = jax.nn.log_sigmoid(-g)  # log(1 − λ), stable for large |g|
    # survival before step t: Π_{j<t} (1 − λ_j), with an empty product at t = 0
    survive = jnp.exp(jnp.cumsum(log_survive, axis=-1) - log_survive)
    pdf = survive * lam
    return pdf.at[..., -1].set(survive[..., -1])


def exit_log_distribution(gate_logits_BST: jax.Array) -> jax.Array:
    """log of ``exit_distribution``, computed in log space (finite where the pdf underflows) [B, S, T]."""
    g = gate_logits_BST.astype(jnp.float32)
    log_survive = jax.nn.log_sigmoid(-g)
    log_before = jnp.cumsum(log_survive, axis=-1) - log_survive
    logp = log_before + jax.nn.log_sigmoid(g)
    return logp.at[..., -1].set(log_before[..., -1])


def exit_cdf(gate_logits_BST: jax.Array) -> jax.Array:
    """Cumulative exit probability [B, S, T] (cumsum of the pdf, as Ouro's threshold rule reads it)."""
    return jnp.cumsum(exit_distribution(gate_logits_BST), axis=-1)


def expected_exit_step(gate_logits_BST: jax.Array) -> jax.Array:
    """E[t] under the exit distribution, 1-based [B, S]."""
    pdf = exit_distribution(gate_logits_BST)
    return (pdf * jnp.arange(1, pdf.shape[-1] + 1, dtype=pdf.dtype)).sum(-1)


def act_weights(gate_logits_BST: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ACT halting (Graves 2016): weights p [B, S, T], halting step N [B, S] (1-based) and remainder R [B, S].

    λ_t = σ(g_t) are unconditional halting probabilities; N is the first t with Σ_{j<=t} λ_j >= 1 − eps (else T);
    p_t = λ_t for t < N, p_N = R = 1 − Σ_{j<N} λ_j, 0 after. Gradients flow through λ and R, not through N.
    """
    lam = jax.nn.sigmoid(gate_logits_BST.astype(jnp.float32))
    t_max = lam.shape[-1]
    csum = jnp.cumsum(lam, axis=-1)
    halted = (csum >= 1.0 - eps).at[..., -1].set(True)
    n = jnp.argmax(halted, axis=-1) + 1
    steps = jnp.arange(1, t_max + 1)
    before = steps < n[..., None]
    remainder = 1.0 - jnp.sum(jnp.where(before, lam, 0.0), axis=-1)
    p = jnp.where(before, lam, 0.0) + jnp.where(steps == n[..., None], remainder[..., None], 0.0)
    return p, n.astype(jnp.int32), remainder


# --------------------------------------------------------------------------------------------- exit rules

def _gate_at(gate_XT: jax.Array, t: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(gate_XT, t, axis=-1, keepdims=False)


def _check_prob(name: str, field: str, value: Any, lo_closed: bool, hi_closed: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= 0 if lo_closed else value > 0) and (value <= 1 if hi_closed else value < 1)
    if not ok:
        interval = ("[" if lo_closed else "(") + "0, 1" + ("]" if hi_closed else ")")
        raise ValueError(f"{name}.{field}={value!r}: must be a float in {interval}")


@dataclasses.dataclass(frozen=True)
class FixedExit:
    """Run exactly ``n`` loops (1-based); every token reads out loop n."""

    n: int
    needs_gate = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"FixedExit.n={self.n!r}: must be an int >= 1")

    def validate(self, n_loops: int) -> None:
        if self.n > n_loops:
            raise ValueError(f"FixedExit.n={self.n!r}: must be <= n_loops={n_loops} (pass n_loops >= n)")

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> jax.Array:
        return jnp.broadcast_to(t + 1 >= self.n, h_new_XD.shape[:-1])


@dataclasses.dataclass(frozen=True)
class QExit:
    """Ouro's threshold exit: the first t whose exit CDF is >= q (``>=``, as Ouro); no crossing: the last loop."""

    q: float
    needs_gate = True

    def __post_init__(self) -> None:
        _check_prob("QExit", "q", self.q, lo_closed=True, hi_closed=True)

    def validate(self, n_loops: int) -> None:
        """Valid for any loop count."""

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> jax.Array:
        # gate entries after t do not change cdf[..t] (a prefix sum), so a partly filled buffer is enough
        return _gate_at(exit_cdf(gate_XT), t) >= self.q


@dataclasses.dataclass(frozen=True)
class ACTExit:
    """ACT's rule: halt at the first t where the summed halting probabilities Σ_{j<=t} σ(g_j) reach 1 − eps."""

    eps: float
    needs_gate = True

    def __post_init__(self) -> None:
        _check_prob("ACTExit", "eps", self.eps, lo_closed=False, hi_closed=False)

    def validate(self, n_loops: int) -> None:
        """Valid for any loop count."""

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> jax.Array:
        lam = jax.nn.sigmoid(gate_XT.astype(jnp.float32))
        upto = jnp.arange(gate_XT.shape[-1]) <= t
        return jnp.sum(jnp.where(upto, lam, 0.0), axis=-1) >= 1.0 - self.eps


@dataclasses.dataclass(frozen=True)
class ConvergenceExit:
    """Training-free: exit once the carried state's relative change ‖h_t − h_{t−1}‖ / ‖h_t‖ is below eps."""

    eps: float
    needs_gate = False

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"ConvergenceExit.eps={self.eps!r}: must be a float > 0")

    def validate(self, n_loops: int) -> None:
        """Valid for any loop count."""

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> jax.Array:
        new = h_new_XD.astype(jnp.float32)
        delta = jnp.linalg.norm(new - h_prev_XD.astype(jnp.float32), axis=-1)
        return delta < self.eps * jnp.linalg.norm(new, axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class RowExit:
    """Per-row exit ("reasoning effort per request"): row b reads out at loop ``depth_B[b]`` at the latest, earlier
    where its own Ouro threshold ``q_B[b]`` (``QExit``) or the shared ``rule`` fires.

    Built inside a jitted function from traced arrays (never a static argument): depth_B int32 [B] in
    1..n_loops or None, q_B float32 [B] in [0, 1] or None, rule another exit rule or None. Rows are the first
    axis of the arrays the rule is evaluated on ([B, S] in a prefill, [B, 1] in a decode step).
    """

    depth_B: jax.Array | None = None
    q_B: jax.Array | None = None
    rule: Any = None

    @property
    def needs_gate(self) -> bool:
        return self.q_B is not None or bool(getattr(self.rule, "needs_gate", False))

    def validate(self, n_loops: int) -> None:
        """Values are checked by the caller before tracing (``generate``); the shared rule here."""
        if self.rule is not None:
            self.rule.validate(n_loops)

    def fires(self, t, n_loops, gate_XT, h_prev_XD, h_new_XD) -> jax.Array:
        shape = h_new_XD.shape[:-1]

        def per_row(v_B):
            return v_B.reshape(v_B.shape[0], *(1,) * (len(shape) - 1))

        out = jnp.zeros(shape, bool)
        if self.depth_B is not None:
            out = out | (t + 1 >= per_row(self.depth_B))
        if self.q_B is not None:
            out = out | (_gate_at(exit_cdf(gate_XT), t) >= per_row(self.q_B))
        if self.rule is not None:
            out = out | self.rule.fires(t, n_loops, gate_XT, h_prev_XD, h_new_XD)
        return out


def validate_exit_rule(rule: Any, n_loops: int, has_gate: bool) -> None:
    """Raise ValueError, before tracing, for a rule that cannot run ``n_loops`` loops on this model."""
    if rule is None:
        return
    if not callable(getattr(rule, "fires", None)):
        raise ValueError(f"exit_rule={rule!r}: must be FixedExit, QExit, ACTExit, ConvergenceExit or have .fires")
    if getattr(rule, "needs_gate", False) and not has_gate:
        raise ValueError(f"exit_rule={rule!r}: needs the exit gate (LoopedConfig.exit_gate=True)")
    rule.validate(n_loops)


def validate_loop_budget(n_loops: Any, max_loops: Any, backprop_loops: Any, exit_rule: Any,
                         return_steps: bool) -> None:
    """Raise ValueError for a traced-loop-count call (``max_loops`` given) that cannot run."""
    if isinstance(max_loops, bool) or not isinstance(max_loops, int) or max_loops < 1:
        raise ValueError(f"max_loops={max_loops!r}: must be an int >= 1")
    if isinstance(n_loops, int) and not 1 <= n_loops <= max_loops:
        raise ValueError(f"n_loops={n_loops!r}: must be in [1, max_loops={max_loops}] (or a traced int scalar)")
    if backprop_loops is not None and (isinstance(backprop_loops, bool) or not isinstance(backprop_loops, int)
                                       or not 1 <= backprop_loops <= max_loops):
        raise ValueError(f"backprop_loops={backprop_loops!r}: must be None or an int in [1, max_loops={max_loops}]")
    if exit_rule is not None or return_steps:
        raise ValueError("max_loops: a traced loop count cannot be combined with exit_rule or return_steps")


def rule_fires(rule: Any, t: jax.Array, n_loops: int, gate_XT: jax.Array | None, h_prev_XD: jax.Array,
               h_new_XD: jax.Array) -> jax.Array:
    """Bool [...]: ``rule`` fires after 0-based loop ``t``; always at the last loop; ``rule=None`` only there.

    gate_XT: gate logits of loops 0..t in [..., :t+1] of an ``n_loops``-long buffer (later entries are ignored).
    h_prev_XD, h_new_XD: the carried state before and after loop t.
    """
    last = jnp.broadcast_to(t >= n_loops - 1, h_new_XD.shape[:-1])
    if rule is None:
        return last
    return last | rule.fires(t, n_loops, gate_XT, h_prev_XD, h_new_XD)


# --------------------------------------------------------------------------------------------- executors

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopResult:
    """What an executor returns.

    state_BSD: each token's carried state at its exit. out_BSD: its read-out state there.
    exit_step_BS: int32, the loop (1..T) each token reads out. n_iterations: int32 scalar, loops executed.
    gate_BST: gate logits per loop (T = n_loops); after a token's exit, the gate of its frozen state.
    step_out_TBSD: read-out state after every loop (frozen tokens show their frozen state), when recorded.
    aux_T: the step's 4th output stacked over loops (leading axis T = n_loops; zeros for loops never executed),
      or None when the step has none (and always from ``truncated_loop``).
    """

    state_BSD: jax.Array
    out_BSD: jax.Array
    exit_step_BS: jax.Array
    n_iterations: jax.Array
    gate_BST: jax.Array | None = None
    step_out_TBSD: jax.Array | None = None
    aux_T: Any = None


def _split_step(res: tuple) -> tuple[jax.Array, jax.Array, jax.Array | None, Any]:
    """(new h, out, gate, aux or None) from a step's 3- or 4-tuple."""
    return (*res, None) if len(res) == 3 else tuple(res)


def _set_step(buf_XT: jax.Array, t: jax.Array, val_X: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf_XT, val_X.astype(buf_XT.dtype), t, axis=-1)


def adaptive_loop(step_fn: StepFn, h0_BSD: jax.Array, rule: Any, n_loops: int, *, has_gate: bool,
                  record_steps: bool = False) -> LoopResult:
    """Masked ``lax.while_loop``: run until every token's rule fired (frozen tokens keep their state) or n_loops."""
    b, s, d = h0_BSD.shape
    aux_shape = _split_step(jax.eval_shape(step_fn, h0_BSD))[3]
    carry = dict(t=jnp.int32(0), h=h0_BSD, out=jnp.zeros_like(h0_BSD), active=jnp.ones((b, s), bool),
                 exit=jnp.full((b, s), n_loops, jnp.int32),
                 gates=jnp.zeros((b, s, n_loops), jnp.float32) if has_gate else None,
                 steps=jnp.zeros((n_loops, b, s, d), h0_BSD.dtype) if record_steps else None,
                 aux=jax.tree.map(lambda a: jnp.zeros((n_loops, *a.shape), a.dtype), aux_shape))

    def cond(c):
        return (c["t"] < n_loops) & jnp.any(c["active"])

    def body(c):
        t, a = c["t"], c["active"]
        new_h, out, gate, aux = _split_step(step_fn(c["h"]))
        gates = None if gate is None else _set_step(c["gates"], t, gate)
        fires = rule_fires(rule, t, n_loops, gates, c["h"], new_h)
        keep = a[..., None]
        h = jnp.where(keep, new_h, c["h"])
        out = jnp.where(keep, out, c["out"])
        steps = None if c["steps"] is None else c["steps"].at[t].set(out)
        aux = jax.tree.map(lambda buf, x: buf.at[t].set(x), c["aux"], aux)
        return dict(t=t + 1, h=h, out=out, active=a & ~fires, exit=jnp.where(a & fires, t + 1, c["exit"]),
                    gates=gates, steps=steps, aux=aux)

    c = jax.lax.while_loop(cond, body, carry)
    idx = jnp.arange(n_loops)
    gates = c["gates"]
    if gates is not None:  # loops after a token's exit: the gate of its frozen state
        at_exit = jnp.take_along_axis(gates, c["exit"][..., None] - 1, axis=-1)
        gates = jnp.where(idx >= c["exit"][..., None], at_exit, gates)
    steps = c["steps"]
    if steps is not None:  # loops never executed (everyone had exited): the final frozen states
        steps = jnp.where((idx >= c["t"])[:, None, None, None], c["out"][None], steps)
    return LoopResult(state_BSD=c["h"], out_BSD=c["out"], exit_step_BS=c["exit"], n_iterations=c["t"],
                      gate_BST=gates, step_out_TBSD=steps, aux_T=c["aux"])


def all_loops(step_fn: StepFn, h0_BSD: jax.Array, rule: Any, n_loops: int, *, has_gate: bool,
              record_steps: bool = False, unroll: int | bool = 1) -> LoopResult:
    """``lax.scan`` over all n_loops for every token; the rule only selects each token's read-out loop.

    state_BSD is the state after the last loop (every token ran all loops); out_BSD is read at the exit step.
    """
    b, s, _ = h0_BSD.shape
    carry = (h0_BSD, jnp.zeros_like(h0_BSD), jnp.zeros((b, s), bool), jnp.full((b, s), n_loops, jnp.int32),
             jnp.zeros((b, s, n_loops), jnp.float32) if has_gate else None)

    def body(c, t):
        h, out_sel, fired, exit_step, gates = c
        new_h, out, gate, aux = _split_step(step_fn(h))
        gates = None if gate is None else _set_step(gates, t, gate)
        first = ~fired & rule_fires(rule, t, n_loops, gates, h, new_h)
        out_sel = jnp.where(first[..., None], out, out_sel)
        exit_step = jnp.where(first, t + 1, exit_step)
        return (new_h, out_sel, fired | first, exit_step, gates), (out if record_steps else None, aux)

    (h, out, _, exit_step, gates), (steps, aux) = jax.lax.scan(body, carry, jnp.arange(n_loops, dtype=jnp.int32),
                                                               unroll=unroll)
    return LoopResult(state_BSD=h, out_BSD=out, exit_step_BS=exit_step, n_iterations=jnp.int32(n_loops),
                      gate_BST=gates, step_out_TBSD=steps, aux_T=aux)


def truncated_loop(step_fn: StepFn, h0_BSD: jax.Array, n_loops: jax.Array, max_loops: int,
                   backprop_loops: int | None = None) -> LoopResult:
    """Run a traced count ``n_loops`` (1..max_loops) of loops in one compiled scan of length ``max_loops``.

    Iterations t >= n are skipped by ``lax.cond`` (no compute, state unchanged); with ``backprop_loops = k`` the
    state entering iteration n − k is under ``stop_gradient``, so only the last k iterations get gradients.
    """
    n = jnp.clip(jnp.asarray(n_loops, jnp.int32), 1, max_loops)
    k = max_loops if backprop_loops is None else backprop_loops

    def run(h_out):
        new_h, out = _split_step(step_fn(h_out[0]))[:2]
        return new_h, out

    def body(c, t):
        h, out = c
        h = jnp.where((t == n - k) & (t > 0), jax.lax.stop_gradient(h), h)
        return jax.lax.cond(t < n, run, lambda h_out: h_out, (h, out)), None

    (h, out), _ = jax.lax.scan(body, (h0_BSD, jnp.zeros_like(h0_BSD)), jnp.arange(max_loops, dtype=jnp.int32))
    return LoopResult(state_BSD=h, out_BSD=out, exit_step_BS=jnp.broadcast_to(n, h.shape[:-1]), n_iterations=n)


def sample_loop_count(key: jax.Array, mean_loops: float, max_loops: int, sigma: float = 0.5) -> jax.Array:
    """Log-normal Poisson loop count (Geiping et al. 2025): τ ~ N(log r̄ − σ²/2, σ), n = 1 + Poisson(e^τ).

    E[e^τ] = r̄, so E[n] = 1 + r̄ before clipping to [1, max_loops]. The Poisson draw is by inverse CDF over
    0..max_loops − 2 (exact for the clipped count, and cheap to compile). Returns an int32 scalar.
    """
    k_norm, k_unif = jax.random.split(key)
    tau = math.log(mean_loops) - 0.5 * sigma ** 2 + sigma * jax.random.normal(k_norm)
    rate = jnp.exp(tau)
    j = jnp.arange(max(max_loops - 1, 1), dtype=jnp.float32)
    cdf = jnp.cumsum(jnp.exp(j * tau - rate - jax.scipy.special.gammaln(j + 1.0)))
    u = jax.random.uniform(k_unif)
    draw = jnp.sum(cdf[: max_loops - 1] < u)  # P(draw >= m) = 1 − CDF(m − 1); saturates at max_loops − 1
    return (1 + draw).astype(jnp.int32)


def loop_kwargs(hcfg: HaltingConfig, key: jax.Array | None = None) -> dict[str, Any]:
    """Model-call keywords for one training step: a sampled traced ``n_loops`` with ``max_loops`` and
    ``backprop_loops`` when ``hcfg.random_loops``, else {} (the config's fixed loop count)."""
    if not hcfg.random_loops:
        return {}
    if key is None:
        raise ValueError("key=None: random_loops=True needs a PRNG key to sample the loop count")
    n = sample_loop_count(key, hcfg.mean_loops, hcfg.max_loops, hcfg.loops_sigma)
    return dict(n_loops=n, max_loops=hcfg.max_loops, backprop_loops=hcfg.backprop_loops)


# --------------------------------------------------------------------------------------------- objectives

def _masked_mean(x_BS: jax.Array, mask_BS: jax.Array | None) -> jax.Array:
    if mask_BS is None:
        return x_BS.mean()
    m = mask_BS.astype(jnp.float32)
    return (x_BS * m).sum() / jnp.maximum(m.sum(), 1.0)


def cross_entropy(logits_XV: jax.Array, labels_X: jax.Array) -> jax.Array:
    """Per-token CE [...] in float32: logsumexp − the label's logit (fused, no log-softmax tensor)."""
    logits = logits_XV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels_X[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def step_cross_entropy(step_logits_TBSV: jax.Array, labels_BS: jax.Array) -> jax.Array:
    """Per-step, per-token CE [T, B, S] from materialised step logits."""
    return cross_entropy(step_logits_TBSV, labels_BS[None])


def _position_blocks(block_fn: Callable, carry: Any, xs_BS: tuple[jax.Array, ...], block_tokens: int
                     ) -> tuple[Any, Any]:
    """Run ``block_fn(carry, xs_Bb, valid_b) -> (carry, outs_Bb)`` over blocks of positions of [B, S, ...] arrays.

    Blocks are cut with ``dynamic_slice`` along S and their outputs written back with ``dynamic_update_slice``: no
    reshape or transpose of the inputs, so their batch sharding survives (a reshape into [n_blk, B, blk, ...] had
    the partitioner gather the global batch). S need not be a multiple of the block: the last block starts at
    S − blk and ``valid_b`` marks its positions not already covered (its overlap is rewritten with equal values);
    ``valid_b`` is None where every block is whole. Returns (carry, outs) with each output [B, S, ...].
    """
    s = xs_BS[0].shape[1]
    blk = s if block_tokens <= 0 or block_tokens >= s else block_tokens
    n_blk = -(-s // blk)
    if n_blk == 1:
        return block_fn(carry, xs_BS, None)

    def sliced(i):
        start = jnp.minimum(i * blk, s - blk)
        return start, tuple(jax.lax.dynamic_slice_in_dim(x, start, blk, axis=1) for x in xs_BS)

    ragged = s % blk != 0
    xs_spec = tuple(jax.ShapeDtypeStruct((x.shape[0], blk, *x.shape[2:]), x.dtype) for x in xs_BS)
    out_shapes = jax.eval_shape(lambda c, xs: block_fn(c, xs, None)[1], carry, xs_spec)
    outs0 = jax.tree.map(lambda o: jnp.zeros((o.shape[0], s, *o.shape[2:]), o.dtype), out_shapes)

    def body(c, i):
        acc, outs = c
        start, xs_Bb = sliced(i)
        acc, outs_Bb = block_fn(acc, xs_Bb, (start + jnp.arange(blk) >= i * blk) if ragged else None)
        outs = jax.tree.map(lambda o, ob: jax.lax.dynamic_update_slice_in_dim(o, ob, start, axis=1), outs, outs_Bb)
        return (acc, outs), None

    (carry, outs), _ = jax.lax.scan(body, (carry, outs0), jnp.arange(n_blk))
    return carry, outs


def chunked_step_cross_entropy(step_hidden_TBSD: jax.Array, head_fn: HeadFn, labels_BS: jax.Array, *,
                               block_tokens: int = 0, prepare_fn: HeadFn | None = None,
                               return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-step CE [T, B, S] from step states, one [B, block_tokens, V] logits block at a time.

    A map over steps and, within a step, over blocks of ``block_tokens`` positions (0 or >= S: the whole
    sequence); each block's logits are rematerialised in the backward pass, so peak memory is one block's logits
    and their gradient, and the backward saves only the states. With ``block_tokens`` > 0, ``head_fn`` must act
    token by token ([B, s, D] -> [B, s, V] for any s); sequence-wise work (coda layers) goes in ``prepare_fn``
    ([B, S, D] -> [B, S, D]), run on each whole step and rematerialised. ``return_lse``: also return the
    logsumexp of the logits [T, B, S] (a z-loss needs it).
    """
    @jax.checkpoint
    def block_stats(h_BbD: jax.Array, y_Bb: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = head_fn(h_BbD).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, y_Bb[..., None].astype(jnp.int32), axis=-1)[..., 0], lse

    prepare = jax.checkpoint(prepare_fn) if prepare_fn is not None else (lambda h: h)

    def one_step(h_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _position_blocks(lambda c, xs, valid: (c, block_stats(*xs)), (), (prepare(h_BSD), labels_BS),
                                block_tokens)[1]

    ce_TBS, lse_TBS = jax.lax.map(one_step, step_hidden_TBSD)
    return (ce_TBS, lse_TBS) if return_lse else ce_TBS


def fused_step_cross_entropy(step_hidden_TBSD: jax.Array, w_DV: jax.Array, labels_BS: jax.Array,
                             weight_TBS: jax.Array, z_weight_BS: jax.Array | None = None, *, block_tokens: int = 0,
                             logits_fn: Callable[[jax.Array], jax.Array] | None = None,
                             dw_fn: Callable[[jax.Array], jax.Array] | None = None,
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Σ weight·CE_t + Σ z_weight·logsumexp_T², with per-step CE from states and the head weight [D, V] computed in
    blocks of positions, and the gradients (states, weight matrix, weights) formed in that same pass: the head runs
    once forward and once per gradient, never again in the backward pass (which ``chunked_step_cross_entropy``
    under reverse mode does). Peak memory: one [B, block, V] block; residuals: the state gradient [T, B, S, D].

    Returns (loss, ce_TBS, lse_TBS); the last two carry no gradient (metrics). ``weight_TBS`` is the loss's
    derivative w.r.t. each CE (e.g. p_t·mask/N for the Ouro objective), so it must not depend on the states except
    through the exit gate (its gradient, CE_t, flows back as usual). ``logits_fn`` / ``dw_fn``: sharding
    constraints for a logits block [B, block, V] and the accumulated head gradient [D, V].
    """
    t, b, s, _ = step_hidden_TBSD.shape
    constrain_logits = logits_fn or (lambda x: x)
    constrain_dw = dw_fn or (lambda x: x)
    if z_weight_BS is None:
        z_weight_BS = jnp.zeros((b, s), jnp.float32)

    def forward(h, w, weight, z_weight):
        zw_TBS = jnp.zeros((t, b, s), jnp.float32).at[-1].set(z_weight.astype(jnp.float32))

        def block(dw, xs, valid_b):
            h_b, y_b, wt_b, zw_b = xs
            logits = constrain_logits(jnp.matmul(h_b, w, preferred_element_type=jnp.float32))
            lse = jax.nn.logsumexp(logits, axis=-1)
            ce = lse - jnp.take_along_axis(logits, y_b[..., None].astype(jnp.int32), axis=-1)[..., 0]
            prob = jnp.exp(logits - lse[..., None])
            onehot = jax.nn.one_hot(y_b, logits.shape[-1], dtype=jnp.float32)
            g = (prob * (wt_b + 2.0 * zw_b * lse)[..., None] - onehot * wt_b[..., None]).astype(h_b.dtype)
            dh = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(h_b.dtype)
            if valid_b is not None:  # a position the last block covers again counts once
                h_b = jnp.where(valid_b[:, None], h_b, jnp.zeros_like(h_b))
            dw = dw + constrain_dw(jnp.einsum("bsd,bsv->dv", h_b, g, preferred_element_type=jnp.float32))
            return dw, (ce, lse, dh)

        def one_step(dw, xs_BS):  # one loop step: states, weights, z-weights
            h_BSD, wt_BS, zw_BS = xs_BS
            return _position_blocks(block, dw, (h_BSD, labels_BS, wt_BS, zw_BS), block_tokens)

        dw, (ce, lse, dh) = jax.lax.scan(one_step, constrain_dw(jnp.zeros(w.shape, jnp.float32)),
                                         (h, weight.astype(jnp.float32), zw_TBS))
        loss = jnp.sum(weight.astype(jnp.float32) * ce) + jnp.sum(z_weight.astype(jnp.float32) * lse[-1] ** 2)
        return (loss, ce, lse), (dh, dw.astype(w.dtype), ce, lse[-1] ** 2)

    @jax.custom_vjp
    def fused(h, w, weight, z_weight):
        return forward(h, w, weight, z_weight)[0]

    def fused_bwd(res, cts):
        dh, dw, ce, lse_sq = res
        ct = cts[0]  # ce and lse are returned without gradient
        return ((ct * dh).astype(dh.dtype), (ct * dw).astype(dw.dtype), (ct * ce).astype(weight_TBS.dtype),
                (ct * lse_sq).astype(z_weight_BS.dtype))

    fused.defvjp(forward, fused_bwd)
    loss, ce, lse = fused(step_hidden_TBSD, w_DV, weight_TBS, z_weight_BS)
    return loss, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(lse)


def ouro_expected_loss(ce_TBS: jax.Array, gate_BST: jax.Array, mask_BS: jax.Array | None = None,
                       beta: float = 0.1) -> jax.Array:
    """Ouro stage I: Σ_t p_t·CE_t − β·H(p) per token, averaged over non-masked tokens."""
    logp = exit_log_distribution(gate_BST)
    p = jnp.exp(logp)
    expected = jnp.sum(p * jnp.moveaxis(ce_TBS, 0, -1), axis=-1)
    entropy = -jnp.sum(p * logp, axis=-1)
    return _masked_mean(expected - beta * entropy, mask_BS)


def expected_loss_terms(hcfg: HaltingConfig, gate_BST: jax.Array, mask_BS: jax.Array | None = None,
                        ) -> tuple[jax.Array, jax.Array]:
    """("ouro" / "pondernet") the objective as Σ weight_TBS·CE_TBS + regulariser: (weight [T, B, S] =
    p_t·mask/N, the gate-only term −β·H(p) or β·KL), for ``fused_step_cross_entropy``."""
    if hcfg.objective not in ("ouro", "pondernet"):
        raise ValueError(f"objective={hcfg.objective!r}: expected_loss_terms needs 'ouro' or 'pondernet'")
    m = jnp.ones(gate_BST.shape[:2], jnp.float32) if mask_BS is None else mask_BS.astype(jnp.float32)
    p_TBS = jnp.moveaxis(exit_distribution(gate_BST), -1, 0)
    weight = p_TBS * (m / jnp.maximum(m.sum(), 1.0))
    zeros = jnp.zeros(p_TBS.shape, jnp.float32)  # the objectives with CE = 0 leave just their gate terms
    return weight, _per_step_objective(hcfg, zeros, gate_BST, mask_BS)


def geometric_log_prior(n_steps: int, lambda_p: float) -> jax.Array:
    """log of the Geometric(λ_p) prior truncated to t = 1..T and renormalised: [T]."""
    t = jnp.arange(n_steps, dtype=jnp.float32)
    log_norm = math.log1p(-(1.0 - lambda_p) ** n_steps)
    return math.log(lambda_p) + t * math.log1p(-lambda_p) - log_norm


def pondernet_loss(ce_TBS: jax.Array, gate_BST: jax.Array, mask_BS: jax.Array | None = None,
                   beta: float = 0.01, lambda_p: float = 0.2) -> jax.Array:
    """PonderNet: Σ_t p_t·CE_t + β·KL(p ‖ truncated Geometric(λ_p)) per token, masked mean."""
    logp = exit_log_distribution(gate_BST)
    p = jnp.exp(logp)
    expected = jnp.sum(p * jnp.moveaxis(ce_TBS, 0, -1), axis=-1)
    kl = jnp.sum(p * (logp - geometric_log_prior(gate_BST.shape[-1], lambda_p)), axis=-1)
    return _masked_mean(expected + beta * kl, mask_BS)


def act_loss(step_hidden_TBSD: jax.Array, gate_BST: jax.Array, head_fn: HeadFn, labels_BS: jax.Array,
             mask_BS: jax.Array | None = None, eps: float = 0.01, tau: float = 0.01) -> jax.Array:
    """ACT (Graves; Universal Transformer): CE of head(Σ_t p_t·h_t) + τ·(N + R), masked mean.

    One head application on the remainder-weighted state, so no per-step logits at all.
    """
    p, n, remainder = act_weights(gate_BST, eps)
    state = jnp.einsum("bst,tbsd->bsd", p, step_hidden_TBSD.astype(jnp.float32)).astype(step_hidden_TBSD.dtype)
    ce = cross_entropy(head_fn(state), labels_BS)
    return _masked_mean(ce + tau * (n + remainder), mask_BS)


def ouro_gate_loss(ce_TBS: jax.Array, gate_BST: jax.Array, mask_BS: jax.Array | None = None,
                   k: float = 50.0, gamma: float = 0.005) -> jax.Array:
    """Ouro stage II: BCE between the continue probability 1 − λ_t and w_t = σ(k·(I_t − γ)), t = 2..T, / T.

    I_t = max(0, CE_{t−1} − CE_t) is detached. The LM is meant to be frozen: pass ``gate_BST`` computed from
    stop-gradient states (``halting_loss`` does this with ``gate_fn``) so only the gate learns.
    """
    ce = jax.lax.stop_gradient(ce_TBS.astype(jnp.float32))
    improvement = jnp.maximum(ce[:-1] - ce[1:], 0.0)  # [T-1, B, S] for t = 2..T
    w = jnp.moveaxis(jax.nn.sigmoid(k * (improvement - gamma)), 0, -1)
    g = gate_BST[..., 1:].astype(jnp.float32)
    # log(1 − λ) = log σ(−g), log λ = log σ(g)
    bce = -(w * jax.nn.log_sigmoid(-g) + (1.0 - w) * jax.nn.log_sigmoid(g))
    return _masked_mean(bce.sum(-1) / gate_BST.shape[-1], mask_BS)


def final_step_loss(ce_TBS: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
    """Plain CE of the last loop, masked mean."""
    return _masked_mean(ce_TBS[-1], mask_BS)


def mixture_logits(gate_BST: jax.Array, *, step_logits_TBSV: jax.Array | None = None,
                   step_hidden_TBSD: jax.Array | None = None, head_fn: HeadFn | None = None) -> jax.Array:
    """Σ_t p_t·logits_t [B, S, V] (the released Ouro code's training logits).

    From step logits, or chunked from step states + head: a scan over T holding one [B, S, V] accumulator.
    """
    p_TBS = jnp.moveaxis(exit_distribution(gate_BST), -1, 0)
    if step_logits_TBSV is not None:
        return jnp.einsum("tbs,tbsv->bsv", p_TBS, step_logits_TBSV.astype(jnp.float32))
    if step_hidden_TBSD is None or head_fn is None:
        raise ValueError("mixture_logits: pass step_logits_TBSV, or step_hidden_TBSD and head_fn")
    term = jax.checkpoint(lambda h_BSD, p_BS: p_BS[..., None] * head_fn(h_BSD).astype(jnp.float32))

    def add(acc, xs):
        return acc + term(*xs), None

    acc0 = jnp.zeros_like(term(step_hidden_TBSD[0], p_TBS[0]))
    acc, _ = jax.lax.scan(add, acc0, (step_hidden_TBSD, p_TBS))
    return acc


def mixture_logits_loss(gate_BST: jax.Array, labels_BS: jax.Array, mask_BS: jax.Array | None = None,
                        **logits_or_hidden: Any) -> jax.Array:
    """CE of ``mixture_logits`` (keywords as there), masked mean: Ouro's released training loss."""
    return _masked_mean(cross_entropy(mixture_logits(gate_BST, **logits_or_hidden), labels_BS), mask_BS)


def check_ponder(hcfg: HaltingConfig, layer_loops: int) -> None:
    """Raise ValueError where ``hcfg.ponder_weight`` meets a model it means nothing for (no per-layer loops)."""
    if hcfg.ponder_weight != 0 and layer_loops < 2:
        raise ValueError(f"ponder_weight={hcfg.ponder_weight!r}: needs per-layer loops (LoopedConfig.layer_loops "
                         f">= 2, got {layer_loops}); set ponder_weight=0")


def layer_ponder_cost(expected_n_BSK: jax.Array, layer_loops: int, mask_BS: jax.Array | None = None) -> jax.Array:
    """The per-layer loops' ponder cost (mean E[n] − 1)/(N − 1) in [0, 1]: E[n] [B, S, k] averaged over the k core
    layers and the counted tokens (``mask_BS``); N = ``layer_loops`` >= 2. Weighted by ``ponder_weight``."""
    if layer_loops < 2:
        raise ValueError(f"layer_loops={layer_loops!r}: the ponder cost needs per-layer loops (>= 2)")
    return (_masked_mean(expected_n_BSK.astype(jnp.float32).mean(-1), mask_BS) - 1.0) / (layer_loops - 1)


def halting_loss(hcfg: HaltingConfig, *, gate_BST: jax.Array | None, labels_BS: jax.Array,
                 mask_BS: jax.Array | None = None, step_logits_TBSV: jax.Array | None = None,
                 step_hidden_TBSD: jax.Array | None = None, head_fn: HeadFn | None = None,
                 gate_fn: HeadFn | None = None, prepare_fn: HeadFn | None = None,
                 ce_TBS: jax.Array | None = None, layer_expected_n_BSK: jax.Array | None = None,
                 layer_loops: int | None = None) -> jax.Array:
    """The objective ``hcfg.objective`` on one batch (labels already aligned with the logits), plus
    ``hcfg.ponder_weight`` · ``layer_ponder_cost(layer_expected_n_BSK, layer_loops)`` when the weight is not 0
    (then both are required: ``LoopedOutput.layer_expected_n`` and ``LoopedConfig.layer_loops``).

    Inputs: step logits [T, B, S, V], or step read-out states [T, B, S, D] with ``head_fn`` ([B, S, D] ->
    [B, S, V]) — required for ``chunked``, "act" and "ouro_gate". "ouro_gate" also needs ``gate_fn``
    ([B, S, D] -> gate logit [B, S]), applied to stop-gradient states so only the gate receives gradients.
    With ``hcfg.ce_block`` > 0 the per-step CE runs in blocks of positions, so ``head_fn`` must act token by
    token; sequence-wise read-out work (coda layers) goes in ``prepare_fn`` ([B, S, D] -> [B, S, D]).
    ``ce_TBS``: the per-step CE already computed (for "ouro", "pondernet", "final"), used instead of logits/states.
    """
    loss = _block_loop_objective(hcfg, gate_BST=gate_BST, labels_BS=labels_BS, mask_BS=mask_BS,
                                 step_logits_TBSV=step_logits_TBSV, step_hidden_TBSD=step_hidden_TBSD,
                                 head_fn=head_fn, gate_fn=gate_fn, prepare_fn=prepare_fn, ce_TBS=ce_TBS)
    if hcfg.ponder_weight == 0:
        return loss
    if layer_expected_n_BSK is None or layer_loops is None:
        raise ValueError(f"ponder_weight={hcfg.ponder_weight!r}: needs layer_expected_n_BSK and layer_loops")
    check_ponder(hcfg, layer_loops)
    return loss + hcfg.ponder_weight * layer_ponder_cost(layer_expected_n_BSK, layer_loops, mask_BS)


def _block_loop_objective(hcfg: HaltingConfig, *, gate_BST, labels_BS, mask_BS, step_logits_TBSV,
                          step_hidden_TBSD, head_fn, gate_fn, prepare_fn, ce_TBS) -> jax.Array:
    obj = hcfg.objective
    if ce_TBS is not None and obj in ("ouro", "pondernet", "final"):
        return _per_step_objective(hcfg, ce_TBS, gate_BST, mask_BS)
    use_hidden = hcfg.chunked or obj in ("act", "ouro_gate") or step_logits_TBSV is None
    if use_hidden and (step_hidden_TBSD is None or head_fn is None):
        raise ValueError(f"objective={obj!r}, chunked={hcfg.chunked}: needs step_hidden_TBSD and head_fn")

    token_head = head_fn

    def step_ce(hidden_TBSD: jax.Array) -> jax.Array:
        return chunked_step_cross_entropy(hidden_TBSD, token_head, labels_BS, block_tokens=hcfg.ce_block,
                                          prepare_fn=prepare_fn)

    if prepare_fn is not None and head_fn is not None:  # the whole read-out, for objectives taking whole states
        head_fn = lambda h_BSD: token_head(prepare_fn(h_BSD))  # noqa: E731

    if obj == "act":
        return act_loss(step_hidden_TBSD, gate_BST, head_fn, labels_BS, mask_BS, hcfg.act_eps, hcfg.ponder_tau)
    if obj == "mixture":
        src = (dict(step_hidden_TBSD=step_hidden_TBSD, head_fn=head_fn) if use_hidden
               else dict(step_logits_TBSV=step_logits_TBSV))
        return mixture_logits_loss(gate_BST, labels_BS, mask_BS, **src)
    if obj == "ouro_gate":
        if gate_fn is None:
            raise ValueError("objective='ouro_gate': needs gate_fn (the exit gate, [B,S,D] -> [B,S])")
        frozen = jax.lax.stop_gradient(step_hidden_TBSD)
        ce = step_ce(frozen)
        gates = jnp.moveaxis(jax.vmap(gate_fn)(frozen), 0, -1)
        return ouro_gate_loss(ce, gates, mask_BS, hcfg.gate_k, hcfg.gate_gamma)

    if obj == "final" and use_hidden:
        return _masked_mean(step_ce(step_hidden_TBSD[-1:])[0], mask_BS)
    if use_hidden:
        ce = step_ce(step_hidden_TBSD)
    else:
        ce = step_cross_entropy(step_logits_TBSV, labels_BS)
    return _per_step_objective(hcfg, ce, gate_BST, mask_BS)


def _per_step_objective(hcfg: HaltingConfig, ce_TBS: jax.Array, gate_BST: jax.Array | None,
                        mask_BS: jax.Array | None) -> jax.Array:
    if hcfg.objective == "final":
        return final_step_loss(ce_TBS, mask_BS)
    if hcfg.objective == "ouro":
        return ouro_expected_loss(ce_TBS, gate_BST, mask_BS, hcfg.beta)
    return pondernet_loss(ce_TBS, gate_BST, mask_BS, hcfg.beta, hcfg.geometric_lambda)


def parse_exit_rule(text: str):
    """An exit rule from text: ``q=P`` (QExit), ``fixed=N`` (FixedExit), ``act=EPS`` (ACTExit), ``conv=EPS``
    (ConvergenceExit) or ``none`` (None); ValueError otherwise."""
    if text.strip().lower() == "none":
        return None
    rules = {"q": (QExit, float), "fixed": (FixedExit, int), "act": (ACTExit, float),
             "conv": (ConvergenceExit, float)}
    name, sep, value = text.partition("=")
    if not sep or name.strip().lower() not in rules:
        raise ValueError(f"{text!r}: must be q=P, fixed=N, act=EPS, conv=EPS or none")
    cls, kind = rules[name.strip().lower()]
    return cls(kind(value))
