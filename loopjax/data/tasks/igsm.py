"""Synthetic GSM in the style of i-GSM (Ye et al. 2024, "Physics of Language Models 2.1"), as used by Saunshi et al.

Generator, for a difficulty (depth D, operations K) drawn uniformly from ``difficulties``:
  1. Entity hierarchy: ``n_levels`` levels of ``level_width`` distinct entity names (drawn from ``n_names``); an
     instance parameter is an edge between adjacent levels, "each <parent> has <value> <child>", named by the
     (parent, child) pair. ``name_tokens=1`` drops the hierarchy: every parameter is named by one distinct token
     of the ``n_names`` (a scaled-down variant whose lookups are single-token induction).
  2. Dependency DAG of the query: a random binary expression tree of exactly K operations ('+', '-', '*' mod
     ``modulus``) whose longest leaf-to-root path has exactly D operations (left child depth D - 1, right child
     any depth < D, operation budgets split uniformly among feasible splits; D = K = 0: the query is a constant,
     a lookup by name). Leaves are constants in [0, modulus), and a leaf is reused by later operands with
     probability ``share_leaf``, so the graph is a DAG.
  3. ``n_distractors`` extra parameters (constants, or operations on any earlier parameter) that the query does
     not depend on.
  4. Every node gets a distinct random edge of the hierarchy as its name. ``order="shuffled"``: the statements
     appear in a uniformly random order (an operand may be defined after its use); ``order="topological"``: every
     operand is defined before its use (each next statement drawn uniformly among those whose operands are placed).
The answer is the query node's value mod ``modulus``.

``dense_labels=True`` adds supervision to the training rows (``lm_example``; scoring rows keep the answer alone):
at the ';' closing each statement whose value is determined by the statements before it (a constant, or an
operation whose operands are all defined earlier, recursively), the target is that value: the "answer of every
prefix" labelling that p-hop's ``dense_labels`` uses, for the parameters a causal reader can already evaluate.
``reference_labels=True`` also labels each operand reference (at its name's last token) with the operand's value
when the prefix determines it: one supervised lookup per reference, the analogue of p-hop's per-position labels.

Tokens: values 0..M-1 (M = modulus), then '+', '-', '*', '=', ';', '?', BOS, PAD, then entity names.
A statement is [P, C, '=', v, ';'] (a constant) or [P, C, '=', Pa, Ca, op, Pb, Cb, ';'] (an operation);
prompt = [BOS, statements..., '?', Pq, Cq, '='], answer = [value]. With ``name_tokens=1`` each name [P, C] is
one token; with ``eq_tokens=False`` no '=' is written (statements [P, C, v, ';'] and [P, C, Pa, Ca, op, Pb, Cb,
';'], and the prompt ends at the query's name, where the answer is read as ``reference_labels`` read operands).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from loopjax.data.tasks.base import Example, Task

_OPS = "+-*"


@dataclasses.dataclass(frozen=True)
class IGSM(Task):
    """i-GSM-style problems; ``difficulties`` is a tuple of (depth, n_ops) pairs with depth <= n_ops < 2**depth
    ((0, 0): the query names a constant, a lookup by name without arithmetic)."""

    difficulties: tuple[tuple[int, int], ...] = ((4, 6),)
    n_levels: int = 4
    level_width: int = 4
    n_names: int = 32
    n_distractors: int = 4
    modulus: int = 7
    share_leaf: float = 0.3
    seq_len: int | None = None
    dense_labels: bool = False
    reference_labels: bool = False
    order: str = "shuffled"
    name_tokens: int = 2
    eq_tokens: bool = True

    def __post_init__(self):
        diffs = tuple((int(d), int(k)) for d, k in self.difficulties)
        object.__setattr__(self, "difficulties", diffs)
        if not diffs or any(not (0 <= d <= k <= 2**d - 1) for d, k in diffs):
            raise ValueError(f"difficulties={self.difficulties!r}: must be (depth, n_ops) pairs with "
                             "0 <= depth <= n_ops <= 2**depth - 1 ((0, 0): the query is a constant)")
        for field in ("dense_labels", "reference_labels", "eq_tokens"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}={getattr(self, field)!r}: must be True or False")
        if self.order not in ("shuffled", "topological"):
            raise ValueError(f"order={self.order!r}: must be 'shuffled' or 'topological'")
        if self.name_tokens not in (1, 2):
            raise ValueError(f"name_tokens={self.name_tokens!r}: must be 1 (one token) or 2 (parent, child)")
        if self.modulus < 2:
            raise ValueError(f"modulus={self.modulus!r}: must be >= 2")
        if self.n_levels < 2 or self.level_width < 1:
            raise ValueError(f"n_levels={self.n_levels!r}, level_width={self.level_width!r}: must be >= 2 and >= 1")
        if self.name_tokens == 2 and self.n_names < self.n_levels * self.level_width:
            raise ValueError(f"n_names={self.n_names!r}: must be >= n_levels * level_width = "
                             f"{self.n_levels * self.level_width}")
        if self.n_distractors < 0:
            raise ValueError(f"n_distractors={self.n_distractors!r}: must be >= 0")
        if not 0.0 <= self.share_leaf <= 1.0:
            raise ValueError(f"share_leaf={self.share_leaf!r}: must be in [0, 1]")
        if self.name_tokens == 1 and self._max_nodes > self.n_names:
            raise ValueError(f"n_names={self.n_names!r}: a problem may need {self._max_nodes} parameter names")
        if self.name_tokens == 2 and self._max_nodes > self._n_edges:
            raise ValueError(f"n_levels={self.n_levels!r}, level_width={self.level_width!r}: the hierarchy has "
                             f"{self._n_edges} parameters but a problem may need {self._max_nodes}")
        self._check_seq_len()

    # Token ids.
    @property
    def op_ids(self) -> tuple[int, int, int]:
        return self.modulus, self.modulus + 1, self.modulus + 2

    @property
    def eq_id(self) -> int:
        return self.modulus + 3

    @property
    def end_id(self) -> int:
        return self.modulus + 4

    @property
    def query_id(self) -> int:
        return self.modulus + 5

    @property
    def bos_id(self) -> int:
        return self.modulus + 6

    @property
    def pad_id(self) -> int:
        return self.modulus + 7

    @property
    def name_base(self) -> int:
        return self.modulus + 8

    @property
    def vocab_size(self) -> int:
        return self.name_base + self.n_names

    @property
    def _n_edges(self) -> int:
        return (self.n_levels - 1) * self.level_width**2

    @property
    def _max_nodes(self) -> int:
        k = max(k for _, k in self.difficulties)
        return k + (k + 1) + self.n_distractors

    @property
    def min_seq_len(self) -> int:
        k, w = max(k for _, k in self.difficulties), self.name_tokens
        # inputs = prompt (the answer is one token): BOS, operations, constants, query
        e = int(self.eq_tokens)
        return 1 + (3 * w + 2 + e) * (k + self.n_distractors) + (w + 2 + e) * (k + 1) + (w + 1 + e)

    def sample(self, rng: np.random.Generator) -> Example:
        depth, n_ops = self.difficulties[rng.integers(len(self.difficulties))]
        nodes: list[tuple] = []  # ("leaf", value) or ("op", op_index, left_id, right_id, value)
        leaves: list[int] = []
        query = self._build(rng, depth, n_ops, nodes, leaves)
        for _ in range(self.n_distractors):
            if rng.random() < 0.5:
                self._new_leaf(rng, nodes)
            else:
                self._new_op(rng, nodes, int(rng.integers(len(nodes))), int(rng.integers(len(nodes))))

        param = self._names(rng, len(nodes))

        tokens = [self.bos_id]
        for x in self._statement_order(rng, nodes):
            node = nodes[x]
            tokens += [*param[x]] + [self.eq_id] * self.eq_tokens
            if node[0] == "leaf":
                tokens.append(node[1])
            else:
                tokens += [*param[node[2]], self.op_ids[node[1]], *param[node[3]]]
            tokens.append(self.end_id)
        tokens += [self.query_id, *param[query]] + [self.eq_id] * self.eq_tokens
        return Example(prompt=np.array(tokens, np.int32), answer=np.array([nodes[query][-1]], np.int32),
                       difficulty=(depth, n_ops))

    def _names(self, rng, n: int) -> list[tuple[int, ...]]:
        """Distinct names for ``n`` parameters: single tokens, or random (parent, child) edges of a hierarchy."""
        if self.name_tokens == 1:
            return [(int(t),) for t in rng.choice(self.n_names, size=n, replace=False) + self.name_base]
        w = self.level_width
        names = rng.choice(self.n_names, size=(self.n_levels, w), replace=False) + self.name_base
        edges = rng.choice(self._n_edges, size=n, replace=False)
        level, rest = np.divmod(edges, w * w)
        parent, child = np.divmod(rest, w)
        return [(int(names[l, i]), int(names[l + 1, j])) for l, i, j in zip(level, parent, child)]

    def _statement_order(self, rng, nodes) -> list[int]:
        if self.order == "shuffled":
            return [int(x) for x in rng.permutation(len(nodes))]
        out, placed = [], set()
        remaining = list(range(len(nodes)))
        while remaining:  # draw uniformly among the statements whose operands are already placed
            ready = [x for x in remaining if nodes[x][0] == "leaf" or {nodes[x][2], nodes[x][3]} <= placed]
            x = ready[int(rng.integers(len(ready)))]
            out.append(x)
            placed.add(x)
            remaining.remove(x)
        return out

    def _new_leaf(self, rng, nodes) -> int:
        nodes.append(("leaf", int(rng.integers(self.modulus))))
        return len(nodes) - 1

    def _new_op(self, rng, nodes, left: int, right: int) -> int:
        op = int(rng.integers(3))
        if rng.random() < 0.5:
            left, right = right, left
        a, b = nodes[left][-1], nodes[right][-1]
        value = (a + b, a - b, a * b)[op] % self.modulus
        nodes.append(("op", op, left, right, value))
        return len(nodes) - 1

    def _build(self, rng, depth: int, n_ops: int, nodes, leaves) -> int:
        """A node of exactly ``depth`` operations on its longest path and ``n_ops`` distinct operations below it."""
        if depth == 0:
            if leaves and rng.random() < self.share_leaf:
                return int(leaves[rng.integers(len(leaves))])
            leaves.append(self._new_leaf(rng, nodes))
            return leaves[-1]
        # Left subtree: depth - 1 with k_l ops in [depth-1, 2^(depth-1)-1]; right: depth r < depth, k_r in [r, 2^r-1].
        splits = []  # (r, lowest k_r, highest k_r)
        for r in range(depth):
            lo = max(r, n_ops - 1 - (2 ** (depth - 1) - 1))
            hi = min(2**r - 1, n_ops - 1 - (depth - 1))
            if lo <= hi:
                splits.append((r, lo, hi))
        counts = np.array([hi - lo + 1 for _, lo, hi in splits])
        r, lo, hi = splits[rng.choice(len(splits), p=counts / counts.sum())]
        k_r = lo + int(rng.integers(hi - lo + 1))
        left = self._build(rng, depth - 1, n_ops - 1 - k_r, nodes, leaves)
        right = self._build(rng, r, k_r, nodes, leaves)
        return self._new_op(rng, nodes, left, right)

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        return np.array([analyse(self, prompt)[0]], np.int32)

    def extra_labels(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """The values the prefix determines: of each statement at its ';' (``dense_labels``), of each operand at its
        reference (``reference_labels``)."""
        labels = prefix_values(self, example.prompt, statements=self.dense_labels, references=self.reference_labels)
        if not labels:
            return super().extra_labels(example)
        pos, values = zip(*labels)
        return np.array(pos, np.int64), np.array(values, np.int32)

    def decode(self, tokens) -> str:
        out = []
        for t in (int(x) for x in tokens):
            if t < self.modulus:
                out.append(str(t))
            elif t < self.name_base:
                out.append(["+", "-", "*", "=", ";\n", "?", "<bos>", "_"][t - self.modulus])
            else:
                out.append(f"E{t - self.name_base}")
        return " ".join(out).replace(" ;\n ", ";\n")


def _statements(task: IGSM, prompt: np.ndarray) -> tuple[list[tuple], tuple[int, ...]]:
    """Parse a prompt: ([(name, definition, position of its ';'), ...] in order, the query's name); a definition is
    ("const", v) or (op, operand name, operand name)."""
    toks, w, e = [int(t) for t in prompt], task.name_tokens, int(task.eq_tokens)
    tail = w + 1 + e  # '?', the query's name, '=' with eq_tokens
    if toks[0] != task.bos_id or toks[-tail] != task.query_id or (e and toks[-1] != task.eq_id):
        raise ValueError("not an i-GSM prompt")
    out = []
    i = 1
    while i < len(toks) - tail:
        if e and toks[i + w] != task.eq_id:
            raise ValueError(f"expected '=' at token {i + w}")
        end = toks.index(task.end_id, i + w + e)
        body = toks[i + w + e:end]
        if len(body) == 1:
            definition = ("const", body[0])
        elif len(body) == 2 * w + 1:
            definition = (_OPS[body[w] - task.modulus], tuple(body[:w]), tuple(body[w + 1:]))
        else:
            raise ValueError(f"malformed statement at token {i}")
        out.append((tuple(toks[i:i + w]), definition, end))
        i = end + 1
    return out, tuple(toks[len(toks) - tail + 1:len(toks) - e])


def _apply(op: str, a: int, b: int, modulus: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op] % modulus


def prefix_values(task: IGSM, prompt: np.ndarray, *, statements: bool = True,
                  references: bool = False) -> list[tuple[int, int]]:
    """(position, value) pairs, in position order, of what the prompt's prefix determines: with ``statements``,
    each statement's value at its closing ';'; with ``references``, each operand's value at its name's last token."""
    known: dict[tuple[int, ...], int] = {}
    out = []
    for name, definition, end in _statements(task, prompt)[0]:
        if definition[0] == "const":
            known[name] = definition[1]
        else:
            op, a, b = definition[0], known.get(definition[1]), known.get(definition[2])
            if references:  # operand names end just before the op token and just before the ';'
                out += [(pos, v) for pos, v in ((end - task.name_tokens - 2, a), (end - 1, b)) if v is not None]
            if a is not None and b is not None:
                known[name] = _apply(op, a, b, task.modulus)
        if statements and name in known:
            out.append((end, known[name]))
    return out


def analyse(task: IGSM, prompt: np.ndarray) -> tuple[int, int, int]:
    """(answer, depth, n_ops) of the query, recomputed by parsing the prompt and evaluating it recursively."""
    parsed, query = _statements(task, prompt)
    defs = {name: definition for name, definition, _ in parsed}
    memo: dict[tuple[int, ...], tuple[int, int, frozenset]] = {}

    def evaluate(name, stack=()):
        if name in stack:
            raise ValueError(f"cyclic definition through {name}")
        if name not in memo:
            d = defs[name]
            if d[0] == "const":
                memo[name] = (d[1] % task.modulus, 0, frozenset())
            else:
                a, da, oa = evaluate(d[1], stack + (name,))
                b, db, ob = evaluate(d[2], stack + (name,))
                memo[name] = (_apply(d[0], a, b, task.modulus), 1 + max(da, db), oa | ob | {name})
        return memo[name]

    value, depth, ops = evaluate(query)
    return value, depth, len(ops)
