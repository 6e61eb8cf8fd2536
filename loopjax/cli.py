"""``loopjax`` command line: train, evaluate, generate from and convert checkpoints.

    loopjax train CONFIG [--workdir DIR] [--set key=value ...]
    loopjax eval CONFIG --workdir DIR [--step N] [--batches N] [--set key=value ...]
    loopjax eval (WORKDIR | OURO_DIR) --data PREPARED_DIR [--split val] [--max-tokens N] [--exit-rule q=0.5]
        [--batch-size B] [--seq-len S] [--step N] [--json PATH]     (CE / perplexity at every loop depth)
    loopjax data prepare INPUT... --tokenizer (TOKENIZER_JSON | DIR | bytes) --out DIR [--text-field text]
        [--prompt-field F --response-field F] [--val-fraction 0.01] [--no-append-eos] [--seed N]
        [--bos-token STR] [--eos-token STR] [--skip-bad-lines]
    loopjax generate (--checkpoint DIR | --ouro DIR | CONFIG --workdir DIR) --prompt TEXT [--max-new-tokens N]
        [--exit-rule q=0.5|fixed=3|act=0.01|conv=0.01|none] [--kv-mode per_step|last_step|compute_all]
        [--show-depth] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--step N] [--set ...]
    loopjax convert import HF_DIR CONFIG --workdir DIR [--set ...]     (an Ouro HF checkpoint -> step 0)
    loopjax convert export CONFIG --workdir DIR --out HF_DIR [--step N] [--source HF_DIR] [--set ...]
    loopjax analyze CHECKPOINT --task phop|addition|igsm|none --out DIR [--set task.KEY=VALUE ...] [--n-loops N]
        [--record-loops N] [--ouro] [--step N] [--examples N] [--seq-len N] [--seed S] [--power-iters N]
        [--q-grid 0.5,0.9] [--eps-grid 0.01,0.001]
    loopjax lm-eval (RUN_DIR | OURO_DIR) --tasks T1,T2 [--include-path DIR] [--depths 1,2,4,adaptive,adaptive-frozen]
        [--exit-rule q=0.5] [--limit N] [--batch-size B] [--max-length N] [--num-fewshot K] [--tokenizer T]
        [--out DIR]      (lm-evaluation-harness tasks at every loop depth, FLOPs per token; .[eval])
    loopjax aot CONFIG_OR_PRESET --topology v5p:2x2x4 [--num-slices N] [--seq S] [--batch B] [--mesh fsdp=16]
        [--json PATH] [--sweep-remat] [--cost fit|full|none] [KEY=VALUE ...]   (TPU compile on a CPU host; .[tpu])

CONFIG is a Python file defining ``get_config() -> Experiment``, a name under ``experiments/configs/``
(``tiny_text``), or a module path. ``--set`` overrides any field by its dotted path (see
``loopjax.train.experiment``). A SIGTERM / SIGINT during ``train`` saves a checkpoint and exits with 128 + the
signal number; rerunning the same command resumes.

``generate`` takes its model from a training run directory (``--checkpoint DIR``: the experiment is rebuilt from
the ``DIR/checkpoints/config.json`` every run writes, so no CONFIG is needed), from an HF Ouro folder
(``--ouro DIR``), or, as before (kept for backwards compatibility), from ``CONFIG --workdir DIR``. Text goes
through ``tokenizer.json`` in that folder when there is one (the ``tokenizers`` package), else UTF-8 bytes.
``--show-depth`` prints every new token as ``piece[exit step]`` (coloured by exit step on a terminal) and a
JSON summary (mean exit step, loop iterations) on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from loopjax.config import config_from_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopjax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, workdir_required=True):
        sp.add_argument("config", help="config file, name under experiments/configs/, or module")
        sp.add_argument("--workdir", required=workdir_required, help="run directory (checkpoints, metrics)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    common(sub.add_parser("train", help="train (resumes from WORKDIR when it holds a checkpoint)"), False)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's eval data, or by loop depth (--data)")
    common(ev, False)
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    ev.add_argument("--batches", type=int, default=None, help="eval batches (default train.eval_batches)")
    _depth_eval_args(ev)
    _data_args(sub.add_parser("data", help="prepare tokenised corpora"))
    _generate_args(sub.add_parser("generate", help="continue a text prompt (training checkpoint or Ouro folder)"))
    _analyze_args(sub.add_parser("analyze", help="fixed points, attention, contraction, accuracy per FLOP -> DIR"))
    conv = sub.add_parser("convert", help="import / export HuggingFace Ouro checkpoints")
    csub = conv.add_subparsers(dest="direction", required=True)
    imp = csub.add_parser("import", help="HF Ouro folder -> a step-0 checkpoint in WORKDIR")
    imp.add_argument("src", help="HF checkpoint folder (config.json + safetensors)")
    common(imp)
    exp = csub.add_parser("export", help="a checkpoint in WORKDIR -> HF Ouro folder")
    common(exp)
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--step", type=int, default=None)
    exp.add_argument("--source", default=None, help="HF folder supplying tokenizer files and non-architecture fields")
    from loopjax.evaluation.run import add_arguments as lm_eval_arguments

    lm_eval_arguments(sub.add_parser("lm-eval", help="lm-evaluation-harness tasks at every loop depth (.[eval])"))
    from loopjax.aot import add_arguments as aot_arguments

    aot_arguments(sub.add_parser("aot", help="compile the train step for a TPU topology: memory, cost, est MFU"))
    return p


def _experiment(args):
    from loopjax.train.experiment import load_experiment

    return load_experiment(args.config, args.set)


def _trainer(exp, workdir, *, train_data=(), eval_data=None, restore_step=None):
    from loopjax.train import Trainer

    return Trainer(exp.model, exp.train, train_data=train_data, eval_data=eval_data, workdir=workdir,
                   config=exp.to_json(), restore_step=restore_step)


def _restored(exp, args, eval_data=None):
    """A Trainer holding the checkpoint of ``args.workdir`` (refuses an empty workdir)."""
    trainer = _trainer(exp, args.workdir, eval_data=eval_data, restore_step=getattr(args, "step", None))
    if trainer.resumed_from is None:
        raise SystemExit(f"loopjax: no checkpoint in {os.path.join(args.workdir, 'checkpoints')}")
    return trainer


def cmd_train(args) -> int:
    from loopjax.train.experiment import build_data

    exp = _experiment(args)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    train_data, eval_data = build_data(exp)
    trainer = _trainer(exp, workdir, train_data=train_data, eval_data=eval_data)
    if trainer.resumed_from is not None:
        print(f"loopjax: resuming {workdir} from step {trainer.resumed_from}", file=sys.stderr)
    result = trainer.fit()
    trainer.close()
    print(json.dumps({"step": result.step, "status": result.status, **result.metrics, **result.eval_metrics}))
    return 128 + result.signal if result.signal else 0


def cmd_eval(args) -> int:
    from loopjax.train.experiment import build_data

    if args.data is not None:
        return cmd_eval_depth(args)
    if args.workdir is None:
        raise ValueError("eval: give CONFIG --workdir DIR, or WORKDIR --data PREPARED_DIR")
    exp = _experiment(args)
    _, eval_data = build_data(exp)
    trainer = _restored(exp, args, eval_data)
    metrics = trainer.evaluate(n_batches=args.batches)
    trainer.close()
    print(json.dumps({"step": trainer.resumed_from, **metrics}))
    return 0


def _checked(kind, ok, allowed: str):
    """An argparse ``type`` that converts with ``kind`` and rejects values failing ``ok`` (argparse names the flag)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}")
        return value
    return parse


