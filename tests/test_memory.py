"""Gated memory banks: the read against float64 NumPy, the model against a plain loop that reads the memory
before every core layer at every loop, defaults unchanged, closed-form counts, sharding, checkpoints, cached
generation, the optimizer mask and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import loopjax as lj
from loopjax.config import MeshConfig, TrainConfig
from loopjax.flops import forward_flops
from loopjax.memory import GlobalMemory, LayerMemory
from loopjax.sharding import make_mesh, param_shardings, rules_for, shard_batch, use_rules

MEM = dict(memory_local_slots=6, memory_global_slots=4, memory_gate_bias=0.5)


def _cfg(**kw):
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, n_loops=2, max_seq_len=16,
                init_std=0.2)
    base.update(kw)
    return lj.LoopedConfig(**base)


def _randomise(module, seed):
    """Every memory parameter random (gate weights non-zero, norm scales away from 1), so the test sees each."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if "memory" not in "/".join(map(str, path)) and not isinstance(module, (LayerMemory, GlobalMemory)):
            continue
        x = rng.normal(size=var.shape)
        var[...] = jnp.asarray(1 + 0.2 * x if path[-1] == "scale" else 0.3 * x, var[...].dtype)
    return module


def _model(seed=0, **kw):
    return _randomise(lj.LoopedLM(_cfg(**kw), rngs=nnx.Rngs(seed)), seed + 10)


def _tokens(b=2, s=8, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, 64)


# ----------------------------------------------------------------------------------- float64 NumPy reference
def _np(x):
    return np.asarray(x, np.float64)


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * _np(scale)


def np_memory(mem, glob, h, eps):
    """h + g_L ⊙ (W_L m_L) + g_G ⊙ (W_G m_G), m = softmax(q · norm_k(K)ᵀ / √D) V, q = norm_q(norm(h)), float64."""
    h = _np(h)
    d = h.shape[-1]
    q = _np_rms(_np_rms(h, mem.norm.scale[...], eps), mem.norm_q.scale[...], eps)
    out = h.copy()
    for bank, w, gate in ((mem.local, mem.w_local, mem.gate_local), (glob, mem.w_global, mem.gate_global)):
        if w is None:
            continue
        k = _np_rms(_np(bank.keys[...]), bank.norm_k.scale[...], eps)
        s = q @ k.T / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        m = (p / p.sum(-1, keepdims=True)) @ _np(bank.values[...])
        g = 1 / (1 + np.exp(-(h @ _np(gate.w[...]) + _np(gate.b[...]))))
        out = out + g * (m @ _np(w[...]))
    return out


@pytest.mark.parametrize("banks", [dict(memory_local_slots=7, memory_global_slots=5), dict(memory_local_slots=7),
                                   dict(memory_global_slots=5)])
def test_memory_read_matches_float64_numpy(banks):
    cfg = _cfg(**banks)
    rngs = nnx.Rngs(3)
    mem = _randomise(LayerMemory(cfg, rngs), 4)
    glob = _randomise(GlobalMemory(cfg, rngs), 5) if cfg.memory_global_slots else None
    h = jax.random.normal(jax.random.key(6), (2, 9, cfg.d_model))
    out, gates = mem.inject(h, glob)
    np.testing.assert_allclose(np.asarray(out), np_memory(mem, glob, h, cfg.rms_eps), atol=1e-5, rtol=1e-5)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert np.isnan(gates[0]) == (cfg.memory_local_slots == 0) and np.isnan(gates[1]) == (cfg.memory_global_slots == 0)


@pytest.mark.parametrize("bias", [-3.0, 1.7])
def test_zero_initialised_gates_give_sigmoid_of_the_bias_exactly(bias):
    model = lj.LoopedLM(_cfg(**dict(MEM, memory_gate_bias=bias)), rngs=nnx.Rngs(0))
    mem = model.core.layer_memory[1]
    h = jax.random.normal(jax.random.key(2), (2, 5, 32)) * 3
    want = jax.nn.sigmoid(jnp.float32(bias))
    for gate in (mem.gate_local, mem.gate_global):
        np.testing.assert_array_equal(np.asarray(gate(h, "g")), np.full((2, 5, 32), want))
    graphdef, state = nnx.split(model)
    gates = jax.jit(lambda st: nnx.merge(graphdef, st)(_tokens()).memory_gates)(state)
    assert gates.shape == (2, 2, 2)  # loops, core layers, (local, global)
    np.testing.assert_allclose(np.asarray(gates), np.full((2, 2, 2), want), rtol=1e-4)  # a float32 mean


