"""The lm-eval tasks we ship (experiments/eval_tasks): the generator writes JSONL + YAML whose answers an
independent text solver confirms; lm-eval loads them offline, builds the requests, and scores an oracle LM 1.0
and a wrong one 0.0 through ``simple_evaluate``."""

import json
import os

import pytest
import yaml

from experiments.eval_tasks.make import main, make_tasks
from experiments.eval_tasks.text import TextTask, solve_text
from loopjax.data.tasks import Addition, PHop, lm_arrays

NAMES = ["loopjax_phop_p1", "loopjax_phop_p3", "loopjax_addition_n3", "loopjax_igsm_d2k3"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tasks") / "tasks"
    names = make_tasks(str(out), examples=6, seed=3, phop_hops=(1, 3), phop_n=16, addition_terms=(3,),
                       igsm_difficulties=((2, 3),))
    assert names == NAMES
    return out


def solve(context: str) -> str:
    """The answer of a shipped task's prompt, from its text alone."""
    family = "phop" if "Sequence:" in context else "igsm" if "?" in context else "addition"
    return solve_text(family, context)


def test_files_are_written_and_answers_check(task_dir):
    for name in NAMES:
        spec = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data) and data == str(task_dir / f"{name}.jsonl")
        assert spec["task"] == name and "loopjax_reasoning" in spec["tag"]
        rows = [json.loads(line) for line in open(data, encoding="utf-8")]
        assert len(rows) == 6
        for row in rows:
            gold = row["choices"][row["answer"]] if "choices" in row else row["answer"]
            assert solve(row["question"]) == gold, (name, row)
    assert len({json.dumps(r) for r in map(json.loads, open(task_dir / "loopjax_phop_p3.jsonl"))}) == 6
    p3 = [json.loads(line)["difficulty"] for line in open(task_dir / "loopjax_phop_p3.jsonl")]
    assert p3 == [3] * 6


def test_cli_writes_the_same_tasks_and_rejects_bad_values(tmp_path, task_dir, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--examples", "6", "--seed", "3", "--phop-hops", "1,3", "--phop-n", "16",
                 "--addition-terms", "3", "--igsm-difficulties", "2:3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{e}" for n in NAMES for e in ("jsonl", "yaml"))
    for name in NAMES:
        assert (out / f"{name}.jsonl").read_text() == (task_dir / f"{name}.jsonl").read_text()
    assert f"--include-path {out} --tasks loopjax_reasoning" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "bad"), "--phop-hops", "9", "--phop-n", "8"]) == 2
    assert "n=8: must be >= 2 * max(hops) + 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="examples=0: must be an int >= 1"):
        make_tasks(str(tmp_path / "bad2"), examples=0)


def test_text_task_trains_on_exactly_the_harness_rows(task_dir):
    """TextTask's example i is the shipped row i in bytes (prompt = the context, answer = " " + the gold
    continuation), its solver agrees, and its rows fit its declared length."""
    for name, inner, desc in (("loopjax_phop_p3", PHop(alphabet=4, n=16, hops=(3,), max_hops=3), ""),
                              ("loopjax_addition_n3", Addition(n_terms=(3,), digits=2), "Add the 3 numbers.\n\n")):
        task = TextTask(inner, description=desc)
        rows = [json.loads(line) for line in open(task_dir / f"{name}.jsonl", encoding="utf-8")]
        for i, row in enumerate(rows):
            ex = task.example(3, i)
            gold = row["choices"][row["answer"]] if "choices" in row else row["answer"] + "\n"
            assert task.decode(ex.prompt) == desc + row["question"] and task.decode(ex.answer) == " " + gold
            assert task.check(ex) and len(lm_arrays(ex, task.length, task.pad_id)["inputs"]) == task.length
            assert len(ex.prompt) + len(ex.answer) - 1 <= task.min_seq_len
    assert len(TextTask(PHop(alphabet=4, n=16, hops=(3,))).example(0, 0).prompt) + 1 == \
        TextTask(PHop(alphabet=4, n=16, hops=(3,))).min_seq_len  # p-hop rows have one length: the bound is tight
    with pytest.raises(ValueError, match="must be a PHop or an Addition"):
        TextTask("igsm")


# ------------------------------------------------------------------ through lm-eval itself
@pytest.fixture(scope="module")
def lm_eval_api():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'loopjax[eval]'")
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    return lm_eval, LM, TaskManager


def test_lm_eval_loads_the_tasks_and_builds_requests(task_dir, lm_eval_api):
    _, _, TaskManager = lm_eval_api
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    for name in NAMES + ["loopjax_phop", "loopjax_addition", "loopjax_igsm", "loopjax_reasoning"]:
        assert name in tm.all_tasks, name
    tasks = tm.load(["loopjax_reasoning"])["tasks"]
    assert sorted(tasks) == sorted(NAMES)
    for name, task in tasks.items():
        task.build_all_requests(limit=3, rank=0, world_size=1)
        docs = list(task.eval_docs)[:3]
        if name.startswith("loopjax_addition"):
            assert task.OUTPUT_TYPE == "generate_until" and len(task.instances) == 3
            ctx, kwargs = task.instances[0].arguments
            assert ctx.endswith(docs[0]["question"]) and kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] >= 3
        else:
            n_choices = len(docs[0]["choices"])
            assert task.OUTPUT_TYPE == "multiple_choice" and len(task.instances) == 3 * n_choices
            assert {i.request_type for i in task.instances} == {"loglikelihood"}
            ctx, cont = task.instances[0].arguments
            assert ctx.endswith(docs[0]["question"]) and cont == " " + docs[0]["choices"][0]


def test_simple_evaluate_scores_an_oracle_one_and_a_wrong_model_zero(task_dir, lm_eval_api):
    lm_eval, LM, TaskManager = lm_eval_api

    class Oracle(LM):
        """Answers by solving the prompt's text (``wrong``: the answer's successor / a wrong number)."""

        def __init__(self, wrong=False):
            super().__init__()
            self.wrong = wrong

        def _answer(self, ctx):
            a = solve(ctx)
            if not self.wrong:
                return a
            return chr((ord(a) - 97 + 1) % 4 + 97) if a.isalpha() else str((int(a) + 1) % 7) if "?" in ctx \
                else str(int(a) + 1)

        def loglikelihood(self, requests):
            return [(0.0 if cont.strip() == self._answer(ctx) else -5.0, True) for ctx, cont in
                    (r.args for r in requests)]

        def loglikelihood_rolling(self, requests):  # abstract in lm-eval; the shipped tasks never call it
            raise NotImplementedError("the shipped tasks make no rolling requests")

        def generate_until(self, requests):
            return [" " + self._answer(r.args[0]) + "\nmore" for r in requests]

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    for wrong, expect in ((False, 1.0), (True, 0.0)):
        res = lm_eval.simple_evaluate(model=Oracle(wrong), tasks=["loopjax_reasoning"], task_manager=tm,
                                      bootstrap_iters=0, limit=4)["results"]
        for name in NAMES:
            key = "exact_match,number" if name.startswith("loopjax_addition") else "acc,none"
            assert res[name][key] == expect, (name, res[name])