def exit_rule_arg(text: str):
    """``--exit-rule``: ``q=P`` (QExit), ``fixed=N`` (FixedExit), ``act=EPS`` (ACTExit), ``conv=EPS``
    (ConvergenceExit) or ``none`` (``halting.parse_exit_rule``)."""
    from loopjax import halting

    try:
        return halting.parse_exit_rule(text)
    except ValueError as err:
        msg = str(err)
        raise argparse.ArgumentTypeError(msg if msg.startswith(repr(text)) else f"{text!r}: {msg}") from None


def _generate_args(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("config", nargs="?", help="config (the CONFIG --workdir DIR form)")
    gen.add_argument("--workdir", help="training run directory (with CONFIG)")
    gen.add_argument("--checkpoint", metavar="DIR", help="training run directory; the model config is read from "
                     "DIR/checkpoints/config.json")
    gen.add_argument("--ouro", metavar="DIR", help="HF Ouro folder (config.json + safetensors)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    gen.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=64)
    gen.add_argument("--exit-rule", type=exit_rule_arg, default=None,
                     help="q=P (Ouro threshold), fixed=N, act=EPS, conv=EPS or none (default: all loops)")
    gen.add_argument("--kv-mode", choices=("per_step", "last_step", "compute_all"), default="per_step")
    gen.add_argument("--show-depth", action="store_true",
                     help="print each token with its exit step: piece[step], coloured on a terminal")
    gen.add_argument("--temperature", type=_checked(float, lambda v: v >= 0, "a float >= 0 (0 = greedy)"),
                     default=0.0)
    gen.add_argument("--top-k", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=None)
    gen.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "a float in (0, 1]"), default=None)
    gen.add_argument("--seed", type=int, default=0)


