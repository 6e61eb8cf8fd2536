"""Read a prepared corpus (``loopjax data prepare``) as packed training rows.

``PackedTokenSource(path, seq_len, split=...)`` is a grain random-access source. The split's documents are laid end
to end in manifest order and the stream is cut into rows of ``seq_len`` ("concat then split", no padding): row k
covers stream tokens [kS, kS + S] (S + 1 tokens, overlapping the next row by one) and gives, all [S]:

  inputs       int32    stream[kS : kS + S]
  targets      int32    stream[kS + 1 : kS + S + 1]
  segment_ids  int32    1, 2, ... : the document of each input token, numbered from 1 within the row
  positions    int32    index of the input token within its document's piece in this row: 0 at every document
                        start, and 0 at the row start for a document continuing from the previous row (that piece
                        sees none of its earlier tokens, so it is a fresh sequence to the model)
  mask         float32  the loss mask (the issue's ``loss_mask``; the key every loopjax pipeline uses):
                        1 where the target is in the input token's document (0 across a document boundary), and
                        in an SFT corpus only where the target is a response token (or the closing EOS)

Reads go through tensorstore, one slice per row (O(row): only the zarr chunks the row touches are decoded); stores
are opened lazily in each process (grain workers too). A folder without ``manifest.json`` (a partial
``prepare`` run) is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from loopjax.data.prepare import FORMAT_VERSION, SPLITS


def read_manifest(path: str) -> dict:
    """The manifest of a prepared corpus folder; a clear error for anything else."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        partial = os.path.isdir(os.path.join(path, ".prepare"))
        why = ("an unfinished `loopjax data prepare` run (rerun the same command to finish it)" if partial
               else "not a prepared corpus (make one with `loopjax data prepare`)")
        raise FileNotFoundError(f"{path}: no manifest.json: {why}")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: format_version={manifest.get('format_version')!r}: this loopjax reads "
                         f"{FORMAT_VERSION}")
    return manifest


class PreparedSplit:
    """One split of a prepared corpus as a token stream: ``read(lo, hi)``, document starts, loss starts."""

    def __init__(self, path: str, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}")
        self.path, self.split = path, split
        self.manifest = read_manifest(path)
        shards = self.manifest["splits"][split]["shards"]
        if not shards:
            raise ValueError(f"{path}: the {split!r} split has no document (prepare with --val-fraction > 0 for a "
                             "val split)")
        self.shard_paths = [os.path.join(path, split, s["name"] + ".zarr") for s in shards]
        lengths = np.array([s["tokens"] for s in shards], np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(lengths)])
        starts, loss = [], []
        for s, base in zip(shards, self.shard_starts[:-1]):
            stem = os.path.join(path, split, s["name"])
            starts.append(np.load(stem + ".offsets.npy")[:-1] + base)
            if self.manifest["sft"]:
                loss.append(np.load(stem + ".loss_starts.npy") + base)
        self.doc_starts = np.concatenate(starts)  # int64 [documents]: stream offset of each document
        self.loss_starts = np.concatenate(loss) if loss else None
        self._stores: dict[int, Any] = {}

    @property
    def num_tokens(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    def _store(self, i: int):
        if i not in self._stores:
            import tensorstore as ts

            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": self.shard_paths[i]}}
            self._stores[i] = ts.open(spec, open=True, read=True).result()
        return self._stores[i]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens stream[lo:hi] as int32 (a row spans at most a few shards)."""
        out = np.empty(hi - lo, np.int32)
        i = int(np.searchsorted(self.shard_starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            base, stop = int(self.shard_starts[i]), int(self.shard_starts[i + 1])
            end = min(hi, stop)
            out[pos - lo:end - lo] = self._store(i)[pos - base:end - base].read().result()
            pos, i = end, i + 1
        return out

    def document(self, d: int) -> np.ndarray:
        """The tokens of document ``d`` (BOS / EOS included)."""
        stop = int(self.doc_starts[d + 1]) if d + 1 < self.num_documents else self.num_tokens
        return self.read(int(self.doc_starts[d]), stop)

    def __getstate__(self):
        return {**self.__dict__, "_stores": {}}  # tensorstore handles are reopened in each worker


def pack_row(index_S1: np.ndarray, doc_starts: np.ndarray,
             loss_starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """segment_ids, positions and mask of a row whose S + 1 stream indices are ``index_S1`` (consecutive)."""
    doc_S1 = np.searchsorted(doc_starts, index_S1, side="right") - 1
    doc_in, doc_out = doc_S1[:-1], doc_S1[1:]
    segment_ids = (doc_in - doc_in[0] + 1).astype(np.int32)
    positions = (index_S1[:-1] - np.maximum(doc_starts[doc_in], index_S1[0])).astype(np.int32)
    mask = doc_in == doc_out
    if loss_starts is not None:
        mask &= index_S1[1:] >= loss_starts[doc_out]
    return {"segment_ids": segment_ids, "positions": positions, "mask": mask.astype(np.float32)}


class PackedTokenSource:
    """grain random-access source of packed rows of a prepared corpus (keys and shapes: the module docstring)."""

    def __init__(self, path: str, seq_len: int, *, split: str = "train"):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: must be an int >= 1")
        self.corpus = PreparedSplit(path, split)
        self.seq_len = seq_len
        self.rows = (self.corpus.num_tokens - 1) // seq_len
        if self.rows < 1:
            raise ValueError(f"seq_len={seq_len}: the {split!r} split of {path} has {self.corpus.num_tokens} tokens, "
                             "fewer than one row")

    @property
    def manifest(self) -> dict:
        return self.corpus.manifest

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} out of range for {self.rows} rows")
        begin = index * self.seq_len
        window = self.corpus.read(begin, begin + self.seq_len + 1)
        row = pack_row(np.arange(begin, begin + self.seq_len + 1), self.corpus.doc_starts, self.corpus.loss_starts)
        return {"inputs": window[:-1], "targets": window[1:], **row}

    def __repr__(self) -> str:
        return (f"PackedTokenSource({self.corpus.path!r}, split={self.corpus.split!r}, {self.rows} rows of "
                f"{self.seq_len})")
