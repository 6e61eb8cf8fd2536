"""Exit distributions over loop steps.

Stick-breaking (Ouro): λ_t = σ(g_t); p_t = λ_t Π_{j<t}(1 − λ_j) for t < T; the last step takes the remainder
Π_{j<T}(1 − λ_j). Computed per token in float32, in log space for the survival product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