# ---------------------------------------------------------------------------------- the model with memory
def _jnp_memory(mem, glob, h, eps):
    """The read written out in jnp from the formula (differentiable, float32), for the model-level references."""
    def rms(x, scale):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale[...]

    q = rms(rms(h, mem.norm.scale), mem.norm_q.scale)
    out = h
    for bank, w, gate in ((mem.local, mem.w_local, mem.gate_local), (glob, mem.w_global, mem.gate_global)):
        if w is not None:
            probs = jax.nn.softmax(q @ rms(bank.keys[...], bank.norm_k.scale).T / h.shape[-1] ** 0.5, -1)
            out = out + jax.nn.sigmoid(h @ gate.w[...] + gate.b[...]) * (probs @ bank.values[...] @ w[...])
    return out


def reference_logits(model, tokens_BS, n_loops):
    """A plain Python loop: before every core layer, at every loop, the memory read; then the layer."""
    cfg, core = model.cfg, model.core
    b, s = tokens_BS.shape
    cos, sin, layout = model.rope_and_layout(jnp.broadcast_to(jnp.arange(s), (b, s)))
    h = model.embed[...][tokens_BS]
    for _ in range(n_loops):
        for layer, mem in zip(core.layers, core.layer_memory):
            h = layer(_jnp_memory(mem, core.global_memory, h, cfg.rms_eps), cos, sin, layout)
        if cfg.step_norm:
            h = core.norm(h)
    x = h if cfg.step_norm else core.norm(h)
    return x @ (model.embed[...].T if model.lm_head is None else model.lm_head[...])


def _ce(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def _logits_and_grads(model, fn, tokens):
    """(logits, flat gradients of their CE) of ``fn(model)``, jitted (eager op-by-op dispatch is slow)."""
    graphdef, state = nnx.split(model)

    def run(state):
        def loss(st):
            logits = fn(nnx.merge(graphdef, st))
            return _ce(logits, tokens), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return logits, grads

    logits, grads = jax.jit(run)(state)
    return np.asarray(logits), nnx.to_flat_state(grads)


@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True, remat_scope="layer", n_layers=3),
                                dict(scan_layers=True, remat_scope="both", remat_policy="save_dots"),
                                dict(remat_scope="layer", remat_policy="minimal", norm_scheme="sandwich",
                                     step_norm=True)])
def test_model_equals_python_loop_reading_memory_before_every_layer(kw):
    """Logits and every gradient (banks, projections, gates, norms, layers) equal the plain loop's, under
    scan_layers and each remat scope."""
    model = _model(**MEM, **kw)
    tokens = _tokens()
    logits, g = _logits_and_grads(model, lambda m: m(tokens).logits, tokens)
    ref, r = _logits_and_grads(model, lambda m: reference_logits(m, tokens, 2), tokens)
    np.testing.assert_allclose(logits, ref, atol=2e-5)
    assert [k for k, _ in g] == [k for k, _ in r]
    for (path, a), (_, b) in zip(g, r):
        np.testing.assert_allclose(a[...], b[...], atol=2e-5, rtol=1e-4, err_msg=str(path))
        if path[:2] != ("core", "gate"):  # the exit gate does not feed the logits
            assert float(jnp.abs(b[...]).max()) > 0, path


def test_exit_rule_executors_read_the_memory():
    """The block-loop halting executors (masked while_loop, all loops) run the same steps as the plain call."""
    graphdef, state = nnx.split(_model(**MEM, n_loops=3))
    tokens = _tokens()

    @jax.jit
    def three(state):
        model = nnx.merge(graphdef, state)
        return (model(tokens).logits, model(tokens, exit_rule=lj.FixedExit(3)).logits,
                model(tokens, exit_rule=lj.QExit(1.0), run_all_loops=True).logits)

    plain, adaptive, all_loops = three(state)
    np.testing.assert_allclose(adaptive, plain, atol=1e-6)
    np.testing.assert_allclose(all_loops, plain, atol=1e-6)


