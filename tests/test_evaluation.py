"""The lm-eval backend: every depth's log-likelihood equals a float64 NumPy score of the same tokens, bucketing
and dummy rows change nothing, generation equals ``loopjax.generate``, and a tiny trained model evaluates end
to end through ``simple_evaluate`` and ``loopjax lm-eval`` with a row per depth."""

from __future__ import annotations

import json
import os
import string

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'loopjax[eval]'")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import loopjax as lj  # noqa: E402
from loopjax import cli  # noqa: E402
from loopjax.evaluation import LoopjaxLM, load_eval_tokenizer  # noqa: E402
from loopjax.evaluation.scoring import length_buckets  # noqa: E402
from loopjax.flops import forward_flops  # noqa: E402

CFG = lj.LoopedConfig(vocab_size=258, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1, n_loops=3,
                      max_seq_len=64, exit_gate=True, init_std=0.2)
RULE = lj.QExit(0.5)
DEPTHS = (1, 2, 3, "adaptive", "adaptive-frozen")
MAX_LEN = 32


@pytest.fixture(scope="module")
def model():
    return lj.LoopedLM(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def lm(model):
    return LoopjaxLM(model, load_eval_tokenizer("bytes"), depths=DEPTHS, exit_rule=RULE, batch_size=4,
                     max_length=MAX_LEN, progress=False)


REF_LEN = 40


@nnx.jit
def _ref_logits(model, x_1S):
    steps = model(x_1S, n_loops=CFG.n_loops, return_steps=True).step_logits[:, 0]
    ad = model(x_1S, n_loops=CFG.n_loops, exit_rule=RULE, run_all_loops=True).logits[0]
    fr = model(x_1S, n_loops=CFG.n_loops, exit_rule=RULE).logits[0]
    return steps, ad, fr


def reference(model, tokens, n_cont):
    """float64 NumPy: summed continuation log-prob and greedy flag per depth entry, from direct model calls on
    the request alone (right-padded to one length, which a causal model never sees)."""
    n = len(tokens) - 1
    x = np.zeros((1, REF_LEN), np.int32)
    x[0, :n] = tokens[:-1]
    tgt = np.asarray(tokens[1:])[-n_cont:]
    pos = np.arange(n)[-n_cont:]

    def score(logits_SV):
        lp = np.asarray(logits_SV, np.float64)[pos]
        lp = lp - lp.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        return lp[np.arange(n_cont), tgt].sum(), bool((lp.argmax(-1) == tgt).all())

    steps, ad, fr = _ref_logits(model, jnp.asarray(x))
    ref = {t + 1: score(steps[t]) for t in range(CFG.n_loops)}
    ref["adaptive"], ref["adaptive-frozen"] = score(ad), score(fr)
    return ref


def ll_instances(pairs, task="t"):
    return [Instance("loglikelihood", {}, (c, x), i, (task, i, 1)) for i, (c, x) in enumerate(pairs)]


def test_loglikelihood_equals_float64_reference_at_every_depth(lm, model):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list(string.ascii_lowercase), rng.integers(1, 6))) for _ in range(30)]
    pairs = [("", " " + words[0]), ("", words[1]), ("abc ", "def"), (" lead", " space x"),
             (" ".join(words[:14]), " " + words[14]),  # longer than max_length: left-truncated
             ("q", "r"), (words[2] + " " + words[3], " " + words[4] + " " + words[5])]
    tok = lm.tokenizer
    expected = []
    for ctx, cont in pairs:  # the harness's own split, then its truncation convention
        if ctx == "":
            c, x = [tok.prefix_id], tok.encode(cont)
        else:
            c, x = lm._encode_pair(ctx, cont)
        whole = (c + x)[-(MAX_LEN + 1):]
        expected.append(reference(model, whole, min(len(x), len(whole) - 1)))
    assert len(tok.encode(pairs[4][0])) > MAX_LEN
    for d in DEPTHS:
        lm.set_depth(d)
        got = lm.loglikelihood(ll_instances(pairs), disable_tqdm=True)
        for (lp, greedy), ref in zip(got, expected):
            np.testing.assert_allclose(lp, ref[d][0], rtol=2e-5, atol=2e-4)
            assert greedy == ref[d][1]
    # the per-depth figures differ (the depths are not one number repeated)
    assert len({round(expected[4][d][0], 3) for d in DEPTHS}) >= 3


def test_greedy_flag_true_when_continuation_is_the_argmax(lm, model):
    lm.set_depth(2)
    ctx = [256] + list(b"hello wor")
    x = jnp.asarray(np.asarray(ctx, np.int32)[None])
    nxt = int(np.argmax(np.asarray(model(x, n_loops=2).logits[0, -1])))
    other = (nxt + 1) % 256
    (lp_g, g), (lp_o, o) = lm._loglikelihood_tokens([(None, ctx, [nxt]), (None, ctx, [other])], disable_tqdm=True)
    assert g and not o and lp_g > lp_o


