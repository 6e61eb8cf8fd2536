"""Per-row depth dial in ``generate`` (``row_loops``, ``row_q``): each row of one batch, at its own depth or exit
threshold, generates what it generates alone; one compiled program serves every mix; bad values raise."""

import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from loopjax.generate import Sampling, generate
from loopjax.generate.loop import _generate_jit


def _model(**overrides):
    base = dict(vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=3, max_seq_len=32,
                init_std=0.3, n_coda=1, input_injection="concat", norm_scheme="sandwich")
    base.update(overrides)
    return lj.LoopedLM(lj.LoopedConfig(**base), rngs=nnx.Rngs(0))


def _batch(seed=21):
    """Three left-padded prompts of lengths 6, 3 and 5 (fresh random tokens) and their mask."""
    rng = np.random.default_rng(seed)
    lengths = (6, 3, 5)
    rows = [rng.integers(0, 128, n).astype(np.int32) for n in lengths]
    batch = np.stack([np.concatenate([np.full(6 - len(r), 9, np.int32), r]) for r in rows])
    mask = np.stack([np.r_[np.zeros(6 - len(r)), np.ones(len(r))] for r in rows]).astype(np.int32)
    return rows, batch, mask


def _assert_row_equal(out, row, alone, exit_steps=None):
    n = int(np.asarray(alone.lengths)[0])
    np.testing.assert_array_equal(np.asarray(out.tokens[row]), np.asarray(alone.tokens[0]))
    np.testing.assert_allclose(np.asarray(out.logits[row, :n]), np.asarray(alone.logits[0, :n]), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.exit_steps[row]),
                                  np.asarray(alone.exit_steps[0]) if exit_steps is None else exit_steps)


def test_row_depth_equals_each_row_alone_at_that_depth():
    """Greedy, left-padded rows at depths 1, 3, 2 in one call, with a stop token: each row's tokens, logits and
    length equal that row alone with n_loops = its depth (no exit rule); its tokens read out at that depth.
    compute_all gives the same rows (every loop runs, the dial picks the read-out)."""
    model = _model()
    rows, batch, mask = _batch()
    depths = [1, 3, 2]
    first = generate(model, batch, 6, attention_mask=mask, row_loops=depths)
    stop = int(np.asarray(first.tokens)[1, 2])  # ends row 1 at its third token (others wherever it occurs)
    out = generate(model, batch, 6, attention_mask=mask, row_loops=depths, stop_tokens=stop, return_logits=True)
    for r, (p, d) in enumerate(zip(rows, depths)):
        alone = generate(model, p[None], 6, n_loops=d, stop_tokens=stop, return_logits=True)
        n = int(alone.lengths[0])
        assert int(out.lengths[r]) == n
        _assert_row_equal(out, r, alone, exit_steps=np.where(np.arange(6) < n, d, 0))
    assert int(out.lengths[1]) <= 3
    every = generate(model, batch, 6, attention_mask=mask, row_loops=depths, stop_tokens=stop, kv_mode="compute_all",
                     return_logits=True)
    np.testing.assert_array_equal(np.asarray(every.tokens), np.asarray(out.tokens))
    np.testing.assert_array_equal(np.asarray(every.exit_steps), np.asarray(out.exit_steps))
    np.testing.assert_allclose(np.asarray(every.logits), np.asarray(out.logits), atol=1e-4, rtol=0)


def test_row_depth_last_step_equals_fixed_exit_alone():
    """last_step: a row at depth d equals that row alone under FixedExit(d) with the call's n_loops (the prompt
    keeps its last-loop KV, as under any exit rule)."""
    model = _model()
    rows, batch, mask = _batch(seed=22)
    depths = [2, 1, 2]
    out = generate(model, batch, 5, attention_mask=mask, kv_mode="last_step", row_loops=depths, return_logits=True)
    for r, (p, d) in enumerate(zip(rows, depths)):
        alone = generate(model, p[None], 5, kv_mode="last_step", exit_rule=lj.FixedExit(d), return_logits=True)
        _assert_row_equal(out, r, alone, exit_steps=d)


def test_row_depth_caps_a_shared_rule():
    """With a shared QExit the row exits at min(rule, depth): rows equal themselves alone; an uncapped row
    equals the rule alone; the prompt's read-out is the earlier of the two."""
    model = _model()
    rows, batch, mask = _batch(seed=23)
    depths = [3, 2, 1]
    rule = lj.QExit(0.6)
    out = generate(model, batch, 6, attention_mask=mask, exit_rule=rule, row_loops=depths, return_logits=True)
    for r, (p, d) in enumerate(zip(rows, depths)):
        _assert_row_equal(out, r, generate(model, p[None], 6, exit_rule=rule, row_loops=[d], return_logits=True))
        shared = generate(model, p[None], 6, exit_rule=rule, return_logits=True)
        if d == 3:  # the cap never binds: the shared rule alone
            _assert_row_equal(out, r, shared)
        else:  # the prompt's read-out (all loops computed): the earlier of the rule's exit and the cap
            assert int(out.exit_steps[r, 0]) == min(int(shared.exit_steps[0, 0]), d)
        assert (np.asarray(out.exit_steps[r]) <= d).all()
    assert (np.asarray(out.exit_steps[0]) < 3).any()  # the rule fires before the cap somewhere


