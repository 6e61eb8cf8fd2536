"""``loopjax`` command line: train, evaluate, generate from and convert checkpoints.

    loopjax train CONFIG [--workdir DIR] [--set key=value ...]
    loopjax eval CONFIG --workdir DIR [--step N] [--batches N] [--set key=value ...]
    loopjax generate CONFIG --workdir DIR --prompt TEXT [--max-new-tokens N] [--step N] [--set ...]
    loopjax convert import HF_DIR CONFIG --workdir DIR [--set ...]     (an Ouro HF checkpoint -> step 0)
    loopjax convert export CONFIG --workdir DIR --out HF_DIR [--step N] [--source HF_DIR] [--set ...]

CONFIG is a Python file defining ``get_config() -> Experiment``, a name under ``experiments/configs/``
(``tiny_text``), or a module path. ``--set`` overrides any field by its dotted path (see
``loopjax.train.experiment``). A SIGTERM / SIGINT during ``train`` saves a checkpoint and exits with 128 + the
signal number; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopjax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, workdir_required=True):
        sp.add_argument("config", help="config file, name under experiments/configs/, or module")
        sp.add_argument("--workdir", required=workdir_required, help="run directory (checkpoints, metrics)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")

    common(sub.add_parser("train", help="train (resumes from WORKDIR when it holds a checkpoint)"), False)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on the config's eval data")
    common(ev)
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    ev.add_argument("--batches", type=int, default=None, help="eval batches (default train.eval_batches)")
    gen = sub.add_parser("generate", help="continue a text prompt with a trained checkpoint")
    common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--step", type=int, default=None)
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

    exp = _experiment(args)
    _, eval_data = build_data(exp)
    trainer = _restored(exp, args, eval_data)
    metrics = trainer.evaluate(n_batches=args.batches)
    trainer.close()
    print(json.dumps({"step": trainer.resumed_from, **metrics}))
    return 0


def cmd_generate(args) -> int:
    try:
        from loopjax.generate import generate_text
    except ImportError as err:
        raise SystemExit(f"loopjax generate: loopjax.generate is not available ({err})") from None
    trainer = _restored(_experiment(args), args)
    out = generate_text(trainer.model(), args.prompt, max_new_tokens=args.max_new_tokens)
    trainer.close()
    print(out.text)
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"loopjax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
