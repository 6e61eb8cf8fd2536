"""The published PyTorch Ouro model, loaded from a user-fetched folder, for side-by-side timings.

``--torch-ref DIR`` in the benchmarks points at a folder holding ``modeling_ouro.py`` of the Ouro release (and,
optionally, its ``configuration_ouro.py``); nothing of it is committed here. Where the folder has no
``configuration_ouro.py``, ``OuroConfig`` below (a ``PretrainedConfig`` with the fields ``modeling_ouro`` reads)
stands in for it. Needs torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

_PKG = "_loopjax_torch_ouro_ref"


def if_available(ref_dir: str | None):
    """(this module, None) where ``ref_dir`` is given and torch / transformers import, else (None, why not)."""
    if ref_dir is None:
        return None, "no --torch-ref"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"torch / transformers not importable ({e})"
    load(ref_dir)
    return sys.modules[__name__], None


def load(ref_dir: str) -> types.ModuleType:
    """``modeling_ouro`` imported from ``ref_dir`` as a package module (its relative config import resolved)."""
    path = os.path.join(ref_dir, "modeling_ouro.py")
    if not os.path.isfile(path):
        raise ValueError(f"--torch-ref={ref_dir!r}: no modeling_ouro.py there")
    if f"{_PKG}.modeling_ouro" in sys.modules:
        return sys.modules[f"{_PKG}.modeling_ouro"]
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [ref_dir]
    sys.modules[_PKG] = pkg
    if not os.path.isfile(os.path.join(ref_dir, "configuration_ouro.py")):
        shim = types.ModuleType(f"{_PKG}.configuration_ouro")
        shim.OuroConfig = _config_class()
        sys.modules[shim.__name__] = shim
    return importlib.import_module(f"{_PKG}.modeling_ouro")


def _config_class():
    from transformers import PretrainedConfig

    class OuroConfig(PretrainedConfig):
        """The fields ``modeling_ouro`` reads; defaults as in the Ouro release where it has one."""

        model_type = "ouro"

        def __init__(self, vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, hidden_act="silu", max_position_embeddings=4096,
                     rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, attention_dropout=0.0, use_cache=True,
                     sliding_window=None, layer_types=None, total_ut_steps=4, pad_token_id=None,
                     tie_word_embeddings=False, initializer_range=0.02, **kwargs):
            self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
            self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
            self.num_key_value_heads, self.hidden_act = num_key_value_heads, hidden_act
            self.max_position_embeddings, self.rms_norm_eps = max_position_embeddings, rms_norm_eps
            self.rope_theta = rope_theta
            self.rope_scaling, self.attention_dropout, self.use_cache = rope_scaling, attention_dropout, use_cache
            self.sliding_window, self.total_ut_steps = sliding_window, total_ut_steps
            self.layer_types = layer_types or ["full_attention"] * num_hidden_layers
            self.initializer_range = initializer_range
            super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    return OuroConfig


def build(ref_dir: str, sizes: dict, n_loops: int, seq: int, attn: str = "sdpa", seed: int = 0):
    """An ``OuroForCausalLM`` (float32, random init) with loopjax ``sizes`` (vocab_size, d_model, n_layers, ...)."""
    import torch

    mod = load(ref_dir)
    cfg_cls = sys.modules[f"{_PKG}.configuration_ouro"].OuroConfig
    cfg = cfg_cls(vocab_size=sizes["vocab_size"], hidden_size=sizes["d_model"], intermediate_size=sizes["d_ff"],
                  num_hidden_layers=sizes["n_layers"], num_attention_heads=sizes["n_heads"],
                  num_key_value_heads=sizes["n_kv_heads"], max_position_embeddings=seq, rope_theta=1e6,
                  total_ut_steps=n_loops, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return mod.OuroForCausalLM(cfg).float()


def expected_loss(model, tokens_BS, beta: float):
    """Ouro's objective on the published model's per-loop outputs: Σ_t p_t·CE_t − β·H(p), CE from every loop's
    logits (the LM head runs at each loop), stick-breaking p from its gate, the last position masked out."""
    import torch
    import torch.nn.functional as F

    _, hidden_T, gate_T = model.model(input_ids=tokens_BS, use_cache=False)
    b, s = tokens_BS.shape
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    ce_TBS = torch.stack([F.cross_entropy(model.lm_head(h).flatten(0, 1), labels_BS.flatten(), reduction="none")
                          .view(b, s) for h in hidden_T])
    g_BST = torch.cat(gate_T, dim=-1).float()
    log_survive = F.logsigmoid(-g_BST)
    log_before = torch.cumsum(log_survive, -1) - log_survive
    logp = torch.cat([log_before[..., :-1] + F.logsigmoid(g_BST[..., :-1]), log_before[..., -1:]], -1)
    p = logp.exp()
    per_token = (p * ce_TBS.permute(1, 2, 0)).sum(-1) + beta * (p * logp).sum(-1)
    return per_token[:, : s - 1].mean()


def make_train_step(model, beta: float):
    """step(tokens) -> loss: forward, backward and AdamW (the loopjax benchmark's hyper-parameters)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step(tokens_BS):
        opt.zero_grad(set_to_none=True)
        loss = expected_loss(model, tokens_BS, beta)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def matmul_rate(m: int, k: int, n: int, repeats: int, trans_a: bool = False, trans_b: bool = False,
                batch: int = 1) -> float:
    """Best FLOP/s of a float32 [m, k] @ [k, n] matmul in torch (operands stored transposed where asked; a batch
    of them as one batched matmul where ``batch`` > 1)."""
    import time

    import torch

    lead = (batch,) if batch > 1 else ()
    a = torch.randn(*lead, k, m).transpose(-1, -2) if trans_a else torch.randn(*lead, m, k)
    b = torch.randn(*lead, n, k).transpose(-1, -2) if trans_b else torch.randn(*lead, k, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * m * k * n / best
