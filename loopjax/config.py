"""Frozen, self-validating configuration dataclasses and presets.

Every config checks all of its fields in ``__post_init__`` and raises ``ValueError`` naming the field, the
value and what is allowed, so that a bad config fails before anything is traced.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

NORM_SCHEMES = ("pre", "sandwich")
INJECTIONS = ("none", "add", "concat")
REMAT_POLICIES = ("none", "full", "save_dots", "minimal", "save_qkv", "save_dots_offload", "offload")
REMAT_SCOPES = ("loop", "layer", "both")
ATTENTION_IMPLS = ("auto", "reference", "chunked", "cpu_flash", "splash", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r}: must be {allowed}")


def _check_int(field: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]")
    if value < lo or (hi is not None and value > hi):
        _fail(field, value, f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]")


def _check_float(field: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        _fail(field, value, f"a float {lo_s}" + ("" if hi is None else f" and <= {hi}"))


def _check_finite(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, "a finite float")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=2)
        hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
        _fail(field, value, f"one of {choices}{hint}")



def config_from_json(cls: Any, value: Any) -> Any:
    """A (nested) config dataclass from its ``to_json`` dict; JSON lists become tuples again."""
    if dataclasses.is_dataclass(cls) and isinstance(value, dict):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: config_from_json(hints[f.name], value[f.name]) for f in dataclasses.fields(cls)
                      if f.init and f.name in value})
    if isinstance(value, list):
        return tuple(config_from_json(None, v) for v in value)
    if isinstance(value, dict):
        return {k: config_from_json(None, v) for k, v in value.items()}
    return value

def replace_checked(cfg: Any, **overrides: Any) -> Any:
    """``dataclasses.replace`` that names near matches for an unknown field instead of a bare TypeError."""
    names = [f.name for f in dataclasses.fields(cfg)]
    for key in overrides:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            raise ValueError(f"unknown field {key!r} for {type(cfg).__name__}; nearest: {near or names}")
    return dataclasses.replace(cfg, **overrides)


@dataclasses.dataclass(frozen=True)
class LoopedConfig:
    """Architecture of a looped LM: embed → prelude → core (k shared layers × n_loops) → coda → head.

    Fields:
      vocab_size, d_model, n_heads: usual transformer sizes.
      n_kv_heads: key/value heads for GQA (None = n_heads); must divide n_heads.
      head_dim: per-head width (None = d_model // n_heads, which then must divide exactly).
      d_ff: hidden width of the SwiGLU MLP.
      n_layers: k, the unique layers of the shared core.
      n_loops: L, the default number of core applications (a call may pass any other count).
      max_seq_len: longest sequence the model is built for (rope tables and caches).
      n_prelude / n_coda: layers with their own weights before / after the core.
      norm_scheme: "pre" (x + f(norm(x))) or "sandwich" (x + norm2(f(norm1(x))), Ouro).
      step_norm: apply the output norm at the end of every loop and carry the normed state (Ouro).
      input_injection: "none", "add" (core input = h + e) or "concat" (core input = W[h; e]), where e is the
        prelude output; with injection the loop starts from h_0 = 0, otherwise from h_0 = e.
      rope_theta, rms_eps: rotary base and RMSNorm epsilon.
      tie_embeddings: share the token embedding with the LM head.
      sliding_window: attention window in tokens (None = full causal attention); applies to every layer.
      param_dtype / compute_dtype: "float32", "bfloat16" or "float16".
      remat_policy: what a rematerialised function keeps for its backward: "none" (no remat at all), "full"
        (save nothing), "save_dots" (save all matmul outputs), "minimal" (save matmuls without batch dims:
        projections and MLP, not attention scores), "save_qkv" (save only the q/k/v projections, by their
        checkpoint names), "save_dots_offload" (as "minimal", with the layer inputs moved to host memory),
        "offload" (save nothing on the device; move each layer's and loop's input state to pinned host
        memory instead of keeping it in HBM). On TPU the offload policies need remat_scope "loop" / "both" or
        scan_layers=False (``looped.tpu_remat_problem``: XLA cannot offload a nested layer scan's residuals).
      remat_scope: where ``jax.checkpoint`` goes: "loop" (around each loop iteration: its backward holds all k
        layers' internals at once), "layer" (around each layer inside each loop: the scan keeps the k layer
        inputs of every loop, a layer's backward holds one layer's internals), "both" (nested: the scan keeps one
        state per loop; the loop's backward recomputes it holding only the k layer inputs, and each layer's
        backward one layer's internals).
      attention_impl: the attention backend (``loopjax.attention``): "auto" (splash on TPU, cuDNN on GPU,
        cpu_flash on CPU where it builds, chunked elsewhere), "reference", "chunked", "cpu_flash", "splash",
        "cudnn".
      attention_interpret: run Pallas attention kernels in interpret mode (testing splash on a CPU).
      scan_unroll: iterations per scan step passed to ``lax.scan(unroll=...)``; True unrolls fully.
      scan_layers: run the k core layers of a loop as a ``lax.scan`` over their stacked parameters instead of k
        unrolled calls (MaxText's scan_layers): compile time and the compiler's scheduling window stay one layer
        wide, which keeps XLA from holding several layers' recompute and weights at once. Parameters stay one
        module per layer (checkpoints and conversion unchanged); they are stacked once per forward.
      exit_gate: build the Ouro exit gate Linear(d_model, 1) read after every loop.
      init_std: stddev of the normal init of weight matrices.
      layer_loops: N, per-layer adaptive loops (``loopjax.layer_loop``): every core layer iterates its own state
        up to N times per token with residual scales softplus(a_t), a halting router and the expected state as
        its output (Frey et al. 2026). 1 = off (no extra parameters, today's model bit for bit).
      layer_loop_scale_init: initial residual-scale logit a_t of every iteration (softplus(-7) ~ 1e-3: each
        layer starts near the identity).

    Gated memory banks (``loopjax.memory``; Frey et al. 2026), read before every core layer at every iteration:
      memory_local_slots: S_L slots of the bank each core layer owns (0 = no local banks); >= 0.
      memory_global_slots: S_G slots of the one bank all core layers share (0 = no global bank); >= 0.
      memory_gate_bias: initial bias b of the element-wise gates sigmoid(W_g h + b) (W_g starts at zero, so every
        gate starts at exactly sigmoid(b)); the paper's code default -3 (gates nearly shut), +3 reported best.
      With both slot counts 0 (the default) the model has no memory parameters and computes today's function.
      Weight decay (``loopjax.train.optim.decay_mask``) skips the banks' keys and values, the gates' biases and
      every norm scale; the projections and gate matrices are decayed like other matrices.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 512
    n_layers: int = 2
    n_loops: int = 4
    max_seq_len: int = 256
    n_prelude: int = 0
    n_coda: int = 0
    norm_scheme: str = "pre"
    step_norm: bool = False
    input_injection: str = "none"
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    sliding_window: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "full"
    remat_scope: str = "loop"
    attention_impl: str = "auto"
    attention_interpret: bool = False
    scan_unroll: int | bool = 1
    scan_layers: bool = False
    exit_gate: bool = True
    init_std: float = 0.02
    # --- per-layer adaptive loops (issue 29) ---
    layer_loops: int = 1
    layer_loop_scale_init: float = -7.0
    # --- gated memory banks (loopjax.memory) ---
    memory_local_slots: int = 0
    memory_global_slots: int = 0
    memory_gate_bias: float = -3.0

    def __post_init__(self) -> None:
        self._check_memory()
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("d_model", self.d_model, 1)
        _check_int("n_heads", self.n_heads, 1)
        if self.n_kv_heads is not None:
            _check_int("n_kv_heads", self.n_kv_heads, 1)
            if self.n_heads % self.n_kv_heads:
                _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} when head_dim is unset")
            if (self.d_model // self.n_heads) % 2:
                _fail("head_dim", self.d_model // self.n_heads, "even (rotary pairs the two halves)")
        else:
            _check_int("head_dim", self.head_dim, 2)
            if self.head_dim % 2:
                _fail("head_dim", self.head_dim, "even (rotary pairs the two halves)")
        _check_int("d_ff", self.d_ff, 1)
        _check_int("n_layers", self.n_layers, 1)
        _check_int("n_loops", self.n_loops, 1)
        _check_int("max_seq_len", self.max_seq_len, 1)
        _check_int("n_prelude", self.n_prelude, 0)
        _check_int("n_coda", self.n_coda, 0)
        _check_choice("norm_scheme", self.norm_scheme, NORM_SCHEMES)
        if not isinstance(self.step_norm, bool):
            _fail("step_norm", self.step_norm, "a bool")
        _check_choice("input_injection", self.input_injection, INJECTIONS)
        _check_float("rope_theta", self.rope_theta, 1.0)
        _check_float("rms_eps", self.rms_eps, 0.0, 1.0)
        if not isinstance(self.tie_embeddings, bool):
            _fail("tie_embeddings", self.tie_embeddings, "a bool")
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("compute_dtype", self.compute_dtype, DTYPES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("remat_scope", self.remat_scope, REMAT_SCOPES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if not isinstance(self.attention_interpret, bool):
            _fail("attention_interpret", self.attention_interpret, "a bool")
        if not isinstance(self.scan_unroll, bool):
            _check_int("scan_unroll", self.scan_unroll, 1)
        for name in ("exit_gate", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        _check_float("init_std", self.init_std, 0.0)
        # --- per-layer adaptive loops (issue 29) ---
        _check_int("layer_loops", self.layer_loops, 1)
        _check_finite("layer_loop_scale_init", self.layer_loop_scale_init)

    def _check_memory(self) -> None:
        _check_int("memory_local_slots", self.memory_local_slots, 0)
        _check_int("memory_global_slots", self.memory_global_slots, 0)
        gate_bias = self.memory_gate_bias
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float)) or not abs(gate_bias) < float("inf"):
            _fail("memory_gate_bias", gate_bias, "a finite float")
        if self.has_memory and (isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int)
                                or self.n_layers < 1):
            _fail("n_layers", self.n_layers, "an int >= 1 when memory banks are on (they are read before core "
                  "layers; memory_local_slots / memory_global_slots need a core)")

    @property
    def has_memory(self) -> bool:
        """Whether the core reads gated memory banks (any slots, local or global)."""
        return self.memory_local_slots > 0 or self.memory_global_slots > 0

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def replace(self, **overrides: Any) -> LoopedConfig:
        """A copy with some fields changed (validated; unknown names raise with near matches)."""
        return replace_checked(self, **overrides)


def tiny(**overrides: Any) -> LoopedConfig:
    """A model that trains in seconds on a CPU: 2 shared layers of width 64, 4 loops."""
    base = dict(vocab_size=256, d_model=64, n_heads=4, n_kv_heads=2, d_ff=256, n_layers=2, n_loops=4,
                max_seq_len=128)
    base.update(overrides)
    return LoopedConfig(**base)


def _ouro(n_layers: int, **overrides: Any) -> LoopedConfig:
    base = dict(vocab_size=49152, d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, d_ff=5632,
                n_layers=n_layers, n_loops=4, max_seq_len=65536, norm_scheme="sandwich", step_norm=True,
                input_injection="none", rope_theta=1e6, rms_eps=1e-6, tie_embeddings=False, exit_gate=True,
                param_dtype="bfloat16", compute_dtype="bfloat16",
                # training at scale: one layer's internals live in a backward, one layer in the scheduler's window
                remat_scope="layer", scan_layers=True)
    base.update(overrides)
    return LoopedConfig(**base)


def ouro_1_4b(**overrides: Any) -> LoopedConfig:
    """ByteDance Ouro-1.4B: 24 sandwich-norm layers looped 4 times, step norm, exit gate, untied head."""
    return _ouro(24, **overrides)


def ouro_2_6b(**overrides: Any) -> LoopedConfig:
    """ByteDance Ouro-2.6B: as Ouro-1.4B with 48 layers."""
    return _ouro(48, **overrides)


def frey_200m(**overrides: Any) -> LoopedConfig:
    """Frey et al.'s Loop-3 + Mem at ~200M: their Base (12 layers of width 768, 12 heads of 64, SwiGLU 2048,
    vocab 50,304, untied head, RoPE base 500k, RMSNorm, no biases) with per-layer loops (``layer_loops=3``, residual
    scales from -7) and gated memory: 1024 local slots per layer, 512 global slots, gate bias +3 (the paper's
    best); one pass over the layers (n_loops=1). ``frey_200m(layer_loops=1, memory_local_slots=0,
    memory_global_slots=0)`` is their Base.

    q/k norms inside attention are not a loopjax option: the memory read's query and key norms are."""
    base = dict(vocab_size=50304, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64, d_ff=2048, n_layers=12,
                n_loops=1, max_seq_len=4096, norm_scheme="pre", rope_theta=500000.0, rms_eps=1e-6,
                tie_embeddings=False, exit_gate=False, param_dtype="float32", compute_dtype="bfloat16",
                layer_loops=3, memory_local_slots=1024, memory_global_slots=512, memory_gate_bias=3.0,
                remat_scope="layer", scan_layers=True)
    base.update(overrides)
    return LoopedConfig(**base)


SHARDING_PRESETS = ("dp", "fsdp", "fsdp_tp")
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (axes ``data``, ``fsdp``, ``tensor``) and the sharding-rule preset applied on it.

    Fields:
      data, fsdp, tensor: axis sizes; one of them may be -1 = all remaining devices.
      rules: "dp" (batch over ``data``, parameters replicated), "fsdp" (batch over ``data`` and ``fsdp``,
        parameters and optimizer state sharded over ``fsdp``), "fsdp_tp" (as fsdp, plus heads / MLP / vocab
        dimensions over ``tensor``). An axis the preset does not use must be 1 (it would only duplicate work).
    On several slices (multi-slice TPU), the slices are laid along ``data``, which must be a multiple of them.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "dp"

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                _fail(name, value, "an int >= 1, or -1 (fill with the remaining devices)")
        fills = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(fills) > 1:
            _fail(fills[1], -1, f"a size >= 1: only one axis may be -1 (already {fills[0]}=-1)")
        _check_choice("rules", self.rules, SHARDING_PRESETS)
        unused = {"dp": ("fsdp", "tensor"), "fsdp": ("tensor",), "fsdp_tp": ()}[self.rules]
        for name in unused:
            if getattr(self, name) != 1:
                _fail(name, getattr(self, name), f"1 under rules={self.rules!r}, which does not use the {name!r} "
                      "axis (choose rules='fsdp' or 'fsdp_tp')")

    def axis_sizes(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for ``n_devices`` devices, with -1 resolved."""
        sizes = [getattr(self, n) for n in MESH_AXES]
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            if n_devices % known:
                i = sizes.index(-1)
                _fail(MESH_AXES[i], -1, f"fillable: the other axes' product {known} does not divide the "
                      f"{n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        elif known != n_devices:
            raise ValueError(f"mesh data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} = {known}: "
                             f"must equal the {n_devices} devices (or set one axis to -1)")
        return tuple(sizes)

    def replace(self, **overrides: Any) -> MeshConfig:
        """A copy with some fields changed (validated; unknown names raise with near matches)."""
        return replace_checked(self, **overrides)


OBJECTIVES = ("ouro", "pondernet", "act", "ouro_gate", "final", "mixture")


@dataclasses.dataclass(frozen=True)
class HaltingConfig:
    """How the exit gate is trained and how many loops a training step runs.

    Fields:
      objective: "ouro" (Σ_t p_t·CE_t − β·H(p), Ouro stage I), "pondernet" (Σ_t p_t·CE_t + β·KL(p ‖ truncated
        Geometric(geometric_lambda))), "act" (CE of the remainder-weighted state + ponder_tau·(N + R)),
        "ouro_gate" (Ouro stage II: gate-only BCE towards σ(gate_k·(I_t − gate_gamma))), "final" (CE of the last
        loop), "mixture" (CE of Σ_t p_t·logits_t, the released Ouro code's loss).
      beta: weight of the entropy bonus ("ouro") or of the KL term ("pondernet"); >= 0.
      geometric_lambda: PonderNet prior parameter in (0, 1).
      act_eps, ponder_tau: ACT's halting threshold 1 − eps, in (0, 1), and ponder cost weight, >= 0.
      gate_k, gate_gamma: slope (> 0) and improvement threshold (>= 0) of the stage II targets.
      chunked: compute per-step CE in a scan over loops from step states (one [B, S, V] block at a time)
        instead of from materialised [T, B, S, V] step logits.
      ce_block: when the per-step CE comes from step states (``chunked``, "ouro_gate"), positions per logits
        block: each loop's CE runs over blocks of this many positions, one [B, ce_block, V] block live at a
        time (0 = the whole sequence); >= 0.
      ponder_weight: lambda_p of the per-layer loops' ponder cost, added to the objective as
        lambda_p * (mean E[n] - 1) / (layer_loops - 1), the mean over counted tokens and core layers
        (``halting.layer_ponder_cost``). Any finite float: > 0 pushes layers to exit early, < 0 rewards more
        iterations (the paper ablated both signs, e.g. -0.015 and +0.1); 0 = off. Non-zero needs a model with
        ``layer_loops > 1`` (checked where model and objective meet) and ``random_loops=False``.
      random_loops: sample each step's loop count n ~ 1 + Poisson(LogNormal(log mean_loops − σ²/2, loops_sigma)),
        clipped to max_loops, run in one compiled scan of max_loops, backpropagating through the last
        backprop_loops iterations only.
    """

    objective: str = "ouro"
    beta: float = 0.1
    geometric_lambda: float = 0.2
    act_eps: float = 0.01
    ponder_tau: float = 0.01
    gate_k: float = 50.0
    gate_gamma: float = 0.005
    chunked: bool = False
    ce_block: int = 1024
    random_loops: bool = False
    mean_loops: float = 4.0
    loops_sigma: float = 0.5
    max_loops: int = 16
    backprop_loops: int = 8
    # --- per-layer adaptive loops (issue 29) ---
    ponder_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_float("beta", self.beta, 0.0, lo_open=False)
        _check_float("geometric_lambda", self.geometric_lambda, 0.0, 1.0)
        if self.geometric_lambda >= 1.0:
            _fail("geometric_lambda", self.geometric_lambda, "a float in (0, 1)")
        _check_float("act_eps", self.act_eps, 0.0, 1.0)
        if self.act_eps >= 1.0:
            _fail("act_eps", self.act_eps, "a float in (0, 1)")
        _check_float("ponder_tau", self.ponder_tau, 0.0, lo_open=False)
        _check_float("gate_k", self.gate_k, 0.0)
        _check_float("gate_gamma", self.gate_gamma, 0.0, lo_open=False)
        for name in ("chunked", "random_loops"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        _check_int("ce_block", self.ce_block, 0)
        _check_float("mean_loops", self.mean_loops, 0.0)
        _check_float("loops_sigma", self.loops_sigma, 0.0)
        _check_int("max_loops", self.max_loops, 1)
        _check_int("backprop_loops", self.backprop_loops, 1, self.max_loops)
        if self.mean_loops > self.max_loops:
            _fail("mean_loops", self.mean_loops, f"<= max_loops={self.max_loops}")
        # --- per-layer adaptive loops (issue 29) ---
        _check_finite("ponder_weight", self.ponder_weight)
        if self.ponder_weight != 0 and self.random_loops:
            _fail("ponder_weight", self.ponder_weight, "0 with random_loops=True (a traced loop count runs the "
                  "core through an executor that reports no per-layer E[n])")

    def replace(self, **overrides: Any) -> HaltingConfig:
        """A copy with some fields changed (validated; unknown names raise with near matches)."""
        return replace_checked(self, **overrides)


SCHEDULES = ("cosine", "wsd", "constant")
ON_NONFINITE = ("error", "skip")
GATED_OBJECTIVES = ("ouro", "pondernet", "act", "ouro_gate", "mixture")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpoint cadence of a training run.

    Fields:
      steps: optimizer updates. batch_size: global rows per update (split over processes and the mesh's batch
        axes). seq_len: tokens per row.
      learning_rate: peak LR. schedule: "cosine" (linear warmup, cosine decay to min_lr_ratio·peak at ``steps``),
        "wsd" (warmup, stable, then linear decay to min_lr_ratio·peak over the last decay_fraction of steps),
        "constant" (warmup, then flat). warmup_steps: linear ramp from 0.
      b1, b2, eps, weight_decay: AdamW (decoupled decay, applied to matrices only, not norms / gate bias, and not
        to parameters tagged ``weight_decay=False``: memory banks, memory gate biases; ``train.optim.decay_mask``).
      grad_clip: global-norm clipping threshold (0 = off). grad_accum: micro-batches per update (batch_size must
        divide); micro-batch gradients are weighted by their token counts, so the update equals the full batch's.
      z_loss: weight of mean(logsumexp(final logits)²) (0 = off). seed: model init and loop-count sampling.
      objective: a ``HaltingConfig`` (objective, β, random loop counts, ...); "final" is plain CE of the last loop.
      mesh: the device mesh and sharding preset.
      log_every, eval_every, eval_batches: metrics cadence; evaluation every eval_every updates over eval_batches
        batches (0 = never). log_loop_losses: at log steps, also measure the CE after every loop.
      ckpt_every: save every N updates (0 = only at the end / on preemption). keep_checkpoints: keep the last K.
        keep_best: also keep the best checkpoint by best_metric (an eval metric name), best_mode "min" or "max".
      async_checkpointing: write checkpoints in a background thread.
      on_nonfinite: "error" stops the run naming the first step with a non-finite loss or gradient (that update
        and every later one are not applied, and nothing is checkpointed after it); "skip" drops such updates
        and counts them.
      peak_flops: per-device peak FLOP/s for MFU (None = a table of known accelerators; MFU omitted if unknown).
      tpu_scheduler_memory_percent: on TPU, the share of HBM (percent) above which XLA's latency-hiding
        scheduler trades collective overlap for memory (libtpu's xla_tpu_scheduler_percent_shared_memory_limit;
        0 = libtpu's default, which lets the step grow towards all of HBM). Lower it to leave HBM free for a
        larger batch or a co-located process; ignored on CPU and GPU. In [0, 100].
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    z_loss: float = 0.0
    seed: int = 0
    objective: HaltingConfig = dataclasses.field(default_factory=lambda: HaltingConfig(objective="final"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log_every: int = 10
    log_loop_losses: bool = True
    eval_every: int = 0
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    keep_best: bool = False
    best_metric: str = "eval/loss"
    best_mode: str = "min"
    async_checkpointing: bool = True
    on_nonfinite: str = "error"
    peak_flops: float | None = None
    tpu_scheduler_memory_percent: int = 0

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seq_len", self.seq_len, 1)
        _check_float("learning_rate", self.learning_rate, 0.0, lo_open=False)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        _check_float("decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, lo_open=False)
        _check_float("b1", self.b1, 0.0, 1.0, lo_open=False)
        _check_float("b2", self.b2, 0.0, 1.0, lo_open=False)
        if self.b1 >= 1.0 or self.b2 >= 1.0:
            _fail("b1" if self.b1 >= 1.0 else "b2", self.b1 if self.b1 >= 1.0 else self.b2, "a float in [0, 1)")
        _check_float("eps", self.eps, 0.0)
        _check_float("weight_decay", self.weight_decay, 0.0, lo_open=False)
        _check_float("grad_clip", self.grad_clip, 0.0, lo_open=False)
        _check_int("grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            _fail("grad_accum", self.grad_accum, f"a divisor of batch_size={self.batch_size}")
        _check_float("z_loss", self.z_loss, 0.0, lo_open=False)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.objective, HaltingConfig):
            _fail("objective", self.objective, "a HaltingConfig")
        if self.objective.random_loops and self.objective.objective != "final":
            _fail("objective", self.objective, "objective='final' when random_loops=True (a traced loop count gives "
                  "no per-step outputs to weight)")
        if not isinstance(self.mesh, MeshConfig):
            _fail("mesh", self.mesh, "a MeshConfig")
        _check_int("log_every", self.log_every, 1)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("eval_batches", self.eval_batches, 1)
        _check_int("ckpt_every", self.ckpt_every, 0)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        for name in ("log_loop_losses", "keep_best", "async_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        if self.keep_best and self.eval_every == 0:
            _fail("keep_best", True, "False when eval_every=0 (the best checkpoint is chosen by an eval metric)")
        if not isinstance(self.best_metric, str) or not self.best_metric:
            _fail("best_metric", self.best_metric, "a metric name such as 'eval/loss'")
        _check_choice("best_mode", self.best_mode, ("min", "max"))
        _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if self.peak_flops is not None:
            _check_float("peak_flops", self.peak_flops, 0.0)
        _check_int("tpu_scheduler_memory_percent", self.tpu_scheduler_memory_percent, 0, 100)

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with some fields changed (validated; unknown names raise with near matches)."""
        return replace_checked(self, **overrides)
