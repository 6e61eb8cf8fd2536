"""``generate``: prompt → prefill → a ``lax.while_loop`` of decode steps and sampling, one device dispatch.

Also the jitted ``prefill`` / ``decode_step`` for callers that drive decoding themselves. Every jitted function
takes the model as (graphdef, state) with the graphdef static, and compiles once per shape bucket: prompt
lengths and ``max_new_tokens`` are rounded up to powers of two (at least 8); the prompt is left-padded to its
bucket, which changes nothing (positions come from the mask).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopjax.generate import decode
from loopjax.generate.cache import KV_MODES, KVCache, init_cache
from loopjax.halting import RowExit, validate_exit_rule
from loopjax.partitioning import active_rules
from loopjax.generate.sampling import Sampling, as_sampling, sample, sampling_args


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of ``generate`` (B rows, N = max_new_tokens, T loop steps, V vocab).

    tokens: [B, N] int32 new tokens; after a row's stop token, ``pad_token_id``.
    exit_steps: [B, N] int32, the loop (1..T) each token was read out from (0 after the row stopped).
    n_iterations: [N] int32, loop iterations the batch executed for each new token (the first comes from the
      prefill, which runs all T steps; 0 once every row has stopped).
    lengths: [B] int32, tokens generated per row, its stop token included.
    logits: [B, N, V] float32 logits each token was sampled from (only with ``return_logits=True``).
    """

    tokens: jax.Array
    exit_steps: jax.Array
    n_iterations: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None

    def total_iterations(self) -> int:
        """Loop iterations executed for the whole call."""
        return int(np.asarray(self.n_iterations).sum())


def bucket(n: int) -> int:
    """Shape bucket of a length: the next power of two, at least 8."""
    return max(8, 1 << (n - 1).bit_length())


def _check_kv_mode(kv_mode: str) -> None:
    if kv_mode not in KV_MODES:
        near = difflib.get_close_matches(str(kv_mode), KV_MODES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"kv_mode={kv_mode!r}: must be one of {KV_MODES}{hint}")


def _check_n_loops(model, n_loops: int | None) -> int:
    n_loops = model.cfg.n_loops if n_loops is None else n_loops
    if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
        raise ValueError(f"n_loops={n_loops!r}: must be an int >= 1")
    return n_loops


def _check_prompt(prompt_BS, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """Concrete int32 prompt and bool mask; rows must be left-padded and hold at least one token."""
    prompt = np.asarray(prompt_BS)
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_BS: must be an int array [batch, seq], got dtype {prompt.dtype} shape {prompt.shape}")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_BS.shape={prompt.shape}: the prompt is empty; give every row at least one token "
                         "(e.g. a BOS token)")
    if attention_mask is None:
        mask = np.ones(prompt.shape, bool)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != prompt.shape:
            raise ValueError(f"attention_mask.shape={mask.shape}: must equal prompt_BS.shape={prompt.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask: must hold only 0 (padding) and 1 (token)")
        mask = mask.astype(bool)
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask rows {empty.tolist()}: have no tokens; every row needs at least one")
        not_left = np.flatnonzero((mask[:, :-1] & ~mask[:, 1:]).any(axis=1))
        if not_left.size:
            raise ValueError(f"attention_mask rows {not_left.tolist()}: must be left-padded (zeros, then ones)")
    return prompt.astype(np.int32), mask


