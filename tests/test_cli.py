"""CLI: config loading and validated overrides; train -> resume -> eval -> generate -> convert end to end."""

import json
import os
import re
import textwrap

import pytest

from loopjax.cli import main
from loopjax.config import HaltingConfig
from loopjax.train.experiment import Experiment, apply_overrides, load_experiment, parse_value

CONFIG = textwrap.dedent('''
    import loopjax as lj
    from loopjax.config import HaltingConfig, MeshConfig, TrainConfig
    from loopjax.train.experiment import DataConfig, Experiment

    def get_config():
        model = lj.tiny(vocab_size=258, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1, n_loops=2,
                        max_seq_len=16, norm_scheme="sandwich", step_norm=True, tie_embeddings=False)
        train = TrainConfig(steps=4, batch_size=8, seq_len=16, warmup_steps=1, learning_rate=3e-3, log_every=2,
                            eval_every=4, eval_batches=1, ckpt_every=2, log_loop_losses=False,
                            objective=HaltingConfig(objective="ouro"), mesh=MeshConfig(data=-1))
        return Experiment(model=model, train=train, data=DataConfig(source="text", paths=(TEXT,),
                                                                     eval_fraction=0.2))
''')


@pytest.fixture
def config_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The looped model reads this text again and again. " * 40)
    path = tmp_path / "cfg.py"
    path.write_text(f"TEXT = {str(text)!r}\n" + CONFIG)
    return str(path)


def test_parse_value_reads_literals_and_bare_strings():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("(4, 8)") == (4, 8)
    assert parse_value("true") is True and parse_value("None") is None and parse_value("ouro") == "ouro"


def test_overrides_apply_together_and_coerce_types(config_file):
    exp = load_experiment(config_file, ["train.steps=2", "train.warmup_steps=2", "train.learning_rate=1",
                                        "train.objective.objective=final", "model.n_loops=3",
                                        "data.paths=a.txt,b.txt", "train.mesh.data=-1"])
    assert isinstance(exp, Experiment)
    assert (exp.train.steps, exp.train.warmup_steps, exp.model.n_loops) == (2, 2, 3)
    assert exp.train.learning_rate == 1.0 and isinstance(exp.train.learning_rate, float)
    assert exp.train.objective == HaltingConfig(objective="final") and exp.data.paths == ("a.txt", "b.txt")


@pytest.mark.parametrize("override, match", [
    ("train.learnin_rate=1", "unknown config key 'train.learnin_rate'; nearest: .*'train.learning_rate'"),
    ("modl.d_model=8", "nearest: .*'model.d_model'"),
    ("train.objective=ouro", "group of settings"),
    ("train.steps=0", "steps=0: must be an int >= 1"),
    ("train.objective.objective=ouroo", "did you mean 'ouro'"),
    ("train.steps", "must be key=value"),
])
def test_bad_overrides_are_clear_errors(config_file, override, match):
    with pytest.raises(ValueError, match=match):
        load_experiment(config_file, [override])


