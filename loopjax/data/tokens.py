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

``packing="first_fit"`` instead keeps every document of up to S + 1 tokens whole in one row (``first_fit_plan``)
and pads the rest of the row (token 0, segment id 0, mask 0).

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


PACKINGS = ("concat", "first_fit")


def first_fit_plan(doc_starts: np.ndarray, num_tokens: int, row_tokens: int,
                   window: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-document packing: (row_offsets [rows + 1], piece_start, piece_len) with row r holding pieces
    row_offsets[r]:row_offsets[r + 1], each ``stream[piece_start : piece_start + piece_len]``.

    Documents are taken in order; each goes into the first of the ``window`` most recently opened rows with room
    for it, else a new row (rows leaving the window are closed and padded). A document longer than a row
    (``row_tokens`` = seq_len + 1) is cut into pieces of ``row_tokens`` overlapping by one token, so every token
    but a document's first is a target exactly once.
    """
    lengths = np.diff(np.append(doc_starts, num_tokens)).tolist()
    open_rows: list[list[int]] = []  # [row, room left]
    rows, starts, lens = [], [], []
    n_rows = 0
    for start, length in zip(doc_starts.tolist(), lengths):
        offset = 0
        while offset == 0 or offset + 1 < length:
            piece = min(row_tokens, length - offset)
            if piece <= 0:
                break
            for slot in open_rows:
                if slot[1] >= piece:
                    row = slot[0]
                    slot[1] -= piece
                    break
            else:
                row, n_rows = n_rows, n_rows + 1
                open_rows.append([row, row_tokens - piece])
                if len(open_rows) > window:
                    open_rows.pop(0)
            rows.append(row)
            starts.append(start + offset)
            lens.append(piece)
            offset += row_tokens - 1
        open_rows = [slot for slot in open_rows if slot[1] > 0]
    order = np.argsort(np.asarray(rows, np.int64), kind="stable")
    row_offsets = np.concatenate([[0], np.cumsum(np.bincount(np.asarray(rows, np.int64), minlength=n_rows))])
    return (row_offsets.astype(np.int64), np.asarray(starts, np.int64)[order], np.asarray(lens, np.int64)[order])


class PackedTokenSource:
    """grain random-access source of packed rows of a prepared corpus (keys and shapes: the module docstring).

    packing: "concat" (concat then split, no padding; the module docstring) or "first_fit" (documents up to a row
      long stay whole, packed by ``first_fit_plan``; the rest of a row is padding: token 0, segment id 0,
      position 0, mask 0).
    """

    def __init__(self, path: str, seq_len: int, *, split: str = "train", packing: str = "concat"):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: must be an int >= 1")
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}: must be one of {PACKINGS}")
        self.corpus = PreparedSplit(path, split)
        self.seq_len, self.packing = seq_len, packing
        if packing == "first_fit":
            self.plan = first_fit_plan(self.corpus.doc_starts, self.corpus.num_tokens, seq_len + 1)
            self.rows = len(self.plan[0]) - 1
        else:
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
        if self.packing == "first_fit":
            return self._first_fit_row(index)
        begin = index * self.seq_len
        window = self.corpus.read(begin, begin + self.seq_len + 1)
        row = pack_row(np.arange(begin, begin + self.seq_len + 1), self.corpus.doc_starts, self.corpus.loss_starts)
        return {"inputs": window[:-1], "targets": window[1:], **row}

    def _first_fit_row(self, index: int) -> dict[str, np.ndarray]:
        row_offsets, piece_start, piece_len = self.plan
        n = self.seq_len + 1
        tokens, segment = np.zeros(n, np.int32), np.zeros(n, np.int32)
        positions, stream_index = np.zeros(n, np.int32), np.full(n, -1, np.int64)
        at = 0
        for k, p in enumerate(range(row_offsets[index], row_offsets[index + 1]), 1):
            lo, length = int(piece_start[p]), int(piece_len[p])
            tokens[at:at + length] = self.corpus.read(lo, lo + length)
            segment[at:at + length] = k
            positions[at:at + length] = np.arange(length)
            stream_index[at:at + length] = np.arange(lo, lo + length)
            at += length
        mask = (segment[:-1] == segment[1:]) & (segment[:-1] > 0)
        if self.corpus.loss_starts is not None:
            doc = np.searchsorted(self.corpus.doc_starts, stream_index[1:], side="right") - 1
            mask &= stream_index[1:] >= self.corpus.loss_starts[np.maximum(doc, 0)]
        return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segment[:-1],
                "positions": positions[:-1], "mask": mask.astype(np.float32)}

    def __repr__(self) -> str:
        return (f"PackedTokenSource({self.corpus.path!r}, split={self.corpus.split!r}, packing={self.packing!r}, "
                f"{self.rows} rows of {self.seq_len})")
