"""The shipped tasks' text: rendering, solving it from the text alone, and byte-level training tasks over it.

``render_*`` turn a generator's example into a JSONL row (question, choices, answer). ``solve_text`` recomputes
an answer from a rendered prompt (no generator bookkeeping): the generator checks every row with it.
``TextTask`` turns a p-hop or addition generator into a ``loopjax.data.tasks.Task`` over UTF-8 bytes
(``loopjax.data.text``'s vocabulary): the prompt is exactly the harness's context, the answer its continuation
(" " + the answer, then "\\n" for generate_until tasks, where the harness stops), so a model trained with
``fit_on_task`` is scored by lm-eval on what it learnt.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from loopjax.data.tasks import IGSM, Addition, PHop
from loopjax.data.tasks.addition import display
from loopjax.data.tasks.base import Example, Task
from loopjax.data.text import EOS, VOCAB_SIZE, decode, encode

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def render_phop(task: PHop, example) -> dict[str, Any]:
    """A p-hop example as text: the sequence, the hop count, the answer letter as a choice index."""
    p = int(example.prompt[0]) - task.alphabet
    seq = " ".join(LETTERS[int(t)] for t in example.prompt[1:])
    return {"question": f"Sequence: {seq}\nHops: {p}\nAnswer:", "choices": list(LETTERS[:task.alphabet]),
            "answer": int(example.answer[0]), "difficulty": p}


def render_addition(task: Addition, example) -> dict[str, Any]:
    """An addition example as text: "31 + 07 + 45 =" and its decimal sum."""
    prompt, answer = display(task, example)
    return {"question": prompt, "answer": answer, "difficulty": int(example.difficulty)}


def render_igsm(task: IGSM, example) -> dict[str, Any]:
    """An i-GSM example as text: one statement per line, the query last; the choices are the values mod M."""
    text = task.decode(example.prompt).removeprefix("<bos> ")
    depth, ops = example.difficulty
    return {"question": f"{text}\nAnswer:", "choices": [str(v) for v in range(task.modulus)],
            "answer": int(example.answer[0]), "difficulty": f"{depth}:{ops}"}



def solve_phop(text: str) -> str:
    """The symbol reached by the prompt's hop count of jumps (to just after the latest earlier copy)."""
    seq = re.search(r"Sequence: ([a-z ]+)\n", text).group(1).split()
    p = int(re.search(r"Hops: (\d+)", text).group(1))
    i = len(seq) - 1
    for _ in range(p):
        i = max((j + 1 for j in range(i) if seq[j] == seq[i]), default=0)
    return seq[i]


def solve_addition(text: str) -> str:
    """The decimal sum of the numbers on the prompt's last line."""
    return str(sum(int(x) for x in re.findall(r"\d+", text.split("\n")[-1])))


def solve_igsm(text: str, modulus: int) -> str:
    """The queried quantity's value mod ``modulus``, evaluating the statements recursively."""
    defs = dict(re.findall(r"^(E\d+ E\d+) = ([^;\n]+);$", text, re.M))
    query = re.search(r"^\? (E\d+ E\d+) =$", text, re.M).group(1)

    def value(name, depth=0):
        op = re.fullmatch(r"(E\d+ E\d+) ([-+*]) (E\d+ E\d+)", defs[name])
        if op is None or depth > len(defs):
            return int(defs[name])
        a, b = value(op.group(1), depth + 1), value(op.group(3), depth + 1)
        return {"+": a + b, "-": a - b, "*": a * b}[op.group(2)] % modulus

    return str(value(query))


def solve_text(family: str, text: str, modulus: int = 7) -> str:
    """The answer of a rendered prompt of ``family`` ("phop", "addition", "igsm")."""
    if family == "phop":
        return solve_phop(text)
    if family == "addition":
        return solve_addition(text)
    if family == "igsm":
        return solve_igsm(text, modulus)
    raise ValueError(f"family={family!r}: must be 'phop', 'addition' or 'igsm'")


@dataclasses.dataclass(frozen=True)
class TextTask(Task):
    """A p-hop or addition generator rendered as the shipped task's text, in byte tokens (vocab 258).

    description: the prefix the task YAML was written with ("" for ``make --no-description``).
    """

    inner: PHop | Addition
    description: str = ""
    seq_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.inner, (PHop, Addition)):
            raise ValueError(f"inner={self.inner!r}: must be a PHop or an Addition task (fixed-length renderings)")
        self._check_seq_len()

    @property
    def family(self) -> str:
        return "phop" if isinstance(self.inner, PHop) else "addition"

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def pad_id(self) -> int:
        return EOS

    @property
    def min_seq_len(self) -> int:
        d, t = len(self.description.encode()), self.inner
        if isinstance(t, PHop):  # "Sequence: v ... v\nHops: p\nAnswer:" + " x"
            return d + len("Sequence: ") + 2 * t.n - 1 + len("\nHops: ") + len(str(max(t.hops))) + len(
                "\nAnswer:") + 2 - 1
        n = max(t.n_terms)  # "12 + 34 =" + " 46\n"
        return d + n * t.digits + 3 * (n - 1) + 2 + 1 + t.answer_width + 1 - 1

    def _render(self, example: Example) -> tuple[str, str]:
        if self.family == "phop":
            row = render_phop(self.inner, example)
            return row["question"], " " + row["choices"][row["answer"]]
        row = render_addition(self.inner, example)
        return row["question"], " " + row["answer"] + "\n"

    def sample(self, rng: np.random.Generator) -> Example:
        ex = self.inner.sample(rng)
        question, answer = self._render(ex)
        return Example(prompt=encode(self.description + question, bos=False),
                       answer=encode(answer, bos=False), difficulty=ex.difficulty)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        text = decode(prompt)[len(self.description):]
        return encode(" " + solve_text(self.family, text) + ("\n" if self.family == "addition" else ""), bos=False)

    def decode(self, tokens) -> str:
        return decode(tokens)
