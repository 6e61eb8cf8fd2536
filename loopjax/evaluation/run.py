"""``loopjax lm-eval``: evaluate tasks at every depth; a table per task, JSON per depth and combined, a PNG.

Offline by design: ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set (unless the caller set them) before
``datasets`` is first imported, so local tasks (``dataset_path: json`` with ``data_files``) run with no network
and a task that needs the hub fails with a message naming it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from loopjax.evaluation import depths as dp

INSTALL_HINT = "lm-eval is not installed: pip install 'loopjax[eval]' (lm-eval>=0.4.10, no torch needed)"
KIND = {dp.ADAPTIVE: "all loops run, rule picks read-out (Ouro)", dp.FROZEN: "masked while-loop, exited frozen"}


def go_offline() -> None:
    """Datasets and hub offline unless the environment already says otherwise (call before importing datasets)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def require_lm_eval() -> None:
    """ImportError with the install command when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def task_manager(tasks: Sequence[str], include_path: str | None):
    """A TaskManager knowing ``tasks``: the include path alone when it holds them all (fast), else with the
    harness's own tasks too; an unknown name is a ValueError with the nearest known names."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path}: not a folder")
    if include_path is not None:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    tm = TaskManager(include_path=include_path, include_defaults=True)
    for t in tasks:
        if t not in tm.all_tasks:
            near = difflib.get_close_matches(t, tm.all_tasks, n=3)
            where = f" or in --include-path {include_path}" if include_path else " (pass --include-path DIR for yours)"
            raise ValueError(f"task {t!r}: not a task of lm-eval{where}; nearest: {near}")
    return tm


def check_tasks_load(tasks: Sequence[str], tm) -> None:
    """Build each task once, so a dataset that is not on this machine fails naming its task and the fix."""
    import warnings

    from lm_eval.tasks import get_task_dict

    for t in tasks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict -> TaskManager.load in 0.4.1x
                get_task_dict([t], tm)
        except Exception as err:  # datasets / hub raise many types; the fix is the same
            raise ValueError(f"task {t!r}: its data could not be loaded offline ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:300] if str(err) else ''}). Standard tasks download from "
                             "the Hugging Face hub: run once with network and HF_DATASETS_OFFLINE=0 "
                             "HF_HUB_OFFLINE=0 to fill the cache, or write a local task (dataset_path: json, "
                             "dataset_kwargs.data_files) and pass --include-path") from None


def primary_metric(task_result: dict) -> str | None:
    """The first metric key of a task's results (e.g. "acc,none"): "metric,filter" keys only, so stderr, alias and
    bookkeeping such as "sample_len" (which lm-eval lists first) are excluded."""
    for k, v in task_result.items():
        if ("," in k and "_stderr," not in k and isinstance(v, (int, float))
                and not isinstance(v, bool)):
            return k
    return None


