"""Ouro checkpoints (HuggingFace ``model_type: "ouro"``): config and weight mapping, streaming load, export.

Typical use::

    model = lj.load_ouro("/ckpt/Ouro-1.4B", dtype="bfloat16")
    out = model(tokens_BS, exit_rule=ouro_exit_rule(read_hf_config(path)), run_all_loops=True)  # as the HF code
    lj.save_ouro(model, "/tmp/export", source="/ckpt/Ouro-1.4B")

Weight layouts: HF ``nn.Linear`` weights are [out, in]; loopjax keeps [in, out...] (``wq`` [D, N, H] is
``q_proj.weight.T`` reshaped, ``wo`` [N, H, D] is ``o_proj.weight.T`` reshaped, ``lm_head`` [D, V] is
``lm_head.weight.T``). The exact semantics matched are in tests/data/ouro/SEMANTICS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from loopjax.config import LoopedConfig
from loopjax.convert.safetensors_io import checkpoint_files, iter_tensors, tensor_shapes, write_checkpoint
from loopjax.halting import FixedExit, QExit
from loopjax.layers import dtype as jnp_dtype
from loopjax.model import LoopedLM
from loopjax.partitioning import LogicalRules
from loopjax.sharding import param_shardings, rules_for

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
# Files of a source checkpoint that describe neither the architecture nor the weights (copied by save_ouro).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "generation_config.json", "configuration_ouro.py", "modeling_ouro.py")

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor: its name and shape, where it lives in ``LoopedLM``'s state and its layout there.

    layout: "same" (identical), "linear" (HF [out, in] -> loopjax ``weight.T`` reshaped to ``shape``), or
    "reshape" (same data, other shape: the gate's [1, D] -> [D] and [1] -> []).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: Path
    shape: tuple[int, ...]
    layout: str

    def to_loopjax(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return x.T.reshape(self.shape)
        return x.reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return x.reshape(self.hf_shape[1], self.hf_shape[0]).T
        return x.reshape(self.hf_shape)


def weight_specs(cfg: LoopedConfig) -> list[WeightSpec]:
    """Every tensor of an Ouro checkpoint for ``cfg`` in HF order (27 for 2 layers with an untied head)."""
    d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_ff, cfg.vocab_size
    specs = [WeightSpec("model.embed_tokens.weight", (v, d), ("embed",), (v, d), "same")]
    for i in range(cfg.n_layers):
        hf, lj = f"model.layers.{i}.", ("core", "layers", i)
        specs += [
            WeightSpec(hf + "input_layernorm.weight", (d,), lj + ("norm_in", "scale"), (d,), "same"),
            WeightSpec(hf + "input_layernorm_2.weight", (d,), lj + ("norm_in2", "scale"), (d,), "same"),
            WeightSpec(hf + "self_attn.q_proj.weight", (n * h, d), lj + ("attn", "wq"), (d, n, h), "linear"),
            WeightSpec(hf + "self_attn.k_proj.weight", (k * h, d), lj + ("attn", "wk"), (d, k, h), "linear"),
            WeightSpec(hf + "self_attn.v_proj.weight", (k * h, d), lj + ("attn", "wv"), (d, k, h), "linear"),
            WeightSpec(hf + "self_attn.o_proj.weight", (d, n * h), lj + ("attn", "wo"), (n, h, d), "linear"),
            WeightSpec(hf + "post_attention_layernorm.weight", (d,), lj + ("norm_post", "scale"), (d,), "same"),
            WeightSpec(hf + "post_attention_layernorm_2.weight", (d,), lj + ("norm_post2", "scale"), (d,), "same"),
            WeightSpec(hf + "mlp.gate_proj.weight", (f, d), lj + ("mlp", "w_gate"), (d, f), "linear"),
            WeightSpec(hf + "mlp.up_proj.weight", (f, d), lj + ("mlp", "w_up"), (d, f), "linear"),
            WeightSpec(hf + "mlp.down_proj.weight", (d, f), lj + ("mlp", "w_down"), (f, d), "linear"),
        ]
    specs += [
        WeightSpec("model.norm.weight", (d,), ("core", "norm", "scale"), (d,), "same"),
        WeightSpec("model.early_exit_gate.weight", (1, d), ("core", "gate", "w"), (d,), "reshape"),
        WeightSpec("model.early_exit_gate.bias", (1,), ("core", "gate", "b"), (), "reshape"),
    ]
    if not cfg.tie_embeddings:
        specs.append(WeightSpec("lm_head.weight", (v, d), ("lm_head",), (d, v), "linear"))
    return specs


# ---------------------------------------------------------------------------------------------------- config


def read_hf_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder as a dict."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return json.load(f)


def _dtype_name(value: Any) -> str:
    name = np.dtype(value).name if not isinstance(value, str) else value
    return {"float": "float32", "bf16": "bfloat16", "half": "float16"}.get(name, name)


def ouro_config(hf: dict[str, Any], *, dtype: Any = None, **overrides: Any) -> LoopedConfig:
    """``LoopedConfig`` for an HF Ouro config dict: sandwich norm, step norm, exit gate, no input injection
    (and, as the ``ouro_*`` presets, per-layer remat over a scan of the layers).

    dtype: parameter and compute dtype ("float32", "bfloat16", "float16" or a numpy/jnp dtype); None = the
    checkpoint's ``torch_dtype``. ``overrides`` replace fields of the result (e.g. ``remat_policy``).
    Raises ValueError naming every field loopjax cannot honour (rope_scaling, sliding-window layers, ...).
    """
    problems = []
    if hf.get("model_type") != "ouro":
        problems.append(f"model_type={hf.get('model_type')!r}: must be 'ouro'")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        problems.append(f"rope_scaling={rope_scaling!r}: must be null (loopjax implements unscaled RoPE only)")
    sliding = [i for i, t in enumerate(hf.get("layer_types") or []) if t != "full_attention"]
    if hf.get("use_sliding_window") or sliding:
        problems.append(f"use_sliding_window={hf.get('use_sliding_window')!r}, non-full layer_types at layers "
                        f"{sliding}: must be full attention in every layer (per-layer sliding windows are "
                        "not supported by this converter)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r}: must be 'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]!r}: must be false (Ouro layers have no biases)")
    if problems:
        raise ValueError("unsupported Ouro config fields:\n  " + "\n  ".join(problems))
    name = _dtype_name(dtype if dtype is not None else hf.get("torch_dtype", hf.get("dtype")) or "float32")
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], n_layers=hf["num_hidden_layers"], n_loops=hf.get("total_ut_steps", 4),
        max_seq_len=hf.get("max_position_embeddings", 32768), norm_scheme="sandwich", step_norm=True,
        input_injection="none", rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        exit_gate=True, param_dtype=name, compute_dtype=name, remat_scope="layer", scan_layers=True)
    fields.update(overrides)
    return LoopedConfig(**fields)


def ouro_exit_rule(hf: dict[str, Any]) -> FixedExit | QExit | None:
    """The read-out rule of a plain HF forward without labels: ``early_exit_step`` (0-based) as ``FixedExit``,
    else ``early_exit_threshold`` as ``QExit``; None when neither is set (the last loop). Use it with
    ``run_all_loops=True`` to match the HF code, which always runs every loop."""
    step, total = hf.get("early_exit_step"), hf.get("total_ut_steps", 4)
    if step is not None and 0 <= step < total:
        return FixedExit(int(step) + 1)
    if hf.get("early_exit_threshold") is not None:
        return QExit(float(hf["early_exit_threshold"]))
    return None


def _check_exportable(cfg: LoopedConfig) -> None:
    wrong = {name: getattr(cfg, name) for name, want in (
        ("norm_scheme", "sandwich"), ("step_norm", True), ("exit_gate", True), ("input_injection", "none"),
        ("n_prelude", 0), ("n_coda", 0), ("sliding_window", None), ("layer_loops", 1))
        if getattr(cfg, name) != want}
    if wrong:
        raise ValueError(f"save_ouro: the Ouro format cannot hold this model: {wrong} must be norm_scheme="
                         "'sandwich', step_norm=True, exit_gate=True, input_injection='none', n_prelude=0, "
                         "n_coda=0, sliding_window=None, layer_loops=1")


def hf_ouro_config(cfg: LoopedConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``cfg``: ``base`` (e.g. the source checkpoint's config, keeping its token
    ids, exit threshold and auto_map) with every architecture field set from ``cfg``."""
    _check_exportable(cfg)
    out = dict(base or {
        "architectures": ["OuroForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
        "initializer_range": cfg.init_std, "early_exit_threshold": 1.0, "use_cache": True,
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModel": "modeling_ouro.OuroModel",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}})
    out.update(
        model_type="ouro", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.d_head, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta, rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=cfg.param_dtype, total_ut_steps=cfg.n_loops, use_sliding_window=False, sliding_window=None,
        max_window_layers=cfg.n_layers, layer_types=["full_attention"] * cfg.n_layers)
    return out


# ------------------------------------------------------------------------------------------------- load / save


def _check_tensors(found: dict[str, tuple[tuple[int, ...], str]], specs: dict[str, WeightSpec]) -> None:
    """One error listing every unknown, missing and wrongly shaped tensor."""
    unknown = sorted(set(found) - set(specs))
    missing = sorted(set(specs) - set(found))
    bad = [f"{n}: shape {list(found[n][0])}, expected {list(specs[n].hf_shape)}"
           for n in sorted(set(found) & set(specs)) if found[n][0] != specs[n].hf_shape]
    if unknown or missing or bad:
        parts = ([f"unknown tensors ({len(unknown)}): {unknown}"] if unknown else []) + \
                ([f"missing tensors ({len(missing)}): {missing}"] if missing else []) + \
                ([f"shape mismatches ({len(bad)}): " + "; ".join(bad)] if bad else [])
        raise ValueError("checkpoint does not match its config.json:\n  " + "\n  ".join(parts))


def load_ouro(path: str, *, dtype: Any = None, mesh: jax.sharding.Mesh | None = None,
              rules: LogicalRules | str = "dp", **config_overrides: Any) -> LoopedLM:
    """Load an HF Ouro checkpoint folder (config.json + model.safetensors or index-sharded files) as a LoopedLM.

    Streaming: the model is built abstractly (``nnx.eval_shape``) and filled one tensor at a time, each read
    from its safetensors file into numpy (``convert.safetensors_io``), converted to loopjax's layout and dtype and put straight onto its device (or,
    with ``mesh``, its NamedSharding from the parameter's logical axes under ``rules``: a preset name of
    ``sharding.rules_for`` or a ``LogicalRules``; the default "dp" replicates). So host memory holds the loaded
    parameters plus one tensor in flight, never two copies of the model.
    dtype: parameter/compute dtype (None = the checkpoint's ``torch_dtype``); ``config_overrides`` go to
    ``ouro_config`` (e.g. remat_policy).
    """
    cfg = ouro_config(read_hf_config(path), dtype=dtype, **config_overrides)
    files = checkpoint_files(path)
    specs = {s.hf_name: s for s in weight_specs(cfg)}
    _check_tensors(tensor_shapes(files), specs)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LoopedLM(cfg, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(abstract))
    if set(variables) != {s.path for s in specs.values()}:  # the mapping and the module tree drifted apart
        raise RuntimeError(f"weight_specs does not cover LoopedLM's state: "
                           f"{sorted(set(variables) ^ {s.path for s in specs.values()}, key=str)}")
    shardings: dict[Path, Any] = {}
    if mesh is not None:
        rules = rules_for(rules) if isinstance(rules, str) else rules
        shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh, rules)))

    arrays: dict[Path, jax.Array] = {}
    for name, x in iter_tensors(files):
        spec = specs[name]
        value = spec.to_loopjax(x).astype(variables[spec.path].dtype, copy=False)
        arrays[spec.path] = jax.device_put(value, shardings.get(spec.path))
        del x, value  # at most one tensor on the host at a time
    state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in nnx.to_flat_state(abstract)])
    return nnx.merge(graphdef, state)


