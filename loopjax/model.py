"""``LoopedLM``: token embedding → prelude → looped core → coda → final norm → LM head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from loopjax import halting
from loopjax.attention import TokenLayout, check_impl
from loopjax.config import LoopedConfig
from loopjax.halting import exit_distribution
from loopjax.layer_loop import LayerLoopStats, check_threshold
from loopjax.layers import DecoderLayer, RMSNorm, dense, dtype, make_param, rope_cos_sin
from loopjax.looped import LoopedCore, remat
from loopjax.partitioning import ACTIVATION_BSD, LOGITS_BSV, LOGITS_TBSV, with_logical_constraint


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopedOutput:
    """Outputs of ``LoopedLM.__call__`` (T = loops run, B batch, S sequence, D d_model, V vocab).

    logits: [B, S, V] float32 logits read out after the final loop.
    hidden: [B, S, D] the read-out state of the final loop (what the coda / head consume).
    step_logits: [T, B, S, V] logits after each loop; only with ``return_steps=True``.
    step_hidden: [T, B, S, D] read-out state after each loop; only with ``return_steps=True``.
    gate_logits: [B, S, T] exit-gate logits after each loop; None when the config has no exit gate.
    exit_pdf: [B, S, T] stick-breaking exit distribution from ``gate_logits``; None without a gate.
    exit_step: [B, S] int32, the loop (1..T) each token's logits were read from; None for plain calls.
    n_iterations: scalar int32, loop iterations executed; None for plain calls.
    layer_expected_n: [B, S, k] float32, E[n] of each core layer's per-layer loop per token (``layer_loop``),
      the mean over the T block loops (in exit-rule calls, over the block loops the token ran before its exit);
      differentiable (the ponder cost's input). None without per-layer loops and in traced-loop-count calls
      (``max_loops``).
    layer_exit_iteration: [B, S, k] float32, the per-layer iterations each token computed (N unless
      ``layer_exit_threshold`` stopped it), the mean over the T block loops; None as ``layer_expected_n``.
    layer_iterations: [T, k] int32, iterations each core layer executed in each block loop (the while loop's trip
      count under ``layer_exit_threshold``, else N; 0 for a block loop an exit rule never ran); None as
      ``layer_expected_n``.
    memory_gates: [T, k, 2] float32 mean memory gate value (over batch and positions, padding included; in an
      exit-rule call over every token the loop computed, exited ones included) per loop, core layer and bank
      (local, global), NaN for an absent bank and for a block loop never run; None without memory banks and in
      traced-loop-count calls (whose steps still read the memory).
    """

    logits: jax.Array
    hidden: jax.Array
    step_logits: jax.Array | None = None
    step_hidden: jax.Array | None = None
    gate_logits: jax.Array | None = None
    exit_pdf: jax.Array | None = None
    exit_step: jax.Array | None = None
    n_iterations: jax.Array | None = None
    layer_expected_n: jax.Array | None = None
    layer_exit_iteration: jax.Array | None = None
    layer_iterations: jax.Array | None = None
    memory_gates: jax.Array | None = None


class LoopedLM(nnx.Module):
    """A looped language model; parameters hold one core block however many loops a call runs.

    Example::

        cfg = lj.LoopedConfig(vocab_size=256, d_model=128, n_heads=4, n_layers=2, n_loops=4)
        model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
        out = model(tokens_BS)                 # 4 loops
        out = model(tokens_BS, n_loops=8)      # same weights, 8 loops
    """

    def __init__(self, cfg: LoopedConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.d_model, cfg.param_dtype
        self.embed = make_param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), cfg.init_std, pd)
        self.prelude = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_prelude)])
        self.core = LoopedCore(cfg, rngs)
        self.coda = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_coda)])
        self.coda_norm = RMSNorm(d, cfg.rms_eps, pd) if cfg.n_coda else None
        self.lm_head = None if cfg.tie_embeddings else make_param(
            rngs, (d, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

    def with_attention_impl(self, impl: str) -> LoopedLM:
        """The same model (sharing its parameter arrays) with another ``attention_impl``, e.g. "reference" where
        forward-mode derivatives are needed (the kernels define reverse mode only)."""
        if impl == self.cfg.attention_impl:
            return self
        cfg = self.cfg.replace(attention_impl=impl)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: LoopedLM(cfg, rngs=nnx.Rngs(0))))
        return nnx.merge(graphdef, nnx.state(self))

    def embed_tokens(self, tokens_BS: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype, [B, S, D] (unscaled, as Ouro)."""
        return jnp.take(self.embed[...], tokens_BS, axis=0).astype(dtype(self.cfg.compute_dtype))

    def head_weight(self) -> jax.Array:
        """The LM head matrix [D, V] (the embedding's transpose when tied) in the compute dtype."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(dtype(self.cfg.compute_dtype))

    def head(self, x_BSD: jax.Array) -> jax.Array:
        """LM head (tied or not): float32 logits [..., V]."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return dense(x_BSD, w.astype(x_BSD.dtype), jnp.float32)

    def readout(self, out_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout) -> jax.Array:
        """Logits from a loop's read-out state: coda layers and their norm when present, then the head."""
        return self.token_logits(self.readout_state(out_BSD, cos_BSh, sin_BSh, layout))

    def readout_state(self, out_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array,
                      layout: TokenLayout) -> jax.Array:
        """The sequence-wise part of ``readout``: coda layers and their norm (identity without a coda)."""
        return self._coda(out_BSD, cos_BSh, sin_BSh, layout)

    def token_logits(self, x_BSD: jax.Array) -> jax.Array:
        """The token-wise part of ``readout``: the head, float32 logits [B, S, V] in their sharding (any S)."""
        return with_logical_constraint(self.head(x_BSD), LOGITS_BSV)

    def step_readout(self, out_TBSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array,
                     layout: TokenLayout) -> jax.Array:
        """``readout`` of every loop's state, [T, B, S, V]; the head runs as one matmul over all T loops."""
        x = out_TBSD
        if self.coda:  # coda_norm exists only with coda layers
            x = jax.vmap(lambda o: self._coda(o, cos_BSh, sin_BSh, layout))(x)
        return with_logical_constraint(self.head(x), LOGITS_TBSV)

    def _coda(self, x_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout) -> jax.Array:
        for layer in self.coda:
            x_BSD = layer(x_BSD, cos_BSh, sin_BSh, layout)
        return x_BSD if self.coda_norm is None else self.coda_norm(x_BSD)

    def rope_and_layout(self, positions_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
                        segment_ids_BS: jax.Array | None = None) -> tuple[jax.Array, jax.Array, TokenLayout]:
        """Rotary tables (computed once per forward, shared by every loop) and the ``TokenLayout`` attention reads
        its masks from; padding (``attention_mask_BS`` 0) becomes a segment of its own (id -1)."""
        cos, sin = rope_cos_sin(positions_BS, self.cfg.d_head, self.cfg.rope_theta)
        if attention_mask_BS is not None:
            seg = jnp.zeros(positions_BS.shape, jnp.int32) if segment_ids_BS is None else segment_ids_BS
            segment_ids_BS = jnp.where(attention_mask_BS.astype(bool), seg.astype(jnp.int32), -1)
        elif segment_ids_BS is not None:
            segment_ids_BS = segment_ids_BS.astype(jnp.int32)
        return cos, sin, TokenLayout(positions_BS.astype(jnp.int32), segment_ids_BS)

    def __call__(self, tokens_BS: jax.Array, *, n_loops: int | None = None, positions_BS: jax.Array | None = None,
                 segment_ids_BS: jax.Array | None = None, attention_mask_BS: jax.Array | None = None,
                 return_steps: bool = False,
                 use_scan: bool = True, exit_rule=None, run_all_loops: bool = False, max_loops: int | None = None,
                 backprop_loops: int | None = None, layer_exit_threshold: float | None = None) -> LoopedOutput:
        """Run the model on int tokens [B, S].

        n_loops: loops to run (default ``cfg.n_loops``; any count >= 1, more than trained extrapolates).
        positions_BS: token positions for rotary and causality (default 0..S-1 per row; in packed rows they restart
          at 0 at each document).
        segment_ids_BS: int document ids of packed rows: a token attends only to earlier tokens of its segment.
        attention_mask_BS: 1 for real tokens, 0 for padding (padding keys are hidden from every real token).
        return_steps: also return per-loop ``step_logits`` and ``step_hidden``.
        use_scan: False runs the loops as an unrolled Python loop (reference / benchmark path).
        exit_rule: a ``halting`` exit rule (``FixedExit``, ``QExit``, ``ACTExit``, ``ConvergenceExit``); runs at
          most ``n_loops`` loops in a masked ``lax.while_loop``, freezing each token once its rule fires (see
          ``loopjax.halting``), and fills ``exit_step`` and ``n_iterations``.
        run_all_loops: with ``exit_rule``, every token runs all ``n_loops`` (a differentiable scan) and the rule
          only selects each token's read-out loop (the published Ouro behaviour).
        max_loops, backprop_loops: random loop-count training: ``n_loops`` may be a traced int scalar (1..
          max_loops), run in one compiled scan of ``max_loops``; gradients flow through the last
          ``backprop_loops`` iterations only (None = all).
        layer_exit_threshold: with per-layer loops (``layer_loops`` >= 2), run each core layer's iterations as a
          masked ``lax.while_loop`` in which a token stops once its cumulative halting mass is >= this value in
          (0, 1] (``loopjax.layer_loop``; inference only, not differentiable). None runs all N iterations.
        """
        n_loops = self.cfg.n_loops if n_loops is None else n_loops
        if max_loops is not None:
            halting.validate_loop_budget(n_loops, max_loops, backprop_loops, exit_rule, return_steps)
        elif isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops={n_loops!r}: must be an int >= 1")
        if exit_rule is not None or run_all_loops or max_loops is not None:
            if not use_scan:
                raise ValueError("use_scan=False: must be True with exit_rule / run_all_loops / max_loops")
            if run_all_loops and exit_rule is None:
                raise ValueError("run_all_loops=True: needs an exit_rule (it selects each token's read-out loop)")
            if max_loops is None:
                halting.validate_exit_rule(exit_rule, n_loops, self.core.gate is not None)
        if layer_exit_threshold is not None:
            check_threshold(layer_exit_threshold, self.cfg.layer_loops)
        if tokens_BS.ndim != 2:
            raise ValueError(f"tokens_BS.shape={tokens_BS.shape}: must be [batch, seq]")
        b, s = tokens_BS.shape
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s}: must be <= max_seq_len={self.cfg.max_seq_len}")
        for name, x in (("positions_BS", positions_BS), ("segment_ids_BS", segment_ids_BS),
                        ("attention_mask_BS", attention_mask_BS)):
            if x is not None and tuple(x.shape) != (b, s):
                raise ValueError(f"{name}.shape={tuple(x.shape)}: must equal tokens_BS.shape={(b, s)}")
        check_impl(self.cfg.attention_impl, head_dim=self.cfg.d_head, dtype=dtype(self.cfg.compute_dtype),
                   interpret=self.cfg.attention_interpret)
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        cos, sin, layout = self.rope_and_layout(positions_BS, attention_mask_BS, segment_ids_BS)

        e = with_logical_constraint(self.embed_tokens(tokens_BS), ACTIVATION_BSD)
        for layer in self.prelude:
            e = layer(e, cos, sin, layout)
        if exit_rule is not None or max_loops is not None:
            return self._halting_call(e, cos, sin, layout, n_loops=n_loops, exit_rule=exit_rule,
                                      run_all_loops=run_all_loops, max_loops=max_loops,
                                      backprop_loops=backprop_loops, return_steps=return_steps,
                                      layer_exit_threshold=layer_exit_threshold)
        core = self.core(e, cos, sin, layout, n_loops=n_loops, record_steps=return_steps, use_scan=use_scan,
                         layer_exit_threshold=layer_exit_threshold)

        logits = self.readout(core.out_BSD, cos, sin, layout)
        step_logits = None
        if return_steps:
            step_logits = self.step_readout(core.step_out_TBSD, cos, sin, layout)
        gate_BST = exit_pdf = None
        if core.gate_TBS is not None:
            gate_BST = jnp.moveaxis(core.gate_TBS, 0, -1)
            exit_pdf = exit_distribution(gate_BST)
        return LoopedOutput(logits=logits, hidden=core.out_BSD, step_logits=step_logits,
                            step_hidden=core.step_out_TBSD, gate_logits=gate_BST, exit_pdf=exit_pdf,
                            **layer_outputs(core.layer_stats, core.memory_gates_TK2))

    def _halting_call(self, e_BSD, cos_BSh, sin_BSh, layout, *, n_loops, exit_rule, run_all_loops, max_loops,
                      backprop_loops, return_steps, layer_exit_threshold=None) -> LoopedOutput:
        """Exit-rule and traced-loop-count calls: the core's step driven by a ``halting`` executor."""
        graphdef, state = nnx.split(self.core)

        def body(state, h):
            new_h, out, gate, stats, mem_gates = nnx.merge(graphdef, state).step(
                h, e_BSD, cos_BSh, sin_BSh, layout, layer_exit_threshold=layer_exit_threshold,
                return_layer_stats=True)
            return new_h, out, gate, (stats, mem_gates)

        scan_body = remat(body, self.cfg.remat_policy, in_scan=True, scope=self.cfg.remat_scope)
        h0 = self.core.initial_state(e_BSD)
        has_gate = self.core.gate is not None
        if max_loops is not None:
            res = halting.truncated_loop(lambda h: scan_body(state, h), h0, n_loops, max_loops, backprop_loops)
        elif run_all_loops:
            res = halting.all_loops(lambda h: scan_body(state, h), h0, exit_rule, n_loops, has_gate=has_gate,
                                    record_steps=return_steps, unroll=self.cfg.scan_unroll)
        else:  # no reverse mode through while_loop, so no remat either
            res = halting.adaptive_loop(lambda h: body(state, h), h0, exit_rule, n_loops, has_gate=has_gate,
                                        record_steps=return_steps)
        step_logits = None
        if res.step_out_TBSD is not None:
            step_logits = self.step_readout(res.step_out_TBSD, cos_BSh, sin_BSh, layout)
        extras = {}
        if res.aux_T is not None:  # loops a token ran: t < its exit step (all of them under run_all_loops)
            loop_T = jnp.arange(n_loops)
            exit_BS = jnp.full_like(res.exit_step_BS, n_loops) if run_all_loops else res.exit_step_BS
            ran_TBS = loop_T[:, None, None] < exit_BS[None]
            extras = layer_outputs(*res.aux_T, ran_TBS=ran_TBS, executed_T=loop_T < res.n_iterations)
        return LoopedOutput(logits=self.readout(res.out_BSD, cos_BSh, sin_BSh, layout), hidden=res.out_BSD,
                            step_logits=step_logits, step_hidden=res.step_out_TBSD, gate_logits=res.gate_BST,
                            exit_pdf=None if res.gate_BST is None else exit_distribution(res.gate_BST),
                            exit_step=res.exit_step_BS, n_iterations=res.n_iterations, **extras)


