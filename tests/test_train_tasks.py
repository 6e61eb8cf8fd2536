"""fit_on_task / task_accuracy / accuracy_vs_loops, and the experiments' shared results writer."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import loopjax as lj
from experiments import common
from loopjax.config import HaltingConfig, TrainConfig
from loopjax.data import PHop, make_pipeline
from loopjax.data.tasks.base import answer_correct
from loopjax.train import Trainer
from loopjax.train.tasks import EVAL_SEED, TrainingInterrupted, accuracy_vs_loops, fit_on_task, task_accuracy

TASK = PHop(alphabet=4, n=12, hops=(1, 2), seq_len=13)


def _cfg(**kw):
    base = dict(vocab_size=TASK.vocab_size, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1, n_loops=3,
                max_seq_len=16)
    return lj.tiny(**{**base, **kw})


def _manual_accuracy(model, task, n_loops, count, seed=EVAL_SEED):
    examples = list(task.examples(seed, count))
    batch = task.eval_batch(seed=seed, count=count)
    logits = model(jnp.asarray(batch["inputs"]), n_loops=n_loops).logits
    correct = answer_correct(np.asarray(logits.argmax(-1)), batch)
    labels = np.array([ex.difficulty for ex in examples])
    return correct.mean(), {int(p): correct[labels == p].mean() for p in np.unique(labels)}


def test_task_accuracy_matches_a_direct_forward():
    model = lj.LoopedLM(_cfg(), rngs=nnx.Rngs(3))
    for n_loops in (1, 4):
        score = task_accuracy(model, TASK, n_loops=n_loops, count=40, batch_size=16)  # uneven last chunk
        acc, by = _manual_accuracy(model, TASK, n_loops, 40)
        assert score.accuracy == pytest.approx(acc, abs=1e-12)
        assert score.by_difficulty.keys() == by.keys()
        for p in by:
            assert score.by_difficulty[p] == pytest.approx(by[p], abs=1e-12)
        assert score.answer_exit == n_loops and score.n_examples == 40
    table = accuracy_vs_loops(model, TASK, [1, 3], count=40)
    assert sorted(table) == [1, 3]
    assert table[3].accuracy == pytest.approx(task_accuracy(model, TASK, n_loops=3, count=40).accuracy)


def test_task_accuracy_with_an_exit_rule_reports_answer_depth():
    model = lj.LoopedLM(_cfg(exit_gate=True), rngs=nnx.Rngs(4))
    batch = TASK.eval_batch(seed=EVAL_SEED, count=24)
    out = model(jnp.asarray(batch["inputs"]), n_loops=3, exit_rule=lj.QExit(0.5))
    score = task_accuracy(model, TASK, n_loops=3, exit_rule=lj.QExit(0.5), count=24)
    expect = np.asarray(out.exit_step, np.float64)[batch["mask"] > 0].mean()
    assert score.answer_exit == pytest.approx(expect)
    assert score.accuracy == pytest.approx(answer_correct(np.asarray(out.logits.argmax(-1)), batch).mean())


def test_task_accuracy_rejects_bad_arguments():
    model = lj.LoopedLM(_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="count"):
        task_accuracy(model, TASK, count=0)
    with pytest.raises(ValueError, match="batch_size"):
        task_accuracy(model, TASK, batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        task_accuracy(model, PHop(alphabet=4, n=40, hops=(2,)), count=4)


def test_fit_on_task_is_the_trainer_on_the_task_stream_and_resumes(tmp_path):
    tcfg = TrainConfig(steps=12, batch_size=16, seq_len=13, learning_rate=3e-3, warmup_steps=2, log_every=4,
                       ckpt_every=0, log_loop_losses=False, objective=HaltingConfig(objective="final"))
    cfg = _cfg()
    trainer = fit_on_task(cfg, tcfg, TASK, workdir=tmp_path / "run", progress=False)
    manual = Trainer(cfg, tcfg, train_data=iter(make_pipeline(TASK.source(seed=0), batch_size=16, seed=0)),
                     progress=False, tensorboard=False)
    manual.fit()
    assert trainer.step == manual.step == 12
    for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(manual.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = fit_on_task(cfg, tcfg, TASK, workdir=tmp_path / "run", progress=False)  # resumes at the end
    assert again.resumed_from == 12
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(manual.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = json.loads((tmp_path / "run" / "checkpoints" / "config.json").read_text())
    assert saved["task"]["class"] == "PHop" and saved["task"]["hops"] == [1, 2]


@dataclasses.dataclass(frozen=True)
class _TermAfter(PHop):
    """TASK's stream that sends this process one SIGTERM once ``after`` rows were read and a Python handler (the
    Trainer's, installed by ``fit``) is in place, so the signal lands inside the training loop."""

    after: int = 0
    calls: list = dataclasses.field(default_factory=list, compare=False)

    def lm_example(self, example):
        self.calls.append(1)
        if len(self.calls) >= self.after and callable(signal.getsignal(signal.SIGTERM)) and -1 not in self.calls:
            self.calls.append(-1)
            os.kill(os.getpid(), signal.SIGTERM)
        return super().lm_example(example)