def test_row_q_equals_each_row_alone_with_its_threshold():
    """Per-row Ouro thresholds: row b equals that row alone with QExit(q_b); with row_loops too, the cap binds."""
    model = _model()
    rows, batch, mask = _batch(seed=24)
    qs = [0.2, 0.95, 0.6]
    out = generate(model, batch, 6, attention_mask=mask, row_q=qs, return_logits=True)
    exits = []
    for r, (p, q) in enumerate(zip(rows, qs)):
        alone = generate(model, p[None], 6, row_q=[q], return_logits=True)
        _assert_row_equal(out, r, alone)
        exits.append(np.asarray(alone.exit_steps[0]))
    # row_q = [q] is QExit(q): the middle row against the rule itself
    _assert_row_equal(out, 2, generate(model, rows[2][None], 6, exit_rule=lj.QExit(qs[2]), return_logits=True))
    assert len({tuple(e) for e in exits}) > 1  # the thresholds really give different depths
    capped = generate(model, batch, 6, attention_mask=mask, row_q=qs, row_loops=[1, 1, 1])
    np.testing.assert_array_equal(np.asarray(capped.exit_steps), 1)


def test_sampling_row_depth_equals_uniform_depth_rows():
    """Sampling with a fixed seed: row b of a mixed-depth batch equals row b of the same batch run at depth
    row_loops[b] for every row (same shapes, so the same keys per row and step)."""
    model = _model()
    _, batch, mask = _batch(seed=25)
    s = Sampling(temperature=2.0, top_k=20)
    depths = [2, 1, 3]
    out = generate(model, batch, 8, attention_mask=mask, sampling=s, seed=7, row_loops=depths, return_logits=True)
    for d in sorted(set(depths)):
        uniform = generate(model, batch, 8, attention_mask=mask, sampling=s, seed=7, kv_mode="per_step",
                           row_loops=[d] * 3, return_logits=True)
        for r in np.flatnonzero(np.asarray(depths) == d):
            np.testing.assert_array_equal(np.asarray(out.tokens[r]), np.asarray(uniform.tokens[r]))
            np.testing.assert_allclose(np.asarray(out.logits[r]), np.asarray(uniform.logits[r]), atol=1e-5, rtol=0)
    other = generate(model, batch, 8, attention_mask=mask, sampling=s, seed=8, row_loops=depths)
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()  # really sampled


def test_one_program_for_every_mix_of_depths():
    """Different per-row depths and thresholds reuse the compiled program (the values are traced)."""
    model = _model()
    _, batch, mask = _batch(seed=26)
    generate(model, batch, 4, attention_mask=mask, row_loops=[1, 2, 3])
    before = _generate_jit._cache_size()
    generate(model, batch, 4, attention_mask=mask, row_loops=[3, 3, 1])
    generate(model, batch, 4, attention_mask=mask, row_loops=np.array([2, 2, 2], np.int64))
    assert _generate_jit._cache_size() == before
    generate(model, batch, 4, attention_mask=mask, row_q=[0.1, 0.5, 0.9])
    after_q = _generate_jit._cache_size()
    generate(model, batch, 4, attention_mask=mask, row_q=[0.7, 0.3, 1.0])
    assert _generate_jit._cache_size() == after_q


def test_bad_row_values_raise_clear_errors():
    model = _model()
    _, batch, mask = _batch(seed=27)
    cases = [
        (dict(row_loops=[1, 2]), r"row_loops: must be 3 ints"),
        (dict(row_loops=[[1, 2, 3]]), r"row_loops: must be 3 ints"),
        (dict(row_loops=[1.0, 2.0, 3.0]), r"row_loops: must be 3 ints"),
        (dict(row_loops=[True, False, True]), r"row_loops: must be 3 ints"),
        (dict(row_loops=[1, 0, 2]), r"rows \[1\] are outside 1..n_loops=3"),
        (dict(row_loops=[1, 4, 2]), r"rows \[1\] are outside 1..n_loops=3 \(pass n_loops"),
        (dict(row_loops=[1, 4, 2], n_loops=2), r"rows \[1, 2\]|rows \[1\]"),
        (dict(row_q=[0.5, 0.5]), r"row_q: must be 3 floats"),
        (dict(row_q=[0.5, 1.5, -0.1]), r"rows \[1, 2\] are outside \[0, 1\]"),
        (dict(row_q=[0.5, float("nan"), 0.1]), r"rows \[1\] are outside \[0, 1\]"),
        (dict(row_q=[0.5, 0.5, 0.5], exit_rule=lj.QExit(0.5)), r"row_q with exit_rule"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            generate(model, batch, 4, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match="row_q: a per-row QExit threshold needs the exit gate"):
        generate(_model(exit_gate=False), batch, 4, attention_mask=mask, row_q=[0.5, 0.5, 0.5])
