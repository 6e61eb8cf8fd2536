"""Generation: cached decoding vs full recompute and vs a float64 NumPy reference of each KV mode, padding,
sampling, stopping, compile buckets, error cases."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.generate import KVCache, Sampling, decode_step, generate, prefill
from loopjax.generate.cache import stacked
from loopjax.generate.loop import _generate_jit

_CONFIGS = {
    "pre": dict(),
    "sandwich": dict(norm_scheme="sandwich", step_norm=True),
    "prelude_coda_concat": dict(n_prelude=1, n_coda=1, input_injection="concat", norm_scheme="sandwich"),
    "add_window": dict(input_injection="add", n_coda=1, sliding_window=4),
}


def _model(seed=0, **overrides):
    base = dict(vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, n_loops=3, max_seq_len=64,
                init_std=0.2)
    base.update(overrides)
    return lj.LoopedLM(lj.LoopedConfig(**base), rngs=nnx.Rngs(seed))


def _prompt(b, s, seed=1, vocab=128):
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, s), 0, vocab), np.int32)


def _full_logits(model, tokens_BS, **kw):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, **kw).logits)
    return np.asarray(fn(state, jnp.asarray(tokens_BS)))


# ---------------------------------------------------------------- float64 NumPy reference of cached generation
class _NpModel:
    """The looped LM in float64 NumPy, one token at a time, with an explicit per-position KV store."""

    def __init__(self, model):
        self.cfg = model.cfg
        self.p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def norm(self, scale, x):
        return x / np.sqrt(np.mean(x * x) + self.cfg.rms_eps) * scale["scale"]

    def rope(self, x_KH, pos):
        h = x_KH.shape[-1]
        ang = pos / self.cfg.rope_theta ** (np.arange(0, h, 2) / h)
        cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
        return x_KH * cos + np.concatenate([-x_KH[:, h // 2:], x_KH[:, :h // 2]], -1) * sin

    def layer(self, lp, x, pos, past):
        """One decoder layer for one token; ``past`` lists (pos, k, v) of visible earlier tokens.
        Returns (output, own k, own v)."""
        a = lp["attn"]
        xn = self.norm(lp["norm_in"], x)
        q = self.rope(np.einsum("d,dnh->nh", xn, a["wq"]), pos)
        k = self.rope(np.einsum("d,dkh->kh", xn, a["wk"]), pos)
        v = np.einsum("d,dkh->kh", xn, a["wv"])
        w = self.cfg.sliding_window
        keys = [(pk, pv) for pp, pk, pv in past if w is None or pos - pp < w] + [(k, v)]
        ks, vs = np.stack([kk for kk, _ in keys]), np.stack([vv for _, vv in keys])  # [J, K, H]
        g = q.shape[0] // ks.shape[1]
        ks, vs = np.repeat(ks, g, axis=1), np.repeat(vs, g, axis=1)
        sc = np.einsum("nh,jnh->nj", q, ks) / np.sqrt(q.shape[-1])
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("nhd,nh->d", a["wo"], np.einsum("nj,jnh->nh", pr, vs))
        if "norm_in2" in lp:
            o = self.norm(lp["norm_in2"], o)
        x = x + o
        m = lp["mlp"]
        xn = self.norm(lp["norm_post"], x)
        gate = xn @ m["w_gate"]
        y = (gate / (1 + np.exp(-gate)) * (xn @ m["w_up"])) @ m["w_down"]
        if "norm_post2" in lp:
            y = self.norm(lp["norm_post2"], y)
        return x + y, k, v

    def run(self, tokens, n_prompt, computed, readout, kv_mode):
        """Logits [len, V] and gate logits [len, T] of every position of ``tokens`` (one row, no padding).

        computed[i]: loop steps position i ran; readout[i]: the step its state is read out from. Keys of an
        earlier position j at step t: step min(t, computed[j]) ("per_step"/"compute_all"), or its deepest step
        when either token was generated ("last_step"; the prompt attends to itself per step, as prefill does).
        """
        cfg, p = self.cfg, self.p
        n_loops = max(computed)
        kv = []  # per position: dict of (kind, step, layer) -> (k, v)
        logits, gates = [], []
        for i, tok in enumerate(tokens):
            mine = {}

            def past(kind, t, l):
                out = []
                for j in range(i):
                    if kind != "core":
                        tj = 0
                    elif kv_mode == "last_step" and not (i < n_prompt and j < n_prompt):
                        tj = computed[j]
                    else:
                        tj = min(t, computed[j])
                    out.append((j, *kv[j][kind, tj, l]))
                return out

            e = p["embed"][tok]
            for l, lp in enumerate(p.get("prelude", {}).values()):
                e, k, v = self.layer(lp, e, i, past("pre", 0, l))
                mine["pre", 0, l] = (k, v)
            h = np.zeros_like(e) if cfg.input_injection != "none" else e
            outs, g = [], np.zeros(n_loops)
            for t in range(1, computed[i] + 1):
                c = p["core"]
                x = {"none": h, "add": h + e}.get(cfg.input_injection)
                if x is None:
                    x = np.concatenate([h, e]) @ c["adapter"]
                for l, lp in enumerate(c["layers"].values()):
                    x, k, v = self.layer(lp, x, i, past("core", t, l))
                    mine["core", t, l] = (k, v)
                out = self.norm(c["norm"], x)
                h = out if cfg.step_norm else x
                outs.append(out)
                if "gate" in c:
                    g[t - 1] = out @ c["gate"]["w"] + c["gate"]["b"]
            x = outs[readout[i] - 1]
            for l, lp in enumerate(p.get("coda", {}).values()):
                x, k, v = self.layer(lp, x, i, past("coda", 0, l))
                mine["coda", 0, l] = (k, v)
            if "coda_norm" in p:
                x = self.norm(p["coda_norm"], x)
            head = p["embed"].T if "lm_head" not in p else p["lm_head"]
            logits.append(x @ head)
            gates.append(g)
            kv.append(mine)
        return np.stack(logits), np.stack(gates)


# ---------------------------------------------------------------- cached decoding is exact
@pytest.mark.parametrize("name", list(_CONFIGS))
def test_cached_decoding_equals_full_recompute(name):
    """per_step and compute_all with fixed loops: every new token's logits equal a no-cache forward of the
    sequence so far (one causal forward of the whole generated sequence), to 1e-5."""
    model = _model(**_CONFIGS[name])
    prompt, n_new = _prompt(2, 5), 6
    for kv_mode in ("per_step", "compute_all") if name == "prelude_coda_concat" else ("per_step",):
        out = generate(model, prompt, n_new, kv_mode=kv_mode, return_logits=True)
        assert out.tokens.shape == (2, n_new) and out.logits.shape == (2, n_new, 128)
        seq = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
        ref = _full_logits(model, seq)[:, prompt.shape[1] - 1:-1]
        np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(out.tokens), ref.argmax(-1))
        np.testing.assert_array_equal(np.asarray(out.exit_steps), 3)
        np.testing.assert_array_equal(np.asarray(out.n_iterations), 3)


@pytest.mark.parametrize("name", ["prelude_coda_concat", "add_window"])
def test_kv_modes_match_float64_reference(name):
    """Each KV mode against the per-token float64 NumPy reference with its documented KV rule."""
    model = _model(**_CONFIGS[name])
    npm = _NpModel(model)
    prompt, n_new = _prompt(1, 5, seed=3), 5
    for kv_mode in ("per_step", "last_step"):
        out = generate(model, prompt, n_new, kv_mode=kv_mode, return_logits=True)
        toks = list(prompt[0]) + list(np.asarray(out.tokens[0]))
        n = len(toks) - 1
        ref, _ = npm.run(toks[:n], 5, [3] * n, [3] * n, kv_mode)
        np.testing.assert_allclose(np.asarray(out.logits[0]), ref[4:], atol=1e-4, rtol=0)  # float32 vs float64; amplified through loops


# ---------------------------------------------------------------- batching, sampling, stopping
def test_left_padded_rows_equal_unpadded_rows():
    """A left-padded batch (positions from the mask) generates what each row generates alone."""
    model = _model(**_CONFIGS["prelude_coda_concat"])
    a, b = _prompt(1, 6, seed=4)[0], _prompt(1, 3, seed=5)[0]
    batch = np.stack([a, np.concatenate([np.full(3, 7, np.int32), b])])
    mask = np.array([[1] * 6, [0] * 3 + [1] * 3])
    out = generate(model, batch, 5, attention_mask=mask, return_logits=True)
    for row, p in enumerate([a, b]):
        alone = generate(model, p[None], 5, return_logits=True)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), np.asarray(alone.tokens[0]))
        np.testing.assert_allclose(np.asarray(out.logits[row]), np.asarray(alone.logits[0]), atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_filtered():
    """Same seed, same tokens; another seed, other tokens; top-k/top-p sample inside their sets."""
    model = _model()
    prompt = _prompt(2, 4, seed=6)
    s = Sampling(temperature=3.0)  # flatter logits, so sampling really varies
    one, same, other = (generate(model, prompt, 8, sampling=s, seed=k, return_logits=True) for k in (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(same.tokens))
    assert (np.asarray(one.tokens) != np.asarray(other.tokens)).any()
    for samp, inside in ((Sampling(temperature=3.0, top_k=3), lambda rank, before: rank < 3),
                         (Sampling(temperature=3.0, top_p=0.3), lambda rank, before: before < 0.3)):
        out = generate(model, prompt, 8, sampling=samp, seed=3, return_logits=True)
        logits = np.asarray(out.logits, np.float64) / samp.temperature
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        p_tok = np.take_along_axis(probs, np.asarray(out.tokens)[..., None], -1)
        rank = (probs > p_tok).sum(-1)
        before = np.where(probs > p_tok, probs, 0).sum(-1)  # mass of strictly more likely tokens
        assert inside(rank, before).all(), samp
        assert rank.max() > 0, samp  # it did sample, not just take the argmax


def test_top_k_one_equals_greedy():
    model = _model()
    prompt = _prompt(2, 5, seed=7)
    greedy = generate(model, prompt, 6, return_logits=True)
    for s in (Sampling(temperature=0.7, top_k=1), Sampling(temperature=1.3, top_p=1e-6)):
        sampled = generate(model, prompt, 6, sampling=s, seed=9, return_logits=True)
        np.testing.assert_array_equal(np.asarray(sampled.tokens),
                                      np.asarray(greedy.tokens))


def test_per_row_stop_and_early_return():
    """A row ends at its first stop token (kept), then emits padding; the loop stops once all rows stopped."""
    model = _model()
    prompt = _prompt(2, 5, seed=8)
    free = np.asarray(generate(model, prompt, 8, return_logits=True).tokens)
    stop = int(free[0, 2])
    out = generate(model, prompt, 8, stop_tokens=[stop], pad_token_id=-1, return_logits=True)
    for row in range(2):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if hits.size else 8
        assert int(out.lengths[row]) == n
        np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), free[row, :n])
        np.testing.assert_array_equal(np.asarray(out.tokens[row, n:]), -1)
        np.testing.assert_array_equal(np.asarray(out.exit_steps[row, n:]), 0)
    everyone = np.unique(free[:, 0])
    early = generate(model, prompt, 8, stop_tokens=everyone.tolist(), return_logits=True)
    np.testing.assert_array_equal(np.asarray(early.lengths), 1)
    np.testing.assert_array_equal(np.asarray(early.n_iterations), [3] + [0] * 7)


def test_compiles_once_per_shape_bucket():
    """Prompt lengths and token counts inside one bucket reuse the compiled generate loop."""
    model = _model()
    generate(model, _prompt(2, 5), 5, return_logits=True)
    before = _generate_jit._cache_size()
    generate(model, _prompt(2, 7, seed=2), 6, return_logits=True)
    assert _generate_jit._cache_size() == before
    generate(model, _prompt(2, 3, seed=3), 8, sampling=Sampling(temperature=2.0, top_k=5), return_logits=True)
    sampling_variant = _generate_jit._cache_size()  # sampling compiles once, whatever its settings
    generate(model, _prompt(2, 3, seed=3), 8, sampling=Sampling(temperature=0.5, top_p=0.9), return_logits=True)
    assert _generate_jit._cache_size() == sampling_variant


def test_prefill_and_decode_step_drive_decoding_by_hand():
    """The jitted prefill/decode_step give the same tokens and logits as generate; the cache lays out slot t*k+l."""
    model = _model()
    prompt = _prompt(2, 5, seed=10)
    ref = generate(model, prompt, 4, return_logits=True)
    cache, out = prefill(model, prompt, capacity=16)
    assert isinstance(cache, KVCache) and len(cache.core_k) == 3 * 2
    assert cache.core_k[0].shape == (2 * 2, 16, 8)  # N slots of [B*K, C, H]
    logits = [out.logits_BV]
    for _ in range(3):
        cache, out = decode_step(model, cache, jnp.argmax(logits[-1], -1))
        logits.append(out.logits_BV)
    np.testing.assert_allclose(np.stack(logits, 1), np.asarray(ref.logits), atol=1e-5, rtol=0)
    assert int(cache.length) == 8 and np.asarray(cache.valid_BC[:, :8]).all() and not np.asarray(cache.valid_BC[:, 8:]).any()
    # slot t*k + l holds step t, layer l: the prompt's step-1 layer-0 keys are layer 0's keys of the embedding
    layer = model.core.layers[0]
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cos, sin = lj.layers.rope_cos_sin(pos, 8, model.cfg.rope_theta)
    _, k, _ = layer.attn.project(layer.norm_in(model.embed_tokens(jnp.asarray(prompt))), cos, sin)
    np.testing.assert_allclose(np.asarray(stacked(cache.core_k, 2)[0, :, :, :5]), np.asarray(k).transpose(0, 2, 1, 3),
                               atol=1e-6)


def test_last_step_cache_is_one_step_deep():
    model = _model()
    cache, _ = prefill(model, _prompt(1, 4), capacity=8, kv_mode="last_step")
    full, _ = prefill(model, _prompt(1, 4), capacity=8, kv_mode="per_step")
    assert len(cache.core_k) == 2 and len(full.core_k) == 6
    last = stacked(full.core_k[4:], 1)  # the per-step cache's last step
    np.testing.assert_array_equal(np.asarray(stacked(cache.core_k, 1)), np.asarray(last))


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    model = _model()
    prompt = _prompt(2, 5)
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(prompt_BS=np.zeros((2, 0), np.int32)), "empty"),
        (dict(prompt_BS=_prompt(1, 60)), "exceeds the cache"),
        (dict(cache_len=8), "exceeds the cache"),
        (dict(kv_mode="per-step"), "did you mean 'per_step'"),
        (dict(attention_mask=np.array([[1, 1, 0, 1, 1], [1] * 5])), "left-padded"),
        (dict(attention_mask=np.array([[0] * 5, [1] * 5])), "no tokens"),
        (dict(stop_tokens=[500]), "stop_tokens"),
        (dict(sampling="nucleus"), "sampling="),
        (dict(n_loops=0), "n_loops=0"),
    ]
    for kw, msg in cases:
        args = dict(prompt_BS=prompt, max_new_tokens=6)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            generate(model, args.pop("prompt_BS"), args.pop("max_new_tokens"), **args)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="cache is full"):
        cache, out = prefill(model, prompt, capacity=5)
        decode_step(model, cache, jnp.argmax(out.logits_BV, -1))


# ---------------------------------------------------------------- exit rules
def _exit_model():
    return _model(**_CONFIGS["prelude_coda_concat"])


def test_compute_all_with_exit_rule_equals_run_all_loops_forward():
    """compute_all: every token runs all loops and the rule picks the read-out loop, so each new token's logits and
    exit step equal those of ``model(seq, exit_rule=..., run_all_loops=True)`` without a cache."""
    model = _exit_model()
    prompt = _prompt(2, 5, seed=11)
    for rule in (lj.QExit(0.6), lj.ACTExit(0.3)):
        out = generate(model, prompt, 6, kv_mode="compute_all", exit_rule=rule, return_logits=True)
        seq = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
        graphdef, state = nnx.split(model)
        full = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, exit_rule=rule, run_all_loops=True))(state, seq)
        sl = slice(prompt.shape[1] - 1, -1)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full.logits[:, sl]), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(out.exit_steps), np.asarray(full.exit_step[:, sl]))
        assert len(np.unique(np.asarray(out.exit_steps))) > 1, rule  # the rule really varies the depth
        np.testing.assert_array_equal(np.asarray(out.n_iterations), 3)


@pytest.mark.parametrize("kv_mode", ["per_step", "last_step"])
def test_early_exit_decoding_matches_float64_reference(kv_mode):
    """per_step / last_step with QExit: a new token runs only up to its exit loop, skipped loops read the deepest
    available KV; logits match the per-token float64 reference given the same exits, each exit is where the
    reference's exit CDF first reaches q, and the batch runs max(exit) iterations per token."""
    model, rule = _exit_model(), lj.QExit(0.6)
    npm = _NpModel(model)
    prompt = _prompt(2, 5, seed=11)
    out = generate(model, prompt, 6, kv_mode=kv_mode, exit_rule=rule, return_logits=True)
    exits = np.asarray(out.exit_steps)
    graphdef, state = nnx.split(model)
    prompt_exits = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, exit_rule=rule, run_all_loops=True)
                                      .exit_step)(state, prompt))
    np.testing.assert_array_equal(np.asarray(out.n_iterations)[1:], exits[:, 1:].max(0))
    assert (exits[:, 1:] < 3).any()  # some tokens really skipped loops
    for row in range(2):
        toks = list(prompt[row]) + list(np.asarray(out.tokens[row]))[:-1]
        # exit_steps[:, i] belongs to the position that produced token i: the last prompt token for i = 0
        assert prompt_exits[row, -1] == exits[row, 0]
        computed = [3] * 5 + list(exits[row, 1:])
        readout = list(prompt_exits[row]) + list(exits[row, 1:])
        ref, gates = npm.run(toks, 5, computed, readout, kv_mode)
        np.testing.assert_allclose(np.asarray(out.logits[row]), ref[4:], atol=1e-4, rtol=0)
        for i, e in enumerate(exits[row]):  # the rule as the reference's gates see it
            lam = 1 / (1 + np.exp(-gates[4 + i, :e]))
            cdf = 1 - np.cumprod(1 - lam)
            assert e == 3 or cdf[e - 1] >= 0.6 - 1e-5
            assert (cdf[:e - 1] < 0.6 + 1e-5).all()


