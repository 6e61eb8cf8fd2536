"""``loopjax data prepare``: text files -> a tokenised corpus folder (tensorstore zarr3 shards + index + manifest).

Layout of ``OUT``::

    manifest.json                  the commit point: a folder without it is not a corpus (readers refuse it)
    train/00000.zarr               1-D zarr3 array of token ids (smallest unsigned dtype holding the vocabulary)
    train/00000.offsets.npy        int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    train/00000.loss_starts.npy    SFT only: int64 [documents], the first response token of each document
    val/...                        the same for the validation split
    .prepare/                      work state of an unfinished run (removed once the manifest is written)

A document is ``[BOS] ids [EOS]`` (BOS when the tokenizer has one, EOS unless ``append_eos=False``). Work is cut
into *units* of consecutive documents (about ``unit_bytes`` of text each, planned from a first pass that reads and
validates every input before anything is written); unit k writes shard k of each split (none when the unit has no
document of that split) under temporary names, renames them, then records itself in ``.prepare/``. A rerun with the
same arguments skips recorded units and redoes the rest, so a run killed at any moment and rerun produces the same
bytes as an uninterrupted one. The train/val split is per document, from ``seed`` alone.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from loopjax.config import _check_float, _check_int, _fail

FORMAT_VERSION = 1
SHOW_SKIPPED = 5  # skipped files named in the manifest and summary
SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".parquet")
SPLITS = ("train", "val")
_STATE_DIR = ".prepare"


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Arguments of ``loopjax data prepare`` (see the module docstring).

    inputs: files, folders (recursive) or globs of .txt / .md (one document per file), .jsonl / .jsonl.gz (one
      document per line) and .parquet (one per row; needs the ``parquet`` extra, pyarrow).
    tokenizer: a Hugging Face ``tokenizer.json``, a folder holding one (an Ouro checkpoint folder), or "bytes".
    out: the corpus folder.
    text_field: the jsonl / parquet field holding a document's text.
    prompt_field, response_field: both set = SFT rows: a document is prompt + response and only response tokens
      (and EOS) are counted in the loss.
    val_fraction: the fraction of documents (chosen from ``seed``) held out as the "val" split.
    append_eos: end every document with EOS.
    bos_token, eos_token: token strings used when the tokenizer folder's config names none.
    skip_bad_lines: count and skip a jsonl line that is not JSON or lacks the field, instead of failing.
    unit_bytes: text bytes per work unit (= per shard).
    chunk_tokens: zarr chunk length: the most a read of one row decodes beyond the row.
    """

    inputs: tuple[str, ...]
    tokenizer: str
    out: str
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    val_fraction: float = 0.01
    append_eos: bool = True
    seed: int = 0
    bos_token: str | None = None
    eos_token: str | None = None
    skip_bad_lines: bool = False
    unit_bytes: int = 64 << 20
    chunk_tokens: int = 1 << 15

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, tuple) or not self.inputs or not all(isinstance(p, str) for p in self.inputs):
            _fail("inputs", self.inputs, "a non-empty tuple of paths, folders or globs")
        for name in ("tokenizer", "out", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, getattr(self, name), "a non-empty string")
        if (self.prompt_field is None) != (self.response_field is None):
            _fail("prompt_field", self.prompt_field, "set together with response_field (SFT rows) or neither")
        _check_float("val_fraction", self.val_fraction, 0.0, 0.5, lo_open=False)
        _check_int("seed", self.seed, 0)
        _check_int("unit_bytes", self.unit_bytes, 1)
        _check_int("chunk_tokens", self.chunk_tokens, 1)
        for name in ("append_eos", "skip_bad_lines"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")

    @property
    def sft(self) -> bool:
        return self.prompt_field is not None


# ------------------------------------------------------------------------------------------------ tokenizer

@dataclasses.dataclass
class CorpusTokenizer:
    """A tokenizer with the ids the corpus format needs. ``encode_batch(texts) -> (ids, lengths)``."""

    kind: str  # "bytes" or "hf"
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    sha256: str
    path: str | None = None
    hf: Any = None

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int64) and each text's length (no BOS / EOS added)."""
        if self.kind == "bytes":
            parts = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
            lengths = np.fromiter((len(p) for p in parts), np.int64, len(parts))
            return (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)), lengths
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encs = encode(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encs), np.int64, len(encs))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int64, int(lengths.sum()))
        return ids, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (BOS / EOS dropped)."""
        ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)]
        if self.kind == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)


def _special(folder: str, name: str) -> str | None:
    """``name`` ("bos_token" / "eos_token") from the folder's tokenizer_config.json or special_tokens_map.json."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    value = json.load(f).get(name)
            except (OSError, ValueError) as err:
                raise ValueError(f"tokenizer config {path}: cannot be read ({err})") from None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
    return None