def _generation_model(args):
    """(model, folder searched for tokenizer.json) from --ouro, --checkpoint or CONFIG --workdir."""
    forms = [args.ouro is not None, args.checkpoint is not None, args.config is not None or args.workdir is not None]
    if sum(forms) != 1:
        raise ValueError("give exactly one model source: --checkpoint DIR, --ouro DIR or CONFIG --workdir DIR")
    if args.ouro is not None:
        if args.set or args.step is not None:
            raise ValueError("--set / --step apply to training checkpoints, not to --ouro")
        from loopjax.convert import load_ouro

        return load_ouro(args.ouro), args.ouro
    if args.checkpoint is not None:
        from loopjax.train.experiment import Experiment, apply_overrides

        path = os.path.join(args.checkpoint, "checkpoints", "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no checkpoints/config.json (not a training "
                                    "run directory?)")
        with open(path) as f:
            exp = apply_overrides(config_from_json(Experiment, json.load(f)), args.set)
        workdir = args.checkpoint
    else:
        if args.config is None or args.workdir is None:
            raise ValueError("the CONFIG form needs both CONFIG and --workdir DIR")
        exp, workdir = _experiment(args), args.workdir
    trainer = _trainer(exp, workdir, restore_step=args.step)
    if trainer.resumed_from is None:
        raise SystemExit(f"loopjax: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    model = trainer.model()
    trainer.close()
    return model, workdir


# 256-colour terminal codes from shallow (blue) to deep (red) exits
_DEPTH_COLOURS = (33, 37, 71, 178, 208, 196)


def _show_piece(piece: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in piece)


def annotate_depth(pieces: Sequence[str], exit_steps: Sequence[int], n_loops: int, colour: bool) -> str:
    """Each token's text with its exit step: ``piece[step]``, or the piece coloured by step on a terminal."""
    if not colour:
        return "".join(f"{_show_piece(p)}[{e}]" for p, e in zip(pieces, exit_steps))

    def paint(text, step):
        i = round((step - 1) * (len(_DEPTH_COLOURS) - 1) / max(n_loops - 1, 1))
        return f"\033[38;5;{_DEPTH_COLOURS[i]}m{text}\033[0m"

    legend = " ".join(paint(str(t), t) for t in range(1, n_loops + 1))
    return "".join(paint(_show_piece(p), e) for p, e in zip(pieces, exit_steps)) + f"\n(exit step: {legend})"


def cmd_generate(args) -> int:
    try:
        from loopjax.generate import Sampling, generate_text, load_tokenizer
    except ImportError as err:
        raise SystemExit(f"loopjax generate: loopjax.generate is not available ({err})") from None
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k / --top-p only apply when sampling: pass --temperature > 0")
    model, folder = _generation_model(args)
    from loopjax.halting import validate_exit_rule

    try:
        validate_exit_rule(args.exit_rule, model.cfg.n_loops, model.cfg.exit_gate)
    except ValueError as err:
        raise ValueError(f"--exit-rule: {err}") from None
    tok_path = os.path.join(folder, "tokenizer.json")
    tokenizer = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    out = generate_text(model, args.prompt, tokenizer, args.max_new_tokens, exit_rule=args.exit_rule,
                        kv_mode=args.kv_mode, sampling=Sampling(args.temperature, args.top_k, args.top_p),
                        seed=args.seed)
    if not args.show_depth:
        print(out.text)
        return 0
    print(annotate_depth(out.token_texts, out.exit_steps, model.cfg.n_loops, sys.stdout.isatty()))
    n = len(out.exit_steps)
    print(json.dumps({"tokens": n, "mean_exit_step": round(sum(out.exit_steps) / max(n, 1), 3),
                      "loop_iterations": out.n_iterations, "stopped": out.stopped}), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    try:
        from loopjax.convert import load_ouro, save_ouro
    except ImportError as err:
        raise SystemExit(f"loopjax convert: loopjax.convert is not available ({err})") from None
    exp = _experiment(args)
    if args.direction == "export":
        trainer = _restored(exp, args)
        files = save_ouro(trainer.model(), args.out, source=args.source)
        trainer.close()
        print(json.dumps({"step": trainer.resumed_from, "files": files}))
        return 0
    import jax.numpy as jnp
    from flax import nnx

    from loopjax.checkpoint import Checkpointer
    from loopjax.train import TrainState, make_optimizer

    model = load_ouro(args.src)
    exp = dataclasses.replace(exp, model=model.cfg)
    tx, _ = make_optimizer(exp.train)
    params = nnx.state(model, nnx.Param)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite=jnp.int32(0),
                       first_nonfinite=jnp.int32(-1))
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), config=exp.to_json(), async_save=False)
    if ckpt.all_steps():
        raise SystemExit(f"loopjax convert import: {args.workdir} already holds checkpoints {ckpt.all_steps()}")
    ckpt.save(0, state)
    ckpt.close()
    print(json.dumps({"workdir": args.workdir, "model": dataclasses.asdict(model.cfg)}))
    return 0