def layer_outputs(stats: LayerLoopStats | None, memory_gates_TK2: jax.Array | None,
                  ran_TBS: jax.Array | None = None, executed_T: jax.Array | None = None) -> dict:
    """``LoopedOutput``'s per-layer fields from per-loop statistics (leading axes [T, k]).

    ran_TBS: bool, the block loops each token ran (default: all): per-token fields average over those only.
    executed_T: bool, the block loops executed at all (default: all); the others report 0 iterations and NaN gates.
    """
    out = {}
    if stats is not None:
        def per_token(x_TKBS):  # mean over the loops each token ran -> [B, S, k]
            x = x_TKBS.astype(jnp.float32)
            if ran_TBS is None:
                return jnp.moveaxis(x.mean(0), 0, -1)
            w = ran_TBS[:, None].astype(jnp.float32)
            return jnp.moveaxis((w * x).sum(0) / w.sum(0), 0, -1)

        iterations = stats.iterations
        if executed_T is not None:
            iterations = jnp.where(executed_T[:, None], iterations, 0)
        out.update(layer_expected_n=per_token(stats.expected_n_BS),
                   layer_exit_iteration=per_token(stats.exit_iteration_BS), layer_iterations=iterations)
    if memory_gates_TK2 is not None:
        if executed_T is not None:
            memory_gates_TK2 = jnp.where(executed_T[:, None, None], memory_gates_TK2, jnp.nan)
        out.update(memory_gates=memory_gates_TK2)
    return out


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param``) in a model; independent of the loop count."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