def load_corpus_tokenizer(spec: str, *, bos_token: str | None = None,
                          eos_token: str | None = None) -> CorpusTokenizer:
    """The tokenizer named by ``spec`` ("bytes", a tokenizer.json, or a folder holding one) with its BOS / EOS ids.

    BOS / EOS come from the folder's tokenizer_config.json when it names them, else from ``bos_token`` /
    ``eos_token``; a named token missing from the vocabulary is an error.
    """
    if spec == "bytes":
        from loopjax.data import text

        return CorpusTokenizer("bytes", text.VOCAB_SIZE, text.BOS, text.EOS, sha256="bytes-v1")
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {spec!r}: no tokenizer.json there (pass a tokenizer.json file, a folder "
                                "holding one, or 'bytes')")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("a tokenizer.json needs the `tokenizers` package: pip install tokenizers") from None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        hf = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # tokenizers raises its own Exception subclass
        raise ValueError(f"tokenizer {path}: does not load as a Hugging Face tokenizer ({err})") from None
    folder = os.path.dirname(os.path.abspath(path))
    ids = {}
    for name, flag in (("bos", bos_token), ("eos", eos_token)):
        token = _special(folder, f"{name}_token") or flag
        ids[name] = None
        if token is not None:
            ids[name] = hf.token_to_id(token)
            if ids[name] is None:
                raise ValueError(f"--{name}-token {token!r}: not a token of {path}")
    return CorpusTokenizer("hf", hf.get_vocab_size(with_added_tokens=True), ids["bos"], ids["eos"],
                           sha256=hashlib.sha256(raw).hexdigest(), path=os.path.abspath(path), hf=hf)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype holding ids 0..vocab_size-1."""
    for name in ("uint8", "uint16", "uint32"):
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    raise ValueError(f"vocab_size={vocab_size}: does not fit uint32")


# ------------------------------------------------------------------------------------------------ documents

_replaced = [0]


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("loopjax-count-replace", _count_replace)


def input_files(inputs: Sequence[str]) -> list[str]:
    """Files named by ``inputs`` (files, folders searched recursively for known suffixes, globs); sorted, unique."""
    return scan_files(inputs)[0]


def scan_files(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(files read, files skipped): a folder's or a glob's files of other types are skipped (hidden files and
    folders are not listed at all); a file named directly must have a known suffix. Both sorted, unique."""
    found: set[str] = set()
    skipped: set[str] = set()
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise FileNotFoundError(f"input {spec!r}: the pattern matches nothing")
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, files in os.walk(m):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    found.update(os.path.join(root, f) for f in files if f.endswith(SUFFIXES))
                    skipped.update(os.path.join(root, f) for f in files
                                   if not f.endswith(SUFFIXES) and not f.startswith("."))
            elif os.path.isfile(m):
                if not m.endswith(SUFFIXES) and not glob.has_magic(spec):
                    raise ValueError(f"input {m!r}: unknown file type; must end with one of {SUFFIXES}")
                (found if m.endswith(SUFFIXES) else skipped).add(m)
            else:
                raise FileNotFoundError(f"input {m!r}: no such file or folder")
    return sorted(found), sorted(skipped - found)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="loopjax-count-replace")


