"""Ouro checkpoints (loopjax/convert): parity with the HF reference code, load/save round trips, errors, streaming.

The reference (tests/data/ouro/, described in SEMANTICS.md and REFERENCE_NPZ.md) is a tiny Ouro checkpoint and the
arrays its published HF modeling code produced in float32; step indices there are 0-based, loopjax's are 1-based.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import loopjax as lj
from loopjax.config import MeshConfig, ouro_1_4b
from loopjax.convert import (hf_ouro_config, load_ouro, load_tokenizer, ouro_config, ouro_exit_rule, read_hf_config,
                             save_ouro, weight_specs)
from loopjax.convert.safetensors_io import write_checkpoint
from loopjax.sharding import make_mesh, param_shardings, rules_for

DATA = os.path.join(os.path.dirname(__file__), "data", "ouro")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(DATA, "reference.npz")))


@pytest.fixture(scope="module")
def model():
    return load_ouro(DATA, dtype="float32")


def _ids(ref, key="input_ids"):
    return jnp.asarray(ref[key], jnp.int32)


def _close(actual, expected, tol=LOGIT_TOL):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)


def _params(m):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _assert_bitwise_equal(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for p in pa:
        assert pa[p].dtype == pb[p].dtype and pa[p].shape == pb[p].shape, p
        assert pa[p].tobytes() == pb[p].tobytes(), p


# --------------------------------------------------------------------------------------------------- parity


def test_config_maps_hf_fields(model):
    cfg = model.cfg
    hf = read_hf_config(DATA)
    assert (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_head) == (64, 128, 2, 4, 2, 16)
    assert (cfg.vocab_size, cfg.n_loops, cfg.rope_theta, cfg.rms_eps, cfg.max_seq_len) == (256, 4, 1e4, 1e-6, 128)
    assert (cfg.norm_scheme, cfg.step_norm, cfg.exit_gate, cfg.input_injection) == ("sandwich", True, True, "none")
    assert cfg.tie_embeddings is False and cfg.param_dtype == "float32"
    assert ouro_exit_rule(hf) == lj.QExit(1.0)
    assert ouro_exit_rule(dict(hf, early_exit_step=1)) == lj.FixedExit(2)
    assert ouro_exit_rule(dict(hf, early_exit_threshold=None)) is None
    # the published 1.4B config maps onto the preset
    big = dict(hf, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=16, head_dim=128, vocab_size=49152, rope_theta=1e6, max_position_embeddings=65536,
               torch_dtype="bfloat16", layer_types=["full_attention"] * 24)
    assert ouro_config(big) == ouro_1_4b()


def test_embeddings_match_reference(model, ref):
    _close(model.embed_tokens(_ids(ref)), ref["embeddings"])


def test_layer_outputs_and_step_states_match_reference(model, ref):
    """Each decoder layer at each loop step, run one by one in Python, against the reference's per-layer outputs."""
    ids = _ids(ref)
    b, s = ids.shape
    cos, sin, mask = model.rope_and_layout(jnp.broadcast_to(jnp.arange(s), (b, s)))
    h = model.embed_tokens(ids)
    for t in range(model.cfg.n_loops):
        for l, layer in enumerate(model.core.layers):
            h = layer(h, cos, sin, mask)
            _close(h, ref["layer_outputs"][t, l])
        h = model.core.norm(h)
        _close(h, ref["hidden_states"][t])


def test_forward_steps_gate_and_exit_distribution_match_reference(model, ref):
    out = jax.jit(lambda ids: model(ids, return_steps=True))(_ids(ref))
    _close(out.step_hidden, ref["hidden_states"])
    _close(out.step_logits, ref["logits_per_step"])
    _close(out.logits, ref["logits_per_step"][-1])
    _close(out.gate_logits, np.moveaxis(ref["gate_logits"], 0, -1))
    _close(out.exit_pdf, ref["exit_pdf"], 1e-5)
    _close(lj.exit_cdf(out.gate_logits), ref["exit_cdf"], 1e-5)


def test_mixture_logits_and_loss_match_reference(model, ref):
    """The released training path: logits Σ_t p_t·logits_t, HF causal-LM CE on them (labels shifted by one)."""
    ids = _ids(ref)
    out = model(ids, return_steps=True)
    _close(lj.mixture_logits(out.gate_logits, step_logits_TBSV=out.step_logits), ref["weighted_logits"])
    loss = lj.mixture_logits_loss(out.gate_logits[:, :-1], ids[:, 1:],
                                  step_logits_TBSV=out.step_logits[:, :, :-1])
    np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=0, atol=1e-5)
    # the same CE, independently in float64 NumPy from the reference mixture logits
    z = ref["weighted_logits"][:, :-1].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, ref["labels"][:, 1:, None], -1).mean()
    np.testing.assert_allclose(float(loss), ce, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["threshold", "default_config"])
