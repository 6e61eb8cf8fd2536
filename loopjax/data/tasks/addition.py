"""n-ary addition without chain of thought (Saunshi et al., ICLR 2025).

Generator: n drawn uniformly from ``n_terms``; n numbers uniform in [0, 10^digits), each written with exactly
``digits`` digits (zero-padded, most significant first), joined by '+', then '='; the answer is the sum in decimal
without leading zeros, then EOS. Display form: "315 + 120 + 045 + 824 =" -> "1304".

Character-level vocabulary: '0'..'9' -> 0..9, '+' -> 10, '=' -> 11, BOS -> 12, EOS -> 13, PAD -> 14 (vocab 15).
prompt = [BOS, d, d, d, '+', ..., d, d, d, '='], answer = [sum digits..., EOS]. The answer's EOS counts in the loss
and in accuracy, so "all answer digits correct" also means the model stops after the last digit (what greedy
decoding needs).

``place_tokens=True`` (index hints, as in Zhou et al. 2023 / abacus embeddings): every digit token also names its
place, so a digit's column is in its token rather than only in its position: place 0 (units) keeps '0'..'9' -> 0..9,
place p >= 1 is 15 + 10·(p - 1) + digit. The answer is then zero-padded to the fixed width of the largest possible
sum (every answer position has one place) and tagged the same way. The display form is unchanged; the digits to
compute (column sums and their carries, most significant first) are the same.

``dense_labels=True`` adds supervision to the training rows (``lm_example``; scoring rows keep the answer alone), the
"answer of every prefix" labelling of ``PHop.dense_labels``: after term i < n, the ``digits + 1`` row positions
whose inputs are the '+' closing term i and the digits of term i + 1 (targets otherwise unsupervised: the next
term's digits, or the '+' / '=' after it) are labelled with the sum of terms 1..i, written as the answer is (most
significant first, tagged with places under ``place_tokens``), its ``digits + 1`` least significant digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task

PLUS, EQUALS, BOS, EOS, PAD = 10, 11, 12, 13, 14


@dataclasses.dataclass(frozen=True)
class Addition(Task):
    """Sum of n numbers of ``digits`` digits, n drawn uniformly from ``n_terms`` (evaluate per n: ``n_terms=(n,)``)."""

    n_terms: tuple[int, ...] = (8, 16, 24, 32)
    digits: int = 3
    place_tokens: bool = False
    answer_digits: int | None = None
    seq_len: int | None = None
    dense_labels: bool = False

    def __post_init__(self):
        object.__setattr__(self, "n_terms", tuple(int(n) for n in self.n_terms))
        if not self.n_terms or min(self.n_terms) < 1:
            raise ValueError(f"n_terms={self.n_terms!r}: must be a non-empty tuple of ints >= 1")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits={self.digits!r}: must be in [1, 9]")
        for name in ("place_tokens", "dense_labels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a bool")
        widest = self._widest_sum()
        if self.answer_digits is not None and not (isinstance(self.answer_digits, int) and
                                                   widest <= self.answer_digits <= 18):
            raise ValueError(f"answer_digits={self.answer_digits!r}: must be None or an int in [{widest}, 18] "
                             f"(the largest sum of {max(self.n_terms)} terms has {widest} digits)")
        self._check_seq_len()

    def _widest_sum(self) -> int:
        return len(str(max(self.n_terms) * (10**self.digits - 1)))

    @property
    def answer_width(self) -> int:
        """The most answer digits (without EOS): ``answer_digits`` if set, else the digits of the largest possible
        sum. With ``place_tokens`` every answer has exactly this many digits (zero-padded)."""
        return self._widest_sum() if self.answer_digits is None else self.answer_digits

    @property
    def vocab_size(self) -> int:
        return 15 + 10 * (self.answer_width - 1) if self.place_tokens else 15

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def min_seq_len(self) -> int:
        n = max(self.n_terms)
        return (1 + n * (self.digits + 1) + self.answer_width + 1) - 1  # BOS, terms with '+'/'=', answer, EOS; - 1

    def _digit_tokens(self, digits: np.ndarray, places: np.ndarray) -> np.ndarray:
        """Token ids of ``digits`` at ``places`` (0 = units): the digits themselves unless ``place_tokens``."""
        if not self.place_tokens:
            return digits
        return np.where(places == 0, digits, 15 + 10 * (places - 1) + digits)

    def _answer(self, total: int) -> np.ndarray:
        text = f"{total:0{self.answer_width}d}" if self.place_tokens else str(total)
        digits = np.array([int(c) for c in text])
        return np.append(self._digit_tokens(digits, np.arange(len(digits) - 1, -1, -1)), EOS).astype(np.int32)

    def sample(self, rng: np.random.Generator) -> Example:
        n = int(self.n_terms[rng.integers(len(self.n_terms))])
        numbers = rng.integers(0, 10**self.digits, size=n)
        powers = 10 ** np.arange(self.digits - 1, -1, -1)
        digits_ND = (numbers[:, None] // powers[None, :]) % 10
        tokens_ND = self._digit_tokens(digits_ND, np.arange(self.digits - 1, -1, -1)[None, :])
        sep_N1 = np.full((n, 1), PLUS)
        sep_N1[-1, 0] = EQUALS
        prompt = np.concatenate([[BOS], np.concatenate([tokens_ND, sep_N1], axis=1).reshape(-1)])
        return Example(prompt=prompt.astype(np.int32), answer=self._answer(int(numbers.sum())), difficulty=n)

    def extra_labels(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """With ``dense_labels``: the low ``digits + 1`` digits of every prefix sum (module docstring)."""
        if not self.dense_labels:
            return super().extra_labels(example)
        width = self.digits + 1
        n = (example.prompt.shape[0] - 1) // width
        terms_ND = example.prompt[1:].reshape(n, width)[:, :-1]
        values = np.array([int(self.decode(t)) for t in terms_ND], np.int64)
        places_W = np.arange(width - 1, -1, -1)
        pos, labels = [], []
        for i, total in enumerate(np.cumsum(values)[:-1], start=1):
            pos.append(i * width + np.arange(width))
            labels.append(self._digit_tokens((total // 10**places_W) % 10, places_W))
        if not pos:
            return super().extra_labels(example)
        return np.concatenate(pos), np.concatenate(labels).astype(np.int32)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        text = self.decode(prompt)
        if not (text.startswith("<bos>") and text.endswith("=")):
            raise ValueError(f"not an addition prompt: {text!r}")
        terms = text[len("<bos>"):-1].split("+")
        if any(len(t) != self.digits or not t.isdigit() for t in terms):
            raise ValueError(f"not {self.digits}-digit terms: {text!r}")
        if self.place_tokens:
            places = [self._place(int(t)) for t in prompt[1:-1] if int(t) not in (PLUS, EQUALS)]
            if places != list(range(self.digits - 1, -1, -1)) * len(terms):
                raise ValueError(f"digit tokens do not name their places: {prompt.tolist()}")
        return self._answer(sum(int(t) for t in terms))

    def _place(self, token: int) -> int | None:
        """The place a digit token names (0 for the plain digits), None for other tokens."""
        if token < 10:
            return 0
        if self.place_tokens and 15 <= token < self.vocab_size:
            return 1 + (token - 15) // 10
        return None

    def decode(self, tokens) -> str:
        """Text of ``tokens``; a place-tagged digit prints as its digit."""
        names = {PLUS: "+", EQUALS: "=", BOS: "<bos>", EOS: "<eos>", PAD: "_"}
        out = []
        for t in (int(x) for x in tokens):
            place = self._place(t)
            out.append(str(t % 10 if place == 0 else (t - 15) % 10) if place is not None else names.get(t, f"<{t}>"))
        return "".join(out)


def display(task: Addition, example: Example) -> tuple[str, str]:
    """("315 + 120 + 045 + 824 =", "1304"): the human form of an example."""
    prompt = task.decode(example.prompt).removeprefix("<bos>")
    return prompt.replace("+", " + ").replace("=", " ="), task.decode(example.answer).removesuffix("<eos>")