def _record(obj: Any, cfg: PrepareConfig, where: str) -> Any:
    """The document of one jsonl line / parquet row: a str, or (prompt, response) for SFT; raises with ``where``."""
    fields = (cfg.prompt_field, cfg.response_field) if cfg.sft else (cfg.text_field,)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON object with field(s) {fields} expected, got {type(obj).__name__}")
    values = []
    for name in fields:
        if name not in obj:
            raise ValueError(f"{where}: no field {name!r} (fields: {sorted(obj)[:8]}; set --text-field / "
                             "--prompt-field / --response-field)")
        if not isinstance(obj[name], str):
            raise ValueError(f"{where}: field {name!r} is {type(obj[name]).__name__}, not a string")
        values.append(obj[name])
    return values[0] if len(values) == 1 else tuple(values)


def iter_documents(path: str, cfg: PrepareConfig, stats: dict) -> Iterator[Any]:
    """The documents of one file, in order; bad jsonl lines raise (file:line) or, with ``skip_bad_lines``, are
    counted in ``stats["skipped_lines"]``."""
    if path.endswith((".txt", ".md")):
        if cfg.sft:
            raise ValueError(f"{path}: SFT rows (--prompt-field / --response-field) need .jsonl or .parquet input")
        with open(path, "rb") as f:
            yield _decode(f.read())
    elif path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    try:
                        obj = json.loads(_decode(line))
                    except ValueError as err:
                        raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
                    doc = _record(obj, cfg, f"{path}:{line_no}")
                except ValueError:
                    if not cfg.skip_bad_lines:
                        raise
                    stats["skipped_lines"] += 1
                    continue
                yield doc
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading .parquet needs pyarrow: pip install 'loopjax[parquet]'") from None
        table = pq.read_table(path)
        for row_no, row in enumerate(table.to_pylist()):
            yield _record(row, cfg, f"{path}:row {row_no}")
    else:
        raise ValueError(f"input {path!r}: unknown file type")


def _doc_bytes(doc: Any) -> int:
    return len(doc.encode("utf-8")) if isinstance(doc, str) else sum(len(x.encode("utf-8")) for x in doc)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def scan_inputs(cfg: PrepareConfig) -> dict:
    """Pass 1: read and validate every input; sources (size, hash, documents), document text sizes, counters."""
    files, skipped_files = scan_files(cfg.inputs)
    if not files:
        raise ValueError(f"inputs {list(cfg.inputs)}: no {'/'.join(SUFFIXES)} file found"
                         + (f" (skipped {_named(skipped_files)})" if skipped_files else ""))
    stats = {"skipped_lines": 0, "replaced_bytes": 0}
    _replaced[0] = 0
    sources, sizes = [], []
    for path in files:
        n_before = len(sizes)
        sizes.extend(_doc_bytes(d) for d in iter_documents(path, cfg, stats))
        sources.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": _sha256(path),
                        "documents": len(sizes) - n_before})
    stats["replaced_bytes"] = _replaced[0]
    if not sizes:
        raise ValueError(f"inputs {list(cfg.inputs)}: the corpus is empty (no document in {len(files)} file(s))")
    return {"sources": sources, "doc_bytes": np.asarray(sizes, np.int64), "stats": stats,
            "skipped_files": skipped_files}


def _named(paths: Sequence[str], first: int = SHOW_SKIPPED) -> str:
    """"3 files of other types: a, b, c" naming at most ``first`` of them."""
    more = f", ... ({len(paths) - first} more)" if len(paths) > first else ""
    return f"{len(paths)} file{'s' if len(paths) != 1 else ''} of other types: {', '.join(paths[:first])}{more}"


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """bool [n_docs]: True for validation documents; deterministic from ``seed``; at least one of each split
    when ``val_fraction > 0`` and there are two or more documents."""
    u = np.random.default_rng([seed, 0x5EED]).random(n_docs)
    is_val = u < val_fraction
    if val_fraction > 0 and n_docs >= 2:
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return is_val


def plan_units(doc_bytes: np.ndarray, unit_bytes: int) -> list[int]:
    """Unit boundaries [0, ..., n_docs]: consecutive documents until a unit holds >= unit_bytes of text."""
    bounds, acc = [0], 0
    for d, b in enumerate(doc_bytes.tolist()):
        acc += b
        if acc >= unit_bytes:
            bounds.append(d + 1)
            acc = 0
    if bounds[-1] != len(doc_bytes):
        bounds.append(len(doc_bytes))
    return bounds


# ------------------------------------------------------------------------------------------------ writing