def test_threshold_exit_matches_reference(model, ref, mode):
    """Ouro's Q-exit reads each token out of its own step after running every step (run_all_loops)."""
    rule = lj.QExit(float(ref["threshold"])) if mode == "threshold" else ouro_exit_rule(read_hf_config(DATA))
    out = model(_ids(ref), exit_rule=rule, run_all_loops=True)
    _close(out.logits, ref[f"logits_{mode}"])
    np.testing.assert_array_equal(np.asarray(out.exit_step) - 1, ref[f"exit_steps_{mode}"])


def test_padded_logits_match_reference_at_unmasked_positions(model, ref):
    mask = ref["padded_attention_mask"]
    out = model(_ids(ref), attention_mask_BS=jnp.asarray(mask))
    keep = mask.astype(bool)
    _close(np.asarray(out.logits)[keep], ref["padded_logits_last_step"][keep])


def test_greedy_generation_at_the_last_step_matches_reference(model, ref):
    """(Threshold-exit generation is checked through the script below.)"""
    out = lj.generate(model, ref["gen_prompt"][None].astype(np.int32), 8, kv_mode="compute_all")
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), ref["gen_fixed_tokens"])
    np.testing.assert_array_equal(np.asarray(out.exit_steps[0]), [4] * 8)


# ------------------------------------------------------------------------------------------ save / round trip


def test_save_load_round_trip_is_bitwise_and_readable_by_safetensors(model, tmp_path):
    files = save_ouro(model, str(tmp_path), source=DATA)
    assert [os.path.basename(f) for f in files] == ["model.safetensors"]
    assert read_hf_config(str(tmp_path)) == read_hf_config(DATA)
    # the official reader sees exactly the original tensors, bit for bit
    original, written = load_file(os.path.join(DATA, "model.safetensors")), load_file(files[0])
    assert original.keys() == written.keys() and len(written) == 27
    for name in original:
        assert written[name].dtype == original[name].dtype and written[name].shape == original[name].shape
        assert written[name].tobytes() == original[name].tobytes(), name
    _assert_bitwise_equal(model, load_ouro(str(tmp_path)))


def test_sharded_bf16_round_trip_is_bitwise(tmp_path):
    m = load_ouro(DATA, dtype="bfloat16")
    assert m.cfg.param_dtype == "bfloat16" and m.core.layers[0].attn.wq[...].dtype == jnp.bfloat16
    files = save_ouro(m, str(tmp_path / "a"), max_shard_bytes=40_000)
    assert len(files) > 2 and os.path.exists(tmp_path / "a" / "model.safetensors.index.json")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 27
    with safe_open(files[0], framework="numpy") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == ml_dtypes.bfloat16
    assert read_hf_config(str(tmp_path / "a"))["torch_dtype"] == "bfloat16"
    m2 = load_ouro(str(tmp_path / "a"))
    _assert_bitwise_equal(m, m2)
    save_ouro(m2, str(tmp_path / "b"))  # and back to one file
    _assert_bitwise_equal(m, load_ouro(str(tmp_path / "b")))


def test_load_onto_mesh_places_each_param_on_its_sharding(ref):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"))
    rules = rules_for("fsdp_tp")
    m = load_ouro(DATA, mesh=mesh, rules="fsdp_tp")
    want = dict(nnx.to_flat_state(param_shardings(nnx.state(m, nnx.Param), mesh, rules)))
    for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        assert v[...].sharding.is_equivalent_to(want[path], v[...].ndim), path
    assert m.core.layers[0].attn.wq[...].sharding.spec != jax.sharding.PartitionSpec()  # really sharded
    out = jax.jit(lambda ids: m(ids, return_steps=True))(_ids(ref))
    _close(out.step_logits, ref["logits_per_step"])


# --------------------------------------------------------------------------------------------------- errors


def _copy_checkpoint(tmp_path, tensors=None, **config_changes):
    os.makedirs(tmp_path, exist_ok=True)
    shutil.copyfile(os.path.join(DATA, "model.safetensors"), tmp_path / "model.safetensors")
    if tensors is not None:
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = dict(read_hf_config(DATA), **config_changes)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


def test_unknown_missing_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
    t = load_file(os.path.join(DATA, "model.safetensors"))
    t["model.layers.0.self_attn.q_bias"] = t.pop("model.layers.0.self_attn.q_proj.weight")
    del t["model.norm.weight"]
    t["lm_head.weight"] = t["lm_head.weight"][:, :32].copy()
    with pytest.raises(ValueError) as err:
        load_ouro(_copy_checkpoint(tmp_path, t))
    msg = str(err.value)
    for part in ("unknown tensors (1)", "model.layers.0.self_attn.q_bias", "missing tensors (2)",
                 "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "shape mismatches (1)",
                 "lm_head.weight: shape [256, 32], expected [256, 64]"):
        assert part in msg, (part, msg)


def test_unsupported_config_fields_are_named(tmp_path):
    path = _copy_checkpoint(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0}, use_sliding_window=True,
                            layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError) as err:
        load_ouro(path)
    assert "rope_scaling=" in str(err.value) and "use_sliding_window=True" in str(err.value)
    assert "layers [0]" in str(err.value)
    with pytest.raises(ValueError, match="model_type='llama'"):
        ouro_config(dict(read_hf_config(DATA), model_type="llama"))


