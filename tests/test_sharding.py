"""Sharding: meshes, the rule table, sharded creation, and one train step on several meshes vs one device."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import loopjax as lj
from loopjax.config import MeshConfig
from loopjax.sharding import _slice_grid  # noqa: F401  (the multi-slice layout, tested with fake devices)
from loopjax.sharding import (LogicalRules, abstract_sharded, batch_sharding, create_sharded, init_distributed, logical_to_spec, make_mesh,
                              param_shardings, process_batch_rows, rules_for, shard_batch, use_rules,
                              with_logical_constraint)

# Every parameter kind of the core (prelude/coda layers are the same DecoderLayer): concat adapter, sandwich
# norms, gate, untied head; GQA with 2 KV heads. init_std 0.1 makes the loops' CEs differ enough that the gate's
# gradient (∝ CE_1 − CE_2) is not dominated by float32 cancellation.
CFG = lj.LoopedConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=2,
                      max_seq_len=16, input_injection="concat", tie_embeddings=False, norm_scheme="sandwich",
                      step_norm=True, init_std=0.1)
BATCH, SEQ = 8, 16


def is_var(x):
    return isinstance(x, nnx.Variable)


def build_model(cfg=CFG):
    return lambda: lj.LoopedLM(cfg, rngs=nnx.Rngs(0))


def expected_loss(model, tokens_BS):
    """Ouro's expected per-step CE: Σ_t p_t · CE_t, so the head runs at every loop and the gate gets gradients."""
    out = model(tokens_BS, return_steps=True)
    logp_TBSV = jax.nn.log_softmax(out.step_logits[:, :, :-1])
    ce_TBS = -jnp.take_along_axis(logp_TBSV, tokens_BS[None, :, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jnp.sum(out.exit_pdf[:, :-1] * jnp.moveaxis(ce_TBS, 0, -1), axis=-1))


def loss_and_grads(graphdef, state, tokens_BS):
    return jax.value_and_grad(lambda st: expected_loss(nnx.merge(graphdef, st), tokens_BS))(state)


def leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)


@pytest.fixture(scope="module")
def reference(tokens):
    """Parameters of an eager build, and the loss and grads on one device with no mesh and no rules."""
    graphdef, state = nnx.split(lj.LoopedLM(CFG, rngs=nnx.Rngs(0)))
    loss, grads = jax.jit(loss_and_grads, static_argnums=0)(graphdef, state, tokens)
    return jax.device_get(state), float(loss), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_one_step_loss_and_grads_match_single_device(shape, tokens, reference):
    host, ref_loss, ref_grads = reference
    mesh = make_mesh(MeshConfig(*shape, rules="fsdp_tp"))
    rules = rules_for("fsdp_tp")
    graphdef = nnx.graphdef(lj.LoopedLM(CFG, rngs=nnx.Rngs(0)))
    shardings = param_shardings(host, mesh, rules)
    state = jax.device_put(host, shardings)
    step = jax.jit(loss_and_grads, static_argnums=0, out_shardings=(NamedSharding(mesh, P()), shardings))
    with use_rules(mesh, rules):
        loss, grads = step(graphdef, state, shard_batch(tokens, mesh, rules))
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    pairs = zip(leaves_with_paths(grads), leaves_with_paths(ref_grads), jax.tree.leaves(shardings), strict=True)
    for (path, g), (_, r), sharding in pairs:
        g_arr, r_arr = np.asarray(g[...], np.float64), np.asarray(r[...], np.float64)
        # relative L2 error per parameter: sharded reductions only reorder float32 sums
        assert np.linalg.norm(g_arr - r_arr) <= 1e-5 * np.linalg.norm(r_arr), path_key(path)
        assert g[...].sharding.is_equivalent_to(sharding, g_arr.ndim), path_key(path)


# Hand-written expectations under fsdp_tp (independent of the rule table's code path).
FSDP_TP_SPECS = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "core/layers/0/attn/wq": P("fsdp", "tensor", None),
    "core/layers/0/attn/wk": P("fsdp", "tensor", None),
    "core/layers/0/attn/wo": P("tensor", None, "fsdp"),
    "core/layers/0/mlp/w_gate": P("fsdp", "tensor"),
    "core/layers/0/mlp/w_down": P("tensor", "fsdp"),
    "core/layers/0/norm_in2/scale": P(None),
    "core/adapter": P("tensor", "fsdp"),
    "core/gate/w": P("fsdp"),
    "core/gate/b": P(),
}


