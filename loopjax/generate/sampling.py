"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), composable."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (None: all).
    top_k and top_p apply only when sampling (temperature > 0); with both, top-k filters first.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"temperature={t!r}: must be a float >= 0 (0 = greedy)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k={k!r}: must be None or an int >= 1")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p={p!r}: must be None or a float in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def as_sampling(sampling: Sampling | str | dict | None) -> Sampling:
    """Accept a ``Sampling``, ``"greedy"``/None, or a dict of its fields."""
    if sampling is None or sampling == "greedy":
        return GREEDY
    if isinstance(sampling, Sampling):
        return sampling
    if isinstance(sampling, dict):
        return Sampling(**sampling)
    raise ValueError(f"sampling={sampling!r}: must be 'greedy', a Sampling(temperature, top_k, top_p) or a dict "
                     "of its fields")


def sampling_args(sampling: Sampling) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature, top_k, top_p) as arrays, so that changing them does not recompile (0 / 1 switch a filter off)."""
    return (jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32), jnp.asarray(sampling.top_k or 0, jnp.int32),
            jnp.asarray(1.0 if sampling.top_p is None else sampling.top_p, jnp.float32))


def sample(logits_BV: jax.Array, key: jax.Array, greedy: bool, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Draw one token per row: int32 [B]. ``greedy`` is static; the rest may be traced scalars.

    top_k: keep the k largest logits (0: all); top_p: then keep the smallest most-likely set whose probability
    reaches p (1: all).
    """
    logits = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    v = logits.shape[-1]
    neg_inf = jnp.finfo(jnp.float32).min
    sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kept_by_k = jnp.arange(v) < k
    probs = jax.nn.softmax(jnp.where(kept_by_k, sorted_BV, neg_inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = kept_by_k & (before < top_p)  # always keeps the top token
    cutoff_B1 = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(logits < cutoff_B1, neg_inf, logits), axis=-1).astype(jnp.int32)
