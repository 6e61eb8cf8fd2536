"""Gated memory banks (Frey et al. 2026, "Think Harder or Know More?"): learned storage read before each core
layer at every iteration.

Each core layer owns a ``LayerMemory``: a local bank (keys K_l, values V_l [S_L, D]), the projections W_L, W_G
[D, D] (no bias) that map what it reads from its local bank and from the core's one shared ``GlobalMemory``
(K, V [S_G, D]), one element-wise gate per bank and the query norms. The read of a state h [B, S, D]:

    q   = norm_q(norm(h))
    m_b = softmax(q · norm_k(K_b)ᵀ / √D) V_b               dense over all S_b slots, for b in (local, global)
    g_b = σ(W_g,b h + b_g,b)                                 D-dimensional; W_g starts at zero, b_g at the gate bias
    h̃   = h + g_L ⊙ (W_L m_L) + g_G ⊙ (W_G m_G)

The banks are parameters (initialised N(0, 0.02²)), not a cache: a read is a function of the token's own state
only, so cached decoding applies it per token. Scores are one [B, S, S_b] block per bank (float32 softmax); each
bank is read separately, so no [B, S, S_L + S_G] block exists. Shapes: B batch, S sequence, D d_model, M slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from loopjax.config import LoopedConfig
from loopjax.layers import RMSNorm, dense, dtype
from loopjax.partitioning import ACTIVATION_BSD, with_logical_constraint

# Logical axes of the memory parameters (``sharding.py`` maps them): the slot axis of a bank, and the model
# axis of a bank (kept apart from "embed" so that the rule table decides which of the two FSDP shards).
BANK_AXES = ("memory_slots", "memory_embed")
# checkpoint_name tags of the memory's matmul outputs (dot-saving remat policies keep them by name).
MEMORY_OUTPUT_NAMES = ("memory_local", "memory_global", "memory_gate_local", "memory_gate_global")
BANK_STD = 0.02


def _bank(rngs: nnx.Rngs, slots: int, cfg: LoopedConfig) -> nnx.Param:
    value = BANK_STD * jax.random.normal(rngs.params(), (slots, cfg.d_model), jnp.float32)
    # A bank is storage, not a transformation: weight decay would only erase what it has learned.
    return nnx.Param(value.astype(dtype(cfg.param_dtype)), logical_axes=BANK_AXES, weight_decay=False)


class Bank(nnx.Module):
    """Keys and values [M, D] and the norm of the keys; ``read`` is dense softmax attention over the slots."""

    def __init__(self, cfg: LoopedConfig, slots: int, rngs: nnx.Rngs):
        self.keys = _bank(rngs, slots, cfg)
        self.values = _bank(rngs, slots, cfg)
        self.norm_k = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype)

    def read(self, q_BSD: jax.Array) -> jax.Array:
        """m = softmax(q · norm_k(K)ᵀ / √D) V for normed queries [B, S, D]: [B, S, D] in q's dtype."""
        cdt = q_BSD.dtype
        k_MD = self.norm_k(self.keys[...].astype(cdt))
        scores_BSM = jnp.einsum("bsd,md->bsm", q_BSD, k_MD, preferred_element_type=jnp.float32)
        probs_BSM = jax.nn.softmax(scores_BSM * q_BSD.shape[-1] ** -0.5, axis=-1)
        return jnp.einsum("bsm,md->bsd", probs_BSM.astype(cdt), self.values[...].astype(cdt),
                          preferred_element_type=jnp.float32).astype(cdt)


class GlobalMemory(Bank):
    """The one bank all core layers read (S_G slots)."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.memory_global_slots, rngs)


class Gate(nnx.Module):
    """σ(W h + b), element-wise over D; W starts at zero, so the gate starts at exactly σ(b)."""

    def __init__(self, cfg: LoopedConfig):
        d, pd = cfg.d_model, dtype(cfg.param_dtype)
        self.w = nnx.Param(jnp.zeros((d, d), pd), logical_axes=("embed", "mlp"))
        self.b = nnx.Param(jnp.full((d,), cfg.memory_gate_bias, pd), logical_axes=(None,), weight_decay=False)

    def __call__(self, h_BSD: jax.Array, name: str) -> jax.Array:
        z = checkpoint_name(dense(h_BSD, self.w[...].astype(h_BSD.dtype), jnp.float32), name)
        return jax.nn.sigmoid(z + self.b[...].astype(jnp.float32))


class LayerMemory(nnx.Module):
    """One core layer's memory: its local bank (when ``memory_local_slots``), the projection and gate of each
    bank it reads (local, and the core's global bank when ``memory_global_slots``) and the query norms."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        d, eps, pd, std = cfg.d_model, cfg.rms_eps, cfg.param_dtype, cfg.init_std
        self.compute_dtype = dtype(cfg.compute_dtype)
        self.norm = RMSNorm(d, eps, pd)
        self.norm_q = RMSNorm(d, eps, pd)

        def proj():
            value = std * jax.random.normal(rngs.params(), (d, d), jnp.float32)
            return nnx.Param(value.astype(dtype(pd)), logical_axes=("mlp", "embed"))

        local = cfg.memory_local_slots > 0
        self.local = Bank(cfg, cfg.memory_local_slots, rngs) if local else None
        self.w_local = proj() if local else None
        self.gate_local = Gate(cfg) if local else None
        glob = cfg.memory_global_slots > 0
        self.w_global = proj() if glob else None
        self.gate_global = Gate(cfg) if glob else None

    def query(self, h_BSD: jax.Array) -> jax.Array:
        """q = norm_q(norm(h)) in the compute dtype [B, S, D]."""
        return self.norm_q(self.norm(h_BSD.astype(self.compute_dtype)))

    def inject(self, h_BSD: jax.Array, global_memory: GlobalMemory | None,
               ) -> tuple[jax.Array, jax.Array]:
        """(h̃ [B, S, D] in h's dtype, mean gate value per bank [2] float32: (local, global), NaN for an absent
        bank). ``global_memory``: the core's shared bank (None without one)."""
        x = h_BSD.astype(self.compute_dtype)
        q = self.query(h_BSD)
        out = h_BSD
        means = []
        for bank, w, gate, name in ((self.local, self.w_local, self.gate_local, "local"),
                                    (global_memory, self.w_global, self.gate_global, "global")):
            if w is None:
                means.append(jnp.float32(jnp.nan))
                continue
            m = with_logical_constraint(bank.read(q), ACTIVATION_BSD)
            m = checkpoint_name(dense(m, w[...].astype(x.dtype)), f"memory_{name}")
            g = with_logical_constraint(gate(x, f"memory_gate_{name}"), ACTIVATION_BSD)
            out = out + (g * m.astype(jnp.float32)).astype(h_BSD.dtype)
            means.append(jax.lax.stop_gradient(jnp.mean(g)))
        return out, jnp.stack(means)