def path_key(path):
    return "/".join(str(getattr(k, "key", k)) for k in path)


def test_created_params_and_optimizer_state_follow_rules(reference):
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"))
    rules = rules_for("fsdp_tp")

    def build():
        model = lj.LoopedLM(CFG, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    model, opt = create_sharded(build, mesh, rules)
    params = leaves_with_paths(nnx.state(model))
    eager = leaves_with_paths(reference[0])
    assert {path_key(p) for p, _ in params} >= set(FSDP_TP_SPECS)
    for (path, v), (_, e) in zip(params, eager, strict=True):
        arr, axes = v[...], v.get_metadata()["logical_axes"]
        want = FSDP_TP_SPECS.get(path_key(path), logical_to_spec(axes, rules, mesh))
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, want), arr.ndim), (path_key(path), arr.sharding)
        assert arr.addressable_shards[0].data.shape == arr.sharding.shard_shape(arr.shape)
        np.testing.assert_allclose(np.asarray(arr), np.asarray(e[...]), rtol=0, atol=1e-7)
    opt_vars = leaves_with_paths(nnx.state(opt))
    # AdamW's mu and nu per parameter carry its logical axes; the step counts have none
    assert sum(v.get_metadata().get("logical_axes") is not None for _, v in opt_vars) == 2 * len(params)
    for path, v in opt_vars:
        axes = v.get_metadata().get("logical_axes")
        want = P() if axes is None else logical_to_spec(axes, rules, mesh)
        assert v[...].sharding.is_equivalent_to(NamedSharding(mesh, want), v[...].ndim), path_key(path)


@pytest.mark.parametrize("preset,shape", [("dp", (8, 1, 1)), ("fsdp", (2, 4, 1)), ("fsdp_tp", (2, 2, 2))])
def test_param_shardings_of_abstract_state_follow_presets(preset, shape):
    mesh = make_mesh(MeshConfig(*shape, rules=preset))
    shardings = param_shardings(nnx.eval_shape(build_model()), mesh, rules_for(preset))
    got = {path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    for key, spec in FSDP_TP_SPECS.items():
        keep = {"dp": (), "fsdp": ("fsdp",), "fsdp_tp": ("fsdp", "tensor")}[preset]
        want = P(*[a if a in keep else None for a in spec])
        assert got[key].is_equivalent_to(NamedSharding(mesh, want), len(spec) or 1), (key, got[key])
    assert all(s.is_fully_replicated for k, s in got.items() if k.endswith("scale"))


def test_rule_naming_missing_mesh_axis_raises():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    rules = rules_for("fsdp_tp").replace(mlp="expert")
    with pytest.raises(ValueError, match=r"'mlp' maps to mesh axis 'expert'.*mesh axes: \('data', 'fsdp', 'tensor'\)"):
        param_shardings(nnx.eval_shape(build_model()), mesh, rules)


def test_mesh_axis_used_twice_raises():
    rules = LogicalRules.of(embed="fsdp", mlp=("tensor", "fsdp"))
    with pytest.raises(ValueError, match=r"'embed' and 'mlp'.*both map to mesh axis 'fsdp'"):
        logical_to_spec(("embed", "mlp"), rules)


def test_merged_dimension_takes_every_logical_name_mesh_axes_in_order():
    rules = LogicalRules.of(activation_batch=("data", "fsdp"), activation_kv_heads="tensor", embed="fsdp")
    spec = logical_to_spec((("activation_batch", "activation_kv_heads"), None), rules)
    assert spec == P(("data", "fsdp", "tensor"), None)
    with pytest.raises(ValueError, match=r"both map to mesh axis 'fsdp'"):
        logical_to_spec((("activation_batch", "activation_kv_heads"), "embed"), rules)


def test_non_divisible_dimension_raises_naming_the_parameter():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, rules="fsdp"))
    cfg = CFG.replace(d_model=36, n_heads=4, head_dim=8)  # 36 % 8 != 0
    with pytest.raises(ValueError, match=r"^[\w/]+: dimension \d \('embed'\) of shape .* has size 36, "
                                         r"not divisible by mesh axes \('fsdp',\) of total size 8"):
        create_sharded(build_model(cfg), mesh, rules_for("fsdp"))


