"""``loopjax data prepare``: round trips (txt, md, jsonl, jsonl.gz, parquet; bytes and a BPE trained here), the
deterministic split, SIGKILL + rerun giving identical bytes, manifest-less folders refused, every bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loopjax.cli import main
from loopjax.data.prepare import PrepareConfig, load_corpus_tokenizer, prepare, split_documents
from loopjax.data.tokens import PreparedSplit, read_manifest

REPO = Path(__file__).resolve().parent.parent
ALPHABET = list("abcdefghij klmnopqrstuvwxyz.,;!?\n") + ["é", "ß", "中", "🙂", "  "]


def random_docs(rng: np.random.Generator, n: int, max_len: int = 60) -> list[str]:
    """Fresh random documents (some empty, some non-ASCII)."""
    return ["".join(rng.choice(ALPHABET, size=int(rng.integers(0, max_len)))) for _ in range(n)]


def train_bpe(folder: Path, docs: list[str], vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained on ``docs``, saved as ``folder/tokenizer.json`` with a config naming
    BOS / EOS (the layout of an HF checkpoint folder such as Ouro's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return folder


def write_corpus(root: Path, docs: list[str]) -> Path:
    """docs spread over .txt, .md, .jsonl, .jsonl.gz files (in a nested folder)."""
    (root / "sub").mkdir(parents=True)
    q = len(docs) // 4
    for i, d in enumerate(docs[:q]):
        (root / ("sub" if i % 2 else ".") / f"doc{i:03d}.{'md' if i % 3 == 0 else 'txt'}").write_bytes(d.encode())
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[q:2 * q]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(root / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[2 * q:]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "notes.csv").write_text("ignored: not a known suffix inside a folder")
    return root


def all_documents(out: str, decode) -> list[str]:
    docs = []
    for split in ("train", "val"):
        if read_manifest(out)["splits"][split]["documents"]:
            s = PreparedSplit(out, split)
            docs += [decode(s.document(d)) for d in range(s.num_documents)]
    return docs


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_prepare_read_detokenise_round_trip(tmp_path, kind):
    rng = np.random.default_rng()
    docs = random_docs(rng, 40)
    src = write_corpus(tmp_path / "src", docs)
    spec = "bytes" if kind == "bytes" else str(train_bpe(tmp_path / "tok", docs))
    out = str(tmp_path / "out")
    manifest = prepare(PrepareConfig(inputs=(str(src),), tokenizer=spec, out=out, val_fraction=0.2, seed=3,
                                     unit_bytes=200))
    tok = load_corpus_tokenizer(spec)
    assert sorted(all_documents(out, tok.decode)) == sorted(docs)
    assert manifest["documents"] == 40 and len(manifest["sources"]) == len(docs) // 4 + 2
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == tok.vocab_size
    assert manifest["tokenizer"]["bos_id"] == tok.bos_id is not None and tok.eos_id is not None
    assert manifest["splits"]["val"]["documents"] == int(split_documents(40, 0.2, 3).sum()) > 0
    assert len(manifest["splits"]["train"]["shards"]) > 1  # unit_bytes=200 cuts several shards
    s = PreparedSplit(out, "train")
    first = s.document(0)
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert s.num_tokens == manifest["splits"]["train"]["tokens"]
    assert not os.path.exists(os.path.join(out, ".prepare"))
    # a rerun of a finished corpus is a no-op returning the same manifest
    assert prepare(PrepareConfig(inputs=(str(src),), tokenizer=spec, out=out, val_fraction=0.2, seed=3,
                                 unit_bytes=200)) == manifest


def test_parquet_input_or_clear_error_naming_the_extra(tmp_path):
    docs = random_docs(np.random.default_rng(), 6)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match=r"loopjax\[parquet\]"):
            prepare(PrepareConfig(inputs=(str(tmp_path / "x.parquet"),), tokenizer="bytes", out=str(tmp_path / "o")))
        return
    pq.write_table(pa.table({"text": docs, "n": list(range(6))}), tmp_path / "x.parquet")
    out = str(tmp_path / "o")
    prepare(PrepareConfig(inputs=(str(tmp_path / "x.parquet"),), tokenizer="bytes", out=out, val_fraction=0.0))
    assert all_documents(out, load_corpus_tokenizer("bytes").decode) == docs


def test_split_is_by_document_and_deterministic_from_seed():
    a, b, c = (split_documents(1000, 0.1, s) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 50 < a.sum() < 150
    assert split_documents(3, 0.01, 0).sum() == 1  # at least one validation document
    assert not split_documents(5, 0.0, 0).any()


def test_sft_rows_count_only_response_tokens(tmp_path):
    from loopjax.data.tokens import PackedTokenSource

    rng = np.random.default_rng()
    pairs = [(p, r) for p, r in zip(random_docs(rng, 8, 20), random_docs(rng, 8, 20))]
    with open(tmp_path / "sft.jsonl", "w") as f:
        for p, r in pairs:
            f.write(json.dumps({"q": p, "a": r}) + "\n")
    out = str(tmp_path / "o")
    prepare(PrepareConfig(inputs=(str(tmp_path / "sft.jsonl"),), tokenizer="bytes", out=out, val_fraction=0.0,
                          prompt_field="q", response_field="a"))
    total = sum(len(p.encode()) + len(r.encode()) + 2 for p, r in pairs)
    src = PackedTokenSource(out, total - 1)  # one row holding the whole stream
    row = src[0]
    want, stream = [], []
    for p, r in pairs:
        doc = [256] + list(p.encode()) + list(r.encode()) + [257]
        first_response = 1 + len(p.encode())
        want += [1.0 if i >= first_response else 0.0 for i in range(1, len(doc))] + [0.0]  # + boundary target
        stream += doc
    np.testing.assert_array_equal(row["inputs"], stream[:-1])
    np.testing.assert_array_equal(row["mask"], want[:-1])


# ------------------------------------------------------------------------------------------------ kill + resume

def _tree_digest(out: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(out):
        for f in files:
            p = os.path.join(root, f)
            digests[os.path.relpath(p, out)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return digests


def _prepare_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "loopjax.cli", "data", "prepare", str(src), "--tokenizer", "bytes", "--out",
            str(out), "--val-fraction", "0.05", "--seed", "7", "--unit-mb", "0.01", "--no-progress"]


def test_sigkill_mid_prepare_then_rerun_gives_identical_bytes(tmp_path):
    rng = np.random.default_rng()
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "c.jsonl", "w") as f:
        for d in random_docs(rng, 1500, 200):
            f.write(json.dumps({"text": d}) + "\n")
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_prepare_cmd(src, ref), check=True, cwd=REPO, capture_output=True)
    n_units = len(read_manifest(str(ref))["splits"]["train"]["shards"])
    assert n_units >= 10

    proc = subprocess.Popen(_prepare_cmd(src, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".prepare" / "unit_00002.json").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "killed too late: the run had finished"
    with pytest.raises(FileNotFoundError, match="unfinished"):
        PreparedSplit(str(out), "train")  # a partial folder is never read as a corpus
    done = len(list((out / ".prepare").glob("unit_*.json")))
    assert 0 < done < n_units

    subprocess.run(_prepare_cmd(src, out), check=True, cwd=REPO, capture_output=True)
    assert _tree_digest(str(out)) == _tree_digest(str(ref))


# ------------------------------------------------------------------------------------------------ bad input

def _fails(tmp_path, match, *args, exc=ValueError, **kwargs):
    out = tmp_path / "out"
    cfg = PrepareConfig(inputs=tuple(map(str, args)), tokenizer=kwargs.pop("tokenizer", "bytes"), out=str(out),
                        **kwargs)
    with pytest.raises(exc, match=match):
        prepare(cfg)
    assert not out.exists(), "nothing may be written before the inputs are validated"


def test_bad_inputs_are_clear_errors_before_anything_is_written(tmp_path):
    _fails(tmp_path, "no such file", tmp_path / "missing.txt", exc=FileNotFoundError)
    _fails(tmp_path, "matches nothing", tmp_path / "*.jsonl", exc=FileNotFoundError)
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, "no .* file found", tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    _fails(tmp_path, "corpus is empty", tmp_path / "blank.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    _fails(tmp_path, "unknown file type", tmp_path / "x.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n')
    _fails(tmp_path, r"bad\.jsonl:3: not JSON", bad)
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    _fails(tmp_path, r"bad\.jsonl:2: no field 'text'", bad)
    bad.write_text('{"text": 5}\n')
    _fails(tmp_path, r"bad\.jsonl:1: field 'text' is int", bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{ this is not a tokenizer")
    (tmp_path / "ok.txt").write_text("fine")
    _fails(tmp_path, "does not load", tmp_path / "ok.txt", tokenizer=str(broken))
    _fails(tmp_path, "no tokenizer.json", tmp_path / "ok.txt", tokenizer=str(tmp_path / "empty"),
           exc=FileNotFoundError)
    tok = train_bpe(tmp_path / "tok", ["some text to learn"] * 3)
    (tok / "tokenizer_config.json").unlink()
    _fails(tmp_path, "--eos-token '<nope>': not a token", tmp_path / "ok.txt", tokenizer=str(tok),
           eos_token="<nope>")
    _fails(tmp_path, "no EOS token", tmp_path / "ok.txt", tokenizer=str(tok))
    with pytest.raises(ValueError, match="prompt_field"):
        PrepareConfig(inputs=("x",), tokenizer="bytes", out="o", prompt_field="q")


def test_skip_bad_lines_and_undecodable_bytes_are_counted(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "a"}\nnope\n{"x": 1}\n{"text": "b\\u00e9"}\n')
    (tmp_path / "d.txt").write_bytes(b"ok \xff\xfe bytes")
    out = str(tmp_path / "out")
    assert main(["data", "prepare", str(tmp_path), "--tokenizer", "bytes", "--out", out, "--skip-bad-lines",
                 "--val-fraction", "0"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["documents"] == 3 and result["skipped_lines"] == 2 and result["replaced_bytes"] == 2
    assert "undecodable bytes replaced by U+FFFD: 2" in captured.err and "bad lines skipped: 2" in captured.err
    assert sorted(all_documents(out, load_corpus_tokenizer("bytes").decode)) == ["a", "bé", "ok \ufffd\ufffd bytes"]
    assert main(["data", "prepare", str(tmp_path / "c.jsonl"), "--tokenizer", "bytes", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "c.jsonl:2: not JSON" in capsys.readouterr().err


def test_out_folder_guards(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        prepare(PrepareConfig(inputs=(str(tmp_path / "a.txt"),), tokenizer="bytes", out=str(tmp_path / "full")))
    out = str(tmp_path / "o")
    prepare(PrepareConfig(inputs=(str(tmp_path / "a.txt"),), tokenizer="bytes", out=out))
    with pytest.raises(ValueError, match="other inputs or arguments"):
        prepare(PrepareConfig(inputs=(str(tmp_path / "a.txt"),), tokenizer="bytes", out=out, seed=1))
    with pytest.raises(FileNotFoundError, match="not a prepared corpus"):
        read_manifest(str(tmp_path / "full"))


def test_skipped_files_are_counted_and_named_in_the_summary(tmp_path, capsys):
    """Files of other types in a folder are skipped, counted and the first few named (sorted); hidden files are
    not listed; a file named directly with an unknown type stays an error."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document")
    (root / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
    others = ["NOTES", "data.csv", "sub/x.json", "sub/y.tsv", "sub/z.html", "zz.py"]
    for name in others:
        (root / name).write_text("not read")
    (root / ".hidden").write_text("not listed")
    out = str(tmp_path / "out")
    assert main(["data", "prepare", str(root), "--tokenizer", "bytes", "--out", out, "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["skipped_files"] == 6 and result["documents"] == 3
    line = next(l for l in captured.err.splitlines() if l.startswith("files skipped"))
    named = sorted(str(root / n) for n in others)
    assert line.endswith(": 6: " + ", ".join(named[:5]) + ", ... (1 more)"), line
    assert ".hidden" not in captured.err and "warning" not in captured.err
    manifest = read_manifest(out)
    assert manifest["skipped_files"] == 6 and manifest["skipped_files_first"] == named[:5]
    # a glob's other-type matches are skipped and named too; only-skipped inputs say what was skipped
    assert main(["data", "prepare", str(root / "*.*"), "--tokenizer", "bytes", "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 0
    assert (f"files skipped (not .txt/.md/.jsonl/.jsonl.gz/.parquet): 2: {root / 'data.csv'}, {root / 'zz.py'}\n"
            in capsys.readouterr().err)
    assert main(["data", "prepare", str(root / "sub"), "--tokenizer", "bytes", "--out", str(tmp_path / "o3")]) == 2
    assert (f"no .txt/.md/.jsonl/.jsonl.gz/.parquet file found (skipped 3 files of other types: {root / 'sub/x.json'}, "
            in capsys.readouterr().err)
    _fails(tmp_path / "direct", "unknown file type", root / "data.csv")


def test_empty_val_split_warns_with_the_fix(tmp_path, capsys):
    """One document with a val fraction: the val split is empty; prepare warns (library) and the CLI summary says
    so with the fix; --val-fraction 0 (no val split asked for) and two documents do not warn."""
    doc = tmp_path / "one.txt"
    doc.write_text("a single document " * 20)
    cfg = PrepareConfig(inputs=(str(doc),), tokenizer="bytes", out=str(tmp_path / "lib"), val_fraction=0.01)
    with pytest.warns(UserWarning, match=r"val split is empty: 1 document with --val-fraction 0.01.*two or more "
                                         r"documents.*--val-fraction 0"):
        manifest = prepare(cfg, progress=False)
    assert manifest["splits"]["val"]["documents"] == 0
    assert main(["data", "prepare", str(doc), "--tokenizer", "bytes", "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert err.count("val split is empty") == 1 and "warning: the val split is empty" in err
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        prepare(PrepareConfig(inputs=(str(doc),), tokenizer="bytes", out=str(tmp_path / "none"), val_fraction=0.0),
                progress=False)
        (tmp_path / "two.txt").write_text("another document")
        two = prepare(PrepareConfig(inputs=(str(doc), str(tmp_path / "two.txt")), tokenizer="bytes",
                                    out=str(tmp_path / "two"), val_fraction=0.01), progress=False)
    assert two["splits"]["val"]["documents"] == 1