def test_defaults_have_no_memory_and_are_the_plain_model():
    """Slots 0: no memory parameters, and the logits are bit for bit a plain loop over the layers."""
    model = lj.LoopedLM(_cfg(), rngs=nnx.Rngs(0))
    assert model.core.layer_memory is None and model.core.global_memory is None
    tokens = _tokens()
    cos, sin, layout = model.rope_and_layout(jnp.broadcast_to(jnp.arange(8), (2, 8)))
    h = model.embed_tokens(tokens)
    for _ in range(2):
        for layer in model.core.layers:
            h = layer(h, cos, sin, layout)
    want = model.head(model.core.norm(h))
    out = model(tokens, use_scan=False)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(want))
    assert out.memory_gates is None
    # the same weights as a config that never heard of memory: memory options add parameters, change none
    with_mem = lj.LoopedLM(_cfg(memory_local_slots=3), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(with_mem.core.layers[1].mlp.w_up[...], model.core.layers[1].mlp.w_up[...])


# ------------------------------------------------------------------------------------- counts
def test_count_params_and_forward_flops_closed_forms():
    cfg = _cfg(**MEM, n_prelude=1, exit_gate=True, tie_embeddings=False)
    v, d, k, f, n_l, s_l, s_g = 64, 32, 2, 64, 2, 6, 4
    h, n, kv = 8, 4, 2
    layer = d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f + 2 * d
    layer_mem = 2 * d + (2 * s_l * d + d) + 2 * (d * d + d * d + d)  # norms, local bank + norm_k, 2 × (W, W_g, b)
    want = 2 * v * d + (1 + k) * layer + d + (d + 1) + k * layer_mem + (2 * s_g * d + d)
    assert lj.count_params(lj.LoopedLM(cfg, rngs=nnx.Rngs(0))) == want

    seq, loops = 8, 3
    layer_fl = 2 * seq * d * (n * h + 2 * kv * h) + 2 * seq * n * h * d + 4 * seq * seq * n * h + 6 * seq * d * f
    mem_fl = seq * (4 * s_l * d + 4 * d * d) + seq * (4 * s_g * d + 4 * d * d)
    want_fl = layer_fl + loops * (k * (layer_fl + mem_fl) + 2 * seq * d) + 2 * seq * d * v
    assert forward_flops(cfg, seq, loops) == want_fl


def test_frey_200m_preset_sizes():
    """The paper's Base (12L/768, untied 50,304 vocab) ~162M, and the memory adds ~48M (banks ~20M)."""
    cfg = lj.config.frey_200m()
    total = lj.count_params(nnx.eval_shape(lambda: lj.LoopedLM(cfg, rngs=nnx.Rngs(0))))
    base = lj.count_params(nnx.eval_shape(lambda: lj.LoopedLM(
        cfg.replace(memory_local_slots=0, memory_global_slots=0), rngs=nnx.Rngs(0))))
    assert 160e6 < base < 165e6
    assert 47.5e6 < total - base < 48.5e6


# ------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw, match", [
    (dict(memory_local_slots=-1), r"memory_local_slots=-1: must be an int >= 0"),
    (dict(memory_global_slots=-2), r"memory_global_slots=-2"),
    (dict(memory_local_slots=1.5), r"memory_local_slots=1.5"),
    (dict(memory_gate_bias=float("nan")), r"memory_gate_bias=nan: must be a finite float"),
    (dict(memory_global_slots=4, n_layers=0), r"n_layers=0: .*memory banks.*need a core"),
])
def test_bad_memory_configs_raise_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


