"""Byte-level language-modelling source over local text files: no tokenizer, no download.

Tokens are the bytes 0..255 plus BOS = 256 and EOS = 257 (``VOCAB_SIZE = 258``). Documents (one per file, in sorted
path order) are laid end to end as one stream ``BOS doc_1 EOS BOS doc_2 EOS ...`` and packed by cutting the stream
into consecutive windows of ``seq_len + 1`` tokens that overlap by one: row k is
``inputs = stream[kS : kS + S]``, ``targets = stream[kS + 1 : kS + S + 1]``, every target counted (``mask`` 1).
Windows cross document boundaries (GPT-style packing; EOS/BOS mark the boundary). Files are memory-mapped, so the
corpus need not fit in memory; ``fraction=(a, b)`` keeps windows [a·N, b·N) of the N, e.g. (0, 0.99) to train and
(0.99, 1) to evaluate.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

BOS, EOS = 256, 257
VOCAB_SIZE = 258


def encode(text: str, *, bos: bool = True) -> np.ndarray:
    """UTF-8 bytes as int32 tokens, BOS first by default."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[BOS], data]).astype(np.int32) if bos else data


def decode(tokens) -> str:
    """Bytes back to text; BOS dropped, decoding stops at the first EOS, other ids >= 256 dropped."""
    out = bytearray()
    for t in (int(x) for x in tokens):
        if t == EOS:
            break
        if 0 <= t < 256:
            out.append(t)
    return out.decode("utf-8", errors="replace")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by ``paths``: files, directories (every file below, recursively) and glob patterns; sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[str] = set()
    for p in map(os.fspath, paths):
        matches = sorted(glob.glob(p, recursive=True)) or [p]
        for m in matches:
            if os.path.isdir(m):
                for root, _, files in os.walk(m):
                    found.update(os.path.join(root, f) for f in files)
            elif os.path.isfile(m):
                found.add(m)
            else:
                raise FileNotFoundError(f"no text file or directory at {m!r}")
    if not found:
        raise FileNotFoundError(f"no files under {paths!r}")
    return sorted(found)


class ByteTextSource:
    """grain random-access source of packed byte windows: row k -> {"inputs", "targets": int32 [S], "mask": f32 [S]}."""

    def __init__(self, paths, seq_len: int, *, fraction: tuple[float, float] = (0.0, 1.0)):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: must be >= 1")
        lo, hi = fraction
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"fraction={fraction!r}: must satisfy 0 <= a < b <= 1")
        self.paths = expand_paths(paths)
        self.seq_len = int(seq_len)
        sizes = np.array([os.path.getsize(p) for p in self.paths], np.int64)
        # Document d occupies stream[starts[d] : starts[d + 1]] = BOS, its bytes, EOS.
        self.starts = np.concatenate([[0], np.cumsum(sizes + 2)])
        total_windows = (int(self.starts[-1]) - 1) // self.seq_len
        self.first = int(np.floor(lo * total_windows))
        self.stop = int(np.floor(hi * total_windows))
        if self.stop <= self.first:
            raise ValueError(f"seq_len={seq_len!r}, fraction={fraction!r}: {self.starts[-1]} tokens give no window")
        self._maps: dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.stop - self.first

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        begin = (self.first + index) * self.seq_len
        window = self.stream(begin, begin + self.seq_len + 1)
        return {"inputs": window[:-1], "targets": window[1:], "mask": np.ones(self.seq_len, np.float32)}

    def stream(self, begin: int, end: int) -> np.ndarray:
        """Tokens ``stream[begin:end]`` (int32), read from the memory-mapped files."""
        out = np.empty(end - begin, np.int32)
        d = int(np.searchsorted(self.starts, begin, side="right")) - 1
        pos = begin
        while pos < end:
            doc_start, doc_stop = int(self.starts[d]), int(self.starts[d + 1])
            piece_end = min(end, doc_stop)
            lo, hi = pos - doc_start, piece_end - doc_start  # offsets into [BOS, bytes..., EOS]
            piece = out[pos - begin:piece_end - begin]
            n_bytes = doc_stop - doc_start - 2
            b_lo, b_hi = max(lo, 1), min(hi, n_bytes + 1)
            if b_hi > b_lo:
                piece[b_lo - lo:b_hi - lo] = self._bytes(d)[b_lo - 1:b_hi - 1]
            if lo == 0:
                piece[0] = BOS
            if hi == n_bytes + 2:
                piece[-1] = EOS
            pos, d = piece_end, d + 1
        return out

    def _bytes(self, d: int) -> np.ndarray:
        if d not in self._maps:
            self._maps[d] = np.memmap(self.paths[d], dtype=np.uint8, mode="r")
        return self._maps[d]

    def __getstate__(self):
        # Memory maps are reopened in each grain worker process rather than pickled.
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"ByteTextSource({len(self.paths)} files, {self.num_tokens} tokens, seq_len={self.seq_len})"
