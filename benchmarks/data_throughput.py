"""Data throughput: ``loopjax data prepare`` vs the ``tokenizers`` library alone, and the packed-row loader.

    python -m benchmarks.data_throughput [--mb 40] [--vocab 8192] [--seq-len 256] [--batch 8]
        [--out benchmarks/results/data_throughput.json]

1. prepare: a synthetic corpus (Zipf-distributed words, documents of 0.2-8 KB, in 8 jsonl files) is tokenised
   by a byte-level BPE trained on a sample. "encode_batch" is the tokenizers library alone on the same documents,
   already in memory (``Tokenizer.encode_batch``, and ``encode_batch_fast``), batched as prepare batches them;
   "prepare" is the whole command from the files on disk: read + validate + hash (pass 1), read again, tokenise,
   write zarr3 shards, offsets and manifest. Ratio = prepare throughput / encode_batch throughput (target >= 0.8).
2. loader: ``make_pipeline(PackedTokenSource(...), shuffle)`` on one process, rows/s and tokens/s, against the
   CPU train step of ``small`` (8 x 256 tokens per step, BENCHMARKS.md: 292 tokens/s; target >= 50x).
3. one-row reads on corpora whose shards are 1 MB and 64 MB of text: the time per row does not grow with the
   shard (a row decodes only the zarr chunks it touches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

SMALL_TRAIN_TOKENS_PER_S = 292.0  # BENCHMARKS.md, train step section: small, 8 x 256, after the dense() change


def make_corpus(folder: str, mb: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(1, 11))))
             for _ in range(20000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    docs, size = [], 0
    while size < mb * 1e6:
        n = int(rng.integers(40, 1500))
        doc = " ".join(np.asarray(words)[rng.choice(len(words), size=n, p=p)])
        docs.append(doc)
        size += len(doc) + 1
    os.makedirs(folder, exist_ok=True)
    per = -(-len(docs) // 8)
    for f in range(8):
        with open(os.path.join(folder, f"part{f}.jsonl"), "w") as fh:
            for d in docs[f * per:(f + 1) * per]:
                fh.write(json.dumps({"text": d}) + "\n")
    return docs


def train_tokenizer(folder: str, docs: list[str], vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:2000], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return folder


def batches_of(docs: list[str], batch_bytes: int):
    lo = 0
    while lo < len(docs):
        hi, size = lo, 0
        while hi < len(docs) and (hi == lo or size < batch_bytes):
            size += len(docs[hi])
            hi += 1
        yield docs[lo:hi]
        lo = hi


def time_encode(tok, docs: list[str], fast: bool, batch_bytes: int) -> tuple[float, int]:
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    t0, n = time.perf_counter(), 0
    for batch in batches_of(docs, batch_bytes):
        n += sum(len(e) for e in encode(batch, add_special_tokens=False))
    return time.perf_counter() - t0, n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40.0, help="corpus size (MB of text)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loader-batches", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    from loopjax.data import PackedTokenSource, make_pipeline
    from loopjax.data.prepare import _BATCH_BYTES, PrepareConfig, prepare

    work = tempfile.mkdtemp(prefix="loopjax_data_bench_")
    try:
        docs = make_corpus(os.path.join(work, "src"), args.mb)
        mb = sum(len(d) for d in docs) / 1e6
        tok_dir = train_tokenizer(os.path.join(work, "tok"), docs, args.vocab)
        tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        rows = []
        best = {}
        for r in range(args.repeats):  # interleaved, best of repeats (the 2 cores are shared)
            for name in ("encode_batch", "encode_batch_fast", "prepare"):
                if name == "prepare":
                    out = os.path.join(work, f"corpus{r}")
                    t0 = time.perf_counter()
                    m = prepare(PrepareConfig(inputs=(os.path.join(work, "src"),), tokenizer=tok_dir, out=out,
                                              val_fraction=0.01), progress=False)
                    secs, n = time.perf_counter() - t0, m["tokens"] - 2 * m["documents"]
                    if r < args.repeats - 1:
                        shutil.rmtree(out)
                else:
                    secs, n = time_encode(tok, docs, name.endswith("fast"), _BATCH_BYTES)
                if name not in best or secs < best[name][0]:
                    best[name] = (secs, n)
        base = best["encode_batch"][0]
        print(f"prepare vs tokenizers: {len(docs)} documents, {mb:.1f} MB, BPE vocab {args.vocab}, "
              f"{os.cpu_count()} cores, best of {args.repeats}")
        print(f"{'':<22}{'seconds':>9}{'MB/s':>8}{'tokens/s':>12}{'vs encode_batch':>17}")
        for name, (secs, n) in best.items():
            row = dict(name=name, seconds=secs, mb_per_s=mb / secs, tokens=n, tokens_per_s=n / secs,
                       ratio=base / secs)
            rows.append(row)
            print(f"{name:<22}{secs:>9.2f}{mb / secs:>8.2f}{n / secs:>12,.0f}{base / secs:>16.2f}x")

        corpus = os.path.join(work, f"corpus{args.repeats - 1}")
        src = PackedTokenSource(corpus, args.seq_len)
        it = iter(make_pipeline(src, batch_size=args.batch, seed=0, process_index=0, process_count=1))
        for _ in range(20):
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.loader_batches):
            next(it)
        secs = time.perf_counter() - t0
        rows_s = args.loader_batches * args.batch / secs
        tok_s = rows_s * args.seq_len
        print(f"\nloader: make_pipeline(PackedTokenSource(seq_len={args.seq_len}), shuffle, batch {args.batch}), "
              f"1 process, {len(src)} rows")
        print(f"{'rows/s':>10}{'tokens/s':>12}{'small train step tokens/s':>27}{'ratio':>9}")
        print(f"{rows_s:>10,.0f}{tok_s:>12,.0f}{SMALL_TRAIN_TOKENS_PER_S:>27,.0f}"
              f"{tok_s / SMALL_TRAIN_TOKENS_PER_S:>8,.0f}x")
        loader = dict(rows_per_s=rows_s, tokens_per_s=tok_s, train_tokens_per_s=SMALL_TRAIN_TOKENS_PER_S,
                      ratio=tok_s / SMALL_TRAIN_TOKENS_PER_S)

        reads = []
        print(f"\none-row reads ({args.seq_len} tokens, 3000 random rows) vs reading a whole shard, same corpus")
        print(f"{'shard text':>11}{'shards':>8}{'tokens/shard':>14}{'us/row':>9}{'ms/shard':>10}")
        for unit_mb in (1, 64):
            out = os.path.join(work, f"rows{unit_mb}")
            prepare(PrepareConfig(inputs=(os.path.join(work, "src"),), tokenizer=tok_dir, out=out,
                                  val_fraction=0.0, unit_bytes=unit_mb << 20), progress=False)
            s = PackedTokenSource(out, args.seq_len)
            idx = np.random.default_rng(1).integers(0, len(s), 3000)
            for i in idx[:50]:
                s[int(i)]
            t0 = time.perf_counter()
            for i in idx:
                s[int(i)]
            us = (time.perf_counter() - t0) / len(idx) * 1e6
            split = s.corpus
            n_shards = len(split.shard_paths)
            t0 = time.perf_counter()
            split.read(0, int(split.shard_starts[1]))
            shard_ms = (time.perf_counter() - t0) * 1e3
            reads.append(dict(unit_mb=unit_mb, shards=n_shards, tokens_per_shard=split.num_tokens / n_shards,
                              us_per_row=us, ms_per_shard=shard_ms))
            print(f"{unit_mb:>8} MB{n_shards:>8}{split.num_tokens / n_shards:>14,.0f}{us:>9.0f}{shard_ms:>10.1f}")
            shutil.rmtree(out)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), platform=platform.platform(), cores=os.cpu_count(), prepare=rows,
                           loader=loader, row_reads=reads), f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
