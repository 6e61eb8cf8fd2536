"""Experiments: a model, a training run and its data as one validated config, built from a Python config file
and ``key=value`` overrides, plus the data pipelines it names.

A config file (e.g. ``experiments/configs/tiny_text.py``) defines ``get_config() -> Experiment``. Overrides
address any field by its dotted path: ``train.learning_rate=1e-3``, ``model.n_loops=8``,
``train.objective.objective=ouro``, ``train.mesh.fsdp=2``, ``data.task.hops=(4,)``. Values are Python literals
(strings may be bare); an unknown key is an error that lists the nearest known keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import os
import warnings
from typing import Any, Callable, Iterable

from loopjax.config import LoopedConfig, TrainConfig, _check_choice, _check_float, _check_int, _fail

DATA_SOURCES = ("text", "tokens", "phop", "addition", "igsm")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    source: "text" (byte-level LM over local files: ``paths``), "tokens" (a corpus folder made by
      ``loopjax data prepare``: ``prepared``; packed rows with segment ids, positions and a loss mask, evaluated on
      its "val" split) or a synthetic task "phop", "addition", "igsm" (``task`` holds the task dataclass's keyword
      arguments; its ``seq_len`` defaults to ``train.seq_len``).
    paths: text files, directories or glob patterns (source "text").
    prepared: a prepared corpus folder (source "tokens").
    packing: source "tokens": "concat" (concat then split, no padding) or "first_fit" (documents up to a row
      long kept whole, rows padded; ``loopjax.data.tokens.first_fit_plan``).
    eval_fraction: text: the last fraction of windows is held out for evaluation.
    eval_seed: tasks: the seed of the held-out example stream (training uses ``train.seed``).
    worker_count: grain worker processes (0 = in-process).
    """

    source: str = "text"
    paths: tuple[str, ...] = ()
    prepared: str = ""
    packing: str = "concat"
    eval_fraction: float = 0.01
    task: dict = dataclasses.field(default_factory=dict)
    eval_seed: int = 1_000_003
    worker_count: int = 0

    def __post_init__(self) -> None:
        _check_choice("source", self.source, DATA_SOURCES)
        if not isinstance(self.paths, tuple) or not all(isinstance(p, str) for p in self.paths):
            _fail("paths", self.paths, "a tuple of path strings")
        if self.source == "text" and not self.paths:
            _fail("paths", self.paths, "non-empty for source='text' (files, directories or globs)")
        if not isinstance(self.prepared, str):
            _fail("prepared", self.prepared, "a path string")
        _check_choice("packing", self.packing, ("concat", "first_fit"))
        if self.source == "tokens" and not self.prepared:
            _fail("prepared", self.prepared, "a folder made by `loopjax data prepare` for source='tokens'")
        _check_float("eval_fraction", self.eval_fraction, 0.0, 0.5)
        if not isinstance(self.task, dict):
            _fail("task", self.task, "a dict of the task's keyword arguments")
        _check_int("eval_seed", self.eval_seed, 0)
        _check_int("worker_count", self.worker_count, 0)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A whole run: ``model`` (LoopedConfig), ``train`` (TrainConfig), ``data`` (DataConfig)."""

    model: LoopedConfig
    train: TrainConfig
    data: DataConfig

    def __post_init__(self) -> None:
        for name, cls in (("model", LoopedConfig), ("train", TrainConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, name), cls):
                _fail(name, getattr(self, name), f"a {cls.__name__}")

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------ overrides

def _dotted_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            keys.append(prefix + f.name)
            keys += _dotted_keys(getattr(obj, f.name), prefix + f.name + ".")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            keys.append(prefix + str(k))
    return keys


def parse_value(text: str) -> Any:
    """A Python literal (``3``, ``1e-3``, ``(4, 8)``, ``None``, ``True``), ``true`` / ``false``, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class _Node:
    """A dataclass taken apart (class + field values) so that overrides apply before any validation runs."""

    def __init__(self, obj: Any):
        self.cls = type(obj)
        self.fields = {f.name: _unbuild(getattr(obj, f.name)) for f in dataclasses.fields(obj)}

    def build(self) -> Any:
        return self.cls(**{k: v.build() if isinstance(v, _Node) else v for k, v in self.fields.items()})


def _unbuild(x: Any) -> Any:
    return _Node(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else x


def _coerce(old: Any, new: Any, key: str) -> Any:
    if isinstance(old, _Node):
        raise ValueError(f"{key}: is a group of settings; set one of its fields, e.g. "
                         f"{key}.{next(iter(old.fields))}=...")
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, tuple) and isinstance(new, (list, str)):
        return tuple(new) if isinstance(new, list) else tuple(p for p in new.split(",") if p)
    if isinstance(old, tuple) and not isinstance(new, tuple) and new is not None:
        return (new,)
    return new


def _set(node: Any, path: list[str], value: Any, key: str, root: Any) -> None:
    name, rest = path[0], path[1:]
    if isinstance(node, _Node):
        if name not in node.fields:
            near = difflib.get_close_matches(key, _dotted_keys(root), n=4, cutoff=0.5)
            raise ValueError(f"unknown config key {key!r}; nearest: {near or sorted(_dotted_keys(root))[:12]}")
        if rest:
            _set(node.fields[name], rest, value, key, root)
        else:
            node.fields[name] = _coerce(node.fields[name], value, key)
    elif isinstance(node, dict) and not rest:
        node[name] = value
    elif isinstance(node, dict) and name in node:
        _set(node[name], rest, value, key, root)
    else:
        raise ValueError(f"unknown config key {key!r}: {'.'.join(path)} is below a plain value")


