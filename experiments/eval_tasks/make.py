"""Write lm-eval tasks for p-hop, n-ary addition and i-GSM as local JSONL + YAML (offline, no hub).

    python -m experiments.eval_tasks.make --out DIR [--examples 200] [--seed 0] [--phop-hops 1,2,4]
        [--addition-terms 2,4,8] [--igsm-difficulties 1:1,2:2,3:4]
    loopjax lm-eval MODEL --include-path DIR --tasks loopjax_reasoning --depths 1,2,3,4,adaptive

One task per family and difficulty, each YAML reading its own JSONL by absolute path (so DIR can be passed to
``--include-path`` from anywhere; move DIR and you rerun this):

- ``loopjax_phop_p{p}`` (multiple_choice): a symbol sequence and a hop count; the choices are the alphabet.
- ``loopjax_addition_n{n}`` (generate_until): "31 + 07 + 45 =", exact match of the first number generated
  (metric key ``exact_match,number``).
- ``loopjax_igsm_d{depth}k{ops}`` (multiple_choice): i-GSM statements and a query; the choices are 0..modulus-1.

Tags: ``loopjax_phop``, ``loopjax_addition``, ``loopjax_igsm`` (a family) and ``loopjax_reasoning`` (all).
Examples come from the generators in ``loopjax.data.tasks`` (example i of seed s), so the data is reproducible and
the answer of each is checked by the task's independent solver before it is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import yaml

from experiments.eval_tasks.text import render_addition, render_igsm, render_phop, solve_text
from loopjax.data.tasks import IGSM, Addition, PHop

ALL_TAG = "loopjax_reasoning"


def _mc_yaml(name: str, tags: list[str], data: str, description: str) -> dict[str, Any]:
    return {"task": name, "tag": tags, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "output_type": "multiple_choice", "description": description,
            "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "answer",
            "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def _gen_yaml(name: str, tags: list[str], data: str, description: str, max_gen_toks: int) -> dict[str, Any]:
    return {"task": name, "tag": tags, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "output_type": "generate_until", "description": description,
            "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
            "filter_list": [{"name": "number", "filter": [{"function": "regex", "regex_pattern": r"(\d+)"},
                                                          {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def _write(out: str, name: str, rows: list[dict], spec: dict) -> None:
    with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False, allow_unicode=True)


def _examples(task, family: str, render: Callable, count: int, seed: int) -> list[dict]:
    """Rendered rows; the generator, its token-level solver and the text solver must all agree on each."""
    rows = []
    for ex in task.examples(seed, count):
        row = render(task, ex)
        gold = row["choices"][row["answer"]] if "choices" in row else row["answer"]
        if not task.check(ex) or solve_text(family, row["question"], getattr(task, "modulus", 7)) != gold:
            raise RuntimeError(f"{task}: an example's answer disagrees with a solver: {row}")
        rows.append(row)
    return rows


def make_tasks(out: str, *, examples: int = 200, seed: int = 0, phop_hops: Sequence[int] = (1, 2, 4),
               phop_n: int = 32, phop_alphabet: int = 4, addition_terms: Sequence[int] = (2, 4, 8),
               addition_digits: int = 2, igsm_difficulties: Sequence[tuple[int, int]] = ((1, 1), (2, 2), (3, 4)),
               igsm_modulus: int = 7, description: bool = True) -> list[str]:
    """Write every task's JSONL and YAML into ``out`` (created); returns the task names.

    description: prefix each prompt with a one-line statement of the task (off for models trained on the bare
    format, e.g. a small model trained on these renderings).
    """
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples={examples!r}: must be an int >= 1")
    if not (phop_hops or addition_terms or igsm_difficulties):
        raise ValueError("phop_hops, addition_terms, igsm_difficulties: all empty; name at least one task")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    names = []

    def data(name):
        return os.path.join(out, f"{name}.jsonl")

    for p in phop_hops:
        name = f"loopjax_phop_p{p}"
        task = PHop(alphabet=phop_alphabet, n=phop_n, hops=(p,), max_hops=max(phop_hops))
        desc = (f"p-hop induction: from the last symbol, jump {p} time(s) to the symbol right after the latest "
                "earlier copy of the current symbol; answer the symbol reached.\n\n")
        _write(out, name, _examples(task, "phop", render_phop, examples, seed),
               _mc_yaml(name, ["loopjax_phop", ALL_TAG], data(name), desc if description else ""))
        names.append(name)
    for n in addition_terms:
        name = f"loopjax_addition_n{n}"
        task = Addition(n_terms=(n,), digits=addition_digits)
        desc = f"Add the {n} numbers.\n\n"
        _write(out, name, _examples(task, "addition", render_addition, examples, seed),
               _gen_yaml(name, ["loopjax_addition", ALL_TAG], data(name), desc if description else "",
                         max_gen_toks=task.answer_width + 2))
        names.append(name)
    for depth, ops in igsm_difficulties:
        name = f"loopjax_igsm_d{depth}k{ops}"
        task = IGSM(difficulties=((depth, ops),), modulus=igsm_modulus)
        desc = (f"Each line defines a quantity (a constant or an operation on two others, mod {igsm_modulus}); "
                "answer the value of the queried quantity.\n\n")
        _write(out, name, _examples(task, "igsm", render_igsm, examples, seed),
               _mc_yaml(name, ["loopjax_igsm", ALL_TAG], data(name), desc if description else ""))
        names.append(name)
    return names


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    try:
        return tuple((int(a), int(b)) for a, b in (x.split(":") for x in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be DEPTH:OPS pairs, e.g. 1:1,2:2,3:4") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.eval_tasks.make", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSONL files and task YAMLs (--include-path)")
    ap.add_argument("--examples", type=int, default=200, help="examples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phop-hops", type=_ints, default=(1, 2, 4), help="one task per hop count ('' for none)")
    ap.add_argument("--phop-n", type=int, default=32, help="p-hop sequence length")
    ap.add_argument("--phop-alphabet", type=int, default=4)
    ap.add_argument("--addition-terms", type=_ints, default=(2, 4, 8), help="one task per term count")
    ap.add_argument("--addition-digits", type=int, default=2)
    ap.add_argument("--igsm-difficulties", type=_pairs, default=((1, 1), (2, 2), (3, 4)),
                    help="one task per DEPTH:OPS pair")
    ap.add_argument("--igsm-modulus", type=int, default=7)
    ap.add_argument("--description", action=argparse.BooleanOptionalAction, default=True,
                    help="prefix prompts with a one-line statement of the task")
    args = ap.parse_args(argv)
    try:
        names = make_tasks(args.out, examples=args.examples, seed=args.seed, phop_hops=args.phop_hops,
                           phop_n=args.phop_n, phop_alphabet=args.phop_alphabet, addition_terms=args.addition_terms,
                           addition_digits=args.addition_digits, igsm_difficulties=args.igsm_difficulties,
                           igsm_modulus=args.igsm_modulus, description=args.description)
    except ValueError as err:
        print(f"eval_tasks.make: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} tasks to {os.path.abspath(args.out)}: {', '.join(names)}", file=sys.stderr)
    print(f"run: loopjax lm-eval MODEL --include-path {os.path.abspath(args.out)} --tasks {ALL_TAG}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