def _host_value(x: jax.Array, where: Path) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(f"save_ouro: parameter {'/'.join(map(str, where))} spans several processes; "
                         "multi-process export is not supported (gather the parameters to one process first)")
    return np.asarray(jax.device_get(x))


def save_ouro(model: LoopedLM, path: str, *, source: str | None = None,
              max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write ``model`` as an HF Ouro checkpoint: config.json + model.safetensors (or shards of at most
    ``max_shard_bytes`` with model.safetensors.index.json), in the parameter dtype, one tensor at a time.

    source: a checkpoint folder whose config.json supplies the non-architecture fields (token ids, exit
    threshold, auto_map) and whose tokenizer, generation config and remote-code files are copied along.
    Returns the safetensors files written.
    """
    cfg = model.cfg
    base = read_hf_config(source) if source is not None else None
    config = hf_ouro_config(cfg, base)  # validates that the Ouro format can hold the model
    specs = weight_specs(cfg)
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_name = {s.hf_name: s for s in specs}
    dt = np.dtype(jnp_dtype(cfg.param_dtype))
    files = write_checkpoint(
        path, [(s.hf_name, s.hf_shape, dt) for s in specs],
        lambda name: by_name[name].to_hf(_host_value(variables[by_name[name].path][...], by_name[name].path)),
        max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if source is not None and os.path.abspath(source) != os.path.abspath(path):
        for name in _SIDE_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    return files


def load_tokenizer(path: str) -> Any | None:
    """The checkpoint's ``tokenizers.Tokenizer`` from tokenizer.json, or None when the folder has none."""
    file = os.path.join(path, TOKENIZER_NAME)
    if not os.path.exists(file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # optional dependency
        raise ImportError(f"{file} needs the `tokenizers` package: pip install 'loopjax[ouro]'") from err
    return Tokenizer.from_file(file)

