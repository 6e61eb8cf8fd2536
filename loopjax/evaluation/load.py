"""What ``loopjax lm-eval`` evaluates: a ``loopjax train`` run folder or an HF Ouro folder, with its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from loopjax import halting
from loopjax.config import config_from_json
from loopjax.evaluation.tokenizer import EvalTokenizer, load_eval_tokenizer


@dataclasses.dataclass
class Loaded:
    """A model ready to evaluate: parameters on ``mesh`` (sharded by ``rules``), its tokenizer (None when none
    could be found), the exit rule its checkpoint names (None for none), and where the tokenizer came from."""

    model: Any
    tokenizer: EvalTokenizer | None
    mesh: Any
    rules: Any
    exit_rule: Any
    tokenizer_source: str | None


def _run_tokenizer(exp) -> str | None:
    """The tokenizer a run trained with: its prepared corpus's, bytes for byte-level text, None for tasks."""
    data = exp.data
    if data.source == "text":
        return "bytes"
    if data.source == "tokens":
        from loopjax.data.tokens import read_manifest

        kind = read_manifest(data.prepared)["tokenizer"]["kind"]
        return "bytes" if kind == "bytes" else os.path.join(data.prepared, "tokenizer.json")
    return None


def load_for_eval(path: str, *, tokenizer: str | None = None, step: int | None = None,
                  dtype: str | None = "float32") -> Loaded:
    """Load ``path``: a run folder (``checkpoints/config.json``; its mesh and rules) or an HF Ouro folder
    (``config.json``; replicated on every device). ``tokenizer`` overrides the one found ("bytes", a
    tokenizer.json or a folder holding one)."""
    run_cfg = os.path.join(path, "checkpoints", "config.json")
    if os.path.isfile(run_cfg):
        from loopjax.train import Trainer
        from loopjax.train.experiment import Experiment

        with open(run_cfg) as f:
            exp = config_from_json(Experiment, json.load(f))
        trainer = Trainer(exp.model, exp.train, train_data=(), workdir=path, config=exp.to_json(), restore_step=step)
        if trainer.resumed_from is None:
            raise FileNotFoundError(f"{path}: no checkpoint in {os.path.join(path, 'checkpoints')}")
        model, mesh, rules = trainer.model(), trainer.mesh, trainer.rules
        trainer.close()
        found = _run_tokenizer(exp)
        rule = halting.QExit(0.5) if model.cfg.exit_gate else None
    elif os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise ValueError("--step: applies to training run folders, not to an HF Ouro folder")
        from loopjax.config import MeshConfig
        from loopjax.convert import load_ouro, ouro_exit_rule, read_hf_config
        from loopjax.sharding import make_mesh, rules_for

        mesh, rules = make_mesh(MeshConfig()), rules_for("dp")
        model = load_ouro(path, dtype=dtype, mesh=mesh, rules=rules)
        found = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        rule = ouro_exit_rule(read_hf_config(path)) or (halting.QExit(0.5) if model.cfg.exit_gate else None)
        if isinstance(rule, halting.FixedExit):
            rule = halting.QExit(0.5) if model.cfg.exit_gate else None
    else:
        raise FileNotFoundError(f"{path}: neither a `loopjax train` run folder (checkpoints/config.json) nor an HF "
                                "Ouro folder (config.json)")
    spec = tokenizer or found
    tok = None if spec is None else load_eval_tokenizer(spec)
    return Loaded(model, tok, mesh, rules, rule, spec)