def _analyze_args(an: argparse.ArgumentParser) -> None:
    an.add_argument("checkpoint", metavar="CHECKPOINT",
                    help="training run directory (checkpoints/config.json + checkpoints), or with --ouro an HF Ouro "
                         "folder")
    an.add_argument("--task", required=True, choices=("phop", "addition", "igsm", "none"),
                    help="task for accuracy per FLOP (none: a fixed random token batch, no accuracy)")
    an.add_argument("--out", required=True, help="report folder (README.md, results.json, PNG plots)")
    an.add_argument("--set", action="append", default=[], metavar="task.KEY=VALUE",
                    help="a task keyword (defaults: the run's own task when it trained on --task)")
    an.add_argument("--n-loops", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=None,
                    help="deepest exit rule of the accuracy grid (default: the model's n_loops)")
    an.add_argument("--record-loops", type=_checked(int, lambda v: v >= 2, "an int >= 2"), default=None,
                    help="loops recorded for the trajectory metrics (default: --n-loops)")
    an.add_argument("--ouro", action="store_true", help="CHECKPOINT is an HF Ouro folder (loaded in float32)")
    an.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    an.add_argument("--examples", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=64,
                    help="task examples (or random rows with --task none)")
    an.add_argument("--seq-len", type=_checked(int, lambda v: v >= 2, "an int >= 2"), default=32,
                    help="row length of the random batch (--task none)")
    an.add_argument("--seed", type=int, default=0, help="task example stream / random batch seed")
    an.add_argument("--power-iters", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=50,
                    help="power-iteration steps for the Jacobian spectral norm")
    floats = _checked(lambda t: tuple(float(v) for v in t.split(",") if v.strip()), lambda v: all(x > 0 for x in v),
                      "comma-separated floats > 0")
    an.add_argument("--q-grid", type=floats, default=(0.25, 0.5, 0.75, 0.9), help="QExit thresholds (gated models)")
    an.add_argument("--eps-grid", type=floats, default=(0.1, 0.01, 0.001), help="ConvergenceExit thresholds")


