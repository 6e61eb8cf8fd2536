"""forward_flops: a hand count for a small config, and XLA's own cost analysis of the unrolled forward."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import loopjax as lj


def test_forward_flops_hand_count():
    cfg = lj.LoopedConfig(vocab_size=10, d_model=4, n_heads=2, n_kv_heads=1, d_ff=6, n_layers=1, n_loops=2,
                          max_seq_len=8)
    s = 3  # head_dim 2
    q = 2 * 3 * 4 * 4          # [3,4] @ [4, 2 heads * 2]
    kv = 2 * (2 * 3 * 4 * 2)   # k and v: [3,4] @ [4, 1 * 2]
    o = 2 * 3 * 4 * 4
    attn = 2 * (2 * 3 * 3 * 2 * 2)  # scores and values: 2 heads, 3x3, head_dim 2
    mlp = 3 * (2 * 3 * 4 * 6)
    gate = 2 * 3 * 4
    head = 2 * 3 * 4 * 10
    layer = q + kv + o + attn + mlp
    assert lj.forward_flops(cfg, s) == 2 * (layer + gate) + head
    assert lj.forward_flops(cfg, s, 5) == 5 * (layer + gate) + head
    assert lj.forward_flops(cfg, s, 2, readouts=2) == 2 * (layer + gate) + 2 * head
    assert lj.forward_flops(cfg, s, 1.5) == 1.5 * (layer + gate) + head  # mean over an exit profile
    assert lj.train_flops(cfg, s) == 3 * lj.forward_flops(cfg, s)
    with pytest.raises(ValueError, match="n_loops"):
        lj.forward_flops(cfg, s, 0)


@pytest.mark.parametrize("kw", [dict(), dict(input_injection="concat", n_prelude=1, n_coda=1, tie_embeddings=False)])
def test_forward_flops_matches_xla_cost_analysis(kw):
    cfg = lj.LoopedConfig(vocab_size=512, d_model=128, n_heads=4, n_kv_heads=2, d_ff=512, n_layers=2, n_loops=3,
                          remat_policy="none", attention_impl="chunked", **kw)
    model = lj.LoopedLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 64), jnp.int32)
    # XLA's cost analysis counts a while-loop body once, so analyse the unrolled (Python loop) forward
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, use_scan=False).logits)
    cost = fwd.lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost and "flops" in cost, f"XLA cost analysis reported no FLOP count: {cost}"
    ours = lj.forward_flops(cfg, 64)
    # XLA also counts norms, softmax, rotary and activations: a little above the matmul count, never below
    assert ours <= cost["flops"] <= 1.03 * ours


def test_causal_counts_only_the_kept_attention_pairs():
    from loopjax.flops import attended_pairs, layer_flops

    cfg = lj.tiny()
    s, n, h = 64, cfg.n_heads, cfg.d_head
    assert layer_flops(cfg, s) - layer_flops(cfg, s, causal=True) == 2 * 2 * (s * s / 2) * n * h
    windowed = cfg.replace(sliding_window=16)
    # query i sees min(i + 1, 16) keys; the count uses the continuous S·W − W²/2
    assert attended_pairs(windowed, s, causal=True) == s * 16 - 16 * 16 / 2
    assert lj.train_flops(cfg, s, causal=True) < lj.train_flops(cfg, s)