def test_skipped_steps_hold_the_deepest_kv():
    """per_step: after a decode step where every row exits at loop 1, the slots of loops 2..T at that position hold
    its loop-1 keys and values, and only one loop iteration ran."""
    model, rule = _model(), lj.FixedExit(1)
    prompt = _prompt(2, 5, seed=12)
    cache, out = prefill(model, prompt, capacity=8, exit_rule=rule)
    np.testing.assert_array_equal(np.asarray(out.exit_step_B), 1)
    cache, out = decode_step(model, cache, jnp.argmax(out.logits_BV, -1), exit_rule=rule)
    assert int(out.n_iterations) == 1
    k = np.asarray(stacked(cache.core_k, 2)).reshape(3, 2, 2, 2, 8, 8)  # [T, k, B, K, C, H]
    for t in (1, 2):
        np.testing.assert_array_equal(k[t, :, :, :, 5], k[0, :, :, :, 5])
        assert np.abs(k[t, :, :, :, :5] - k[0, :, :, :, :5]).max() > 1e-3  # prompt tokens ran every loop


def test_sharded_generation_matches_single_device():
    """Under ``use_rules`` the cache is sharded over batch rows (data) and kv heads (tensor); tokens and logits are
    those of the unsharded run."""
    from jax.sharding import AxisType
    from loopjax.partitioning import use_rules
    from loopjax.sharding import rules_for

    model = _model()
    prompt = _prompt(2, 5, seed=13)
    ref = generate(model, prompt, 6, return_logits=True)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with use_rules(mesh, rules_for("fsdp_tp")):
        out = generate(model, prompt, 6, return_logits=True)
        cache, _ = prefill(model, prompt, capacity=16)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    spec = cache.core_k[0].sharding.spec
    assert (tuple(spec) + (None,) * 3)[:2] == (("data", "tensor"), None), spec  # one slot [B*K, C, H]


