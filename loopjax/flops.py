"""Exact matmul FLOP counts of a forward pass, as executed (2 FLOPs per multiply-add).

Counted: q/k/v/o projections, attention scores and attention-weighted values, the three SwiGLU matmuls, the
concat-injection adapter, the exit gate, the LM head, and with per-layer loops (``layer_loops`` N > 1) every
iteration of every core layer with its halting router (training runs all N). Attention is counted over the full S×S score matrix
because that is what the masked dense kernel computes (causal and sliding-window masks do not skip work);
``causal=True`` counts only the query-key pairs a causal (sliding-window) mask keeps, S²/2 for full causal
attention: the work a step must do, as model-FLOP utilisation (MFU) conventionally counts it.
Not counted: norms, softmax, rotary, activations and the embedding gather (a few FLOPs per element; XLA's cost
analysis counts them too, so it reports slightly more).
"""

from __future__ import annotations

from loopjax.config import LoopedConfig


def attended_pairs(cfg: LoopedConfig, seq_len: int, causal: bool = False) -> float:
    """Query-key pairs per head and sequence: S² (dense), or those a causal / sliding-window mask keeps."""
    if not causal:
        return seq_len * seq_len
    w = seq_len if cfg.sliding_window is None else min(cfg.sliding_window, seq_len)
    return seq_len * w - w * w / 2


def layer_flops(cfg: LoopedConfig, seq_len: int, causal: bool = False) -> float:
    """FLOPs of one decoder layer over a sequence of ``seq_len`` tokens (``causal``: see the module doc)."""
    s, d, n, k, h, f = seq_len, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_ff
    projections = 2 * s * d * (n * h + 2 * k * h) + 2 * s * n * h * d
    attention = 2 * (2 * attended_pairs(cfg, s, causal) * n * h)  # scores q·k and probs·v
    mlp = 3 * 2 * s * d * f
    return projections + attention + mlp


def layer_loop_flops(cfg: LoopedConfig, seq_len: int, causal: bool = False,
                     iterations: float | None = None) -> float:
    """FLOPs of one core layer with its per-layer loop: ``iterations`` applications of the layer (default
    ``cfg.layer_loops``, all of them, as training runs), each followed by the halting router Linear(D+1 → 1);
    the plain layer when ``layer_loops`` is 1. The expectation Σ p_t h_t is elementwise (not counted)."""
    if cfg.layer_loops == 1:
        return layer_flops(cfg, seq_len, causal)
    n = cfg.layer_loops if iterations is None else iterations
    return n * (layer_flops(cfg, seq_len, causal) + 2 * seq_len * (cfg.d_model + 1))


def loop_flops(cfg: LoopedConfig, seq_len: int, causal: bool = False,
               layer_iterations: float | None = None) -> float:
    """FLOPs of one application of the core: injection adapter, k layers (each with its per-layer loop's
    ``layer_iterations``, see ``layer_loop_flops``), exit gate."""
    s, d = seq_len, cfg.d_model
    inject = 2 * s * (2 * d) * d if cfg.input_injection == "concat" else 0
    gate = 2 * s * d if cfg.exit_gate else 0
    return inject + cfg.n_layers * layer_loop_flops(cfg, s, causal, layer_iterations) + gate


def readout_flops(cfg: LoopedConfig, seq_len: int, causal: bool = False) -> float:
    """FLOPs of one read-out: coda layers and the LM head."""
    return cfg.n_coda * layer_flops(cfg, seq_len, causal) + 2 * seq_len * cfg.d_model * cfg.vocab_size


def forward_flops(cfg: LoopedConfig, seq_len: int, n_loops: float | None = None, *,
                  readouts: float = 1, causal: bool = False, layer_iterations: float | None = None) -> float:
    """FLOPs of one forward pass over one sequence of ``seq_len`` tokens.

    n_loops: loops run (default ``cfg.n_loops``); a float gives the mean over an exit profile.
    readouts: how many loops are read out through coda + head (1 for a plain forward; ``n_loops`` when every
      loop's logits are computed, as in per-step losses).
    causal: count causal attention's kept pairs only (see the module doc).
    layer_iterations: with per-layer loops, the iterations each core layer runs per block loop (default all N);
      a float gives the mean over an exit profile: ``LoopedOutput.layer_iterations.mean()`` for what an adaptive
      call executed, or the mean ``layer_expected_n`` / ``layer_exit_iteration`` for per-token cost.
    """
    n_loops = cfg.n_loops if n_loops is None else n_loops
    if n_loops <= 0:
        raise ValueError(f"n_loops={n_loops!r}: must be > 0")
    if layer_iterations is not None and (cfg.layer_loops == 1 or not 0 < layer_iterations <= cfg.layer_loops):
        raise ValueError(f"layer_iterations={layer_iterations!r}: must be in (0, layer_loops={cfg.layer_loops}] "
                         "(and needs layer_loops >= 2)")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: must be >= 1")
    prelude = cfg.n_prelude * layer_flops(cfg, seq_len, causal)
    total = prelude + n_loops * loop_flops(cfg, seq_len, causal, layer_iterations) + readouts * readout_flops(cfg, seq_len, causal)
    return int(total) if float(total).is_integer() else total


def train_flops(cfg: LoopedConfig, seq_len: int, n_loops: int | None = None, *, readouts: float = 1,
                causal: bool = False) -> float:
    """FLOPs of forward + backward (3× forward, the usual estimate for matmul-dominated models)."""
    return 3 * forward_flops(cfg, seq_len, n_loops, readouts=readouts, causal=causal)
