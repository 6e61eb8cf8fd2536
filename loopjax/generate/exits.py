"""Per-step exit decisions while decoding: does a token's exit rule fire after loop step t?"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def step_fires(rule: Any, t: jax.Array, n_loops: int, gate_logits_XT: jax.Array, h_prev_XD: jax.Array,
               h_new_XD: jax.Array) -> jax.Array:
    """Bool [...]: the rule fires for each token after 0-based step ``t`` (always at the last step).

    gate_logits_XT: gate logits of steps 0..t in [..., :t+1] (later entries are ignored); h_prev_XD, h_new_XD:
    the carried state before and after step t. ``rule=None`` runs all ``n_loops`` steps.
    """
    last = jnp.broadcast_to(t >= n_loops - 1, gate_logits_XT.shape[:-1])
    if rule is None:
        return last
    raise ValueError(f"exit_rule={rule!r}: unsupported")


def validate_rule(rule: Any, n_loops: int) -> None:
    """Raise ValueError, before tracing, for a rule that cannot run with ``n_loops`` steps."""
    if rule is None:
        return
    raise ValueError(f"exit_rule={rule!r}: unsupported")