def test_bucketing_and_dummy_rows_change_nothing_and_compiles_stay_per_bucket(model):
    rng = np.random.default_rng(1)
    lengths = [3, 9, 15, 17, 30, 31, 40, 12, 5]
    reqs = [(None, [256] + list(rng.integers(0, 256, n - 1)), list(rng.integers(0, 256, 2))) for n in lengths]
    results = []
    for batch, max_len in ((1, 64), (16, 48)):  # one row per batch; dummy-filled rows and other buckets
        one = LoopjaxLM(model, load_eval_tokenizer("bytes"), depths=(1, 3, "adaptive"), exit_rule=RULE,
                        batch_size=batch, max_length=max_len, progress=False)
        per_depth = []
        for d in one.depths:
            one.set_depth(d)
            per_depth.append(one._loglikelihood_tokens(reqs, disable_tqdm=True))
        results.append(np.array([[lp for lp, _ in r] for r in per_depth]))
        # a task of mixed lengths compiles one program per bucket it touches, whatever the depth count
        used = {min(b for b in one.buckets if b >= n + 1) for n in lengths}
        assert one.scorer.compiles == {"all_depths": len(used), "frozen": 0}
        assert len(used) <= len(length_buckets(max_len)) == 3
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_all_depths_program_never_holds_logits_of_every_loop(lm):
    from loopjax.evaluation.scoring import TokenRequest, pack
    from loopjax.sharding import use_rules

    sc = lm.scorer
    rows = sc.rows(lm.batch_size)
    batch = sc._device_batch(pack([TokenRequest(tuple(range(1, 15)), 3)], 16, rows))
    with use_rules(sc.mesh, sc.rules):
        hlo = sc._all.lower(sc.state, batch).compile().as_text()
    import re

    assert re.search(rf"f32\[\d+,16,{CFG.vocab_size}\]", hlo)  # one loop's logits at a time
    assert not re.search(rf"\[\d+,\d+,16,{CFG.vocab_size}\]", hlo)  # never [T, B, S, V]


def test_rolling_loglikelihood_of_a_fitting_document_is_one_pass(lm, model):
    text = "looped models think deeper"
    ids = lm.tokenizer.encode(text)
    for d in (1, 3, "adaptive"):
        lm.set_depth(d)
        (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("r", 0, 1))],
                                          disable_tqdm=True)
        np.testing.assert_allclose(got, reference(model, [256] + ids, len(ids))[d][0], rtol=2e-5, atol=2e-4)


def test_generate_until_cuts_at_stop_and_equals_loopjax_generate(lm, model):
    prompts = ["the cat", "a dog!", "xyz"]
    for d, n_loops, rule, kv in ((2, 2, None, "per_step"), ("adaptive-frozen", 3, RULE, "per_step")):
        lm.set_depth(d)
        full = [lm.tokenizer.decode(np.asarray(lj.generate(
            model, np.asarray([lm.tokenizer.encode(p)], np.int32), 10, n_loops=n_loops, exit_rule=rule,
            kv_mode=kv, stop_tokens=[257]).tokens[0]).tolist()) for p in prompts]
        stops = [f[3] if len(f) > 3 else "\x00" for f in full]  # a character the greedy text holds
        reqs = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 10}), i, ("g", i, 1))
                for i, (p, s) in enumerate(zip(prompts, stops))]
        got = lm.generate_until(reqs, disable_tqdm=True)
        assert got == [f[:f.index(s)] if s in f else f for f, s in zip(full, stops)]
        assert all(s not in g for g, s in zip(got, stops))


