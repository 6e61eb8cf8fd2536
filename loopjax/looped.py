"""The shared core: k decoder layers applied n_loops times as one ``lax.scan`` over the loop index.

What is shared and what is per iteration: the core's parameters (its k layers, the step norm, the exit gate,
the injection adapter) are the same object in every iteration and are closed over by the scan body; only the
hidden state h [B, S, D] is carried. Each iteration, each layer inside it, or both (``remat_scope``) is wrapped
in ``jax.checkpoint`` with the configured named policy, so activation memory, parameter count and compile time
do not grow with the loop count.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from loopjax.attention import TokenLayout
from loopjax.config import LoopedConfig
from loopjax.layer_loop import LayerLoop, LayerLoopStats
from loopjax.layers import DENSE_OUTPUT_NAMES, DecoderLayer, RMSNorm, dense, dtype, make_param
from loopjax.memory import MEMORY_OUTPUT_NAMES, GlobalMemory, LayerMemory
from loopjax.partitioning import ACTIVATION_BSD, with_logical_constraint

_CKPT = jax.checkpoint_policies
# checkpoint_name tags of the state entering each loop iteration and each core layer (what offload policies
# move to host memory).
LOOP_STATE, LAYER_INPUT = "loop_state", "layer_input"


def _offload(*names: str, saved: tuple[str, ...] = ()) -> Callable:
    return _CKPT.save_and_offload_only_these_names(names_which_can_be_saved=list(saved),
                                                   names_which_can_be_offloaded=list(names),
                                                   offload_src="device", offload_dst="pinned_host")


# The layers' projections run through ``dense`` (a custom_jvp, whose dot the dot-based policies do not see), so
# the dot policies also save them by their checkpoint names.
_SAVE_DENSE = _CKPT.save_only_these_names(*DENSE_OUTPUT_NAMES, *MEMORY_OUTPUT_NAMES)
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": _CKPT.nothing_saveable,
    "save_dots": _CKPT.save_from_both_policies(_CKPT.checkpoint_dots, _SAVE_DENSE),
    "minimal": _CKPT.save_from_both_policies(_CKPT.dots_with_no_batch_dims_saveable, _SAVE_DENSE),
    "save_qkv": _CKPT.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_dots_offload": _offload(LAYER_INPUT, LOOP_STATE, saved=DENSE_OUTPUT_NAMES + MEMORY_OUTPUT_NAMES),
    "offload": _offload(LAYER_INPUT, LOOP_STATE),
}
# Under remat_scope="both" the loop-level checkpoint keeps nothing of the loop (its layers are checkpointed
# themselves); offload policies still move the loop's input state to the host.
_OUTER_OF_NESTED = {"save_dots_offload": _offload(LOOP_STATE), "offload": _offload(LOOP_STATE)}


def tpu_remat_problem(cfg: LoopedConfig) -> str | None:
    """Why XLA:TPU cannot compile ``cfg``'s remat choice, or None.

    Offloading the layer inputs of a layer scan nested in the scan over loops (offload policy, scope "layer",
    ``scan_layers``) fails in libtpu 0.0.42's compiler ("Bitcast cannot have different memory spaces") at
    realistic sizes: the host-resident [T, k, B, S, D] residual stack gets two layouts."""
    if cfg.remat_policy.endswith("offload") and cfg.remat_scope == "layer" and cfg.scan_layers and cfg.n_layers > 1:
        return (f"model.remat_policy={cfg.remat_policy!r} with model.remat_scope='layer' and model.scan_layers=True "
                "does not compile on TPU (XLA cannot offload the nested layer scan's residuals to pinned_host); "
                "use model.remat_scope='both' (loop states offloaded, each loop recomputed), "
                "model.scan_layers=False, or a policy without offload")
    return None


def remat(fn: Callable, policy_name: str, *, in_scan: bool, scope: str = "loop") -> Callable:
    """Wrap a loop iteration ``fn`` in ``jax.checkpoint`` under a named policy: identity for policy "none" or
    scope "layer" (the layers are checkpointed instead, see ``remat_layer``)."""
    if policy_name == "none" or scope == "layer":
        return fn
    policy = REMAT_POLICIES[policy_name]
    if scope == "both":
        policy = _OUTER_OF_NESTED.get(policy_name, _CKPT.nothing_saveable)
    # Inside scan the loop already stops CSE across iterations, so prevent_cse would only cost speed.
    return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)


def remat_layer(layer: nnx.Module, policy_name: str, scope: str, call: Callable | None = None) -> Callable:
    """``layer`` as a function of its inputs, its input tagged ``LAYER_INPUT``; checkpointed on its own when
    ``scope`` is "layer" or "both". ``call(layer, x, *args)`` runs it (default ``layer(x, *args)``); ``layer`` may
    be any graph node, e.g. a tuple of a layer and its extras."""
    call = call or (lambda layer, x, *args: layer(x, *args))

    def tagged(layer: nnx.Module, x: jax.Array, *args) -> jax.Array:
        return call(layer, checkpoint_name(x, LAYER_INPUT), *args)

    if policy_name == "none" or scope == "loop":  # the loop's checkpoint (if any) sees the tag
        return lambda *args: tagged(layer, *args)
    graphdef, state = nnx.split(layer)
    # The tag sits inside the layer's checkpoint: only there can an offload policy move the layer input to the host.
    # The k layers are unrolled in one loop body: without the barrier XLA may schedule every layer's recompute
    # ahead of the backward (or, nested, merge it with the loop's), holding all k layers' internals again.
    fn = jax.checkpoint(lambda state, *args: tagged(nnx.merge(graphdef, state), *args),
                        policy=REMAT_POLICIES[policy_name], prevent_cse=True)
    return lambda *args: fn(state, *args)


class ExitGate(nnx.Module):
    """Ouro's exit gate: Linear(d_model, 1) with bias on the step state, a float32 logit per token."""

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        self.w = make_param(rngs, (cfg.d_model,), ("embed",), cfg.init_std, cfg.param_dtype)
        self.b = nnx.Param(jnp.zeros((), dtype(cfg.param_dtype)), logical_axes=())

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        w = self.w[...].astype(x_BSD.dtype)
        return jnp.einsum("bsd,d->bs", x_BSD, w, preferred_element_type=jnp.float32) + self.b[...].astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CoreOutput:
    """What the core returns.

    state_BSD: the carried state after the last loop (with step norm, identical to ``out_BSD``).
    out_BSD: the read-out state of the last loop (step-normed state, or norm(state) without step norm).
    step_out_TBSD: ``out`` after every loop, when recorded.
    gate_TBS: exit-gate logits after every loop (None without a gate).
    layer_stats: per-layer loop statistics with leading axes [T, k] (``LayerLoopStats``); None without
      per-layer loops.
    memory_gates_TK2: mean memory gate value per loop, core layer and bank (local, global), float32, NaN for an
      absent bank (None without memory banks); with per-layer loops, the mean over the iterations each layer ran.
    """

    state_BSD: jax.Array
    out_BSD: jax.Array
    step_out_TBSD: jax.Array | None = None
    gate_TBS: jax.Array | None = None
    layer_stats: LayerLoopStats | None = None
    memory_gates_TK2: jax.Array | None = None