def _check_rows(model, rows: int, n_loops: int, row_loops, row_q, exit_rule) -> tuple[Any, Any]:
    """Concrete per-row depth [B] int32 / threshold [B] float32 (None where not given), validated."""
    depth = q = None
    if row_loops is not None:
        depth = np.asarray(row_loops)
        if depth.shape != (rows,) or not (np.issubdtype(depth.dtype, np.integer) and depth.dtype != bool):
            raise ValueError(f"row_loops: must be {rows} ints (one per prompt row), got dtype {depth.dtype} "
                             f"shape {depth.shape}")
        bad = np.flatnonzero((depth < 1) | (depth > n_loops))
        if bad.size:
            raise ValueError(f"row_loops={depth.tolist()}: rows {bad.tolist()} are outside 1..n_loops={n_loops} "
                             "(pass n_loops >= the deepest row)")
        depth = depth.astype(np.int32)
    if row_q is not None:
        q = np.asarray(row_q)
        if q.shape != (rows,) or not np.issubdtype(q.dtype, np.number) or q.dtype == bool:
            raise ValueError(f"row_q: must be {rows} floats (one per prompt row), got dtype {q.dtype} shape {q.shape}")
        bad = np.flatnonzero(~((q >= 0) & (q <= 1)))
        if bad.size:
            raise ValueError(f"row_q={q.tolist()}: rows {bad.tolist()} are outside [0, 1]")
        if not model.cfg.exit_gate:
            raise ValueError("row_q: a per-row QExit threshold needs the exit gate (LoopedConfig.exit_gate=True)")
        if exit_rule is not None:
            raise ValueError(f"row_q with exit_rule={exit_rule!r}: pass one threshold rule, not both")
        q = q.astype(np.float32)
    return depth, q


def _sizes(cfg, s: int, n: int, cache_len: int | None) -> tuple[int, int, int]:
    """(padded prompt length, token buffer length, cache capacity) for a prompt of s tokens and n new ones."""
    limit = cfg.max_seq_len if cache_len is None else cache_len
    what = f"max_seq_len={cfg.max_seq_len}" if cache_len is None else f"cache_len={cache_len}"
    if s + n > limit:
        raise ValueError(f"prompt length {s} + max_new_tokens {n} = {s + n}: exceeds the cache ({what}); "
                         "shorten the prompt or generate fewer tokens")
    if cache_len is not None and cache_len > cfg.max_seq_len:
        raise ValueError(f"cache_len={cache_len}: must be <= max_seq_len={cfg.max_seq_len}")
    s_pad = bucket(s) if bucket(s) + n <= limit else s
    n_buf = bucket(n)
    capacity = limit if cache_len is not None else min(limit, s_pad + n_buf)
    return s_pad, n_buf, capacity


# "rules": the active (mesh, logical rules), read at trace time, so entering ``use_rules`` retraces.
_STATIC = ("graphdef", "n_loops", "kv_mode", "exit_rule", "rules")


@functools.partial(jax.jit, static_argnames=_STATIC + ("capacity",))
def _prefill_jit(graphdef, state, tokens_BS, mask_BS, *, n_loops, kv_mode, exit_rule, rules, capacity):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, tokens_BS.shape[0], capacity, n_loops=n_loops, kv_mode=kv_mode)
    return decode.prefill(model, tokens_BS, mask_BS, cache, n_loops=n_loops, kv_mode=kv_mode, exit_rule=exit_rule)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode_jit(graphdef, state, cache, tokens_B, live_B, *, n_loops, kv_mode, exit_rule, rules):
    model = nnx.merge(graphdef, state)
    return decode.decode_step(model, cache, tokens_B, live_B, n_loops=n_loops, kv_mode=kv_mode, exit_rule=exit_rule)


def prefill(model, prompt_BS, attention_mask=None, *, capacity: int, n_loops: int | None = None,
            kv_mode: str = "per_step", exit_rule: Any = None) -> tuple[KVCache, decode.StepOutput]:
    """Jitted prefill of a left-padded prompt [B, S] into a new cache of ``capacity`` tokens.

    Returns the cache and the last token's logits [B, V], exit step [B] and loop iterations.
    """
    _check_kv_mode(kv_mode)
    n_loops = _check_n_loops(model, n_loops)
    validate_exit_rule(exit_rule, n_loops, model.cfg.exit_gate)
    prompt, mask = _check_prompt(prompt_BS, attention_mask)
    _sizes(model.cfg, prompt.shape[1], 0, capacity)
    graphdef, state = nnx.split(model)
    return _prefill_jit(graphdef, state, jnp.asarray(prompt), jnp.asarray(mask), n_loops=n_loops, kv_mode=kv_mode,
                        exit_rule=exit_rule, rules=active_rules(), capacity=capacity)


