"""LoopedConfig validation: every bad field raises ValueError naming the field; presets are right."""

import pytest

import loopjax as lj

BAD_FIELDS = [
    ("vocab_size", 0), ("vocab_size", 1), ("d_model", 0), ("d_model", -8), ("n_heads", 0),
    ("n_kv_heads", 0), ("n_kv_heads", 3), ("head_dim", 7), ("head_dim", 0), ("d_ff", 0),
    ("n_layers", 0), ("n_loops", 0), ("n_loops", -1), ("n_loops", 2.0), ("max_seq_len", 0),
    ("n_prelude", -1), ("n_coda", -1), ("norm_scheme", "post"), ("norm_scheme", "Sandwich"),
    ("step_norm", 1), ("input_injection", "mul"), ("rope_theta", 0.0), ("rms_eps", 0.0), ("rms_eps", -1e-6),
    ("tie_embeddings", "yes"), ("sliding_window", 0), ("sliding_window", -4), ("param_dtype", "float64"),
    ("compute_dtype", "fp16"), ("remat_policy", "dots"), ("scan_unroll", 0), ("exit_gate", None),
    ("init_std", 0.0), ("n_layers", True), ("remat_scope", "block"), ("attention_impl", "flash"),
    ("attention_interpret", 1), ("scan_layers", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_invalid_field_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        lj.LoopedConfig(**{field: value})


def test_heads_must_divide_d_model_without_head_dim():
    with pytest.raises(ValueError, match=r"n_heads=3: must be a divisor of d_model=128"):
        lj.LoopedConfig(d_model=128, n_heads=3)
    assert lj.LoopedConfig(d_model=96, n_heads=3, head_dim=32).d_head == 32


def test_unknown_name_suggests_near_match():
    with pytest.raises(ValueError, match="did you mean 'sandwich'"):
        lj.LoopedConfig(norm_scheme="sandwhich")
    with pytest.raises(ValueError, match="n_loops"):
        lj.tiny().replace(n_loop=3)


def test_presets():
    o14, o26 = lj.ouro_1_4b(), lj.ouro_2_6b()
    for o in (o14, o26):
        assert (o.d_model, o.n_heads, o.kv_heads, o.d_head, o.d_ff, o.vocab_size) == (2048, 16, 16, 128, 5632, 49152)
        assert (o.rope_theta, o.n_loops, o.norm_scheme, o.step_norm, o.tie_embeddings) == (1e6, 4, "sandwich", True, False)
        assert o.exit_gate and o.input_injection == "none"
    assert (o14.n_layers, o26.n_layers) == (24, 48)
    assert lj.tiny().n_loops == 4 and lj.tiny(n_loops=7).n_loops == 7


def test_config_is_frozen():
    cfg = lj.tiny()
    with pytest.raises(Exception):
        cfg.n_loops = 3  # type: ignore[misc]
