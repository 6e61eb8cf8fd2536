"""The "Train on your own text" recipe end to end on a tiny Ouro folder and a BPE tokenizer trained here:
prepare with the folder's tokenizer -> convert import -> train (Ouro objective, packed rows) -> eval per loop depth,
on the training run and on the Ouro folder itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loopjax.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "experiments" / "configs" / "ouro_continue.py")
WORDS = ["loop", "depth", "token", "exit", "gate", "layer", "the", "a", "of", "runs", "again", "state"]


def _docs(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + "." for _ in range(n)]


def _tiny_ouro_with_tokenizer(tmp_path: Path, docs: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path / "ouro"
    shutil.copytree(REPO / "tests" / "data" / "ouro", folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                                      show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                              "eos_token": "<|endoftext|>"}))
    return folder


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _eval(target, corpus, capsys, *extra):
    assert main(["eval", str(target), "--data", str(corpus), "--seq-len", "32", "--batch-size", "4",
                 "--max-tokens", "256", *extra]) == 0
    out = capsys.readouterr().out
    assert "| depth | CE | PPL |" in out
    return _last_json(out)


@pytest.mark.slow
def test_ouro_continue_recipe_prepare_import_train_eval_per_loop(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng()
    docs = _docs(rng, 120)
    ouro = _tiny_ouro_with_tokenizer(tmp_path, docs)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, d in enumerate(docs[:20]):
        (texts / f"{i}.txt").write_text(d)
    with open(texts / "more.jsonl", "w") as f:
        for d in docs[20:]:
            f.write(json.dumps({"text": d}) + "\n")
    corpus, wd = tmp_path / "corpus", tmp_path / "run"

    assert main(["data", "prepare", str(texts), "--tokenizer", str(ouro), "--out", str(corpus),
                 "--val-fraction", "0.2"]) == 0
    prepared = _last_json(capsys.readouterr().out)
    assert prepared["documents"] == 120 and prepared["vocab_size"] <= 256

    monkeypatch.setenv("OURO_DIR", str(ouro))
    assert main(["convert", "import", str(ouro), CONFIG, "--workdir", str(wd), "--set",
                 f"data.prepared={corpus}"]) == 0
    capsys.readouterr()
    at_import = _eval(wd, corpus, capsys)
    from_folder = _eval(ouro, corpus, capsys)
    assert at_import["step"] == 0 and from_folder["step"] is None
    assert len(at_import["loops"]) == 4 and at_import["tokens"] > 100
    for a, b in zip(at_import["loops"], from_folder["loops"]):  # same weights, same numbers
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
    ad = at_import["adaptive"]
    assert 1 <= ad["mean_exit_step"] <= 4 and 0 < ad["flops_ratio"] <= 1 and np.isfinite(ad["ce"])
    assert at_import["loops"][-1]["flops_ratio"] == pytest.approx(1.0)

    assert main(["train", CONFIG, "--workdir", str(wd), "--set", f"data.prepared={corpus}", "--set",
                 "train.steps=3", "--set", "train.seq_len=32", "--set", "train.learning_rate=1e-3", "--set",
                 "train.warmup_steps=1", "--set", "train.eval_every=3", "--set", "train.eval_batches=1"]) == 0
    trained = _last_json(capsys.readouterr().out)
    assert trained["step"] == 3 and np.isfinite(trained["eval/loss"])
    after = _eval(wd, corpus, capsys, "--exit-rule", "fixed=2", "--json", str(tmp_path / "depth.json"))
    assert after["step"] == 3 and after["adaptive"]["mean_exit_step"] == pytest.approx(2.0)
    assert after["adaptive"]["ce"] == pytest.approx(after["loops"][1]["ce"], rel=1e-4)
    assert json.loads((tmp_path / "depth.json").read_text())["loops"] == after["loops"]


def test_eval_refuses_a_corpus_with_more_ids_than_the_model(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("bytes need 258 ids; the tiny Ouro model has 256")
    corpus = tmp_path / "corpus"
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "--out", str(corpus),
                 "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(REPO / "tests" / "data" / "ouro"), "--data", str(corpus), "--split", "train"]) == 2
    assert "258 ids, more than the model's vocab_size 256" in capsys.readouterr().err


def test_eval_forms_are_clear_errors_when_mixed(tmp_path, capsys):
    assert main(["eval", "tiny_text"]) == 2
    assert "give CONFIG --workdir DIR, or WORKDIR --data PREPARED_DIR" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a prepared corpus" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("some text for a corpus")
    corpus = tmp_path / "corpus"
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "--out", str(corpus)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--data", str(corpus)]) == 2
    assert "neither a training run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", str(corpus), "--workdir", str(tmp_path)]) == 2
    assert "--workdir: not used with --data" in capsys.readouterr().err