def apply_overrides(exp: Any, overrides: Iterable[str]) -> Any:
    """``exp`` with every ``key=value`` applied, then validated once by the configs' own checks."""
    overrides = list(overrides)
    if not overrides:
        return exp
    tree = _unbuild(exp)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: must be key=value, e.g. train.learning_rate=1e-3")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r}: empty key")
        _set(tree, key.split("."), parse_value(text), key, exp)
    return tree.build()


# ------------------------------------------------------------------------------------------------ config files

def load_experiment(spec: str, overrides: Iterable[str] = ()) -> Experiment:
    """The ``get_config()`` of a config file path, a name under ``experiments/configs/``, or a module."""
    path = spec if spec.endswith(".py") else os.path.join("experiments", "configs", spec + ".py")
    if os.path.isfile(path):
        mod_spec = importlib.util.spec_from_file_location(f"loopjax_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    elif spec.endswith(".py"):
        raise FileNotFoundError(f"config file {spec!r} not found")
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError:
            raise FileNotFoundError(f"config {spec!r}: no file {path!r} and no module of that name") from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config {spec!r}: must define get_config() returning an Experiment")
    exp = module.get_config()
    if not isinstance(exp, Experiment):
        raise ValueError(f"config {spec!r}: get_config() returned {type(exp).__name__}, not an Experiment")
    return apply_overrides(exp, overrides)


# ------------------------------------------------------------------------------------------------ data

def _task(exp: Experiment):
    from loopjax.data import IGSM, Addition, PHop

    cls = {"phop": PHop, "addition": Addition, "igsm": IGSM}[exp.data.source]
    kwargs = {"seq_len": exp.train.seq_len, **exp.data.task}
    kwargs = {k: tuple(map(tuple, v)) if k == "difficulties" else tuple(v) if isinstance(v, list) else v
              for k, v in kwargs.items()}
    return cls(**kwargs)


def build_data(exp: Experiment) -> tuple[Any, Callable[[], Iterable[dict]]]:
    """(train iterator of this process's batches, a function returning a fresh eval iterable)."""
    import jax

    from loopjax.data import ByteTextSource, make_pipeline

    dcfg, tcfg = exp.data, exp.train
    n_proc = jax.process_count()
    if tcfg.batch_size % n_proc:
        raise ValueError(f"train.batch_size={tcfg.batch_size}: must be a multiple of the {n_proc} processes")
    local = tcfg.batch_size // n_proc
    if dcfg.source == "text":
        split = 1.0 - dcfg.eval_fraction
        train_src = ByteTextSource(dcfg.paths, tcfg.seq_len, fraction=(0.0, split))
        eval_src = ByteTextSource(dcfg.paths, tcfg.seq_len, fraction=(split, 1.0)) if dcfg.eval_fraction else None
        vocab = train_src.vocab_size
    elif dcfg.source == "tokens":
        from loopjax.data.tokens import PackedTokenSource, read_manifest

        manifest = read_manifest(dcfg.prepared)
        vocab = int(manifest["tokenizer"]["vocab_size"])
        if vocab > exp.model.vocab_size:  # checked before opening any shard or tracing anything
            raise ValueError(f"model.vocab_size={exp.model.vocab_size}: smaller than the vocabulary of "
                             f"{dcfg.prepared} ({vocab} ids, tokenizer {manifest['tokenizer']['sha256'][:12]})")
        train_src = PackedTokenSource(dcfg.prepared, tcfg.seq_len, split="train", packing=dcfg.packing)
        val_rows = max(manifest["splits"]["val"]["tokens"] - 1, 0) // tcfg.seq_len
        eval_src = (PackedTokenSource(dcfg.prepared, tcfg.seq_len, split="val", packing=dcfg.packing)
                    if val_rows >= local else None)
        if eval_src is None and tcfg.eval_every:
            warnings.warn(f"data.prepared={dcfg.prepared}: its val split has {val_rows} rows of {tcfg.seq_len}, "
                          f"fewer than one batch of {local}; no evaluation (prepare with a larger --val-fraction)",
                          stacklevel=2)
    else:
        task = _task(exp)
        if task.length != tcfg.seq_len:
            raise ValueError(f"train.seq_len={tcfg.seq_len}: must equal the task's row length {task.length}")
        train_src = task.source(seed=tcfg.seed)
        eval_src = task.source(seed=dcfg.eval_seed, num_examples=max(local * n_proc * tcfg.eval_batches, n_proc))
        vocab = task.vocab_size
    if vocab > exp.model.vocab_size:
        raise ValueError(f"model.vocab_size={exp.model.vocab_size}: must be >= the data's vocabulary {vocab}")
    train = make_pipeline(train_src, batch_size=local, seed=tcfg.seed, worker_count=dcfg.worker_count)

    def eval_data():
        if eval_src is None:
            return iter(())
        return make_pipeline(eval_src, batch_size=local, seed=0, shuffle=False, num_epochs=1,
                             drop_remainder=True)

    return iter(train), eval_data