def evaluate_depths(lm, tasks: Sequence[str], tm, *, limit=None, num_fewshot=None, bootstrap_iters: int = 1000,
                    log_samples: bool = False) -> dict[str, Any]:
    """``simple_evaluate`` once per depth of ``lm`` (log-likelihoods scored once, for all depths).

    Returns {"per_depth": {depth: harness results}, "tasks": {task: [row per depth]}}; a row holds ``depth``,
    ``kind``, the harness's metric keys, ``mean_exit_depth``, ``flops_per_token`` and ``<metric>_per_tflop``.
    """
    from lm_eval import simple_evaluate

    per_depth, rows = {}, {}
    for d in lm.depths:
        lm.set_depth(d)
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=bootstrap_iters, log_samples=log_samples)
        per_depth[d] = res
        for task, metrics in res["results"].items():
            stats = lm.depth_stats(d, task)
            kind = KIND.get(d, f"{d} loop{'s' if d != 1 else ''}")
            row = {"depth": d, "kind": kind, **{k: v for k, v in metrics.items() if k != "alias"},
                   "mean_exit_depth": stats["mean_exit_depth"], "flops_per_token": stats["flops_per_token"]}
            key = primary_metric(metrics)
            fpt = stats["flops_per_token"]
            if key is not None and fpt:
                row[f"{key.split(',')[0]}_per_tflop"] = metrics[key] / (fpt / 1e12)
            rows.setdefault(task, []).append(row)
    return {"per_depth": per_depth, "tasks": rows}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def depth_table(task: str, rows: list[dict]) -> str:
    """A Markdown table of one task: a row per depth with its metrics ± stderr, exit depth, FLOPs/token."""
    metrics = [k for k in rows[0] if "," in k and "_stderr," not in k]
    per_tflop = [k for k in rows[0] if k.endswith("_per_tflop")]
    head = ["depth", "kind"] + metrics + ["mean exit depth", "FLOPs/token"] + [k.replace("_", " ") for k in per_tflop]
    lines = [f"### {task}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["depth"]), r["kind"]]
        for m in metrics:
            name, _, filt = m.partition(",")
            err = r.get(f"{name}_stderr,{filt}")
            cells.append(_fmt(r[m]) + ("" if err is None or isinstance(err, str) else f" ± {_fmt(err)}"))
        cells += [_fmt(r["mean_exit_depth"]), _fmt(r["flops_per_token"])] + [_fmt(r[k]) for k in per_tflop]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(tasks: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Metric vs FLOPs per token: a line per task through its fixed depths, adaptive points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for task, rows in tasks.items():
        key = primary_metric({k: v for k, v in rows[0].items() if "," in k})
        if key is None:
            continue
        fixed = sorted((r["flops_per_token"], r[key], r["depth"]) for r in rows
                       if isinstance(r["depth"], int) and r["flops_per_token"])
        line, = ax.plot([x for x, _, _ in fixed], [y for _, y, _ in fixed], "o-", label=f"{task} ({key})")
        for x, y, d in fixed:
            ax.annotate(str(d), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=8)
        for r in rows:
            if isinstance(r["depth"], str) and r["flops_per_token"]:
                marker = "*" if r["depth"] == dp.ADAPTIVE else "D"
                ax.plot(r["flops_per_token"], r[key], marker, color=line.get_color(), markersize=11,
                        markeredgecolor="black", label=f"{task} {r['depth']}")
    ax.set_xlabel("FLOPs per token")
    ax.set_ylabel("metric")
    ax.set_title(title or "accuracy vs FLOPs per token by loop depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: str, *, meta: dict) -> list[str]:
    """results_<depth>.json (the harness's own), results.json (combined), accuracy_vs_flops.png."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(out, exist_ok=True)
    files = []
    for d, res in result["per_depth"].items():
        path = os.path.join(out, f"results_depth_{d}.json")
        with open(path, "w") as f:
            json.dump({k: v for k, v in res.items() if k != "samples"}, f, indent=1, default=handle_non_serializable)
        files.append(path)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump({**meta, "tasks": result["tasks"]}, f, indent=1, default=handle_non_serializable)
    files.append(path)
    png = os.path.join(out, "accuracy_vs_flops.png")
    plot(result["tasks"], png, title=meta.get("model", ""))
    return files + [png]


def add_arguments(p) -> None:
    """The ``loopjax lm-eval`` flags."""
    p.add_argument("model", metavar="MODEL", help="a `loopjax train` run folder or an HF Ouro folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="folder of your own task YAMLs (local data)")
    p.add_argument("--depths", default=None,
                   help="comma-separated: ints (loops), adaptive (all loops run, the rule picks each token's "
                        "read-out, Ouro), adaptive-frozen (masked while-loop); default 1..L,adaptive")
    p.add_argument("--exit-rule", default=None, help="q=P, fixed=N, act=EPS, conv=EPS (default: the checkpoint's, "
                                                     "else q=0.5 for gated models)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled batch")
    p.add_argument("--max-length", type=int, default=None, help="input tokens per request (default max_seq_len)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget when a task names none")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, a folder holding one, or bytes (default: the "
                                                     "model folder's / the run's corpus)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default newest)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="bootstrap resamples for non-mean stderrs")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of generation tasks")
    p.add_argument("--out", default=None, help="folder for results_depth_*.json, results.json and the PNG")
    p.add_argument("--no-progress", action="store_true")


def run_command(args) -> int:
    """``loopjax lm-eval``: see ``add_arguments``. Every process runs it; process 0 prints and writes."""
    import logging
    import sys
    import warnings

    go_offline()
    require_lm_eval()
    from loopjax.sharding import init_distributed

    init_distributed()
    import jax

    for name, v, lo in (("--batch-size", args.batch_size, 1), ("--max-gen-toks", args.max_gen_toks, 1),
                        ("--num-fewshot", args.num_fewshot, 0), ("--bootstrap-iters", args.bootstrap_iters, 0)):
        if v is not None and v < lo:
            raise ValueError(f"{name} {v}: must be >= {lo}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit {args.limit}: must be > 0")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: name at least one task")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = task_manager(tasks, args.include_path)
    check_tasks_load(tasks, tm)

    from loopjax.evaluation.harness import LoopjaxLM
    from loopjax.evaluation.load import load_for_eval
    from loopjax.halting import parse_exit_rule

    loaded = load_for_eval(args.model, tokenizer=args.tokenizer, step=args.step)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found (no tokenizer.json in the folder, and the run trained on "
                         "a synthetic task); pass --tokenizer TOKENIZER_JSON | DIR | bytes")
    rule = loaded.exit_rule if args.exit_rule is None else parse_exit_rule(args.exit_rule)
    depth_spec = args.depths
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = LoopjaxLM(loaded.model, loaded.tokenizer, depths=depth_spec, exit_rule=rule,
                       batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                       mesh=loaded.mesh, rules=loaded.rules, seed=args.seed, progress=not args.no_progress)
    main = jax.process_index() == 0
    for w in caught:
        if main:
            print(f"loopjax lm-eval: warning: {w.message}", file=sys.stderr)
    result = evaluate_depths(lm, tasks, tm, limit=limit, num_fewshot=args.num_fewshot,
                             bootstrap_iters=args.bootstrap_iters)
    if not main:
        return 0
    for task, rows in result["tasks"].items():
        print(depth_table(task, rows))
        print()
    print(f"adaptive = {KIND[dp.ADAPTIVE]}; adaptive-frozen = {KIND[dp.FROZEN]}; exit rule {rule!r}; "
          "FLOPs/token: forward FLOPs (loopjax.flops) at the loops each token runs, per input token")
    meta = {"model": args.model, "tasks_requested": tasks, "depths": list(lm.depths), "exit_rule": repr(rule),
            "n_loops": lm.cfg.n_loops, "max_length": lm.max_length, "limit": limit,
            "num_fewshot": args.num_fewshot, "tokenizer": loaded.tokenizer_source, "compiles": dict(lm.scorer.compiles)}
    summary = {"tasks": result["tasks"], "compiles": meta["compiles"]}
    if args.out:
        summary["files"] = write_outputs(result, args.out, meta=meta)
    print(json.dumps(summary, default=str))
    return 0