def _write_zarr(path: str, tokens: np.ndarray, chunk_tokens: int) -> None:
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path},
            "metadata": {"shape": [len(tokens)], "data_type": str(tokens.dtype),
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": [min(chunk_tokens, len(tokens))]}},
                         "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                    {"name": "zstd", "configuration": {"level": 1, "checksum": False}}]},
            "create": True, "delete_existing": True}
    ts.open(spec).result().write(tokens).result()


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _shard_paths(out: str, split: str, unit: int) -> dict[str, str]:
    base = os.path.join(out, split, f"{unit:05d}")
    return {"zarr": base + ".zarr", "offsets": base + ".offsets.npy", "loss_starts": base + ".loss_starts.npy"}


def _remove_unit(out: str, unit: int) -> None:
    for split in SPLITS:
        for p in _shard_paths(out, split, unit).values():
            for q in (p, p + ".tmp"):
                if os.path.isdir(q):
                    shutil.rmtree(q)
                elif os.path.exists(q):
                    os.remove(q)


def _encode(tok: CorpusTokenizer, texts: list[str], progress: Callable[[int, int, int], None]
            ) -> tuple[np.ndarray, np.ndarray]:
    """``tok.encode_batch`` in batches of about ``_BATCH_BYTES`` of text (bounded memory, progress per batch)."""
    all_ids, all_lens, lo = [], [], 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size < _BATCH_BYTES):
            size += len(texts[hi])
            hi += 1
        ids, lens = tok.encode_batch(texts[lo:hi])
        all_ids.append(ids)
        all_lens.append(lens)
        progress(hi - lo, size, len(ids))
        lo = hi
    return np.concatenate(all_ids), np.concatenate(all_lens)


_BATCH_BYTES = 8 << 20


def _write_unit(out: str, unit: int, docs: list, is_val: np.ndarray, tok: CorpusTokenizer, cfg: PrepareConfig,
                dtype: str, progress: Callable[[int, int, int], None]) -> dict:
    """Tokenise one unit's documents and write its shard of each split; returns the unit's record."""
    record = {"unit": unit}
    for split, want_val in (("train", False), ("val", True)):
        chosen = [doc for doc, v in zip(docs, is_val) if v == want_val]
        if not chosen:
            record[split] = {"documents": 0, "tokens": 0}
            continue
        if cfg.sft:
            p_ids, p_len = _encode(tok, [d[0] for d in chosen], lambda n, b, t: progress(0, b, t))
            r_ids, r_len = _encode(tok, [d[1] for d in chosen], progress)
            pieces_ids = (p_ids, r_ids)
            pieces_len = (p_len, r_len)
        else:
            ids, lens = _encode(tok, chosen, progress)
            pieces_ids, pieces_len = (ids,), (lens,)
        n = len(chosen)
        head = int(tok.bos_id is not None)
        tail = int(cfg.append_eos)
        doc_len = head + tail + sum(pieces_len)
        offsets = np.concatenate([[0], np.cumsum(doc_len)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), dtype)
        if head:
            tokens[offsets[:-1]] = tok.bos_id
        if tail:
            tokens[offsets[1:] - 1] = tok.eos_id
        pos = offsets[:-1] + head
        for ids, lens in zip(pieces_ids, pieces_len):
            # positions of every id of this piece: its document's write cursor + index within the piece
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            dest = np.repeat(pos - starts, lens) + np.arange(int(lens.sum()))
            tokens[dest] = ids
            pos = pos + lens
        if len(tokens) and int(tokens.max()) >= tok.vocab_size:
            raise ValueError(f"tokenizer produced id {int(tokens.max())} >= its vocab_size {tok.vocab_size}")
        paths = _shard_paths(out, split, unit)
        os.makedirs(os.path.dirname(paths["zarr"]), exist_ok=True)
        _write_zarr(paths["zarr"] + ".tmp", tokens, cfg.chunk_tokens)
        os.replace(paths["zarr"] + ".tmp", paths["zarr"])
        _save_npy(paths["offsets"], offsets)
        if cfg.sft:
            _save_npy(paths["loss_starts"], offsets[:-1] + head + pieces_len[0])
        record[split] = {"documents": n, "tokens": int(offsets[-1])}
    return record


