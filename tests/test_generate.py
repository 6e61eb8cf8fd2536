"""Generation: cached decoding vs full recompute and vs a float64 NumPy reference of each KV mode, padding,
sampling, stopping, compile buckets, error cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.generate import KVCache, Sampling, decode_step, generate, prefill
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
    for kv_mode in ("per_step", "compute_all"):
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
