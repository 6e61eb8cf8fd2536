"""Layer specialisation of per-layer loops and memory banks: mean E[n] and mean gate value per core layer.

Frey et al. (arXiv 2603.08391) report that early layers loop little and read memory little, late layers more; this
measures it for a model with ``layer_loops > 1`` and / or memory banks (``plots.plot_layer_specialisation`` draws it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROFILE_KEYS = ("expected_steps", "gate_local", "gate_global")


def has_layer_profile(cfg) -> bool:
    """Whether a config's model has anything to profile: per-layer loops or a memory bank."""
    return (getattr(cfg, "layer_loops", 1) > 1 or getattr(cfg, "memory_local_slots", 0) > 0
            or getattr(cfg, "memory_global_slots", 0) > 0)


@functools.partial(jax.jit, static_argnums=0)
def _layer_outputs(graphdef, state, tokens_BS):
    out = nnx.merge(graphdef, state)(tokens_BS)
    # [B, S, k] per-token E[n] of each core layer; [T, k, 2] mean gate value per block loop, layer, bank (NaN: none)
    return getattr(out, "layer_expected_n", None), getattr(out, "memory_gates", None)


def layer_profile(model, tokens_BS, mask_BS=None) -> dict[str, list[float] | None]:
    """Per core layer: mean E[n] over the tokens where ``mask_BS`` > 0 (all tokens by default; ``expected_steps``,
    None without per-layer loops) and mean gate value of the local and the global bank (``gate_local`` /
    ``gate_global``, None without that bank; averaged over every position of ``tokens_BS`` and the block loops,
    as ``LoopedOutput.memory_gates`` reports them). ``tokens_BS``: int [B, S]."""
    tokens_BS = jnp.asarray(tokens_BS, jnp.int32)
    mask = np.ones(tokens_BS.shape, bool) if mask_BS is None else np.asarray(mask_BS) > 0
    if not mask.any():
        raise ValueError("mask_BS selects no token")
    graphdef, state = nnx.split(model)
    en_BSK, gates_TK2 = _layer_outputs(graphdef, state, tokens_BS)
    out: dict[str, list[float] | None] = dict.fromkeys(PROFILE_KEYS)
    if en_BSK is not None:
        out["expected_steps"] = [float(x) for x in np.asarray(en_BSK, np.float64)[mask].mean(axis=0)]
    if gates_TK2 is not None:
        gates_K2 = np.asarray(gates_TK2, np.float64).mean(axis=0)
        for i, bank in enumerate(("local", "global")):
            if not np.isnan(gates_K2[:, i]).any():
                out[f"gate_{bank}"] = [float(x) for x in gates_K2[:, i]]
    return out
