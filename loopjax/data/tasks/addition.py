"""n-ary addition without chain of thought (Saunshi et al., ICLR 2025).

Generator: n drawn uniformly from ``n_terms``; n numbers uniform in [0, 10^digits), each written with exactly
``digits`` digits (zero-padded, most significant first), joined by '+', then '='; the answer is the sum in decimal
without leading zeros, then EOS. Display form: "315 + 120 + 045 + 824 =" -> "1304".

Character-level vocabulary: '0'..'9' -> 0..9, '+' -> 10, '=' -> 11, BOS -> 12, EOS -> 13, PAD -> 14 (vocab 15).
prompt = [BOS, d, d, d, '+', ..., d, d, d, '='], answer = [sum digits..., EOS]. The answer's EOS counts in the loss
and in accuracy, so "all answer digits correct" also means the model stops after the last digit (what greedy
decoding needs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task

PLUS, EQUALS, BOS, EOS, PAD = 10, 11, 12, 13, 14
_CHARS = "0123456789+="


@dataclasses.dataclass(frozen=True)
class Addition(Task):
    """Sum of n numbers of ``digits`` digits, n drawn uniformly from ``n_terms`` (evaluate per n: ``n_terms=(n,)``)."""

    n_terms: tuple[int, ...] = (8, 16, 24, 32)
    digits: int = 3
    seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "n_terms", tuple(int(n) for n in self.n_terms))
        if not self.n_terms or min(self.n_terms) < 1:
            raise ValueError(f"n_terms={self.n_terms!r}: must be a non-empty tuple of ints >= 1")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits={self.digits!r}: must be in [1, 9]")
        self._check_seq_len()

    @property
    def vocab_size(self) -> int:
        return 15

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def min_seq_len(self) -> int:
        n = max(self.n_terms)
        answer_digits = len(str(n * (10**self.digits - 1)))
        return (1 + n * (self.digits + 1) + answer_digits + 1) - 1  # BOS, terms with '+'/'=', answer, EOS; minus 1

    def sample(self, rng: np.random.Generator) -> Example:
        n = int(self.n_terms[rng.integers(len(self.n_terms))])
        numbers = rng.integers(0, 10**self.digits, size=n)
        powers = 10 ** np.arange(self.digits - 1, -1, -1)
        digits_ND = (numbers[:, None] // powers[None, :]) % 10
        sep_N1 = np.full((n, 1), PLUS)
        sep_N1[-1, 0] = EQUALS
        prompt = np.concatenate([[BOS], np.concatenate([digits_ND, sep_N1], axis=1).reshape(-1)])
        total = int(numbers.sum())
        answer = [int(c) for c in str(total)] + [EOS]
        return Example(prompt=prompt.astype(np.int32), answer=np.array(answer, np.int32), difficulty=n)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        text = self.decode(prompt)
        if not (text.startswith("<bos>") and text.endswith("=")):
            raise ValueError(f"not an addition prompt: {text!r}")
        terms = text[len("<bos>"):-1].split("+")
        if any(len(t) != self.digits or not t.isdigit() for t in terms):
            raise ValueError(f"not {self.digits}-digit terms: {text!r}")
        return np.array([_CHARS.index(c) for c in str(sum(int(t) for t in terms))] + [EOS], np.int32)

    def decode(self, tokens) -> str:
        names = {BOS: "<bos>", EOS: "<eos>", PAD: "_"}
        return "".join(_CHARS[t] if t < len(_CHARS) else names.get(t, f"<{t}>") for t in (int(x) for x in tokens))


def display(task: Addition, example: Example) -> tuple[str, str]:
    """("315 + 120 + 045 + 824 =", "1304"): the human form of an example."""
    prompt = task.decode(example.prompt).removeprefix("<bos>")
    return prompt.replace("+", " + ").replace("=", " ="), task.decode(example.answer).removesuffix("<eos>")