def test_generate_text_bytes_round_trip():
    """Without a tokenizer text is UTF-8 bytes; the per-token pieces and exit steps line up with the tokens."""
    model = _model(vocab_size=256)
    res = lj.generate_text(model, "héllo", max_new_tokens=5, exit_rule=lj.QExit(0.6))
    direct = generate(model, np.asarray([list("héllo".encode())], np.int32), 5, exit_rule=lj.QExit(0.6))
    assert res.token_ids == [int(t) for t in np.asarray(direct.tokens[0])]
    assert res.exit_steps == [int(e) for e in np.asarray(direct.exit_steps[0])]
    assert len(res.token_texts) == 5 and not res.stopped
    stop = res.token_ids[1]
    cut = lj.generate_text(model, "héllo", max_new_tokens=5, stop_tokens=[stop], exit_rule=lj.QExit(0.6))
    first = res.token_ids.index(stop)
    assert cut.stopped and cut.token_ids == res.token_ids[:first + 1]
    assert cut.text == bytes(res.token_ids[:first]).decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="at least 256"):
        lj.generate_text(_model(), "hi")


# ---------------------------------------------------------------- Ouro reference parity
_OURO_DIR = Path(__file__).parent / "data" / "ouro"


def test_ouro_reference_prefill_kv_and_greedy_generation():
    """compute_all reproduces the reference: prefill KV per (step, layer) slot, greedy tokens with all loops and
    with threshold 0.5, and the per-token exit steps (stored 0-based in the reference)."""
    ref = np.load(_OURO_DIR / "reference.npz")
    model = lj.load_ouro(str(_OURO_DIR))
    cache, _ = prefill(model, ref["input_ids"].astype(np.int32), capacity=16, kv_mode="compute_all")
    b = ref["input_ids"].shape[0]
    np.testing.assert_allclose(np.asarray(stacked(cache.core_k, b)), ref["prefill_kv_keys"], atol=1e-5)  # HF's
    np.testing.assert_allclose(np.asarray(stacked(cache.core_v, b)), ref["prefill_kv_values"], atol=1e-5)
    prompt = ref["gen_prompt"][None].astype(np.int32)
    fixed = generate(model, prompt, 8, kv_mode="compute_all")
    np.testing.assert_array_equal(np.asarray(fixed.tokens[0]), ref["gen_fixed_tokens"])
    np.testing.assert_array_equal(np.asarray(fixed.exit_steps[0]) - 1, ref["gen_fixed_exit_steps"])
    thr = generate(model, prompt, 8, kv_mode="compute_all", exit_rule=lj.QExit(float(ref["threshold"])))
    np.testing.assert_array_equal(np.asarray(thr.tokens[0]), ref["gen_threshold_tokens"])
    np.testing.assert_array_equal(np.asarray(thr.exit_steps[0]) - 1, ref["gen_threshold_exit_steps"])