class _Progress:
    def __init__(self, total_docs: int, total_bytes: int, enabled: bool):
        self.total_docs, self.total_mb, self.enabled = total_docs, total_bytes / 1e6, enabled
        self.t0, self.docs, self.mb, self.tokens = time.perf_counter(), 0, 0.0, 0
        self.shown = 0.0

    def update(self, docs: int, nbytes: int, tokens: int) -> None:
        self.docs, self.mb, self.tokens = self.docs + docs, self.mb + nbytes / 1e6, self.tokens + tokens
        if self.enabled and time.perf_counter() - self.shown > 0.2:
            self.shown = time.perf_counter()
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\rprepare: {self.docs}/{self.total_docs} documents, {self.mb:.1f}/{self.total_mb:.1f} MB, "
                  f"{rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def prepare(cfg: PrepareConfig, *, progress: bool | None = None) -> dict:
    """Prepare ``cfg.out`` (resuming an interrupted run with the same arguments); returns the manifest.

    Every input is read and validated, and the tokenizer loaded, before anything is written.
    """
    tok = load_corpus_tokenizer(cfg.tokenizer, bos_token=cfg.bos_token, eos_token=cfg.eos_token)
    if cfg.append_eos and tok.eos_id is None:
        raise ValueError(f"tokenizer {cfg.tokenizer!r}: names no EOS token; pass --eos-token STR or --no-append-eos")
    scan = scan_inputs(cfg)
    doc_bytes, n_docs = scan["doc_bytes"], len(scan["doc_bytes"])
    arguments = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "inputs")}
    arguments["inputs"] = [s["path"] for s in scan["sources"]]
    fingerprint = hashlib.sha256(json.dumps({"arguments": arguments, "tokenizer": tok.sha256,
                                             "sources": scan["sources"]}, sort_keys=True).encode()).hexdigest()
    manifest_path = os.path.join(cfg.out, "manifest.json")
    state = os.path.join(cfg.out, _STATE_DIR)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") != fingerprint:
            raise ValueError(f"--out {cfg.out}: holds a corpus prepared from other inputs or arguments; choose "
                             "another folder or delete it")
        shutil.rmtree(state, ignore_errors=True)
        return manifest
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.isdir(state):
        raise ValueError(f"--out {cfg.out}: exists, is not empty and is not a corpus being prepared; choose an "
                         "empty or new folder")
    os.makedirs(state, exist_ok=True)
    args_path = os.path.join(state, "fingerprint.json")
    if os.path.isfile(args_path):
        with open(args_path, encoding="utf-8") as f:
            if json.load(f).get("fingerprint") != fingerprint:
                raise ValueError(f"--out {cfg.out}: holds an unfinished run with other inputs or arguments; rerun "
                                 "that command or delete the folder")
    else:
        _write_json(args_path, {"fingerprint": fingerprint})

    is_val = split_documents(n_docs, cfg.val_fraction, cfg.seed)
    bounds = plan_units(doc_bytes, cfg.unit_bytes)
    dtype = token_dtype(tok.vocab_size)
    done = {}
    for u in range(len(bounds) - 1):
        path = os.path.join(state, f"unit_{u:05d}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                done[u] = json.load(f)
        else:
            _remove_unit(cfg.out, u)
    first_pending = min((u for u in range(len(bounds) - 1) if u not in done), default=None)
    bar = _Progress(n_docs, int(doc_bytes.sum()), sys.stderr.isatty() if progress is None else progress)
    if first_pending is not None:
        skip_docs = bounds[first_pending]
        file_first = np.cumsum([0] + [s["documents"] for s in scan["sources"]])
        stats = {"skipped_lines": 0}
        unit, docs, d = first_pending, [], skip_docs
        bar.update(skip_docs, int(doc_bytes[:skip_docs].sum()), 0)
        for i, source in enumerate(scan["sources"]):
            if file_first[i + 1] <= skip_docs:
                continue  # every document of this file is in a finished unit
            for j, doc in enumerate(iter_documents(source["path"], cfg, stats)):
                if file_first[i] + j < skip_docs:
                    continue
                docs.append(doc)
                d += 1
                if d == bounds[unit + 1]:
                    if unit not in done:
                        rec = _write_unit(cfg.out, unit, docs, is_val[bounds[unit]:d], tok, cfg, dtype, bar.update)
                        _write_json(os.path.join(state, f"unit_{unit:05d}.json"), rec)
                        done[unit] = rec
                    unit, docs = unit + 1, []
    bar.close()
    if len(done) != len(bounds) - 1:  # a file shrank between the two passes
        raise RuntimeError(f"inputs changed while `prepare` read them ({len(done)} of {len(bounds) - 1} units "
                           "written); rerun the same command")
    splits = {}
    for split in SPLITS:
        shards = [{"name": f"{u:05d}", "documents": done[u][split]["documents"], "tokens": done[u][split]["tokens"]}
                  for u in sorted(done) if done[u][split]["documents"]]
        splits[split] = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": {"kind": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "file": None if tok.path is None else os.path.basename(tok.path)},
        "dtype": dtype,
        "chunk_tokens": cfg.chunk_tokens,
        "append_eos": cfg.append_eos,
        "sft": cfg.sft,
        "arguments": arguments,
        "sources": scan["sources"],
        "documents": n_docs,
        "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
        "splits": splits,
        "skipped_lines": scan["stats"]["skipped_lines"],
        "skipped_files": len(scan["skipped_files"]),
        "skipped_files_first": scan["skipped_files"][:SHOW_SKIPPED],
        "replaced_bytes": scan["stats"]["replaced_bytes"],
    }
    if tok.path is not None:  # keep the tokenizer beside the corpus so it can be detokenised on its own
        shutil.copyfile(tok.path, os.path.join(cfg.out, "tokenizer.json.tmp"))
        os.replace(os.path.join(cfg.out, "tokenizer.json.tmp"), os.path.join(cfg.out, "tokenizer.json"))
    _write_json(manifest_path, manifest)  # the commit point
    shutil.rmtree(state, ignore_errors=True)
    hint = empty_val_hint(manifest)
    if hint:
        warnings.warn(hint, EmptyValidationWarning, stacklevel=2)
    return manifest


