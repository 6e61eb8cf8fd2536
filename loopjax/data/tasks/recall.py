"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): the lookup every i-GSM operand needs, alone.

Generator: ``n_pairs`` distinct keys (drawn from ``n_keys``) each bound to a value uniform in [0, ``n_values``),
written as statements, then ``n_queries`` queries of keys drawn uniformly with replacement among the bound ones.
Every query but the last is followed by its value in the prompt; the last one's value is the answer. So a row holds
``n_queries`` lookups, of which ``dense_labels=True`` supervises all in training rows (at each query's key, the
position whose next token is its value); scoring rows keep the answer alone. Solving it takes an induction circuit:
find the statement of the queried key (or an earlier query of it) and copy the token after it.

Tokens: values 0..V-1 (V = ``n_values``), then ';', '?', BOS, PAD, then the keys.
prompt = [BOS, (k, v, ';') * n_pairs, ('?', k, v) * (n_queries - 1), '?', k], answer = [v].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task


@dataclasses.dataclass(frozen=True)
class Recall(Task):
    """Associative recall of ``n_pairs`` key-value bindings by ``n_queries`` queries (the last one is scored)."""

    n_pairs: int = 4
    n_queries: int = 4
    n_keys: int = 8
    n_values: int = 7
    dense_labels: bool = True
    seq_len: int | None = None

    def __post_init__(self):
        for field, low in (("n_pairs", 1), ("n_queries", 1), ("n_values", 2)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{field}={value!r}: must be an int >= {low}")
        if not isinstance(self.n_keys, int) or isinstance(self.n_keys, bool) or self.n_keys < self.n_pairs:
            raise ValueError(f"n_keys={self.n_keys!r}: must be an int >= n_pairs = {self.n_pairs}")
        if not isinstance(self.dense_labels, bool):
            raise ValueError(f"dense_labels={self.dense_labels!r}: must be True or False")
        self._check_seq_len()

    @property
    def end_id(self) -> int:
        return self.n_values

    @property
    def query_id(self) -> int:
        return self.n_values + 1

    @property
    def bos_id(self) -> int:
        return self.n_values + 2

    @property
    def pad_id(self) -> int:
        return self.n_values + 3

    @property
    def key_base(self) -> int:
        return self.n_values + 4

    @property
    def vocab_size(self) -> int:
        return self.key_base + self.n_keys

    @property
    def min_seq_len(self) -> int:
        return 1 + 3 * self.n_pairs + 3 * self.n_queries - 1

    def sample(self, rng: np.random.Generator) -> Example:
        keys = rng.choice(self.n_keys, self.n_pairs, replace=False) + self.key_base
        values = rng.integers(self.n_values, size=self.n_pairs)
        tokens = [self.bos_id]
        for k, v in zip(keys, values):
            tokens += [int(k), int(v), self.end_id]
        asked = rng.integers(self.n_pairs, size=self.n_queries)
        for i in asked[:-1]:
            tokens += [self.query_id, int(keys[i]), int(values[i])]
        tokens += [self.query_id, int(keys[asked[-1]])]
        return Example(prompt=np.array(tokens, np.int32), answer=np.array([values[asked[-1]]], np.int32),
                       difficulty=self.n_pairs)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        toks = [int(t) for t in prompt]
        if toks[0] != self.bos_id or toks[-2] != self.query_id:
            raise ValueError("not a recall prompt")
        bound: dict[int, int] = {}
        i = 1
        while toks[i] != self.query_id:  # statements: key, value, ';'
            if i + 2 >= len(toks) or toks[i + 2] != self.end_id or toks[i] in bound:
                raise ValueError(f"malformed or repeated statement at token {i}")
            bound[toks[i]] = toks[i + 1]
            i += 3
        if toks[-1] not in bound:
            raise ValueError(f"the query's key {toks[-1]} is not bound by a statement")
        return np.array([bound[toks[-1]]], np.int32)

    def extra_labels(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """With ``dense_labels``: the value of every earlier query, at its key."""
        if not self.dense_labels:
            return super().extra_labels(example)
        first = 1 + 3 * self.n_pairs + 1  # the key of the first query
        pos = np.arange(first, len(example.prompt) - 2, 3, dtype=np.int64)
        return pos, example.prompt[pos + 1].astype(np.int32)

    def decode(self, tokens) -> str:
        out = []
        for t in (int(x) for x in tokens):
            if t < self.n_values:
                out.append(str(t))
            elif t < self.key_base:
                out.append([";", "?", "<bos>", "_"][t - self.n_values])
            else:
                out.append(f"K{t - self.key_base}")
        return " ".join(out)
