"""Score (context, continuation) token requests at every loop depth in one forward pass, on a mesh.

Requests are cut to at most ``max_length`` input tokens (the context is left-truncated, the harness's
convention), sorted by length, right-padded to a few power-of-two length buckets and grouped into batches of a
fixed number of rows (short batches are filled with dummy rows whose results are dropped), so a whole task
compiles at most one program per bucket. Right padding needs no mask: attention is causal, so no real token
sees a pad.

Memory: the pass keeps the read-out state of every loop, [T, B, S, D], and runs the LM head one loop at a time
(``lax.map``), so the logits are never [T, B, S, V]: one [B, S, V] float32 block lives at a time, reduced at
once to the continuation's log-prob and greedy flag ([T, B, S] floats). The model's own per-loop head inside
``return_steps`` is dead code in this program and XLA drops it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from loopjax.sharding import batch_sharding, param_shardings, process_batch_rows, shard_batch, use_rules

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    """One scored sequence: ``tokens`` = context + continuation ids (already truncated), the last ``n_cont``
    of which are scored (each predicted from the tokens before it)."""

    tokens: tuple[int, ...]
    n_cont: int

    @property
    def n_inputs(self) -> int:
        """Input positions the model runs over (all tokens but the last)."""
        return len(self.tokens) - 1


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> TokenRequest:
    """The harness convention: keep the last ``max_length + 1`` tokens of context + continuation (the context
    is cut from the left); a continuation longer than that keeps its last ``max_length`` tokens."""
    if not continuation:
        raise ValueError("continuation: must hold at least one token")
    if not context:
        raise ValueError("context: must hold at least one token (the harness passes a prefix token)")
    whole = (tuple(int(t) for t in context) + tuple(int(t) for t in continuation))[-(max_length + 1):]
    return TokenRequest(whole, min(len(continuation), len(whole) - 1))


def length_buckets(max_length: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` below ``max_length``, then ``max_length`` itself."""
    out, b = [], min_bucket
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n}: exceeds the largest bucket {buckets[-1]}")


def plan_batches(requests: Sequence[TokenRequest], batch_size: int, buckets: Sequence[int]
                 ) -> Iterator[tuple[int, list[int]]]:
    """(bucket length, request indices) per batch: longest first, each batch within one bucket, at most
    ``batch_size`` requests (the caller fills the rest with dummy rows)."""
    order = sorted(range(len(requests)), key=lambda i: (-requests[i].n_inputs, i))
    group: list[int] = []
    current = None
    for i in order:
        b = bucket_of(requests[i].n_inputs, buckets)
        if group and (b != current or len(group) == batch_size):
            yield current, group
            group = []
        current = b
        group.append(i)
    if group:
        yield current, group


def pack(requests: Sequence[TokenRequest], length: int, rows: int) -> dict[str, np.ndarray]:
    """[rows, length] inputs, targets and continuation weights; rows past ``len(requests)`` are dummies."""
    inputs = np.zeros((rows, length), np.int32)
    targets = np.zeros((rows, length), np.int32)
    weights = np.zeros((rows, length), np.float32)
    valid = np.zeros((rows, length), np.float32)
    for r, req in enumerate(requests):
        toks = np.asarray(req.tokens, np.int32)
        n = len(toks) - 1
        inputs[r, :n], targets[r, :n] = toks[:-1], toks[1:]
        weights[r, n - req.n_cont:n] = 1.0
        valid[r, :n] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights, "valid": valid}