def test_make_mesh_fills_axis_and_uses_auto_axis_types():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2, rules="fsdp_tp"))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert make_mesh(MeshConfig()).shape["data"] == 8
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, rules="fsdp"))
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        make_mesh(MeshConfig(data=-1, fsdp=3, rules="fsdp"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=-1, fsdp=-1, rules="fsdp"), "fsdp=-1: must be a size >= 1: only one axis may be -1"),
    (dict(data=0), "data=0: must be an int >= 1, or -1"),
    (dict(rules="fsdp-tp"), "rules='fsdp-tp': must be one of .*did you mean 'fsdp_tp'"),
    (dict(fsdp=2), "fsdp=2: must be 1 under rules='dp'"),
    (dict(tensor=2, rules="fsdp"), "tensor=2: must be 1 under rules='fsdp'"),
])
def test_mesh_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**kwargs)


def test_multislice_devices_get_hybrid_layout_along_data():
    fake = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, platform="cpu",
                                  device_kind="cpu", coords=None) for i in range(8)]
    grid = _slice_grid(MeshConfig(data=-1, fsdp=2, rules="fsdp").axis_sizes(8), fake)
    assert grid.shape == (4, 2, 1)
    # each slice owns one contiguous half of the data axis; inside a slice the fsdp axis stays on-slice
    assert {d.slice_index for d in grid[:2].ravel()} == {0} and {d.slice_index for d in grid[2:].ravel()} == {1}
    with pytest.raises(ValueError, match="data=1: must be a multiple of the 2 slices"):
        _slice_grid(MeshConfig(data=1, fsdp=-1, rules="fsdp").axis_sizes(8), fake)
    assert _slice_grid((8, 1, 1), jax.devices()) is None


def test_logical_constraint_is_noop_without_rules_and_constrains_inside():
    x = jax.random.normal(jax.random.key(0), (8, 4, 16))
    axes = ("activation_batch", "activation_length", "activation_mlp")
    assert with_logical_constraint(x, axes) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    with use_rules(mesh, rules_for("fsdp_tp")):
        y = jax.jit(lambda a: with_logical_constraint(a * 2, axes))(x)
        # batch 1 is not divisible by data x fsdp = 4: that axis is dropped, the rest still applies
        z = jax.jit(lambda a: with_logical_constraint(a * 2, axes))(x[:1])
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tensor")), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_model_activation_constraints_appear_only_under_rules(tokens):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    graphdef, state = nnx.split(lj.LoopedLM(CFG, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)
    plain = fwd.lower(state, tokens).as_text()
    with use_rules(mesh, rules_for("fsdp_tp")):
        ruled = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits).lower(state, tokens).as_text()
    assert plain.count("sharding_constraint") == 0
    # embed output + one per core layer + logits, at least
    assert ruled.count("sharding_constraint") >= 3


def test_batch_sharding_and_process_rows():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    rules = rules_for("fsdp_tp")
    assert batch_sharding(mesh, rules).spec == P(("data", "fsdp"), None)
    assert process_batch_rows(mesh, rules, 8) == slice(0, 8)  # one process holds every row
    local = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
    arr = shard_batch(local, mesh, rules)
    assert arr.shape == (8, 4) and len({str(s.index) for s in arr.addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(arr), local)


def test_abstract_sharded_gives_restore_targets_with_rule_shardings():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, rules="fsdp"))
    graphdef, target, shardings = abstract_sharded(build_model(), mesh, rules_for("fsdp"))
    for (path, v), s in zip(leaves_with_paths(target), jax.tree.leaves(shardings), strict=True):
        assert isinstance(v.get_value(), jax.ShapeDtypeStruct) and v.get_value().sharding == s, path_key(path)
    assert target["embed"].get_value().sharding.spec == P(None, "fsdp")
    assert target["embed"].get_value().shape == (CFG.vocab_size, CFG.d_model)


def test_init_distributed_single_process_is_a_noop_and_bad_env_raises(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() is False and not jax.distributed.is_initialized()
    assert init_distributed(num_processes=1) is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        init_distributed()
    assert not jax.distributed.is_initialized()