class LoopedCore(nnx.Module):
    """k shared decoder layers, the output/step norm, the exit gate and the input-injection adapter.

    Per-core-layer extras live in lists parallel to ``layers`` (one entry per layer, None when off; ``layers``
    keeps Ouro's parameter paths): ``layer_loops`` (``layer_loop.LayerLoop``, when ``cfg.layer_loops > 1``) and
    ``layer_memory`` (``memory.LayerMemory``, with memory banks), plus the one shared ``global_memory``.
    """

    def __init__(self, cfg: LoopedConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype)
        self.gate = ExitGate(cfg, rngs) if cfg.exit_gate else None
        d = cfg.d_model
        self.adapter = (make_param(rngs, (2 * d, d), ("mlp", "embed"), cfg.init_std, cfg.param_dtype)
                        if cfg.input_injection == "concat" else None)
        self.layer_loops = (nnx.List([LayerLoop(cfg, rngs) for _ in range(cfg.n_layers)])
                            if cfg.layer_loops > 1 else None)
        self.layer_memory = (nnx.List([LayerMemory(cfg, rngs) for _ in range(cfg.n_layers)])
                             if cfg.has_memory else None)
        self.global_memory = GlobalMemory(cfg, rngs) if cfg.memory_global_slots > 0 else None

    def initial_state(self, e_BSD: jax.Array) -> jax.Array:
        """h_0: the embedding (no injection) or zeros (the embedding re-enters at every loop instead)."""
        return e_BSD if self.cfg.input_injection == "none" else jnp.zeros_like(e_BSD)

    def inject(self, h_BSD: jax.Array, e_BSD: jax.Array) -> jax.Array:
        """The core's input at one loop: h, h + e, or W[h; e]."""
        if self.cfg.input_injection == "add":
            return h_BSD + e_BSD
        if self.cfg.input_injection == "concat":
            he = jnp.concatenate([h_BSD, e_BSD], axis=-1)
            return checkpoint_name(dense(he, self.adapter[...].astype(he.dtype)), "inject_proj").astype(h_BSD.dtype)
        return h_BSD

    def layer_modules(self, l: int) -> dict[str, nnx.Module]:
        """Core layer ``l``'s modules by name: "layer" and each per-layer extra that is on ("loop", "memory")."""
        extras = {"loop": self.layer_loops, "memory": self.layer_memory}
        return {"layer": self.layers[l], **{name: mods[l] for name, mods in extras.items() if mods is not None}}

    def stacked_layers(self) -> tuple[dict[str, nnx.GraphDef], dict[str, nnx.State]]:
        """(graphdefs, states) by ``layer_modules`` name, each state stacked over the k layers on a leading axis:
        what ``scan_layers`` scans (a scan step sees one layer with its extras)."""
        names = self.layer_modules(0).keys()
        per_layer = [self.layer_modules(l) for l in range(len(self.layers))]
        graphdefs = {name: nnx.graphdef(per_layer[0][name]) for name in names}
        states = {name: jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m[name]) for m in per_layer])
                  for name in names}
        return graphdefs, states

    def read_memory(self, l: int, x_BSD: jax.Array) -> jax.Array:
        """Core layer ``l``'s input after its memory read (identity without memory banks)."""
        if self.layer_memory is None:
            return x_BSD
        return self.layer_memory[l].inject(x_BSD, self.global_memory)[0]

    def core_layer(self, x_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout, *,
                   layer: DecoderLayer, loop: LayerLoop | None = None, memory: LayerMemory | None = None,
                   layer_exit_threshold: float | None = None,
                   ) -> tuple[jax.Array, LayerLoopStats | None, jax.Array | None]:
        """One core layer on its input: memory read + layer, or its per-layer loop of such iterations (all of
        them, or the masked while loop under ``layer_exit_threshold``). Returns (new state, the loop's stats or
        None, mean memory gates [2] (local, global) or None)."""
        cfg = self.cfg

        def call(unit: tuple, h: jax.Array, *args) -> tuple[jax.Array, jax.Array | None]:
            layer, memory, global_memory = unit
            gates = None
            if memory is not None:
                h, gates = memory.inject(h, global_memory)
            return layer(h, *args), gates

        # The memory read sits inside the layer's checkpoint: remat recomputes it with the layer. A per-layer loop
        # is a scan inside the loop body, so under scope "loop" its iterations are checkpointed too: otherwise the
        # backward keeps every iteration's internals (temp memory linear in N).
        scope = "both" if loop is not None and cfg.remat_scope == "loop" else cfg.remat_scope
        run = remat_layer((layer, memory, self.global_memory), cfg.remat_policy, scope, call=call)

        def iteration(h: jax.Array, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
            # the one per-iteration function: layer(inject(h), residual_scale=s), with the memory gates read
            args = (cos_BSh, sin_BSh, layout) if scale is None else (cos_BSh, sin_BSh, layout, scale)
            h, gates = run(h, *args)
            return with_logical_constraint(h, ACTIVATION_BSD), gates

        if loop is None:
            x_BSD, gates = iteration(x_BSD)
            return x_BSD, None, gates
        if layer_exit_threshold is None:
            return loop.run(iteration, x_BSD)
        return loop.run_adaptive(iteration, x_BSD, layer_exit_threshold)

    def step(self, h_BSD: jax.Array, e_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array,
             layout: TokenLayout, stacked: tuple[dict, dict] | None = None, *,
             layer_exit_threshold: float | None = None, return_layer_stats: bool = False) -> tuple:
        """One loop: (new carried state, read-out state, gate logit [B, S] or None), plus, when
        ``return_layer_stats``, the per-layer loops' ``LayerLoopStats`` and the mean memory gates [k, 2], each
        stacked over the k layers (or None).

        stacked: ``stacked_layers()`` computed once outside a scan over loops (``scan_layers`` only).
        layer_exit_threshold: run each per-layer loop adaptively (``LayerLoop.run_adaptive``)."""
        cfg = self.cfg
        x = self.inject(checkpoint_name(h_BSD, LOOP_STATE), e_BSD)

        def apply(x: jax.Array, modules: dict[str, nnx.Module]) -> tuple[jax.Array, tuple]:
            x, stats, gates = self.core_layer(x, cos_BSh, sin_BSh, layout, layer_exit_threshold=layer_exit_threshold,
                                              **modules)
            return x, (stats, gates)

        if cfg.scan_layers and len(self.layers) > 1:
            graphdefs, states = stacked if stacked is not None else self.stacked_layers()
            x, (stats, mem_gates) = jax.lax.scan(
                lambda x, st: apply(x, {name: nnx.merge(graphdefs[name], st[name]) for name in graphdefs}), x, states)
        else:
            per_layer = []
            for l in range(len(self.layers)):
                x, aux = apply(x, self.layer_modules(l))
                per_layer.append(aux)
            stats, mem_gates = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        out = self.norm(x)
        new_h = out if self.cfg.step_norm else x
        gate = self.gate(out) if self.gate is not None else None
        if return_layer_stats:
            return new_h, out, gate, stats, mem_gates
        return new_h, out, gate

    def __call__(self, e_BSD: jax.Array, cos_BSh: jax.Array, sin_BSh: jax.Array, layout: TokenLayout, *,
                 n_loops: int, record_steps: bool = False, use_scan: bool = True,
                 layer_exit_threshold: float | None = None) -> CoreOutput:
        """Run ``n_loops`` iterations from ``initial_state(e)``; ``use_scan=False`` is the unrolled Python loop."""
        graphdef, state = nnx.split(self)
        # The layer stack is loop-invariant: built once here, its gradient summed over loops once.
        stacked = self.stacked_layers() if self.cfg.scan_layers and len(self.layers) > 1 else None

        def body(state, stacked, h, e, cos, sin, layout):
            return nnx.merge(graphdef, state).step(h, e, cos, sin, layout, stacked, return_layer_stats=True,
                                                   layer_exit_threshold=layer_exit_threshold)

        body = remat(body, self.cfg.remat_policy, in_scan=use_scan, scope=self.cfg.remat_scope)

        def loop_fn(h, _):
            h, out, gate, stats, mem_gates = body(state, stacked, h, e_BSD, cos_BSh, sin_BSh, layout)
            return h, (out if record_steps else None, gate, stats, mem_gates)

        h0 = self.initial_state(e_BSD)
        if use_scan:
            h, (step_out, gates, stats, mem_gates) = jax.lax.scan(loop_fn, h0, length=n_loops,
                                                                  unroll=self.cfg.scan_unroll)
        else:
            h, ys = h0, []
            for _ in range(n_loops):
                h, y = loop_fn(h, None)
                ys.append(y)
            step_out, gates, stats, mem_gates = jax.tree.map(lambda *a: jnp.stack(a), *ys)
        out = h if self.cfg.step_norm else self.norm(h)
        return CoreOutput(state_BSD=h, out_BSD=out, step_out_TBSD=step_out, gate_TBS=gates, layer_stats=stats,
                          memory_gates_TK2=mem_gates)
