"""p-hop induction (Sanford, Hsu & Telgarsky 2024; the setting of Saunshi et al., ICLR 2025).

Definitions, for v = (v_1, ..., v_n) over an alphabet Σ and 1 <= i <= n:
  find_1(v, i) = max({0} ∪ {j <= i : v_{j-1} = v_i})      (the token right after the latest earlier copy of v_i)
  find_p(v, i) = find_1(v, find_{p-1}(v, i)),  find_1(v, 0) = 0
  hop_p(v)     = v_{find_p(v, n)}, or ⊥ if find_p(v, n) = 0.

Generator (plants a full chain, then fills without shortcuts). Chain positions n = i_0 > i_1 > ... > i_p >= 2 with
gaps i_{t-1} - i_t >= 2 are drawn uniformly (a uniform composition of the n - 2 - 2p slack positions into p + 1
parts), so the hops spread over the whole sequence. Chain tokens c_0 uniform, c_{t+1} uniform in Σ \\ {c_t}. Plant
v_{i_t} = c_t and the anchor v_{i_{t+1}-1} = c_t (the earlier copy of c_t; hop t+1 lands right after it). Every other
position k in the segment i_{t+1} <= k <= i_t - 1 of hop t gets a token uniform in Σ \\ {c_t}, so the anchor is the
latest copy of c_t before i_t: find_1(v, i_t) = i_{t+1} exactly, and no filler opens a shorter chain. Positions
before the last anchor are uniform in Σ. Hence find_t(v, n) = i_t for t = 0..p, strictly decreasing, and
hop_p(v) = c_p. (Sanford et al.'s own code instead draws v with v_i != v_(i-1) and labels every position, where
⊥ can occur; here every example has a full p-hop answer, which is what the single-label accuracy needs.)

Sequence layout: prompt = [HOP_p, v_1, ..., v_n] where HOP_p names the number of hops (so one model can train on a
mixture of p), answer = [hop_p(v)]. Vocabulary: alphabet tokens 0..a-1, PAD = a, HOP_p = a + p for
p = 1..max_hops; ``vocab_size = a + 1 + max_hops``. Inputs are n + 1 tokens; only the last one's target counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task


def find_1(v, i: int) -> int:
    """find_1 with 1-based positions into ``v`` (``v[0]`` is v_1); 0 is ⊥."""
    if i == 0:
        return 0
    return max([0] + [j for j in range(2, i + 1) if v[j - 2] == v[i - 1]])


def find_p(v, i: int, p: int) -> int:
    for _ in range(p):
        i = find_1(v, i)
    return i


def hop_p(v, p: int) -> int | None:
    """hop_p(v) by the naive definition, ``None`` for ⊥."""
    i = find_p(v, len(v), p)
    return None if i == 0 else int(v[i - 1])


def prefix_hops(v, p: int) -> np.ndarray:
    """[hop_p(v_1..v_i) for i = 1..n] in one O(n·p) pass, -1 for ⊥ (Sanford et al.'s label at every position)."""
    v = np.asarray(v)
    n = v.shape[0]
    find = np.zeros(n + 1, np.int64)  # find[i] = find_1(v, i), 1-based; find[0] = 0
    latest: dict[int, int] = {}  # symbol c -> the largest j seen so far with v_(j-1) = c
    for i in range(1, n + 1):
        if i >= 2:
            latest[int(v[i - 2])] = i
        find[i] = latest.get(int(v[i - 1]), 0)
    pos = np.arange(1, n + 1)
    for _ in range(p):
        pos = find[pos]
    return np.where(pos > 0, v[np.maximum(pos, 1) - 1], -1)


def hop_chain(v, p: int) -> list[int]:
    """[find_0, find_1, ..., find_p](v, n), 1-based positions (0 once the chain breaks)."""
    chain = [len(v)]
    for _ in range(p):
        chain.append(find_1(v, chain[-1]))
    return chain


@dataclasses.dataclass(frozen=True)
class PHop(Task):
    """p-hop induction over ``alphabet`` symbols, sequences of length ``n``, p drawn uniformly from ``hops``.

    ``max_hops`` (default ``max(hops)``) fixes the vocabulary, so sources for single p values share one vocabulary
    with a mixture: evaluate per p with ``PHop(hops=(p,), max_hops=...)``.
    """

    alphabet: int = 4
    n: int = 256
    hops: tuple[int, ...] = (16,)
    max_hops: int | None = None
    seq_len: int | None = None
    dense_labels: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hops", tuple(int(p) for p in self.hops))
        if not isinstance(self.dense_labels, bool):
            raise ValueError(f"dense_labels={self.dense_labels!r}: must be True or False")
        if self.alphabet < 2:
            raise ValueError(f"alphabet={self.alphabet!r}: must be >= 2 (the chain needs c_(t+1) != c_t)")
        if not self.hops or min(self.hops) < 1:
            raise ValueError(f"hops={self.hops!r}: must be a non-empty tuple of ints >= 1")
        if self.n < 2 * max(self.hops) + 2:
            raise ValueError(f"n={self.n!r}: must be >= 2 * max(hops) + 2 = {2 * max(self.hops) + 2}")
        if self.max_hops is not None and self.max_hops < max(self.hops):
            raise ValueError(f"max_hops={self.max_hops!r}: must be None or >= max(hops) = {max(self.hops)}")
        self._check_seq_len()

    @property
    def vocab_size(self) -> int:
        return self.alphabet + 1 + (self.max_hops or max(self.hops))

    @property
    def pad_id(self) -> int:
        return self.alphabet

    @property
    def min_seq_len(self) -> int:
        return self.n + 1

    def hop_token(self, p: int) -> int:
        return self.alphabet + p

    def sample(self, rng: np.random.Generator) -> Example:
        p = int(self.hops[rng.integers(len(self.hops))])
        a, n = self.alphabet, self.n
        # Uniform composition of the slack m into p + 1 parts: p hop-gap extras, then the room before i_p.
        m = n - 2 - 2 * p
        bars = np.sort(rng.choice(m + p, size=p, replace=False))
        parts = np.diff(np.concatenate([[-1], bars, [m + p]])) - 1
        pos = n - np.cumsum(np.concatenate([[0], 2 + parts[:p]]))  # i_0 .. i_p, 1-based
        chain = np.empty(p + 1, np.int64)
        chain[0] = rng.integers(a)
        steps = rng.integers(1, a, size=p)  # c_(t+1) = c_t + step mod a: uniform over Σ \ {c_t}
        chain[1:] = (chain[0] + np.cumsum(steps)) % a

        forbid = np.full(n + 1, -1, np.int64)  # index = 1-based position; segment t is [i_(t+1), i_t - 1]
        forbid[pos[p]:n] = np.repeat(chain[p - 1::-1], (pos[:-1] - pos[1:])[::-1])
        draw = rng.integers(0, a - 1, size=n + 1)
        v = np.where(forbid >= 0, (forbid + 1 + draw) % a, rng.integers(0, a, size=n + 1))
        v[pos] = chain
        v[pos[1:] - 1] = chain[:-1]
        prompt = np.concatenate([[self.hop_token(p)], v[1:]]).astype(np.int32)
        return Example(prompt=prompt, answer=np.array([chain[p]], np.int32), difficulty=p)

    def extra_labels(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """With ``dense_labels``: the p-hop answer of every shorter prefix that has one."""
        if not self.dense_labels:
            return super().extra_labels(example)
        p = int(example.prompt[0]) - self.alphabet
        answers = prefix_hops(example.prompt[1:], p)[:-1]  # prefixes v_1..v_i, i < n; row position i
        pos = np.flatnonzero(answers >= 0) + 1
        return pos, answers[pos - 1]

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        p = int(prompt[0]) - self.alphabet
        answer = hop_p([int(x) for x in prompt[1:]], p)
        return np.array([self.pad_id if answer is None else answer], np.int32)

    def decode(self, tokens) -> str:
        out = []
        for t in (int(x) for x in tokens):
            if t < self.alphabet:
                out.append("abcdefghijklmnopqrstuvwxyz"[t] if self.alphabet <= 26 else f"<{t}>")
            elif t == self.pad_id:
                out.append("_")
            else:
                out.append(f"[hop{t - self.alphabet}]")
        return "".join(out)