def test_bad_inputs_raise_clear_errors(model, tmp_path):
    tok = load_eval_tokenizer("bytes")
    with pytest.raises(ValueError, match="depth 'adaptiv'.*did you mean 'adaptive'"):
        LoopjaxLM(model, tok, depths=[1, "adaptiv"])
    with pytest.raises(ValueError, match="depth 0"):
        LoopjaxLM(model, tok, depths=[0])
    with pytest.warns(UserWarning, match="depth 5: deeper than the model's n_loops=3"):
        LoopjaxLM(model, tok, depths=[1, 5], exit_rule=None, progress=False)
    small = lj.LoopedLM(CFG.replace(vocab_size=200), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="258 ids but the model's vocab_size is 200"):
        LoopjaxLM(small, tok)
    nogate = lj.LoopedLM(CFG.replace(exit_gate=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth 'adaptive': needs an exit rule"):
        LoopjaxLM(nogate, tok, depths=[1, "adaptive"])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_eval_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="max_length=65"):
        LoopjaxLM(model, tok, max_length=65)


def test_cli_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert cli.main(["lm-eval", "anything", "--tasks", "x"]) == 2
    assert "pip install 'loopjax[eval]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end

LETTERS = "abcdefgh"


def write_tasks(folder, n_docs=16):
    """A local multiple-choice task and a local generate_until task: after "Q: x" comes X (upper case)."""
    rng = np.random.default_rng(7)
    docs = []
    for _ in range(n_docs):
        q = LETTERS[rng.integers(len(LETTERS))]
        choices = [c.upper() for c in rng.choice([c for c in LETTERS if c != q], 3, replace=False)] + [q.upper()]
        rng.shuffle(choices)
        docs.append({"q": q, "choices": choices, "label": choices.index(q.upper()), "answer": q.upper()})
    data = folder / "upper.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Q: {{q}}\"\ntarget_delimiter: \"\"\n")
    (folder / "upper_mc.yaml").write_text(
        "task: upper_mc\noutput_type: multiple_choice\n" + common +
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "upper_gen.yaml").write_text(
        "task: upper_gen\noutput_type: generate_until\n" + common +
        "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return docs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A `loopjax train` run folder of a tiny byte model trained for seconds on "Q: xX" lines (x a letter)."""
    from loopjax.train import Trainer
    from loopjax.train.experiment import DataConfig, Experiment

    root = tmp_path_factory.mktemp("lm_eval_run")
    (root / "corpus.txt").write_text("Q: aA\n")
    cfg = CFG.replace(init_std=0.02)
    tcfg = lj.TrainConfig(steps=250, batch_size=16, seq_len=32, learning_rate=1e-2, warmup_steps=10, ckpt_every=0,
                          log_every=125, log_loop_losses=False, async_checkpointing=False,
                          objective=lj.HaltingConfig(objective="ouro", beta=0.01))
    exp = Experiment(model=cfg, train=tcfg, data=DataConfig(source="text", paths=(str(root / "corpus.txt"),)))
    rng = np.random.default_rng(0)

    def batches():
        while True:
            text = "".join(f"Q: {c}{c.upper()}\n" for c in rng.choice(list(LETTERS), 16 * 6))
            ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
            starts = rng.integers(0, len(ids) - 33, 16)
            rows = np.stack([ids[s:s + 33] for s in starts])
            yield {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((16, 32), np.float32)}

    one_device = lj.make_mesh(lj.MeshConfig(), devices=jax.devices()[:1])  # fastest on 2 busy cores
    trainer = Trainer(cfg, tcfg, train_data=batches(), workdir=str(root / "run"), config=exp.to_json(),
                      progress=False, tensorboard=False, mesh=one_device)
    with pytest.warns(UserWarning, match="get_state"):
        trainer.fit()
    trainer.close()
    tasks = root / "tasks"
    tasks.mkdir()
    docs = write_tasks(tasks)
    return root / "run", tasks, docs


def test_simple_evaluate_on_local_tasks_beats_chance_at_full_depth(trained_run):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from loopjax.evaluation.load import load_for_eval

    run, tasks, docs = trained_run
    loaded = load_for_eval(str(run))
    assert loaded.tokenizer.kind == "bytes"  # a byte-level text run
    lm = LoopjaxLM(loaded.model, loaded.tokenizer, depths=(3, "adaptive"), exit_rule=RULE, batch_size=8,
                   max_length=32, mesh=loaded.mesh, rules=loaded.rules, progress=False)
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    acc = {}
    for d in lm.depths:
        lm.set_depth(d)
        res = simple_evaluate(model=lm, tasks=["upper_mc", "upper_gen"], task_manager=tm, bootstrap_iters=0,
                              log_samples=False)
        acc[d] = (res["results"]["upper_mc"]["acc,none"], res["results"]["upper_gen"]["exact_match,none"])
    assert min(a[0] for a in acc.values()) > 0.4, acc  # chance: 0.25
    assert max(a[0] for a in acc.values()) >= 0.75 and max(a[1] for a in acc.values()) >= 0.5, acc
    assert lm.scorer.compiles["all_depths"] <= len(lm.buckets)


def test_cli_writes_a_row_per_depth_and_exact_flops(trained_run, tmp_path, capsys):
    run, tasks, docs = trained_run
    out = tmp_path / "out"
    rc = cli.main(["lm-eval", str(run), "--tasks", "upper_mc,upper_gen", "--include-path", str(tasks),
                   "--depths", "1,3,adaptive,adaptive-frozen", "--exit-rule", "q=0.5", "--limit", "12",
                   "--batch-size", "8", "--max-length", "32", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    mc = res["tasks"]["upper_mc"]
    assert [r["depth"] for r in mc] == [1, 3, "adaptive", "adaptive-frozen"]
    assert all("acc,none" in r and "acc_stderr,none" in r for r in mc)
    assert mc[1]["acc,none"] > 0.25
    # FLOPs per token: forward FLOPs of each request's input tokens at the depth's loops (12 docs x 4 choices)
    lengths = [len(f"Q: {d['q']}{c}".encode()) - 1 for d in docs[:12] for c in d["choices"]]
    for r in mc[:2]:
        want = sum(forward_flops(CFG, n, r["depth"]) for n in lengths) / sum(lengths)
        np.testing.assert_allclose(r["flops_per_token"], want, rtol=1e-9)
        assert r["mean_exit_depth"] == r["depth"]
    want_all = sum(forward_flops(CFG, n, 3) for n in lengths) / sum(lengths)
    np.testing.assert_allclose(mc[2]["flops_per_token"], want_all, rtol=1e-9)  # every loop runs
    assert 1 <= mc[2]["mean_exit_depth"] <= 3 and mc[3]["flops_per_token"] <= want_all * (1 + 1e-9)
    assert [r["depth"] for r in res["tasks"]["upper_gen"]] == [1, 3, "adaptive", "adaptive-frozen"]
    for d in ("1", "3", "adaptive", "adaptive-frozen"):
        harness = json.loads((out / f"results_depth_{d}.json").read_text())
        assert "upper_mc" in harness["results"]
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000
    for line in ("### upper_mc", "### upper_gen", "| adaptive | all loops run", "| adaptive-frozen | masked"):
        assert line in printed


def test_cli_bad_inputs(trained_run, tmp_path, capsys):
    run, tasks, _ = trained_run
    base = ["lm-eval", str(run), "--include-path", str(tasks), "--limit", "2", "--no-progress"]
    assert cli.main(base + ["--tasks", "upper_mcq"]) == 2
    assert "task 'upper_mcq'" in capsys.readouterr().err
    assert cli.main(base + ["--tasks", "upper_mc", "--depths", "1,deep"]) == 2
    assert "depth 'deep'" in capsys.readouterr().err
    assert cli.main(base + ["--tasks", "upper_mc", "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubtask.yaml").write_text("task: hubtask\ndataset_path: nonexistent-org/nonexistent-set\n"
                                      "output_type: loglikelihood\ntest_split: test\ndoc_to_text: x\n"
                                      "doc_to_target: y\n")
    assert cli.main(["lm-eval", str(run), "--include-path", str(hub), "--tasks", "hubtask", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "task 'hubtask'" in err and "HF_DATASETS_OFFLINE=0" in err


# ------------------------------------------------------------------------------------------------ multi-host

def _launch(n_devices: int, argv: list[str], env_extra: dict, cache: str):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               HF_DATASETS_CACHE=cache, PYTHONPATH=os.getcwd(), **env_extra)
    return subprocess.Popen([sys.executable, "-m", "loopjax.cli", "lm-eval", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one_and_write_once(tmp_path):
    from tests.test_multihost import free_port

    ouro = tmp_path / "ouro"
    lj.save_ouro(lj.LoopedLM(CFG.replace(norm_scheme="sandwich", step_norm=True), rngs=nnx.Rngs(5)), str(ouro))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, n_docs=6)
    port = free_port()

    def argv(out):
        return [str(ouro), "--tasks", "upper_mc,upper_gen", "--include-path", str(tasks), "--tokenizer", "bytes",
                "--depths", "1,3,adaptive,adaptive-frozen", "--batch-size", "4", "--max-length", "32",
                "--out", str(out), "--no-progress"]

    procs = [_launch(2, argv(tmp_path / "multi"), {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
                     str(tmp_path / f"cache{i}")) for i in range(2)]
    procs.append(_launch(4, argv(tmp_path / "single"), {}, str(tmp_path / "cache_single")))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    summary = [[json.loads(line) for line in o.splitlines() if line.startswith('{"tasks"')] for o in outs]
    assert "### upper_mc" not in outs[1] and summary[1] == []  # process 1 prints and writes nothing (gloo may log)
    multi, single = summary[0][-1], summary[2][-1]
    for task in ("upper_mc", "upper_gen"):
        for a, b in zip(multi["tasks"][task], single["tasks"][task]):
            assert a["depth"] == b["depth"]
            for k in ("acc,none", "exact_match,none", "mean_exit_depth", "flops_per_token"):
                if k in b:
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert json.loads((tmp_path / "multi" / "results.json").read_text())["tasks"] == multi["tasks"]


def test_primary_metric_skips_bookkeeping_keys():
    from loopjax.evaluation.run import primary_metric

    # lm-eval 0.4.x lists "sample_len" before the metrics; the per-TFLOP column must be the task's metric
    result = {"alias": "t", "sample_len": 40, "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.4}
    assert primary_metric(result) == "acc,none"
    assert primary_metric({"alias": "t", "sample_len": 3}) is None
