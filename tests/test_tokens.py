"""Packed rows of a prepared corpus: segment ids, positions and loss mask against a brute-force reference; the grain
pipeline over them; the vocabulary check; no attention across documents in a model (train-style call, masked
while_loop)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loopjax.data import PackedTokenSource, make_pipeline
from loopjax.data.prepare import PrepareConfig, prepare
from loopjax.data.tokens import PreparedSplit


def bytes_corpus(tmp_path, lengths, *, val_fraction=0.0, unit_bytes=64, seed=0):
    """A bytes-tokenised corpus of random documents of the given byte lengths; returns (folder, token docs)."""
    rng = np.random.default_rng()
    docs = [bytes(rng.integers(97, 123, n, dtype=np.uint8)).decode() for n in lengths]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    out = str(tmp_path / f"corpus{seed}")
    prepare(PrepareConfig(inputs=(str(tmp_path / "docs.jsonl"),), tokenizer="bytes", out=out,
                          val_fraction=val_fraction, unit_bytes=unit_bytes, seed=seed, chunk_tokens=16))
    return out, [[256, *d.encode(), 257] for d in docs]


def brute_force_rows(docs: list[list[int]], seq_len: int) -> list[dict]:
    """Row k of "concat then split" by walking the stream one token at a time."""
    stream, doc_of, start_of = [], [], []
    for d, toks in enumerate(docs):
        for i, t in enumerate(toks):
            stream.append(t)
            doc_of.append(d)
            start_of.append(i == 0)
    rows = []
    for k in range((len(stream) - 1) // seq_len):
        seg, pos, mask = [], [], []
        s, p = 1, 0
        for j in range(seq_len):
            g = k * seq_len + j
            if j > 0 and doc_of[g] != doc_of[g - 1]:
                s, p = s + 1, 0
            seg.append(s)
            pos.append(p)
            p += 1
            mask.append(float(doc_of[g] == doc_of[g + 1]))
        rows.append({"inputs": stream[k * seq_len:(k + 1) * seq_len],
                     "targets": stream[k * seq_len + 1:(k + 1) * seq_len + 1],
                     "segment_ids": seg, "positions": pos, "mask": mask})
    return rows


def test_packed_rows_match_brute_force_on_random_document_lengths(tmp_path):
    rng = np.random.default_rng()
    lengths = rng.integers(0, 40, 30)  # empty documents too: BOS EOS only
    out, docs = bytes_corpus(tmp_path, lengths)
    for seq_len in (1, 7, int(rng.integers(8, 64))):
        src = PackedTokenSource(out, seq_len)
        want = brute_force_rows(docs, seq_len)
        assert len(src) == len(want)
        for k in range(len(src)):
            row = src[k]
            assert {k: v.dtype.name for k, v in row.items()} == {
                "inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32",
                "mask": "float32"}
            for key in want[k]:
                np.testing.assert_array_equal(row[key], want[k][key], err_msg=f"row {k} {key} seq_len={seq_len}")


def test_first_fit_rows_keep_short_documents_whole_and_count_every_transition_once(tmp_path):
    from collections import Counter

    rng = np.random.default_rng()
    seq_len = int(rng.integers(8, 24))
    out, docs = bytes_corpus(tmp_path, rng.integers(0, 3 * seq_len, 40))  # some documents longer than a row
    src = PackedTokenSource(out, seq_len, packing="first_fit")
    want = Counter()  # a document of <= seq_len + 1 tokens whole, longer ones cut every seq_len (overlap one)
    for doc in docs:
        off = 0
        while off == 0 or off + 1 < len(doc):
            want[tuple(doc[off:off + seq_len + 1])] += 1
            off += seq_len
    got, counted = Counter(), 0
    for k in range(len(src)):
        row = src[k]
        full = np.append(row["inputs"], row["targets"][-1])  # the row's seq_len + 1 token slots
        seg = np.append(row["segment_ids"], row["segment_ids"][-1] if row["mask"][-1] else 0)
        for s_id in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s_id)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment is not contiguous"
            np.testing.assert_array_equal(row["positions"][idx[idx < seq_len]], np.arange(len(idx))[idx < seq_len])
            got[tuple(full[idx])] += 1
        pad = row["segment_ids"] == 0
        assert not row["mask"][pad].any() and not row["inputs"][pad].any() and not row["positions"][pad].any()
        counted += int(row["mask"].sum())
    assert got == want
    assert counted == sum(len(d) - 1 for d in docs)  # every within-document transition is a target exactly once


def test_reads_across_shard_boundaries_equal_the_stream(tmp_path):
    out, docs = bytes_corpus(tmp_path, [50] * 12, unit_bytes=40)  # one document per shard
    split = PreparedSplit(out, "train")
    assert len(split.shard_paths) >= 10
    stream = np.concatenate(docs)
    rng = np.random.default_rng()
    for _ in range(20):
        lo = int(rng.integers(0, len(stream) - 1))
        hi = int(rng.integers(lo, len(stream) + 1))
        np.testing.assert_array_equal(split.read(lo, hi), stream[lo:hi])


def test_pipeline_over_packed_rows_shuffles_each_epoch_and_resumes_exactly(tmp_path):
    out, _ = bytes_corpus(tmp_path, np.random.default_rng().integers(5, 30, 20))
    src = PackedTokenSource(out, 8)
    n = len(src)
    it = iter(make_pipeline(src, batch_size=1, seed=5, process_index=0, process_count=1))
    first_epoch = [next(it)["inputs"][0].tobytes() for _ in range(n)]
    assert sorted(first_epoch) == sorted(src[i]["inputs"].tobytes() for i in range(n))
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    it2 = iter(make_pipeline(src, batch_size=1, seed=5, process_index=0, process_count=1))
    it2.set_state(state)
    for a in expected:
        b = next(it2)
        assert a.keys() == b.keys() == {"inputs", "targets", "segment_ids", "positions", "mask"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_build_data_tokens_checks_vocab_before_tracing(tmp_path):
    from loopjax.train.experiment import apply_overrides, build_data, load_experiment

    out, _ = bytes_corpus(tmp_path, [30] * 40, val_fraction=0.3)
    exp = apply_overrides(load_experiment("tiny_text"), ["data.source=tokens", f"data.prepared={out}", "train.seq_len=16",
                                                          "train.batch_size=4", "model.vocab_size=128"])
    with pytest.raises(ValueError, match=r"model.vocab_size=128: smaller than the vocabulary .* \(258 ids"):
        build_data(exp)
    exp = apply_overrides(exp, ["model.vocab_size=258"])
    train, eval_data = build_data(exp)
    batch = next(train)
    assert batch["inputs"].shape == (exp.train.batch_size, 16) and "segment_ids" in batch
    assert next(iter(eval_data()))["positions"].shape == (exp.train.batch_size, 16)
    with pytest.raises(ValueError, match="prepared"):
        apply_overrides(load_experiment("tiny_text"), ["data.source=tokens"])
    with pytest.raises(FileNotFoundError, match="not a prepared corpus"):
        build_data(apply_overrides(exp, [f"data.prepared={tmp_path}"]))


# ------------------------------------------------------------------------------------------------ model level

def _tiny_model():
    from flax import nnx

    import loopjax as lj

    cfg = lj.LoopedConfig(vocab_size=258, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=3,
                          max_seq_len=64, norm_scheme="sandwich", step_norm=True, init_std=0.2)
    return lj.LoopedLM(cfg, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))


@pytest.mark.parametrize("adaptive", [False, True])
def test_logits_on_a_packed_row_equal_logits_of_each_document_alone(tmp_path, adaptive):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import loopjax as lj

    jax.config.update("jax_default_matmul_precision", "highest")
    seq_len = 48
    out, _ = bytes_corpus(tmp_path, np.random.default_rng().integers(3, 20, 12))
    row = PackedTokenSource(out, seq_len)[0]
    assert row["segment_ids"].max() >= 3  # several documents in the row, the first cut from no earlier row
    model = _tiny_model()
    kw = {"exit_rule": lj.QExit(0.5)} if adaptive else {"return_steps": True}

    @nnx.jit
    def packed_call(m, tokens, positions, segment_ids):
        return m(tokens, positions_BS=positions, segment_ids_BS=segment_ids, **kw)

    @nnx.jit
    def alone_call(m, tokens):
        return m(tokens, **kw)

    packed = packed_call(model, jnp.asarray(row["inputs"])[None], jnp.asarray(row["positions"])[None],
                         jnp.asarray(row["segment_ids"])[None])
    filler = np.random.default_rng().integers(0, 258, seq_len, dtype=np.int32)
    for seg in np.unique(row["segment_ids"]):
        idx = np.flatnonzero(row["segment_ids"] == seg)
        n = len(idx)
        # the document alone at the start of a row of random filler: causal, so its logits are the document's own
        alone = alone_call(model, jnp.asarray(np.concatenate([row["inputs"][idx], filler[n:]]))[None])
        np.testing.assert_allclose(packed.logits[0, idx], alone.logits[0, :n], atol=2e-5, rtol=2e-5,
                                   err_msg=f"document {seg} sees another document")
        if adaptive:
            np.testing.assert_array_equal(packed.exit_step[0, idx], alone.exit_step[0, :n])
        else:
            np.testing.assert_allclose(packed.step_logits[:, 0, idx], alone.step_logits[:, 0, :n], atol=2e-5,
                                       rtol=2e-5)
