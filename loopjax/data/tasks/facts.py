"""Fact recall: a fixed random table of (subject, relation) -> object triples, stored only in the weights.

The "know more" half of Frey et al. (arXiv 2603.08391)'s split: unlike the in-context tasks (p-hop, addition,
``Recall``), the prompt holds no fact; the model must have memorised the table during training. Scoring is over
the table itself (memorisation by design): ``example(seed, i)`` for i = 0..n_facts-1 visits every fact once.

Table (fixed by ``table_seed``, independent of the stream seed): ``n_subjects`` distinct subjects, each spelled as
``subject_tokens`` syllables drawn from ``n_syllables`` (so no single embedding row can hold a subject's facts: every
syllable is shared by many subjects), and for every subject and each of ``n_relations`` relations an object uniform
in [0, ``n_objects``).

Tokens: objects 0..O-1, then BOS, PAD, then the relations, then the syllables.
prompt = [BOS, syl_1, ..., syl_k, REL_r], answer = [object(s, r)].
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from loopjax.data.tasks.base import Example, Task


@dataclasses.dataclass(frozen=True)
class FactTable(Task):
    """Recall of ``n_subjects * n_relations`` random facts; subjects spelled with ``subject_tokens`` syllables."""

    n_subjects: int = 256
    n_relations: int = 4
    n_objects: int = 32
    subject_tokens: int = 2
    n_syllables: int = 32
    table_seed: int = 0
    seq_len: int | None = None

    def __post_init__(self):
        for field, low in (("n_subjects", 1), ("n_relations", 1), ("n_objects", 2), ("subject_tokens", 1),
                           ("n_syllables", 2), ("table_seed", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{field}={value!r}: must be an int >= {low}")
        if self.n_syllables ** self.subject_tokens < self.n_subjects:
            raise ValueError(f"n_subjects={self.n_subjects}: must be <= n_syllables ** subject_tokens = "
                             f"{self.n_syllables ** self.subject_tokens} (subjects are distinct spellings)")
        self._check_seq_len()

    @property
    def n_facts(self) -> int:
        return self.n_subjects * self.n_relations

    @property
    def bos_id(self) -> int:
        return self.n_objects

    @property
    def pad_id(self) -> int:
        return self.n_objects + 1

    @property
    def relation_base(self) -> int:
        return self.n_objects + 2

    @property
    def syllable_base(self) -> int:
        return self.relation_base + self.n_relations

    @property
    def vocab_size(self) -> int:
        return self.syllable_base + self.n_syllables

    @property
    def min_seq_len(self) -> int:
        return self.subject_tokens + 2

    @functools.cached_property
    def subjects(self) -> np.ndarray:
        """[n_subjects, subject_tokens] syllable ids (0-based), distinct rows."""
        rng = np.random.default_rng([self.table_seed, 0])
        codes = rng.choice(self.n_syllables ** self.subject_tokens, self.n_subjects, replace=False)
        digits = [(codes // self.n_syllables ** j) % self.n_syllables for j in range(self.subject_tokens)]
        return np.stack(digits, axis=1).astype(np.int64)

    @functools.cached_property
    def objects(self) -> np.ndarray:
        """[n_subjects, n_relations] the object of each fact."""
        rng = np.random.default_rng([self.table_seed, 1])
        return rng.integers(self.n_objects, size=(self.n_subjects, self.n_relations)).astype(np.int64)

    def fact(self, subject: int, relation: int) -> Example:
        prompt = np.concatenate([[self.bos_id], self.subjects[subject] + self.syllable_base,
                                 [self.relation_base + relation]]).astype(np.int32)
        return Example(prompt=prompt, answer=np.array([self.objects[subject, relation]], np.int32),
                       difficulty=self.n_facts)

    def sample(self, rng: np.random.Generator) -> Example:
        i = int(rng.integers(self.n_facts))
        return self.fact(i // self.n_relations, i % self.n_relations)

    def example(self, seed: int, index: int) -> Example:
        """Fact ``perm[index % n_facts]`` of a permutation drawn per pass over the table (``index // n_facts``):
        ``n_facts`` consecutive indices visit every fact exactly once."""
        n = self.n_facts
        perm = np.random.default_rng([seed, index // n, 2]).permutation(n)
        i = int(perm[index % n])
        return self.fact(i // self.n_relations, i % self.n_relations)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        toks = [int(t) for t in prompt]
        k = self.subject_tokens
        if len(toks) != k + 2 or toks[0] != self.bos_id:
            raise ValueError("not a fact prompt")
        spelled = np.array(toks[1:1 + k]) - self.syllable_base
        match = np.flatnonzero(np.all(self.subjects == spelled, axis=1))
        relation = toks[-1] - self.relation_base
        if match.size != 1 or not 0 <= relation < self.n_relations:
            raise ValueError(f"unknown subject {spelled.tolist()} or relation {relation}")
        return np.array([self.objects[match[0], relation]], np.int32)

    def decode(self, tokens) -> str:
        out = []
        for t in (int(x) for x in tokens):
            if t < self.n_objects:
                out.append(f"o{t}")
            elif t < self.relation_base:
                out.append(["<bos>", "_"][t - self.n_objects])
            elif t < self.syllable_base:
                out.append(f"R{t - self.relation_base}")
            else:
                out.append(f"s{t - self.syllable_base}")
        return " ".join(out)
