"""Input pipelines and the byte-level text source: packing, sharding, shuffling, exact resume, workers."""

import faulthandler
import itertools
import json
import os
import pickle

import numpy as np
import pytest

from loopjax.data import ByteTextSource, PHop, make_pipeline, shard_bounds
from loopjax.data import text


class IndexSource:
    """A real random-access source whose rows carry their own index, so tests can see which rows a pipeline read."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        row = np.full(4, i, np.int32)
        return {"inputs": row, "targets": row + 1, "mask": np.ones(4, np.float32)}


def rows(batches):
    return [int(x) for b in batches for x in b["inputs"][:, 0]]


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---- text -----------------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = {
        "b.txt": "héllo wörld, looped transformers ∮ " * 3,
        "a.txt": "".join(chr(c) for c in rng.integers(32, 127, size=101)),
        "sub/c.md": "",
        "sub/d.txt": "x" * 23 + "\n",
    }
    for name, body in docs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body, encoding="utf-8")
    expected = []
    for name in sorted(docs, key=lambda n: str(tmp_path / n)):
        expected += [text.BOS, *docs[name].encode("utf-8"), text.EOS]
    return tmp_path, np.array(expected, np.int32)


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_text_windows_pack_the_file_stream_exactly(corpus, seq_len):
    root, stream = corpus
    src = ByteTextSource(root, seq_len)
    n = (len(stream) - 1) // seq_len
    assert len(src) == n and src.num_tokens == len(stream) and src.vocab_size == 258
    for k in range(n):
        row = src[k]
        np.testing.assert_array_equal(row["inputs"], stream[k * seq_len:(k + 1) * seq_len])
        np.testing.assert_array_equal(row["targets"], stream[k * seq_len + 1:(k + 1) * seq_len + 1])
        assert row["inputs"].dtype == np.int32 and row["mask"].dtype == np.float32 and (row["mask"] == 1).all()
    with pytest.raises(IndexError):
        src[n]
    clone = pickle.loads(pickle.dumps(src))  # what grain workers receive: paths, not memory maps
    np.testing.assert_array_equal(clone[n - 1]["targets"], src[n - 1]["targets"])


def test_text_fraction_splits_are_contiguous_and_disjoint(corpus):
    root, _ = corpus
    full, train, val = (ByteTextSource(root, 5, fraction=f) for f in [(0, 1), (0, 0.8), (0.8, 1)])
    assert len(train) + len(val) == len(full)
    joined = [train[i]["inputs"] for i in range(len(train))] + [val[i]["inputs"] for i in range(len(val))]
    assert_same_batches([{"x": j} for j in joined], [{"x": full[i]["inputs"]} for i in range(len(full))])


def test_text_paths_accept_globs_and_reject_missing(corpus):
    root, _ = corpus
    assert [os.path.basename(p) for p in text.expand_paths(str(root / "**" / "*.txt"))] == ["a.txt", "b.txt",
                                                                                           "d.txt"]
    with pytest.raises(FileNotFoundError):
        ByteTextSource(root / "missing.txt", 8)
    with pytest.raises(ValueError, match="fraction"):
        ByteTextSource(root, 8, fraction=(0.5, 0.5))


def test_text_encode_decode_roundtrip():
    s = "loop × 4 — ✓"
    tokens = text.encode(s)
    assert tokens[0] == text.BOS and tokens.dtype == np.int32
    assert text.decode(tokens) == s
    assert text.decode(np.concatenate([tokens, [text.EOS, 65]])) == s


def test_text_pipeline_batches_and_resumes(corpus):
    root, _ = corpus
    src = ByteTextSource(root, 8)
    it = iter(make_pipeline(src, batch_size=3, seed=0, process_index=0, process_count=1))
    take(it, 4)
    state = it.get_state()
    rest = take(it, 6)
    it2 = iter(make_pipeline(src, batch_size=3, seed=0, process_index=0, process_count=1))
    it2.set_state(state)
    assert_same_batches(take(it2, 6), rest)
    assert rest[0]["inputs"].shape == (3, 8)


# ---- pipeline -------------------------------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_other_order():
    def first(seed):
        return take(iter(make_pipeline(IndexSource(40), batch_size=4, seed=seed, process_index=0,
                                       process_count=1)), 5)
    assert_same_batches(first(3), first(3))
    assert rows(first(3)) != rows(first(4))


def test_each_epoch_is_a_fresh_permutation():
    it = make_pipeline(IndexSource(30), batch_size=5, seed=0, num_epochs=3, process_index=0, process_count=1)
    order = rows(list(it))
    epochs = [order[i * 30:(i + 1) * 30] for i in range(3)]
    assert len(order) == 90 and all(sorted(e) == list(range(30)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("count", [1, 3, 4])
def test_process_shards_are_disjoint_equal_and_cover_the_source(count):
    n = 50
    shards = [rows(make_pipeline(IndexSource(n), batch_size=2, seed=5, num_epochs=1, process_index=i,
                                 process_count=count)) for i in range(count)]
    even = n - n % count
    assert all(len(s) == n // count for s in shards)  # equal batch counts: no process waits on a collective
    assert [set(s) for s in shards] == [set(range(i, even, count)) for i in range(count)]  # strided shards
    assert sorted(itertools.chain(*shards)) == list(range(even))  # disjoint and covering (remainder dropped)


def test_shard_bounds_match_strided_slices_and_validate():
    assert shard_bounds(10, 1, 3) == slice(1, 9, 3)
    with pytest.raises(ValueError, match="process_index"):
        shard_bounds(10, 3, 3)
    with pytest.raises(ValueError, match="cannot give"):
        shard_bounds(2, 0, 3)


def test_default_process_sharding_reads_jax_process_index():
    got = rows(make_pipeline(IndexSource(12), batch_size=3, seed=0, num_epochs=1, shuffle=False))
    assert got == list(range(12))  # one process here: its shard is everything, in order without shuffle


def test_resume_from_state_is_exact_for_task_source():
    src = PHop(alphabet=4, n=12, hops=(2, 3)).source(seed=9, num_examples=37)
    kwargs = dict(batch_size=4, seed=2, process_index=1, process_count=2)
    it = iter(make_pipeline(src, **kwargs))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 7)  # 18 rows per shard, 4 per batch: crosses epochs
    resumed = iter(make_pipeline(src, **kwargs))
    resumed.set_state(json.loads(json.dumps(state)))  # the state travels as JSON beside a checkpoint
    assert_same_batches(take(resumed, 7), expected)
    assert expected[0]["inputs"].shape == (4, 13) and expected[0]["mask"].dtype == np.float32


def test_endless_task_source_shards_and_batches_lazily():
    src = PHop(alphabet=4, n=10, hops=(2,)).source(seed=0)  # 2**40 rows: nothing is materialised
    it = iter(make_pipeline(src, batch_size=2, seed=0, process_index=3, process_count=4))
    batch = next(it)
    assert batch["inputs"].shape == (2, 11) and batch["inputs"].dtype == np.int32


def test_pipeline_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        make_pipeline(IndexSource(4), batch_size=0, seed=0)
    with pytest.raises(ValueError, match="num_epochs"):
        make_pipeline(IndexSource(4), batch_size=1, seed=0, num_epochs=0)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    src = PHop(alphabet=4, n=12, hops=(2,)).source(seed=1, num_examples=64)
    kwargs = dict(batch_size=4, seed=3, process_index=0, process_count=1, worker_count=2)
    faulthandler.dump_traceback_later(300, exit=True)  # a stuck worker fails CI loudly instead of hanging it
    reference = take(iter(make_pipeline(src, **{**kwargs, "worker_count": 0})), 8)
    it = iter(make_pipeline(src, **kwargs))
    try:
        assert_same_batches(take(it, 5), reference[:5])
        state = it.get_state()
    finally:
        it.close()  # stop the worker processes now rather than at garbage collection
    resumed = iter(make_pipeline(src, **kwargs))
    try:
        resumed.set_state(json.loads(json.dumps(state)))
        assert_same_batches(take(resumed, 3), reference[5:])
    finally:
        resumed.close()
        faulthandler.cancel_dump_traceback_later()
