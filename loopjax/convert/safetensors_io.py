"""Streaming safetensors I/O: list a (possibly sharded) checkpoint, read one tensor at a time, write tensor by tensor.

Both directions are implemented here on the (simple) format rather than through the ``safetensors`` package:
reading uses plain file reads into owned arrays (bfloat16 as ``ml_dtypes.bfloat16``), because ``safe_open`` memory
maps the file and the mapped pages stay resident until it is closed; writing computes the header from shapes and
dtypes first, then fetches and writes one tensor at a time (``safetensors.numpy.save_file`` needs them all at once).
The files follow the safetensors format (little-endian u64 header length, JSON header padded to 8 bytes, raw
row-major data) with ``{"format": "pt"}`` metadata, as HuggingFace ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


_NUMPY_DTYPES = {name: dt for dt, name in _DTYPE_NAMES.items()}


def read_header(path: str) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, byte offset where the data starts) of one file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which loopjax cannot read")
        begin, end = info["data_offsets"]
        nbytes = int(np.prod(info["shape"], dtype=np.int64)) * _NUMPY_DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape {info['shape']} needs "
                             f"{nbytes}")
    return header, 8 + n


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: the shards named by the index JSON, or model.safetensors."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} (a HuggingFace safetensors checkpoint)")


def tensor_shapes(files: Sequence[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file) for every tensor, from the headers only (no tensor data is read)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        for name, info in read_header(path)[0].items():
            if name in out:
                raise ValueError(f"tensor {name!r} appears in both {out[name][1]} and {path}")
            out[name] = (tuple(info["shape"]), path)
    return out


def iter_tensors(files: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, file by file, in file order.

    Plain reads into owned arrays rather than a memory map: mapped pages of the file would stay resident (and
    count against the process) until the file is closed, which for a one-file checkpoint means a second copy.
    """
    for path in files:
        header, start = read_header(path)
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                f.seek(start + info["data_offsets"][0])
                dt = _NUMPY_DTYPES[info["dtype"]]
                count = int(np.prod(info["shape"], dtype=np.int64))
                yield name, np.fromfile(f, dtype=dt, count=count).reshape(info["shape"])


TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_file(path: str, specs: Sequence[TensorSpec], fetch: Callable[[str], np.ndarray],
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, calling ``fetch(name)`` for one tensor at a time (in ``specs`` order)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dt in specs:
        if np.dtype(dt) not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {np.dtype(dt)} has no safetensors name")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset,
                                                                                                     offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt in specs:
            arr = np.ascontiguousarray(fetch(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dt):
                raise ValueError(f"{name}: fetched {arr.dtype}{list(arr.shape)}, planned {np.dtype(dt)}{list(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # bytes view: the buffer protocol lacks bfloat16


def write_checkpoint(folder: str, specs: Sequence[TensorSpec], fetch: Callable[[str], np.ndarray], *,
                     max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus the index JSON when the
    tensors exceed ``max_shard_bytes`` (HuggingFace's naming). Returns the files written."""
    os.makedirs(folder, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        path = os.path.join(folder, SINGLE_NAME)
        write_file(path, shards[0], fetch)
        if os.path.exists(os.path.join(folder, INDEX_NAME)):  # a stale index would win over the new file on load
            os.remove(os.path.join(folder, INDEX_NAME))
        return [path]
    paths, weight_map = [], {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(os.path.join(folder, name), shard, fetch)
        paths.append(os.path.join(folder, name))
        for spec in shard:
            weight_map[spec[0]] = name
            total += int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return paths