def decode_step(model, cache: KVCache, tokens_B, *, live_B=None, n_loops: int | None = None,
                kv_mode: str = "per_step", exit_rule: Any = None) -> tuple[KVCache, decode.StepOutput]:
    """Jitted decode of one token per row [B] appended to ``cache`` (donated: do not reuse the old cache).

    live_B: bool rows still generating (default all). n_loops, kv_mode, exit_rule must match the prefill.
    """
    _check_kv_mode(kv_mode)
    n_loops = _check_n_loops(model, n_loops)
    validate_exit_rule(exit_rule, n_loops, model.cfg.exit_gate)
    if int(cache.length) >= cache.capacity:
        raise ValueError(f"cache is full ({cache.capacity} tokens): allocate a larger capacity at prefill")
    tokens_B = jnp.asarray(tokens_B, jnp.int32)
    live_B = jnp.ones(tokens_B.shape, bool) if live_B is None else jnp.asarray(live_B, bool)
    graphdef, state = nnx.split(model)
    return _decode_jit(graphdef, state, cache, tokens_B, live_B, n_loops=n_loops, kv_mode=kv_mode,
                       exit_rule=exit_rule, rules=active_rules())


@functools.partial(jax.jit, static_argnames=_STATIC + ("greedy", "n_buf", "capacity", "return_logits"))
def _generate_jit(graphdef, state, tokens_BS, mask_BS, max_new, key, stop_ids, pad_id, sampling_args,
                  row_loops=None, row_q=None, *, n_loops, kv_mode, exit_rule, rules, greedy, n_buf, capacity,
                  return_logits):
    model = nnx.merge(graphdef, state)
    b = tokens_BS.shape[0]
    if row_loops is not None or row_q is not None:  # traced per-row values: one program for every mix of them
        exit_rule = RowExit(depth_B=row_loops, q_B=row_q, rule=exit_rule)
    cache = init_cache(model.cfg, b, capacity, n_loops=n_loops, kv_mode=kv_mode)
    cache, out = decode.prefill(model, tokens_BS, mask_BS, cache, n_loops=n_loops, kv_mode=kv_mode,
                                exit_rule=exit_rule)
    tok = sample(out.logits_BV, jax.random.fold_in(key, 0), greedy, *sampling_args)
    logits_buf = None
    if return_logits:
        logits_buf = jnp.zeros((b, n_buf, out.logits_BV.shape[-1]), jnp.float32).at[:, 0].set(out.logits_BV)
    carry = dict(
        i=jnp.asarray(1, jnp.int32), cache=cache, tok=tok, done=jnp.isin(tok, stop_ids),
        tokens=jnp.full((b, n_buf), pad_id, jnp.int32).at[:, 0].set(tok),
        exits=jnp.zeros((b, n_buf), jnp.int32).at[:, 0].set(out.exit_step_B),
        iters=jnp.zeros((n_buf,), jnp.int32).at[0].set(out.n_iterations),
        lengths=jnp.ones((b,), jnp.int32), logits=logits_buf)

    def cond(c):
        return (c["i"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        i, live = c["i"], ~c["done"]
        cache, o = decode.decode_step(model, c["cache"], c["tok"], live, n_loops=n_loops, kv_mode=kv_mode,
                                      exit_rule=exit_rule)
        tok = jnp.where(live, sample(o.logits_BV, jax.random.fold_in(key, i), greedy, *sampling_args), pad_id)
        new = dict(i=i + 1, cache=cache, tok=tok, done=c["done"] | (live & jnp.isin(tok, stop_ids)),
                   tokens=c["tokens"].at[:, i].set(tok),
                   exits=c["exits"].at[:, i].set(jnp.where(live, o.exit_step_B, 0)),
                   iters=c["iters"].at[i].set(o.n_iterations), lengths=c["lengths"] + live, logits=None)
        if return_logits:
            new["logits"] = c["logits"].at[:, i].set(o.logits_BV)
        return new

    c = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens=c["tokens"], exit_steps=c["exits"], n_iterations=c["iters"], lengths=c["lengths"],
                          logits=c["logits"])


def generate(model, prompt_BS, max_new_tokens: int, *, attention_mask=None, exit_rule: Any = None,
             kv_mode: str = "per_step", sampling: Sampling | str | dict | None = "greedy",
             stop_tokens: Sequence[int] | int | None = None, seed: int = 0, n_loops: int | None = None,
             pad_token_id: int = 0, cache_len: int | None = None, return_logits: bool = False, row_loops=None,
             row_q=None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per row after a (left-padded) prompt, in one device dispatch.

    prompt_BS: int [B, S]; attention_mask: [B, S] 1 = token, 0 = left padding (positions are cumsum(mask) − 1,
      as HF generate derives them).
    exit_rule: an exit rule of ``loopjax.halting`` (None runs ``n_loops`` steps for every token).
    kv_mode: "per_step" (each step its own KV; early exit skips steps and later tokens read the deepest
      available KV), "last_step" (decoding attends to past tokens' last-step KV, 1/T memory) or "compute_all"
      (every token runs all steps; the rule only selects the read-out step, as the reference code).
    sampling: "greedy" or ``Sampling(temperature, top_k, top_p)``; seed: key for sampling.
    stop_tokens: ids that end a row (the stop token is kept); finished rows emit ``pad_token_id``; the loop ends
      early once every row has stopped.
    n_loops: loop steps T (default ``cfg.n_loops``); cache_len: cache capacity (default: the bucketed
      prompt + new length, at most ``cfg.max_seq_len``); return_logits: also return the [B, N, V] logits.
    row_loops: per-row depth dial, [B] ints in 1..n_loops: row b reads every token out at loop ``row_loops[b]``
      (earlier where ``exit_rule`` fires), in the same compiled program for any mix of depths. Each row generates
      what it generates alone with ``exit_rule=FixedExit(row_loops[b])``; in "per_step" and "compute_all" that
      is also what it generates alone with ``n_loops=row_loops[b]`` (loop t never reads a deeper loop's KV).
      In "last_step" the prompt keeps its loop-``n_loops`` KV, as under any exit rule.
    row_q: per-row Ouro threshold, [B] floats in [0, 1] (``QExit(row_q[b])`` for row b; needs the exit gate, and
      exit_rule None); with row_loops, a row exits at whichever comes first.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    max_new_tokens = int(max_new_tokens)
    _check_kv_mode(kv_mode)
    n_loops = _check_n_loops(model, n_loops)
    validate_exit_rule(exit_rule, n_loops, model.cfg.exit_gate)
    sampling = as_sampling(sampling)
    if stop_tokens is None:
        stop_tokens = ()
    elif isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = (int(stop_tokens),)
    stop = np.asarray(tuple(stop_tokens) or (-1,), np.int32)
    vocab = model.cfg.vocab_size
    if stop_tokens and ((stop < 0) | (stop >= vocab)).any():
        raise ValueError(f"stop_tokens={tuple(stop_tokens)!r}: must be token ids in [0, {vocab})")
    prompt, mask = _check_prompt(prompt_BS, attention_mask)
    row_loops, row_q = _check_rows(model, prompt.shape[0], n_loops, row_loops, row_q, exit_rule)
    if ((prompt < 0) | (prompt >= vocab))[mask].any():
        raise ValueError(f"prompt_BS: token ids must be in [0, {vocab})")
    b, s = prompt.shape
    s_pad, n_buf, capacity = _sizes(model.cfg, s, max_new_tokens, cache_len)
    pad = s_pad - s
    prompt = np.pad(np.where(mask, prompt, 0), ((0, 0), (pad, 0)))
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    graphdef, state = nnx.split(model)
    out = _generate_jit(graphdef, state, jnp.asarray(prompt), jnp.asarray(mask), jnp.asarray(max_new_tokens, jnp.int32),
                        jax.random.key(seed), jnp.asarray(stop), jnp.asarray(pad_token_id, jnp.int32),
                        sampling_args(sampling), None if row_loops is None else jnp.asarray(row_loops),
                        None if row_q is None else jnp.asarray(row_q), n_loops=n_loops, kv_mode=kv_mode,
                        exit_rule=exit_rule, rules=active_rules(), greedy=sampling.greedy, n_buf=n_buf,
                        capacity=capacity, return_logits=return_logits)
    n = max_new_tokens
    return GenerateOutput(tokens=out.tokens[:, :n], exit_steps=out.exit_steps[:, :n], n_iterations=out.n_iterations[:n],
                          lengths=out.lengths, logits=None if out.logits is None else out.logits[:, :n])