class EmptyValidationWarning(UserWarning):
    """``prepare`` held out a validation fraction but the val split came out empty."""


def empty_val_hint(manifest: dict) -> str | None:
    """The warning, with its fix, for a corpus asked to hold out a val split that has none; else None."""
    fraction = manifest["arguments"].get("val_fraction", 0)
    if manifest["splits"]["val"]["documents"] or not fraction:
        return None
    n = manifest["documents"]
    return (f"the val split is empty: {n} document{'s' if n != 1 else ''} with --val-fraction {fraction} holds "
            "none out (the split is by whole document), so `loopjax eval --data` and validation during training "
            "have nothing to score; fix: give two or more documents (a .txt/.md file is one document, a .jsonl "
            "line or parquet row is one), e.g. split the text into several files or jsonl records; or pass "
            "--val-fraction 0 to prepare without a val split")


def summary(manifest: dict) -> str:
    """One line per fact a user wants after ``prepare``."""
    s = manifest["splits"]
    lines = [f"documents: {manifest['documents']} (train {s['train']['documents']}, val {s['val']['documents']})",
             f"tokens: {manifest['tokens']} (train {s['train']['tokens']}, val {s['val']['tokens']}), "
             f"dtype {manifest['dtype']}, vocab {manifest['tokenizer']['vocab_size']}",
             f"shards: train {len(s['train']['shards'])}, val {len(s['val']['shards'])}"]
    if manifest["replaced_bytes"]:
        lines.append(f"undecodable bytes replaced by U+FFFD: {manifest['replaced_bytes']}")
    if manifest["skipped_lines"]:
        lines.append(f"bad lines skipped: {manifest['skipped_lines']}")
    if manifest.get("skipped_files"):
        shown = manifest["skipped_files_first"]
        extra = manifest["skipped_files"] - len(shown)
        more = f", ... ({extra} more)" if extra > 0 else ""
        lines.append(f"files skipped (not {'/'.join(SUFFIXES)}): {manifest['skipped_files']}: "
                     f"{', '.join(shown)}{more}")
    hint = empty_val_hint(manifest)
    if hint:
        lines.append(f"warning: {hint}")
    return "\n".join(lines)