def test_save_refuses_models_the_format_cannot_hold(tmp_path):
    m = nnx.eval_shape(lambda: lj.LoopedLM(lj.tiny(norm_scheme="pre", input_injection="add"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="norm_scheme.*input_injection"):
        save_ouro(m, str(tmp_path))


def test_tied_embeddings_checkpoint_has_no_lm_head_and_round_trips(tmp_path):
    t = load_file(os.path.join(DATA, "model.safetensors"))
    del t["lm_head.weight"]
    path = _copy_checkpoint(tmp_path / "a", t, tie_word_embeddings=True)
    assert "lm_head.weight" not in {s.hf_name for s in weight_specs(ouro_config(read_hf_config(path)))}
    m = load_ouro(path)
    assert m.cfg.tie_embeddings and m.lm_head is None
    save_ouro(m, str(tmp_path / "b"))
    assert load_file(str(tmp_path / "b" / "model.safetensors")).keys() == t.keys()
    _assert_bitwise_equal(m, load_ouro(str(tmp_path / "b")))


# ------------------------------------------------------------------------------------- tokenizer and script


def test_tokenizer_is_loaded_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert load_tokenizer(DATA) is None
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "loops": 1, "think": 2, "twice": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("loops think twice").ids == [1, 2, 3]


def _script():
    """experiments/ouro_generate.py as a module (whether or not the repo root is on sys.path)."""
    spec = importlib.util.spec_from_file_location("ouro_generate",
                                                  os.path.join(ROOT, "experiments", "ouro_generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_generate_script_prints_reference_tokens_and_exit_depths(ref, capsys):
    ouro_generate = _script()
    prompt = ",".join(map(str, ref["gen_prompt"]))
    res = ouro_generate.main(["--path", DATA, "--prompt-ids", prompt, "--max-new-tokens", "8",
                              "--threshold", str(float(ref["threshold"]))])
    assert res.token_ids == ref["gen_threshold_tokens"].tolist()
    assert res.exit_steps == (ref["gen_threshold_exit_steps"] + 1).tolist()
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
    assert [r[2] for r in rows] == [f"{e}/4" for e in res.exit_steps]


def test_generate_script_byte_prompt_without_tokenizer():
    ouro_generate = _script()
    res = ouro_generate.generate_ouro(DATA, prompt="Hi, loop!", max_new_tokens=3, stop_at_eos=False)
    assert res.prompt_ids == list(b"Hi, loop!")
    # the config's threshold 1.0: every token reads out the last loop
    assert len(res.token_ids) == 3 and res.exit_steps == [4, 4, 4]
    assert res.text == "".join(res.pieces) or "\ufffd" in res.text


# ---------------------------------------------------------------------------------------- streaming memory

_MEASURE = textwrap.dedent("""
    import resource, sys, jax
    import loopjax as lj
    from flax import nnx
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = lj.load_ouro(sys.argv[1])
    n = lj.count_params(m)
    x = m.core.layers[23].mlp.w_down[...]
    assert str(x.dtype) == "bfloat16" and x.shape == (5632, 2048)
    print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n)
""")


@pytest.mark.slow
def test_streaming_load_of_1_4b_shapes_stays_below_two_copies(tmp_path):
    """A synthetic sharded bf16 checkpoint of Ouro-1.4B's shapes: loading peaks well below 2x its size."""
    cfg = ouro_1_4b(max_seq_len=128)
    specs = weight_specs(cfg)
    block = np.random.default_rng(0).standard_normal(1 << 20).astype(ml_dtypes.bfloat16)
    shape_of = {s.hf_name: s.hf_shape for s in specs}

    def fetch(name):  # cheap, non-constant values: the loader must really read and place them
        n = int(np.prod(shape_of[name]))
        return np.resize(block, n).reshape(shape_of[name])

    hf = dict(read_hf_config(DATA), torch_dtype="bfloat16")
    files = write_checkpoint(str(tmp_path), [(s.hf_name, s.hf_shape, np.dtype(ml_dtypes.bfloat16)) for s in specs],
                             fetch, max_shard_bytes=10**9)
    (tmp_path / "config.json").write_text(json.dumps(hf_ouro_config(cfg, hf)))
    size = sum(os.path.getsize(f) for f in files)
    assert len(files) == 3 and size > 2.7e9
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    base, peak, n_params = map(int, run.stdout.split()[-3:])
    assert n_params * 2 == sum(_data_bytes(f) for f in files)
    # the parameters themselves take `size` bytes; a second copy would push the peak past 2x
    print(f"checkpoint {size / 1e9:.2f} GB, peak RSS above import {(peak - base) / 1e9:.2f} GB "
          f"({(peak - base) / size:.2f}x), absolute peak {peak / 1e9:.2f} GB")
    assert peak - base < 1.25 * size, (peak - base) / size


def _data_bytes(path):
    with safe_open(path, framework="numpy") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) * 2 for k in f.keys())