def test_cli_reports_unknown_key_with_near_matches(config_file, capsys):
    assert main(["train", config_file, "--set", "train.batch_sise=2"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_cli_missing_config_is_an_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("tiny_text", "tiny_phop"):
        exp = load_experiment(name)
        assert exp.train.seq_len <= exp.model.max_seq_len
    assert apply_overrides(load_experiment("tiny_phop"), ["data.task.hops=(2,)"]).data.task["hops"] == (2,)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_resume_eval_generate_convert_end_to_end(config_file, tmp_path, capsys):
    wd = str(tmp_path / "run")
    assert main(["train", config_file, "--workdir", wd]) == 0
    first = _last_json(capsys.readouterr().out)
    assert first["step"] == 4 and first["status"] == "done" and "eval/loss" in first

    assert main(["train", config_file, "--workdir", wd, "--set", "train.steps=6"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "from step 4" in captured.err
    assert _last_json(captured.out)["step"] == 6

    assert main(["eval", config_file, "--workdir", wd, "--set", "train.steps=6"]) == 0
    ev = _last_json(capsys.readouterr().out)
    assert ev["step"] == 6 and ev["eval/loss"] > 0

    assert main(["generate", config_file, "--workdir", wd, "--set", "train.steps=6", "--prompt", "The",
                 "--max-new-tokens", "3"]) == 0
    legacy = capsys.readouterr().out
    # --checkpoint rebuilds the experiment from the run's checkpoints/config.json: same model, same text
    assert main(["generate", "--checkpoint", wd, "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == legacy
    assert main(["generate", "--checkpoint", wd, "--prompt", "The", "--max-new-tokens", "3", "--show-depth",
                 "--exit-rule", "fixed=1", "--kv-mode", "last_step"]) == 0
    assert re.fullmatch(r"(.+\[1\]){3}", capsys.readouterr().out.rstrip("\n"), re.S)

    hf = str(tmp_path / "hf")
    assert main(["convert", "export", config_file, "--workdir", wd, "--set", "train.steps=6", "--out", hf]) == 0
    assert _last_json(capsys.readouterr().out)["files"]
    imported = str(tmp_path / "imported")
    assert main(["convert", "import", hf, config_file, "--workdir", imported]) == 0
    capsys.readouterr()
    assert main(["eval", config_file, "--workdir", imported]) == 0
    ev_imported = _last_json(capsys.readouterr().out)
    assert ev_imported["step"] == 0
    assert ev_imported["eval/loss"] == pytest.approx(ev["eval/loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------- generate flags

OURO = os.path.join(os.path.dirname(__file__), "data", "ouro")


def _shown(piece: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in piece)


def test_generate_ouro_show_depth_matches_lj_generate(capsys):
    import numpy as np

    import loopjax as lj
    from loopjax.convert import load_ouro

    prompt = "Loops!"
    assert main(["generate", "--ouro", OURO, "--prompt", prompt, "--max-new-tokens", "8", "--exit-rule", "q=0.5",
                 "--kv-mode", "per_step", "--show-depth"]) == 0
    captured = capsys.readouterr()
    model = load_ouro(OURO)  # no tokenizer.json there: UTF-8 bytes
    out = lj.generate(model, np.asarray([list(prompt.encode())], np.int32), 8, exit_rule=lj.QExit(0.5),
                      kv_mode="per_step")
    tokens, steps = np.asarray(out.tokens[0]).tolist(), np.asarray(out.exit_steps[0]).tolist()
    pieces = [bytes([t]).decode("utf-8", errors="replace") for t in tokens]
    assert captured.out.rstrip("\n") == "".join(f"{_shown(p)}[{e}]" for p, e in zip(pieces, steps))
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert summary["tokens"] == 8 and summary["loop_iterations"] == out.total_iterations()
    assert summary["mean_exit_step"] == pytest.approx(np.mean(steps), abs=1e-3)


@pytest.mark.parametrize("flags, match", [
    (["--exit-rule", "q=1.5"], "argument --exit-rule: 'q=1.5': QExit.q=1.5"),
    (["--exit-rule", "half"], "argument --exit-rule: 'half': must be q=P, fixed=N"),
    (["--kv-mode", "per-step"], "argument --kv-mode: invalid choice"),
    (["--top-p", "0"], "argument --top-p: '0': must be a float in"),
    (["--temperature", "-1"], "argument --temperature: '-1': must be a float >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: '0': must be an int >= 1"),
])
def test_generate_bad_flag_values_name_the_flag(flags, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ouro", OURO, "--prompt", "x", *flags])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("flags, match", [
    (["--exit-rule", "fixed=5"], "--exit-rule: FixedExit.n=5: must be <= n_loops=4"),
    (["--top-k", "3"], "--top-k / --top-p only apply when sampling"),
    (["--checkpoint", OURO], "exactly one model source"),
])
def test_generate_bad_combinations_are_clear_errors(flags, match, capsys):
    assert main(["generate", "--ouro", OURO, "--prompt", "x", *flags]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_generate_checkpoint_without_run_config_is_an_error(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoints/config.json" in capsys.readouterr().err


def test_python_m_loopjax_aot_parses_like_the_cli_without_importing_it(capsys):
    from loopjax import aot

    assert aot.main(["tiny", "--topology", "v5e:1x1", "--cost", "none", "model.bogus=1"]) == 2
    assert "unknown config key 'model.bogus'" in capsys.readouterr().err


def test_no_library_module_imports_the_cli():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "loopjax"
    imports_cli = re.compile(r"^\s*(from loopjax\.cli|from loopjax import cli|import loopjax\.cli)", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "cli.py" and imports_cli.search(p.read_text())]
    assert offenders == []