def place_state(model, mesh, rules) -> tuple[Any, Any]:
    """(graphdef, state) with every parameter sharded on ``mesh`` by ``rules`` (resharded when it is not)."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)

    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        host = np.asarray(jax.device_get(x)) if x.is_fully_addressable else None
        if host is None:
            return jax.device_put(x, s)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return graphdef, jax.tree.map(lambda s, v: v.replace(put(v[...], s)), shardings, state,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


class Scorer:
    """Jitted scoring programs of one model on one mesh; ``compiles`` counts traces per program.

    depths_loops: T, the loops the all-depths pass runs (read out after each of loops 1..T).
    exit_rule / rule_loops: the adaptive rule and the loop count it is defined over (the model's L); its
      read-out under ``run_all_loops`` semantics is ``min(exit step over T loops, L)``, the same as over L loops.
    """

    def __init__(self, model, mesh, rules, *, loops: int, exit_rule: Any = None, rule_loops: int | None = None):
        self.cfg = model.cfg
        self.mesh, self.rules = mesh, rules
        self.loops, self.exit_rule = loops, exit_rule
        self.rule_loops = loops if rule_loops is None else rule_loops
        self.graphdef, self.state = place_state(model, mesh, rules)
        self.compiles: dict[str, int] = {"all_depths": 0, "frozen": 0}
        names = rules.mesh_axes("activation_batch")
        self.batch_shards = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._all = jax.jit(self._all_depths, out_shardings=self._replicated)
        self._frozen = jax.jit(self._frozen_pass, out_shardings=self._replicated)

    def model(self):
        """The model with the placed (sharded) parameters."""
        return nnx.merge(self.graphdef, self.state)

    def rows(self, batch_size: int) -> int:
        """Rows per batch: ``batch_size`` rounded up to a multiple of the mesh's batch shards."""
        return -(-batch_size // self.batch_shards) * self.batch_shards

    # ------------------------------------------------------------------ programs
    def _readout_scores(self, m, h_TBSD, targets_BS):
        positions = jnp.broadcast_to(jnp.arange(targets_BS.shape[1], dtype=jnp.int32), targets_BS.shape)
        cos, sin, layout = m.rope_and_layout(positions)

        def one(h_BSD):
            logits = m.readout(h_BSD, cos, sin, layout).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            tok_logp = jnp.take_along_axis(logp, targets_BS[..., None], axis=-1)[..., 0]
            return tok_logp, jnp.argmax(logits, axis=-1) == targets_BS

        return jax.lax.map(one, h_TBSD)

    def _all_depths(self, state, batch):
        self.compiles["all_depths"] += 1  # runs only while tracing
        m = nnx.merge(self.graphdef, state)
        w, tgt = batch["weights"], batch["targets"]
        if self.exit_rule is None:
            out = m(batch["inputs"], n_loops=self.loops, return_steps=True)
        else:
            out = m(batch["inputs"], n_loops=self.loops, exit_rule=self.exit_rule, run_all_loops=True,
                    return_steps=True)
        logp_TBS, greedy_TBS = self._readout_scores(m, out.step_hidden, tgt)
        res = {"logp_T": (logp_TBS * w).sum(-1).T, "greedy_T": jnp.all(greedy_TBS | (w == 0), axis=-1).T}
        if self.exit_rule is not None:
            step_BS = jnp.minimum(out.exit_step, self.rule_loops)
            pick = lambda x: jnp.take_along_axis(x, (step_BS - 1)[None], axis=0)[0]  # noqa: E731
            res["logp_exit"] = (pick(logp_TBS) * w).sum(-1)
            res["greedy_exit"] = jnp.all(pick(greedy_TBS) | (w == 0), axis=-1)
            res["exit_cont"] = (step_BS * w).sum(-1)
            res["exit_all"] = (step_BS * batch["valid"]).sum(-1)
        return res

    def _frozen_pass(self, state, batch):
        self.compiles["frozen"] += 1
        m = nnx.merge(self.graphdef, state)
        w, tgt = batch["weights"], batch["targets"]
        out = m(batch["inputs"], n_loops=self.rule_loops, exit_rule=self.exit_rule)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(out.logits, axis=-1) == tgt
        step = out.exit_step.astype(jnp.float32)
        return {"logp": (tok * w).sum(-1), "greedy": jnp.all(greedy | (w == 0), axis=-1),
                "exit_cont": (step * w).sum(-1), "exit_all": (step * batch["valid"]).sum(-1)}

    # ------------------------------------------------------------------ running
    def _device_batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        rows = process_batch_rows(self.mesh, self.rules, next(iter(host.values())).shape[0])
        return {k: shard_batch(v[rows], self.mesh, self.rules) for k, v in host.items()}

    def run(self, requests: Sequence[TokenRequest], *, batch_size: int, buckets: Sequence[int],
            frozen: bool = False, progress=None) -> dict[str, np.ndarray]:
        """Per request arrays (rows in request order): all-depths ``logp_T`` [N, T], ``greedy_T``, and with an
        exit rule ``logp_exit``, ``greedy_exit``, ``exit_cont`` (sum of read-out loops over continuation
        tokens), ``exit_all`` (over all input tokens); ``frozen=True`` runs the masked while-loop instead and
        gives ``logp``, ``greedy``, ``exit_cont``, ``exit_all``. ``progress(n)`` is called per batch."""
        if frozen and self.exit_rule is None:
            raise ValueError("adaptive-frozen: needs an exit rule")
        fn = self._frozen if frozen else self._all
        rows = self.rows(batch_size)
        out: dict[str, np.ndarray] = {}
        for length, idx in plan_batches(requests, rows, buckets):
            host = pack([requests[i] for i in idx], length, rows)
            with use_rules(self.mesh, self.rules):
                res = jax.device_get(fn(self.state, self._device_batch(host)))
            for k, v in res.items():
                v = np.asarray(v)
                if k not in out:
                    out[k] = np.zeros((len(requests),) + v.shape[1:], v.dtype)
                out[k][idx] = v[:len(idx)]
            if progress is not None:
                progress(len(idx))
        return out
