"""What every experiment script shares: presets and flags, model configs for a (k layers, L loops) arch, and the
results folder (Markdown table, JSON, exact command, git revision).

    parser = experiment_parser("phop", __doc__, PRESETS)
    args = parser.parse_args(argv)
    preset = resolve_preset(args, PRESETS)
    ...
    write_results(args.out, title="p-hop", columns=[...], rows=[...], notes="...")
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import loopjax as lj
from loopjax.analysis.report import git_revision
from loopjax.config import LoopedConfig

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
RUNS_ROOT = Path(__file__).resolve().parent.parent / "runs" / "results"  # gitignored
COMMITTED_PRESET = "cpu"  # its results are the ones committed under experiments/results/NAME
MODEL_KEYS = ("d_model", "n_heads", "n_kv_heads", "d_ff", "exit_gate", "norm_scheme", "step_norm", "input_injection",
              "remat_policy")


def experiment_parser(name: str, description: str | None, presets: dict[str, dict]) -> argparse.ArgumentParser:
    """Flags every experiment takes: --preset, --smoke, --seeds, --out, --set key=value."""
    if not presets:
        raise ValueError(f"presets={presets!r}: must name at least one preset")
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                description=(description or name).strip().splitlines()[0])
    p.add_argument("--preset", choices=sorted(presets), default="cpu" if "cpu" in presets else next(iter(presets)),
                   help="sizes and steps (cpu: a 2-core CPU; paper: the paper's sizes, for a TPU / GPU)")
    p.add_argument("--smoke", action="store_true", help="the 'smoke' preset, one seed: an end-to-end check")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--out", default=None, help=f"results folder (default experiments/results/{name} for the "
                   f"{COMMITTED_PRESET} preset, runs/results/{name}-PRESET for the others)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset value (a Python literal), e.g. --set steps=2000")
    p.set_defaults(experiment=name)
    return p


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolve_preset(args: argparse.Namespace, presets: dict[str, dict]) -> dict:
    """The chosen preset with ``--set`` overrides applied, ``seeds`` and ``out`` filled in."""
    name = "smoke" if args.smoke else args.preset
    if name not in presets:
        raise ValueError(f"preset {name!r}: this experiment has {sorted(presets)}")
    preset = dict(presets[name])
    for item in args.set:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: must be KEY=VALUE, e.g. steps=2000")
        if key not in preset:
            raise ValueError(f"--set {key}: unknown key for preset {name!r}; known: {sorted(preset)}")
        value = _literal(text)
        old = preset[key]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, tuple) and isinstance(value, (int, float)):
            value = (value,)
        if old is not None and type(value) is not type(old) and not (isinstance(old, float) and isinstance(value, int)):
            raise ValueError(f"--set {key}={text}: must be a {type(old).__name__} like the preset's {old!r}")
        preset[key] = value
    seeds = tuple(args.seeds) if args.seeds else tuple(preset.get("seeds", (0,)))
    if args.smoke and not args.seeds:
        seeds = seeds[:1]
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {seeds}: must be non-negative ints")
    preset["seeds"] = seeds
    preset["preset"] = name
    if args.out:
        preset["out"] = Path(args.out)
    elif name == COMMITTED_PRESET:
        preset["out"] = RESULTS_ROOT / args.experiment
    else:  # other presets never overwrite the committed results
        preset["out"] = RUNS_ROOT / f"{args.experiment}-{name}"
    return preset


def arch_label(k: int, n_loops: int) -> str:
    """Saunshi et al.'s notation: ``Base k⊗1`` (k distinct layers, once) or ``Loop k⊗L`` (k layers looped L times)."""
    return f"Base {k}⊗1" if n_loops == 1 else f"Loop {k}⊗{n_loops}"


def model_config(preset: dict, k: int, n_loops: int, vocab_size: int, seq_len: int, **overrides: Any) -> LoopedConfig:
    """A ``LoopedConfig`` of ``k`` core layers looped ``n_loops`` times, sized by the preset's model keys."""
    sizes = {key: preset[key] for key in MODEL_KEYS if key in preset}
    sizes.setdefault("n_kv_heads", sizes.get("n_heads", 4))
    return LoopedConfig(vocab_size=vocab_size, n_layers=k, n_loops=n_loops, max_seq_len=seq_len,
                        **{**sizes, **overrides})


def mean_pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"97.3 ± 1.2"``: mean ± standard deviation (over seeds) of ``values`` times ``scale``."""
    v = np.asarray(values, np.float64) * scale
    if v.size == 0:
        return "-"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def command_line() -> str:
    """The command that launched this process, as it would be typed."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py") and "experiments" in argv[0]:
        module = "experiments." + Path(argv[0]).stem
        argv = ["python", "-m", module] + argv[1:]
    elif argv and argv[0].endswith("pytest"):
        argv = ["python", "-m", "pytest"] + argv[1:]
    return shlex.join(argv)


def markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts keyed by ``columns``; missing cells print as ``-``)."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10_000:
            return f"{x:,}"
        return "-" if x is None else str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, *, title: str, columns: Sequence[str], rows: Sequence[dict],
                  notes: str = "", data: Any = None, command: str | None = None) -> Path:
    """Write ``README.md`` (title, command, revision, date, table, notes), ``results.json`` and ``command.txt``
    into ``out_dir``; return the README path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or command_line()
    rev = git_revision()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import jax

    device = f"{jax.devices()[0].platform} x {jax.device_count()}"
    table = markdown_table(columns, rows)
    text = (f"# {title}\n\n```\n{command}\n```\n\nRevision `{rev}`, {date}, devices: {device}, "
            f"loopjax {lj.__version__}.\n\n{table}\n")
    if notes:
        text += f"\n{notes.strip()}\n"
    (out / "README.md").write_text(text)
    (out / "command.txt").write_text(f"{command}\n# revision {rev}\n")
    payload = {"title": title, "command": command, "revision": rev, "date": date, "device": device,
               "columns": list(columns), "rows": list(rows), "data": data}
    (out / "results.json").write_text(json.dumps(_str_keys(payload), indent=1, default=_json_default) + "\n")
    print(f"\n{title}\n{table}\n\nresults: {out}")
    return out / "README.md"


def _str_keys(x: Any) -> Any:
    """JSON wants string keys: difficulty labels such as (depth, ops) become "(4, 6)"."""
    if isinstance(x, dict):
        return {k if isinstance(k, str) else str(k): _str_keys(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_str_keys(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    return repr(x)
