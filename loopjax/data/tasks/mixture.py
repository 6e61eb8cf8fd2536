"""One training stream mixing several tasks, each in its own slice of one shared vocabulary.

Member i's tokens t become ``offset_i + t`` (offsets are the running sum of the members' vocabularies), so the
members never share a token and every member's checker still applies after subtracting its offset. Rows are the
members' own rows (their ``lm_example`` / ``eval_example``, extra labels included), shifted, then padded with the
member's own (shifted) PAD to the longest member's row length. An example's difficulty is ``(name, difficulty)``.

Example ``index`` under ``seed`` picks member i with probability ``weights[i]`` (from its own random stream) and is
member i's ``example(seed, index)``: a member's examples are those of its own stream under the same seed, so
held-out seeds stay held out and ``FactTable``'s pass-over-the-table order is kept. ``member(name)`` is the same
mixture with all weight on one member (same vocabulary and row length): score each family with it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task

_CHOICE_STREAM = 0x6D6978  # salt: the member choice draws from a stream apart from the members' own


@dataclasses.dataclass(frozen=True)
class Mixture(Task):
    """``tasks`` named ``names``, drawn with probabilities ``weights`` (normalised; zero drops a member)."""

    tasks: tuple[Task, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "names", tuple(self.names))
        if not self.tasks or not all(isinstance(t, Task) for t in self.tasks):
            raise ValueError(f"tasks={self.tasks!r}: must be a non-empty tuple of Task")
        if len(self.names) != len(self.tasks) or len(set(self.names)) != len(self.names):
            raise ValueError(f"names={self.names!r}: must be {len(self.tasks)} distinct names, one per task")
        weights = (1.0,) * len(self.tasks) if self.weights is None else tuple(float(w) for w in self.weights)
        if len(weights) != len(self.tasks) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights={self.weights!r}: must be {len(self.tasks)} non-negative numbers, "
                             "not all zero")
        object.__setattr__(self, "weights", weights)
        self._check_seq_len()

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum([0] + [t.vocab_size for t in self.tasks[:-1]]))

    @property
    def vocab_size(self) -> int:
        return sum(t.vocab_size for t in self.tasks)

    @property
    def pad_id(self) -> int:
        return self.offsets[0] + self.tasks[0].pad_id

    @property
    def min_seq_len(self) -> int:
        return max(t.length for t in self.tasks)

    def member(self, name: str) -> Mixture:
        """This mixture with all weight on ``name``: its examples only, in the shared vocabulary and row length."""
        if name not in self.names:
            raise ValueError(f"name={name!r}: must be one of {self.names}")
        return dataclasses.replace(self, weights=tuple(float(n == name) for n in self.names))

    def _choose(self, rng: np.random.Generator) -> int:
        p = np.asarray(self.weights) / sum(self.weights)
        return int(rng.choice(len(self.tasks), p=p))

    def _wrap(self, i: int, ex: Example) -> Example:
        off = self.offsets[i]
        return Example(prompt=(ex.prompt + off).astype(np.int32), answer=(ex.answer + off).astype(np.int32),
                       difficulty=(self.names[i], ex.difficulty))

    def _unwrap(self, example: Example) -> tuple[int, Example]:
        name, difficulty = example.difficulty
        i = self.names.index(name)
        off = self.offsets[i]
        return i, Example(prompt=example.prompt - off, answer=example.answer - off, difficulty=difficulty)

    def sample(self, rng: np.random.Generator) -> Example:
        i = self._choose(rng)
        return self._wrap(i, self.tasks[i].sample(rng))

    def example(self, seed: int, index: int) -> Example:
        i = self._choose(np.random.default_rng([seed, index, _CHOICE_STREAM]))
        return self._wrap(i, self.tasks[i].example(seed, index))

    def _row(self, i: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        off, task, n = self.offsets[i], self.tasks[i], self.length
        pad = n - row["inputs"].shape[0]
        fill = off + task.pad_id
        return {"inputs": np.pad(row["inputs"] + off, (0, pad), constant_values=fill).astype(np.int32),
                "targets": np.pad(row["targets"] + off, (0, pad), constant_values=fill).astype(np.int32),
                "mask": np.pad(row["mask"], (0, pad)).astype(np.float32)}

    def eval_example(self, example: Example) -> dict[str, np.ndarray]:
        i, ex = self._unwrap(example)
        return self._row(i, self.tasks[i].eval_example(ex))

    def lm_example(self, example: Example) -> dict[str, np.ndarray]:
        i, ex = self._unwrap(example)
        return self._row(i, self.tasks[i].lm_example(ex))

    def _member_of(self, token: int) -> int:
        for i, (off, t) in enumerate(zip(self.offsets, self.tasks)):
            if off <= token < off + t.vocab_size:
                return i
        raise ValueError(f"token {token} is outside the mixture's vocabulary of {self.vocab_size}")

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        i = self._member_of(int(prompt[0]))
        return (self.tasks[i].solve(np.asarray(prompt) - self.offsets[i]) + self.offsets[i]).astype(np.int32)

    def decode(self, tokens) -> str:
        toks = [int(t) for t in tokens]
        if not toks:
            return ""
        i = self._member_of(toks[0])
        return f"[{self.names[i]}] " + self.tasks[i].decode(np.asarray(toks) - self.offsets[i])
