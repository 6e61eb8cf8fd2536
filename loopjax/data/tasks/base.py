"""Shared machinery of the synthetic tasks: examples, the decoder-LM layout, grain sources, answer accuracy.

Every task is a frozen dataclass that validates itself and defines
  - ``sample(rng) -> Example``: the documented generator (prompt tokens, answer tokens, difficulty label);
  - ``solve(prompt) -> answer tokens``: an independent checker that recomputes the answer from the prompt alone;
  - ``vocab_size``, ``pad_id``, ``min_seq_len`` and ``decode(tokens) -> str``.
Example ``index`` under ``seed`` is ``sample(np.random.default_rng([seed, index]))``: random access, deterministic,
independent of the order of access, so a grain pipeline over it shuffles, shards and resumes exactly.

Decoder-LM layout of one example (``lm_arrays``), with ``seq = prompt ++ answer``:
  inputs  = seq[:-1]  padded with ``pad_id`` to ``seq_len``
  targets = seq[1:]   padded with ``pad_id``
  mask    = 1.0 exactly where ``targets`` is an answer token, else 0.0
so the loss counts only the answer, and ``answer_correct(argmax(logits), batch)`` from a single teacher-forced
forward equals greedy decoding's exact-match accuracy: greedy first departs from the answer at the first position
where the teacher-forced argmax is wrong, and matches it everywhere if that argmax is right everywhere.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Hashable, Iterator

import numpy as np

Difficulty = Hashable
ALL_EXAMPLES = 2**40  # default source length: effectively endless, yet finite for grain's shuffle


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: ``prompt`` int32 [P], ``answer`` int32 [A], and its difficulty label (e.g. p, n, depth)."""

    prompt: np.ndarray
    answer: np.ndarray
    difficulty: Difficulty


def lm_arrays(example: Example, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The decoder-LM layout above: {"inputs", "targets": int32 [seq_len], "mask": float32 [seq_len]}."""
    seq = np.concatenate([example.prompt, example.answer]).astype(np.int32)
    n = seq.shape[0] - 1
    if n > seq_len:
        raise ValueError(f"seq_len={seq_len!r}: must be >= {n}, the length of this example's inputs")
    inputs = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.float32)
    inputs[:n], targets[:n] = seq[:-1], seq[1:]
    start = example.prompt.shape[0] - 1
    mask[start:start + example.answer.shape[0]] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def answer_correct(pred_BS, batch: dict) -> np.ndarray:
    """Per-example exact match [B]: every position with mask > 0 has ``pred == targets``.

    ``pred_BS`` is the argmax of the logits of one forward pass over ``batch["inputs"]`` (NumPy or JAX array).
    """
    pred_BS = np.asarray(pred_BS)
    ok_BS = (pred_BS == np.asarray(batch["targets"])) | (np.asarray(batch["mask"]) <= 0)
    return np.all(ok_BS, axis=-1)


class Task(abc.ABC):
    """A synthetic task (see the module docstring). Subclasses are frozen dataclasses with a ``seq_len`` field."""

    seq_len: int | None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def min_seq_len(self) -> int:
        """The longest ``inputs`` any example of this task can have."""

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> Example: ...

    @abc.abstractmethod
    def solve(self, prompt: np.ndarray) -> np.ndarray:
        """The answer tokens recomputed from the prompt alone, without the generator's bookkeeping."""

    @abc.abstractmethod
    def decode(self, tokens) -> str: ...

    @property
    def length(self) -> int:
        """The padded sequence length of ``lm_arrays`` rows: ``seq_len`` if set, else ``min_seq_len``."""
        return self.min_seq_len if self.seq_len is None else self.seq_len

    def _check_seq_len(self) -> None:
        if self.seq_len is not None and self.seq_len < self.min_seq_len:
            raise ValueError(f"seq_len={self.seq_len!r}: must be None or >= {self.min_seq_len} for this task")

    def example(self, seed: int, index: int) -> Example:
        """Example ``index`` of the stream seeded by ``seed`` (both non-negative ints)."""
        return self.sample(np.random.default_rng([seed, index]))

    def examples(self, seed: int, count: int, start: int = 0) -> Iterator[Example]:
        for index in range(start, start + count):
            yield self.example(seed, index)

    def check(self, example: Example) -> bool:
        """True iff the independent checker agrees with the generator's answer."""
        return np.array_equal(self.solve(example.prompt), example.answer)

    def eval_example(self, example: Example) -> dict[str, np.ndarray]:
        """The scoring row: ``lm_arrays`` with the answer alone masked in."""
        return lm_arrays(example, self.length, self.pad_id)

    def extra_labels(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """Row positions [K] and target tokens [K] supervised in training besides the answer (none by default;
        e.g. ``PHop.dense_labels``)."""
        return np.zeros(0, np.int64), np.zeros(0, np.int32)

    def lm_example(self, example: Example) -> dict[str, np.ndarray]:
        """The training row: the scoring row plus the ``extra_labels`` masked in."""
        row = self.eval_example(example)
        pos, values = self.extra_labels(example)
        row["targets"][pos] = values
        row["mask"][pos] = 1.0
        return row

    def source(self, *, seed: int, num_examples: int = ALL_EXAMPLES) -> TaskSource:
        """A grain random-access source of ``lm_arrays`` rows (feed it to ``loopjax.data.make_pipeline``)."""
        return TaskSource(self, seed=seed, num_examples=num_examples)

    def eval_batch(self, *, seed: int, count: int, start: int = 0) -> dict[str, np.ndarray]:
        """``count`` stacked scoring rows [count, length], for a single-forward accuracy with ``answer_correct``."""
        rows = [self.eval_example(ex) for ex in self.examples(seed, count, start)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """grain ``RandomAccessDataSource``: row ``i`` is ``task.lm_example(task.example(seed, i))``."""

    task: Task
    seed: int
    num_examples: int = ALL_EXAMPLES

    def __post_init__(self):
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be a non-negative int")
        if not isinstance(self.num_examples, (int, np.integer)) or self.num_examples < 1:
            raise ValueError(f"num_examples={self.num_examples!r}: must be a positive int")

    def __len__(self) -> int:
        return int(self.num_examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return self.task.lm_example(self.task.example(self.seed, index))