def test_fit_on_task_stopped_by_sigterm_raises_and_a_rerun_resumes(tmp_path):
    tcfg = TrainConfig(steps=300, batch_size=8, seq_len=13, warmup_steps=2, log_every=50, ckpt_every=0,
                       log_loop_losses=False)
    task = _TermAfter(alphabet=4, n=12, hops=(1, 2), seq_len=13, after=40)
    with pytest.raises(TrainingInterrupted, match=f"signal {int(signal.SIGTERM)} at step .* of 300; checkpointed"):
        fit_on_task(_cfg(), tcfg, task, workdir=tmp_path / "run", progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        fit_on_task(_cfg(), tcfg, dataclasses.replace(task, calls=[]), progress=False)
    assert "nothing saved" in str(info.value) and 0 < info.value.result.step < 300
    again = fit_on_task(_cfg(), tcfg, TASK, workdir=tmp_path / "run", progress=False)  # the rest of the first run
    assert 0 < again.resumed_from < 300 and again.step == 300


def test_fit_on_task_rejects_mismatched_shapes():
    tcfg = TrainConfig(steps=1, batch_size=8, seq_len=20, warmup_steps=0)
    with pytest.raises(ValueError, match="seq_len"):
        fit_on_task(_cfg(), tcfg, TASK)
    with pytest.raises(ValueError, match="vocab_size"):
        fit_on_task(_cfg(vocab_size=4), TrainConfig(steps=1, batch_size=8, seq_len=13, warmup_steps=0),
                    TASK)


PRESETS = {"cpu": dict(steps=100, lr=1e-3, hops=(2, 4), d_model=32, n_heads=2, seeds=(0, 1)),
           "smoke": dict(steps=2, lr=1e-3, hops=(2,), d_model=16, n_heads=2, seeds=(0, 1))}


def test_experiment_flags_and_presets(tmp_path):
    parser = common.experiment_parser("demo", "A demo.\nmore", PRESETS)
    p = common.resolve_preset(parser.parse_args(["--set", "steps=7", "--set", "lr=1", "--set", "hops=[3]"]),
                              PRESETS)
    assert (p["steps"], p["lr"], p["hops"], p["seeds"], p["preset"]) == (7, 1.0, (3,), (0, 1), "cpu")
    assert p["out"] == common.RESULTS_ROOT / "demo"
    assert common.resolve_preset(parser.parse_args(["--smoke"]), PRESETS)["out"] == common.RUNS_ROOT / "demo-smoke"
    s = common.resolve_preset(parser.parse_args(["--smoke", "--out", str(tmp_path)]), PRESETS)
    assert s["steps"] == 2 and s["seeds"] == (0,) and s["out"] == tmp_path
    with pytest.raises(ValueError, match="unknown key"):
        common.resolve_preset(parser.parse_args(["--set", "stepz=3"]), PRESETS)
    with pytest.raises(ValueError, match="must be a int"):
        common.resolve_preset(parser.parse_args(["--set", "steps=fast"]), PRESETS)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        common.resolve_preset(parser.parse_args(["--set", "steps"]), PRESETS)
    cfg = common.model_config(p, 2, 3, vocab_size=10, seq_len=20)
    assert (cfg.n_layers, cfg.n_loops, cfg.d_model, cfg.n_kv_heads, cfg.max_seq_len) == (2, 3, 32, 2, 20)
    assert common.arch_label(2, 3) == "Loop 2⊗3" and common.arch_label(6, 1) == "Base 6⊗1"
    assert common.mean_pm([0.5, 0.7]) == f"60.0 ± {np.std([50, 70], ddof=1):.1f}"
    assert common.mean_pm([0.25]) == "25.0"


def test_write_results(tmp_path):
    rows = [{"model": "Loop 1⊗4", "params": 123456, "acc": 0.5}, {"model": "Base 1⊗1", "acc": None}]
    readme = common.write_results(tmp_path / "r", title="Demo", columns=["model", "params", "acc"], rows=rows,
                                  notes="A note.", data={"by": {(4, 6): 1.0, 2: np.float32(0.5)}},
                                  command="python -m experiments.demo --smoke")
    text = readme.read_text()
    assert "| Loop 1⊗4 | 123,456 | 0.5 |" in text and "| Base 1⊗1 | - | - |" in text
    assert "python -m experiments.demo --smoke" in text and "A note." in text and "Revision `" in text
    payload = json.loads((tmp_path / "r" / "results.json").read_text())
    assert payload["rows"][0]["params"] == 123456 and payload["data"]["by"] == {"(4, 6)": 1.0, "2": 0.5}
    assert (tmp_path / "r" / "command.txt").read_text().startswith("python -m experiments.demo --smoke")
    assert jax.device_count() >= 1