# ------------------------------------------------------------------------------------- training
def test_optimizer_decays_no_bank_gate_bias_or_norm():
    """With zero gradients AdamW's update is −lr·wd·w on decayed parameters and exactly 0 elsewhere."""
    from loopjax.train.optim import make_optimizer

    tx, _ = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5,
                                       schedule="constant", grad_clip=0.0))
    params = nnx.state(_model(**MEM), nnx.Param)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    no_decay = {"keys", "values", "scale", "b"}
    seen = set()
    for (path, u), (_, p) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(params)):
        if not any("memory" in str(k) for k in path):
            continue
        seen.add(path[-1])
        want = 0.0 if path[-1] in no_decay else -0.1 * 0.5 * np.asarray(p[...])
        np.testing.assert_allclose(np.asarray(u[...]), want, rtol=1e-6, atol=0, err_msg=str(path))
    assert seen == {"keys", "values", "scale", "b", "w", "w_local", "w_global"}


def test_sharded_train_step_matches_single_device():
    """Loss and gradients of a memory model on a 2×2×2 fsdp_tp mesh and a 1×8×1 fsdp mesh equal one device's."""
    # slot counts divisible by the 8-way fsdp axis that shards them
    graphdef, host = nnx.split(_model(**dict(MEM, memory_local_slots=8, memory_global_slots=16)))
    tokens = np.asarray(_tokens(b=8, s=8, seed=4))

    def loss_and_grads(state, tokens_BS):
        return jax.value_and_grad(lambda st: _ce(nnx.merge(graphdef, st)(tokens_BS).logits, tokens_BS))(state)

    ref_loss, ref_grads = jax.jit(loss_and_grads)(host, tokens)
    for shape, preset in (((2, 2, 2), "fsdp_tp"), ((1, 8, 1), "fsdp")):
        mesh, rules = make_mesh(MeshConfig(*shape, rules=preset)), rules_for(preset)
        shardings = param_shardings(host, mesh, rules)
        step = jax.jit(loss_and_grads, out_shardings=(NamedSharding(mesh, P()), shardings))
        with use_rules(mesh, rules):
            loss, grads = step(jax.device_put(host, shardings), shard_batch(tokens, mesh, rules))
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
            a, b = np.asarray(g[...], np.float64), np.asarray(r[...], np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-12, path
        keys = shardings["core"]["layer_memory"][0]["local"]["keys"]
        assert keys.spec == P("fsdp", None)


def test_trainer_logs_gates_and_checkpoint_round_trips(tmp_path):
    """Two training steps log a gate value per layer and bank; a new Trainer on the workdir restores the
    memory model's parameters exactly."""
    import json

    import grain

    from loopjax.train import Trainer

    cfg = _cfg(**MEM, n_layers=2, n_loops=1)

    def make(i):
        x = np.random.default_rng(int(i)).integers(0, 64, 9).astype(np.int32)
        return {"inputs": x[:-1], "targets": x[1:]}

    data = grain.MapDataset.range(100).map(make).batch(8).to_iter_dataset()
    tcfg = TrainConfig(steps=2, batch_size=8, seq_len=8, warmup_steps=1, log_every=1, log_loop_losses=False,
                       ckpt_every=0, async_checkpointing=False)
    first = Trainer(cfg, tcfg, train_data=iter(data), workdir=tmp_path, progress=False, tensorboard=False)
    first.fit()
    first.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [r for r in rows if "train/gate_local_layer0" in r]
    assert logged and all(0 < r[f"train/gate_{b}_layer{l}"] < 1 for r in logged for b in ("local", "global")
                          for l in (0, 1))
    saved = jax.device_get(first.state.params)
    again = Trainer(cfg, tcfg, train_data=iter(data), workdir=tmp_path, progress=False, tensorboard=False)
    assert again.resumed_from == 2
    for (path, a), (_, b) in zip(nnx.to_flat_state(jax.device_get(again.state.params)), nnx.to_flat_state(saved)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    assert any(p[1] == "global_memory" for p, _ in nnx.to_flat_state(saved))
    again.close()


# ------------------------------------------------------------------------------------- generation
def test_cached_greedy_generation_equals_no_cache_forward():
    model = _model(**MEM, n_loops=2, n_coda=1)
    prompt = np.asarray(_tokens(b=2, s=4, seed=7))
    out = lj.generate(model, prompt, 5, return_logits=True)
    seq = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
    ref = np.asarray(model(jnp.asarray(seq)).logits)[:, prompt.shape[1] - 1:-1]
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.argmax(-1))


def test_ouro_export_refuses_a_memory_model(tmp_path):
    cfg = lj.ouro_1_4b(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, vocab_size=64,
                       memory_local_slots=4)
    m = nnx.eval_shape(lambda: lj.LoopedLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="memory_local_slots"):
        lj.save_ouro(m, str(tmp_path))


# ------------------------------------------------------------------ memory composed with per-layer loops
LOOP_MEM = dict(MEM, layer_loops=3, layer_loop_scale_init=0.5)


def reference_loop_mem_logits(model, tokens_BS, n_loops):
    """Loop + Mem as a plain Python loop: every iteration of every core layer reads the memory, then runs the
    layer with its residual scale; the layer's output is the stick-breaking expectation over its iterations."""
    cfg, core = model.cfg, model.core
    b, s = tokens_BS.shape
    cos, sin, layout = model.rope_and_layout(jnp.broadcast_to(jnp.arange(s), (b, s)))
    h = model.embed[...][tokens_BS]
    n = cfg.layer_loops
    for _ in range(n_loops):
        for layer, mem, loop in zip(core.layers, core.layer_memory, core.layer_loops):
            scales = jax.nn.softplus(loop.scale_logits[...])
            x, acc, survive = h, 0.0, 1.0
            for t in range(n):
                x = layer(_jnp_memory(mem, core.global_memory, x, cfg.rms_eps), cos, sin, layout, scales[t])
                lam = jax.nn.sigmoid(x @ loop.router_w[...] + loop.router_t[...] * t / (n - 1) + loop.router_b[...])
                p = survive if t == n - 1 else survive * lam
                acc = acc + p[..., None] * x
                survive = survive * (1 - lam)
            h = acc
        if cfg.step_norm:
            h = core.norm(h)
    x = h if cfg.step_norm else core.norm(h)
    return x @ (model.embed[...].T if model.lm_head is None else model.lm_head[...])


@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True, remat_scope="layer", remat_policy="full")])
def test_loop_mem_equals_python_loop_reading_memory_at_every_layer_iteration(kw):
    """Per-layer loops with memory banks: logits and every gradient equal the written-out formulas."""
    model = _model(**LOOP_MEM, **kw)
    tokens = _tokens()
    logits, g = _logits_and_grads(model, lambda m: m(tokens).logits, tokens)
    ref, r = _logits_and_grads(model, lambda m: reference_loop_mem_logits(m, tokens, 2), tokens)
    np.testing.assert_allclose(logits, ref, atol=2e-5)
    assert [k for k, _ in g] == [k for k, _ in r]
    for (path, a), (_, b) in zip(g, r):
        np.testing.assert_allclose(a[...], b[...], atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_loop_mem_gates_start_at_sigmoid_of_the_bias_and_cached_generation_equals_forward():
    model = lj.LoopedLM(_cfg(**LOOP_MEM), rngs=nnx.Rngs(0))  # gate weights zero-initialised
    out = model(_tokens())
    np.testing.assert_allclose(out.memory_gates, jax.nn.sigmoid(0.5), rtol=1e-5)
    assert out.memory_gates.shape == (2, 2, 2) and out.layer_expected_n.shape == (2, 8, 2)
    adaptive = model(_tokens(), layer_exit_threshold=0.5)
    np.testing.assert_allclose(adaptive.memory_gates, jax.nn.sigmoid(0.5), rtol=1e-5)
    model = _model(**LOOP_MEM, n_loops=2)
    prompt = np.asarray(_tokens(b=2, s=4, seed=7))
    gen = lj.generate(model, prompt, 4, return_logits=True)
    seq = np.concatenate([prompt, np.asarray(gen.tokens)], axis=1)
    ref = np.asarray(model(jnp.asarray(seq)).logits)[:, prompt.shape[1] - 1:-1]
    np.testing.assert_allclose(np.asarray(gen.logits), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(gen.tokens), ref.argmax(-1))