def _analysis_task(name: str, base: dict, overrides: Sequence[str]):
    """A ``loopjax.data`` task ``name`` from ``base`` keywords and ``task.KEY=VALUE`` overrides."""
    import difflib

    from loopjax.data import IGSM, Addition, PHop
    from loopjax.train.experiment import parse_value

    cls = {"phop": PHop, "addition": Addition, "igsm": IGSM}[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = dict(base)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("task.") or key == "task.":
            raise ValueError(f"--set {item!r}: must be task.KEY=VALUE, e.g. task.seq_len=40")
        if key[5:] not in fields:
            near = difflib.get_close_matches(key[5:], fields, n=3, cutoff=0.5)
            raise ValueError(f"--set {key}: {cls.__name__} has no field {key[5:]!r}; nearest: {near or fields}")
        kwargs[key[5:]] = parse_value(text)
    kwargs = {k: tuple(map(tuple, v)) if k == "difficulties" else tuple(v) if isinstance(v, list) else v
              for k, v in kwargs.items()}
    return cls(**kwargs)


def cmd_analyze(args) -> int:
    import shlex

    import numpy as np

    from loopjax.analysis.report import analyze

    exp = None
    if args.ouro:
        if args.step is not None:
            raise ValueError("--step applies to training checkpoints, not to --ouro")
        from loopjax.convert import load_ouro

        model = load_ouro(args.checkpoint, dtype="float32")
    else:
        from loopjax.train.experiment import Experiment

        path = os.path.join(args.checkpoint, "checkpoints", "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{args.checkpoint}: no checkpoints/config.json (not a training run directory? "
                                    "pass --ouro for an HF Ouro folder)")
        with open(path) as f:
            exp = config_from_json(Experiment, json.load(f))
        trainer = _trainer(exp, args.checkpoint, restore_step=args.step)
        if trainer.resumed_from is None:
            raise SystemExit(f"loopjax: no checkpoint in {os.path.join(args.checkpoint, 'checkpoints')}")
        model = trainer.model()
        trainer.close()
    task = tokens = None
    if args.task == "none":
        if args.set:
            raise ValueError("--set task.KEY=VALUE needs a task: pass --task phop|addition|igsm")
        seq_len = min(args.seq_len, model.cfg.max_seq_len)
        tokens = np.random.default_rng(args.seed).integers(0, model.cfg.vocab_size, (args.examples, seq_len))
    else:
        own = exp is not None and exp.data.source == args.task
        base = {"seq_len": exp.train.seq_len, **exp.data.task} if own else {}
        task = _analysis_task(args.task, base, args.set)
    command = ["loopjax", "analyze", args.checkpoint, "--task", args.task, "--out", args.out]
    command += [a for s in args.set for a in ("--set", s)] + (["--ouro"] if args.ouro else [])
    flags = ["n_loops", "record_loops", "step", "examples", "seed", "power_iters"] + ["seq_len"] * (tokens is not None)
    for flag in flags:  # every effective value, so the recorded command reproduces the report
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if task is not None:
        command += [a for f in ("q_grid", "eps_grid") for a in (f"--{f.replace('_', '-')}",
                                                                 ",".join(f"{v:g}" for v in getattr(args, f)))]
    name = os.path.basename(os.path.normpath(args.checkpoint))
    result = analyze(model, task=task, tokens=tokens, out_dir=args.out, n_loops=args.n_loops,
                     record_loops=args.record_loops, examples=args.examples, seed=args.seed,
                     power_iters=args.power_iters, q_grid=args.q_grid, eps_grid=args.eps_grid, name=name,
                     command=shlex.join(command))
    print(json.dumps({"out": args.out, "files": result["files"], "n_loops": result["n_loops"],
                      "sigma": result["contraction"]["sigma"]}))
    return 0


# ------------------------------------------------------------------------------------------------ data, eval by depth

def _data_args(data: argparse.ArgumentParser) -> None:
    dsub = data.add_subparsers(dest="action", required=True)
    pr = dsub.add_parser("prepare", help="tokenise text files into a corpus folder (resumable; rerun to continue)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help=".txt/.md/.jsonl/.jsonl.gz/.parquet files, folders, globs")
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json, a folder holding one (Ouro), or 'bytes'")
    pr.add_argument("--out", required=True, help="corpus folder")
    pr.add_argument("--text-field", default="text", help="jsonl / parquet field of the text")
    pr.add_argument("--prompt-field", default=None, help="SFT: prompt field (loss only on the response)")
    pr.add_argument("--response-field", default=None, help="SFT: response field")
    pr.add_argument("--val-fraction", type=_checked(float, lambda v: 0 <= v <= 0.5, "a float in [0, 0.5]"),
                    default=0.01)
    pr.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True)
    pr.add_argument("--seed", type=_checked(int, lambda v: v >= 0, "an int >= 0"), default=0)
    pr.add_argument("--bos-token", default=None, help="BOS token string when the tokenizer config names none")
    pr.add_argument("--eos-token", default=None, help="EOS token string when the tokenizer config names none")
    pr.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad jsonl lines instead of failing")
    pr.add_argument("--unit-mb", type=_checked(float, lambda v: v > 0, "a float > 0"), default=64.0,
                    help="text per shard (MB)")
    pr.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")


def cmd_data(args) -> int:
    import warnings

    from loopjax.data.prepare import EmptyValidationWarning, PrepareConfig, prepare, summary

    cfg = PrepareConfig(inputs=tuple(args.inputs), tokenizer=args.tokenizer, out=args.out,
                        text_field=args.text_field, prompt_field=args.prompt_field,
                        response_field=args.response_field, val_fraction=args.val_fraction,
                        append_eos=args.append_eos, seed=args.seed, bos_token=args.bos_token,
                        eos_token=args.eos_token, skip_bad_lines=args.skip_bad_lines,
                        unit_bytes=max(1, int(args.unit_mb * 1e6)))
    try:
        with warnings.catch_warnings():  # the summary below states it, with its fix
            warnings.simplefilter("ignore", EmptyValidationWarning)
            manifest = prepare(cfg, progress=False if args.no_progress else None)
    except ImportError as err:
        raise ValueError(str(err)) from None
    print(summary(manifest), file=sys.stderr)
    print(json.dumps({"out": args.out, "documents": manifest["documents"], "tokens": manifest["tokens"],
                      "train_tokens": manifest["splits"]["train"]["tokens"],
                      "val_tokens": manifest["splits"]["val"]["tokens"], "vocab_size":
                      manifest["tokenizer"]["vocab_size"], "replaced_bytes": manifest["replaced_bytes"],
                      "skipped_lines": manifest["skipped_lines"], "skipped_files": manifest.get("skipped_files", 0)}))
    return 0


def _depth_eval_args(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--data", metavar="PREPARED_DIR", default=None,
                    help="evaluate CE / perplexity per loop depth on this prepared corpus (CONFIG is then a training "
                         "run directory or an HF Ouro folder)")
    ev.add_argument("--split", choices=("val", "train"), default="val")
    ev.add_argument("--max-tokens", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=None)
    ev.add_argument("--batch-size", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=8)
    ev.add_argument("--seq-len", type=_checked(int, lambda v: v >= 1, "an int >= 1"), default=None,
                    help="row length (default: the run's train.seq_len, or min(512, max_seq_len) for Ouro)")
    ev.add_argument("--exit-rule", type=exit_rule_arg, default=argparse.SUPPRESS,
                    help="adaptive depth: q=P, fixed=N, act=EPS, conv=EPS or none (default q=0.5 when gated)")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the result JSON here")


def _eval_model(args):
    """(model, seq_len) from a training run directory or an HF Ouro folder (``args.config``)."""
    path = args.config
    run_cfg = os.path.join(path, "checkpoints", "config.json")
    if os.path.isfile(run_cfg):
        from loopjax.train.experiment import Experiment, apply_overrides

        with open(run_cfg) as f:
            exp = apply_overrides(config_from_json(Experiment, json.load(f)), args.set)
        trainer = _trainer(exp, path, restore_step=args.step)
        if trainer.resumed_from is None:
            raise SystemExit(f"loopjax: no checkpoint in {os.path.join(path, 'checkpoints')}")
        model = trainer.model()
        trainer.close()
        return model, exp.train.seq_len, trainer.resumed_from
    if os.path.isfile(os.path.join(path, "config.json")):
        if args.step is not None or args.set:
            raise ValueError("--step / --set apply to training run directories, not to an HF Ouro folder")
        from loopjax.convert import load_ouro

        model = load_ouro(path, dtype="float32")
        return model, min(512, model.cfg.max_seq_len), None
    raise FileNotFoundError(f"eval {path}: neither a training run directory (checkpoints/config.json) nor an HF "
                            "Ouro folder (config.json)")


def cmd_eval_depth(args) -> int:
    from loopjax.data.tokens import PackedTokenSource, read_manifest
    from loopjax.halting import QExit, validate_exit_rule
    from loopjax.train.depth_eval import depth_table, evaluate_by_depth, rows_to_batches

    if args.workdir is not None:
        raise ValueError("--workdir: not used with --data (give the run directory or Ouro folder as the argument)")
    manifest = read_manifest(args.data)
    model, seq_len, step = _eval_model(args)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > model.cfg.vocab_size:
        raise ValueError(f"--data {args.data}: its tokenizer has {vocab} ids, more than the model's vocab_size "
                         f"{model.cfg.vocab_size}")
    seq_len = args.seq_len or seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len}: must be <= the model's max_seq_len {model.cfg.max_seq_len}")
    rule = getattr(args, "exit_rule", "default")
    if rule == "default":
        rule = QExit(0.5) if model.cfg.exit_gate else None
    if rule is not None:
        try:
            validate_exit_rule(rule, model.cfg.n_loops, model.cfg.exit_gate)
        except ValueError as err:
            raise ValueError(f"--exit-rule: {err}") from None
    source = PackedTokenSource(args.data, seq_len, split=args.split)
    result = evaluate_by_depth(model, rows_to_batches(source, args.batch_size, max_tokens=args.max_tokens),
                               exit_rule=rule)
    result.update({"step": step, "data": args.data, "split": args.split, "seq_len": seq_len})
    print(depth_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


def cmd_aot(args) -> int:
    from loopjax.aot import cmd_aot as run

    return run(args)


def cmd_lm_eval(args) -> int:
    from loopjax.evaluation.run import run_command

    try:
        return run_command(args)
    except ImportError as err:
        print(f"loopjax lm-eval: {err}", file=sys.stderr)
        return 2


COMMANDS = {"lm-eval": cmd_lm_eval, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "convert": cmd_convert, "analyze": cmd_analyze, "data": cmd_data, "aot": cmd_aot}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `aot` takes arguments after its options (KEY=VALUE overrides)
        if args.command != "aot":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from loopjax.aot import take_trailing_overrides

        take_trailing_overrides(parser, args, extra)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"loopjax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
