"""Synthetic tasks: every generated example verified by an independent checker; layout; determinism."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopjax.data.tasks import IGSM, Addition, Example, FactTable, Mixture, PHop, Recall, answer_correct, lm_arrays
from loopjax.data.tasks.addition import BOS, EOS, display
from loopjax.data.tasks.igsm import analyse, prefix_values
from loopjax.data.tasks.phop import find_1, hop_chain, hop_p, prefix_hops

FAST = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)


# ---- p-hop ----------------------------------------------------------------------------------------------------------

def test_hop_definition_on_hand_examples():
    a, b, c = 0, 1, 2
    v = [a, b, c, a]                    # previous 'a' is v_1, so find_1 = 2 and hop_1 = v_2 = b
    assert find_1(v, 4) == 2 and hop_p(v, 1) == b
    assert hop_p(v, 2) is None          # before v_2 = b there is no earlier b: ⊥
    assert find_1([a, a], 2) == 2       # j = i is allowed: v_{i-1} = v_i gives a fixed point
    assert hop_p([a, a], 5) == a
    v = [c, a, b, c, b, a, c, a]        # v_8 = a -> after v_6 = a: v_7 = c -> after v_4 = c: v_5 = b
    assert hop_chain(v, 3) == [8, 7, 5, 4]  # -> after v_3 = b (latest b before v_5): v_4 = c
    assert hop_p(v, 3) == c


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), alphabet=st.integers(2, 6), p=st.integers(1, 6),
       extra=st.integers(0, 20))
def test_phop_examples_have_full_chain_and_checker_answer(seed, index, alphabet, p, extra):
    task = PHop(alphabet=alphabet, n=2 * p + 2 + extra, hops=(p,))
    ex = task.example(seed, index)
    assert ex.prompt.shape == (task.n + 1,) and ex.prompt[0] == task.hop_token(p)
    v = ex.prompt[1:].tolist()
    assert all(0 <= t < alphabet for t in v)
    chain = hop_chain(v, p)
    assert all(x > y > 0 for x, y in zip(chain, chain[1:])), chain  # p genuine hops, no ⊥, no fixed point
    assert ex.answer.tolist() == [hop_p(v, p)] == [v[chain[-1] - 1]]
    assert task.check(ex)


def test_phop_mixture_draws_every_p_and_shares_vocab():
    mix = PHop(alphabet=4, n=24, hops=(2, 5))
    assert {mix.example(3, i).difficulty for i in range(40)} == {2, 5}
    single = PHop(alphabet=4, n=24, hops=(2,), max_hops=5)
    assert single.vocab_size == mix.vocab_size == 4 + 1 + 5
    ex = single.example(0, 0)
    assert single.check(ex) and mix.check(ex)


@FAST
@given(v=st.lists(st.integers(0, 3), min_size=1, max_size=30), p=st.integers(1, 5))
def test_prefix_hops_equal_the_naive_definition_on_every_prefix(v, p):
    naive = [hop_p(v[:i], p) for i in range(1, len(v) + 1)]
    assert prefix_hops(v, p).tolist() == [-1 if h is None else h for h in naive]


@FAST
@given(seed=seeds, p=st.integers(1, 4), extra=st.integers(0, 12))
def test_phop_dense_labels_mark_every_prefix_answer_and_score_only_the_final(seed, p, extra):
    dense = PHop(alphabet=3, n=2 * p + 2 + extra, hops=(p,), dense_labels=True)
    plain = PHop(alphabet=3, n=2 * p + 2 + extra, hops=(p,))
    ex = dense.example(seed, 0)
    assert np.array_equal(ex.prompt, plain.example(seed, 0).prompt)
    row, scoring = dense.lm_example(ex), dense.eval_example(ex)
    v = ex.prompt[1:].tolist()
    np.testing.assert_array_equal(row["inputs"], scoring["inputs"])
    for i in range(1, dense.n):  # row position i has seen v_1..v_i
        h = hop_p(v[:i], p)
        assert row["mask"][i] == (h is not None) and (h is None or row["targets"][i] == h)
    assert row["mask"][0] == 0 and row["mask"][dense.n] == 1 and row["targets"][dense.n] == ex.answer[0]
    np.testing.assert_array_equal(scoring["mask"], plain.lm_example(ex)["mask"])
    batch = dense.eval_batch(seed=seed, count=3)
    assert batch["mask"].sum() == 3  # one scored answer per row


# ---- addition -------------------------------------------------------------------------------------------------------

def test_addition_checker_on_the_issue_example():
    task = Addition(n_terms=(4,))
    prompt = np.array([BOS] + [int(c) if c.isdigit() else {"+": 10, "=": 11}[c] for c in "315+120+045+824="])
    assert task.decode(task.solve(prompt)) == "1304<eos>"
    ex = Example(prompt=prompt, answer=task.solve(prompt), difficulty=4)
    assert display(task, ex) == ("315 + 120 + 045 + 824 =", "1304")


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), n=st.integers(1, 12), digits=st.integers(1, 4))
def test_addition_examples_match_checker(seed, index, n, digits):
    task = Addition(n_terms=(n,), digits=digits)
    ex = task.example(seed, index)
    text = task.decode(ex.prompt)
    terms = text.removeprefix("<bos>").removesuffix("=").split("+")
    assert len(terms) == n and all(len(t) == digits for t in terms)
    assert task.decode(ex.answer) == f"{sum(map(int, terms))}<eos>"
    assert task.check(ex) and ex.answer[-1] == EOS
    assert len(ex.prompt) + len(ex.answer) - 1 <= task.min_seq_len


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), n=st.integers(1, 12), digits=st.integers(1, 4))
def test_addition_place_tokens_name_each_digit_place(seed, index, n, digits):
    plain = Addition(n_terms=(n,), digits=digits)
    tagged = Addition(n_terms=(n,), digits=digits, place_tokens=True)
    ex, ex_t = plain.example(seed, index), tagged.example(seed, index)
    width = len(str(n * (10**digits - 1)))
    assert tagged.answer_width == width and tagged.vocab_size == 15 + 10 * (width - 1)
    # same problem, same display; the tagged answer is zero-padded to the widest sum
    assert tagged.decode(ex_t.prompt) == plain.decode(ex.prompt)
    assert tagged.decode(ex_t.answer) == plain.decode(ex.answer).removesuffix("<eos>").zfill(width) + "<eos>"
    assert tagged.check(ex_t) and ex_t.answer[-1] == EOS and ex_t.answer.max() < tagged.vocab_size
    # every digit token names its place: units are 0..9, place p >= 1 is 15 + 10 (p - 1) + digit
    term_tokens = ex_t.prompt[1:].reshape(n, digits + 1)[:, :digits]
    for place, column in zip(range(digits - 1, -1, -1), term_tokens.T):
        lo = 0 if place == 0 else 15 + 10 * (place - 1)
        assert ((column >= lo) & (column < lo + 10)).all()
    answer_places = [0 if t < 10 else 1 + (t - 15) // 10 for t in ex_t.answer[:-1]]
    assert answer_places == list(range(width - 1, -1, -1))


def test_addition_place_tokens_fixed_answer_width_and_bad_values():
    task = Addition(n_terms=(2,), digits=3, place_tokens=True, answer_digits=5)
    ex = task.example(0, 0)
    assert len(ex.answer) == 6 and task.decode(ex.answer)[:1] == "0" and task.check(ex)
    with pytest.raises(ValueError, match="answer_digits"):
        Addition(n_terms=(4,), digits=3, answer_digits=3)  # 4 * 999 = 3996 needs 4 digits
    with pytest.raises(ValueError, match="place_tokens"):
        Addition(place_tokens=1)
    with pytest.raises(ValueError, match="dense_labels"):
        Addition(dense_labels="yes")
    with pytest.raises(ValueError, match="place"):
        task.solve(Addition(n_terms=(2,), digits=3).example(0, 0).prompt)  # plain digits: no place tags


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), n=st.integers(1, 10), digits=st.integers(1, 3), tagged=st.booleans())
def test_addition_dense_labels_are_the_low_digits_of_every_prefix_sum(seed, index, n, digits, tagged):
    task = Addition(n_terms=(n,), digits=digits, place_tokens=tagged)
    dense = Addition(n_terms=(n,), digits=digits, place_tokens=tagged, dense_labels=True)
    ex = dense.example(seed, index)
    assert np.array_equal(ex.prompt, task.example(seed, index).prompt)
    row, scoring = dense.lm_example(ex), dense.eval_example(ex)
    for key in scoring:  # scoring rows and the plain task's training rows keep the answer alone
        assert np.array_equal(scoring[key], task.lm_example(ex)[key])
    terms = display(task, ex)[0].removesuffix(" =").split(" + ")
    labelled = np.flatnonzero(row["mask"] > scoring["mask"])
    assert len(labelled) == (n - 1) * (digits + 1)
    for i in range(1, n):  # after term i: positions of its '+' and the next term's digits
        window = np.arange(i * (digits + 1), (i + 1) * (digits + 1))
        assert row["inputs"][window[0]] == 10 and np.isin(window, labelled).all()
        want = str(sum(int(t) for t in terms[:i])).zfill(digits + 1)[-(digits + 1):]
        assert dense.decode(row["targets"][window]) == want
        if tagged:  # the labels name their places as the answer digits do
            places = [0 if t < 10 else 1 + (t - 15) // 10 for t in row["targets"][window]]
            assert places == list(range(digits, -1, -1))
    answer = scoring["mask"] > 0
    assert np.array_equal(row["targets"][answer], ex.answer) and row["mask"][answer].all()


def test_addition_mixture_pads_to_longest_and_masks_answer_only():
    task = Addition(n_terms=(2, 8))
    batch = task.eval_batch(seed=1, count=12)
    assert batch["inputs"].shape == (12, task.min_seq_len) == (12, 1 + 8 * 4 + 4)  # BOS, 8 terms + signs, 4 digits
    ns = [ex.difficulty for ex in task.examples(1, 12)]
    assert set(ns) == {2, 8}
    for row, ex in enumerate(task.examples(1, 12)):
        assert batch["mask"][row].sum() == len(ex.answer)
        assert batch["targets"][row][batch["mask"][row] > 0].tolist() == ex.answer.tolist()


# ---- i-GSM ----------------------------------------------------------------------------------------------------------

def test_igsm_checker_on_hand_example():
    task = IGSM(difficulties=((2, 2),))
    E = [task.name_base + i for i in range(6)]
    add, sub, mul = task.op_ids
    eq, end = task.eq_id, task.end_id
    prompt = [task.bos_id,
              E[0], E[1], eq, E[2], E[3], mul, E[4], E[5], end,     # x = y * z
              E[4], E[5], eq, 5, end,                               # z = 5
              E[2], E[3], eq, E[4], E[5], sub, E[0], E[2], end,     # y = z - w
              E[0], E[2], eq, 6, end,                               # w = 6
              task.query_id, E[0], E[1], eq]
    assert analyse(task, np.array(prompt)) == (((5 - 6) * 5) % 7, 2, 2)  # (-5) mod 7 = 2
    # dense labels: only the statements the prefix determines (z = 5, w = 6; x and y use later definitions)
    assert prefix_values(task, np.array(prompt)) == [(14, 5), (28, 6)]
    # the same problem with one-token names, statements in topological order: every statement is labelled
    single = IGSM(difficulties=((2, 2),), name_tokens=1)
    x, y, z, w = E[:4]
    prompt = [task.bos_id, w, eq, 6, end, z, eq, 5, end, y, eq, z, sub, w, end, x, eq, y, mul, z, end,
              task.query_id, x, eq]
    assert analyse(single, np.array(prompt)) == (2, 2, 2)
    assert prefix_values(single, np.array(prompt)) == [(4, 6), (8, 5), (14, 6), (20, 2)]
    assert prefix_values(single, np.array(prompt), statements=False, references=True) == [
        (11, 5), (13, 6), (17, 6), (19, 5)]  # z and w in y = z - w; y and z in x = y * z
    no_eq = IGSM(difficulties=((2, 2),), name_tokens=1, eq_tokens=False)  # no '=': the answer is read at the name
    prompt = [t for t in prompt if t != eq]
    assert analyse(no_eq, np.array(prompt)) == (2, 2, 2)
    assert prefix_values(no_eq, np.array(prompt), references=True) == [
        (3, 6), (6, 5), (8, 5), (10, 6), (11, 6), (13, 6), (15, 5), (16, 2)]
    with pytest.raises(ValueError, match="not an i-GSM prompt"):
        analyse(no_eq, np.array(prompt + [eq]))


def _ask(task: IGSM, toks: list[int], name: tuple[int, ...]) -> np.ndarray:
    """The prompt ``toks`` with its query replaced by the parameter ``name``."""
    keep = len(toks) - task.name_tokens - task.eq_tokens
    return np.array(toks[:keep] + [*name] + [task.eq_id] * task.eq_tokens)


def _split(task: IGSM, toks: list[int]) -> list[tuple[int, tuple, tuple | None]]:
    """(position of the ';', name, operand names or None for a constant) of each statement, by the token layout."""
    w, out, start = task.name_tokens, [], 1
    for end in (i for i, t in enumerate(toks) if t == task.end_id):
        body = toks[start + w + task.eq_tokens:end]
        operands = (tuple(body[:w]), tuple(body[w + 1:])) if len(body) > 1 else None
        out.append((end, tuple(toks[start:start + w]), operands))
        start = end + 1
    return out


def _format(data) -> dict:
    """A drawn problem format: statement order, name width, '=' tokens (names for up to 15 + 16 + 5 parameters)."""
    return dict(order=data.draw(st.sampled_from(["shuffled", "topological"])),
                name_tokens=data.draw(st.sampled_from([1, 2])), eq_tokens=data.draw(st.booleans()), n_names=48)


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), depth=st.integers(0, 3), data=st.data())
def test_igsm_dense_labels_are_the_values_of_prefix_determined_statements(seed, index, depth, data):
    n_ops = data.draw(st.integers(depth, 2**depth - 1))
    kw = dict(difficulties=((depth, n_ops),), n_distractors=data.draw(st.integers(0, 4)), **_format(data))
    task, dense = IGSM(**kw), IGSM(**kw, dense_labels=True)
    ex = dense.example(seed, index)
    assert np.array_equal(ex.prompt, task.example(seed, index).prompt)  # same stream
    row, plain = dense.lm_example(ex), task.lm_example(ex)
    assert {k: v.tolist() for k, v in dense.eval_example(ex).items()} == {k: v.tolist() for k, v in plain.items()}
    labelled = np.flatnonzero(row["mask"] > plain["mask"])
    toks = ex.prompt.tolist()
    statements = _split(task, toks)
    known = set()  # names defined so far, whose values the prefix determines
    for pos, name, operands in statements:
        if operands is None or set(operands) <= known:
            known.add(name)
            # the independent evaluator, asked about this statement's name instead of the query
            value = analyse(task, _ask(task, toks, name))[0]
            assert pos in labelled and row["targets"][pos] == value
        else:
            assert pos not in labelled
    assert len(labelled) == len(known)
    if task.order == "topological":  # every statement is determined by its prefix
        assert len(known) == len(statements)


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), depth=st.integers(1, 3), data=st.data())
def test_igsm_reference_labels_are_the_values_of_prefix_determined_operands(seed, index, depth, data):
    n_ops = data.draw(st.integers(depth, 2**depth - 1))
    both = data.draw(st.booleans())  # with or without the statement labels
    kw = dict(difficulties=((depth, n_ops),), n_distractors=data.draw(st.integers(0, 4)), **_format(data))
    task, ref = IGSM(**kw, dense_labels=both), IGSM(**kw, dense_labels=both, reference_labels=True)
    ex = ref.example(seed, index)
    row, base = ref.lm_example(ex), task.lm_example(ex)
    assert np.array_equal(row["mask"][base["mask"] > 0], base["mask"][base["mask"] > 0])  # earlier labels kept
    labelled = set(np.flatnonzero(row["mask"] > base["mask"]).tolist())
    toks, known, expected = ex.prompt.tolist(), set(), set()
    statements = _split(task, toks)
    for pos, name, operands in statements:
        if operands is not None:
            w = task.name_tokens
            for last, operand in zip((pos - w - 2, pos - 1), operands):  # the last token of each operand's name
                assert tuple(toks[last - w + 1:last + 1]) == operand
                if operand in known:
                    expected.add(last)
                    assert row["targets"][last] == analyse(task, _ask(task, toks, operand))[0]
        if operands is None or set(operands) <= known:
            known.add(name)
    assert labelled == expected
    if task.order == "topological":
        assert len(expected) == 2 * sum(operands is not None for _, _, operands in statements)
    assert {k: v.tolist() for k, v in ref.eval_example(ex).items()} == \
        {k: v.tolist() for k, v in IGSM(**kw).eval_example(ex).items()}  # scoring rows: the answer alone


@FAST
@given(seed=seeds, index=st.integers(0, 10**6), depth=st.integers(0, 4), data=st.data())
def test_igsm_examples_match_checker_depth_and_op_count(seed, index, depth, data):
    n_ops = data.draw(st.integers(depth, 2**depth - 1))
    task = IGSM(difficulties=((depth, n_ops),), n_distractors=data.draw(st.integers(0, 5)), **_format(data))
    ex = task.example(seed, index)
    assert analyse(task, ex.prompt) == (int(ex.answer[0]), depth, n_ops)
    if task.order == "topological":  # every operand is defined before the statement that uses it
        defined = set()
        for _, name, operands in _split(task, ex.prompt.tolist()):
            assert operands is None or set(operands) <= defined
            defined.add(name)
    assert task.check(ex)
    assert 0 <= ex.prompt.min() and ex.prompt.max() < task.vocab_size
    assert len(ex.prompt) <= task.min_seq_len


def test_igsm_rejects_infeasible_difficulty_and_small_hierarchy():
    with pytest.raises(ValueError, match="difficulties"):
        IGSM(difficulties=((2, 4),))  # a depth-2 binary tree has at most 3 operations
    with pytest.raises(ValueError, match="difficulties"):
        IGSM(difficulties=((0, 1),))  # depth 0 is a constant: no operations
    with pytest.raises(ValueError, match="level_width"):
        IGSM(difficulties=((5, 20),), n_levels=2, level_width=3)
    with pytest.raises(ValueError, match="order"):
        IGSM(order="sorted")
    with pytest.raises(ValueError, match="reference_labels"):
        IGSM(reference_labels=1)
    with pytest.raises(ValueError, match="name_tokens"):
        IGSM(name_tokens=3)
    with pytest.raises(ValueError, match="n_names"):
        IGSM(difficulties=((3, 7),), name_tokens=1, n_names=16)  # up to 7 + 8 + 4 parameters


# ---- associative recall -------------------------------------------------------------------------------------------

def test_recall_checker_and_labels_on_hand_example():
    task = Recall(n_pairs=2, n_queries=3, n_keys=4, n_values=5)
    k0, k1, q, e = task.key_base, task.key_base + 1, task.query_id, task.end_id
    prompt = np.array([task.bos_id, k1, 3, e, k0, 4, e, q, k0, 4, q, k1, 3, q, k0], np.int32)
    assert task.decode(prompt) == "<bos> K1 3 ; K0 4 ; ? K0 4 ? K1 3 ? K0"
    assert task.solve(prompt).tolist() == [4]
    ex = Example(prompt, np.array([4], np.int32), 2)
    row = task.lm_example(ex)
    assert np.flatnonzero(row["mask"]).tolist() == [8, 11, 14]  # each query's key; the last is the answer
    assert row["targets"][[8, 11, 14]].tolist() == [4, 3, 4]
    sparse = dataclasses.replace(task, dense_labels=False)
    assert np.flatnonzero(sparse.lm_example(ex)["mask"]).tolist() == [14]
    with pytest.raises(ValueError, match="repeated"):
        task.solve(np.array([task.bos_id, k1, 3, e, k1, 4, e, q, k1], np.int32))
    with pytest.raises(ValueError, match="not bound"):
        task.solve(np.array([task.bos_id, k1, 3, e, q, k0], np.int32))


@given(seed=seeds, index=st.integers(0, 10**6), n_pairs=st.integers(1, 6), n_queries=st.integers(1, 6),
       spare_keys=st.integers(0, 4), n_values=st.integers(2, 9))
@FAST
def test_recall_examples_bind_distinct_keys_and_label_every_query(seed, index, n_pairs, n_queries, spare_keys,
                                                                  n_values):
    task = Recall(n_pairs=n_pairs, n_queries=n_queries, n_keys=n_pairs + spare_keys, n_values=n_values)
    ex = task.example(seed, index)
    assert task.check(ex) and len(ex.prompt) == task.min_seq_len and ex.prompt.max() < task.vocab_size
    statements = ex.prompt[1:1 + 3 * n_pairs].reshape(n_pairs, 3)
    assert (statements[:, 2] == task.end_id).all() and (statements[:, 1] < n_values).all()
    bound = dict(zip(statements[:, 0].tolist(), statements[:, 1].tolist()))
    assert len(bound) == n_pairs and min(bound) >= task.key_base  # distinct keys
    queries = ex.prompt[1 + 3 * n_pairs:].tolist() + ex.answer.tolist()
    assert queries[::3] == [task.query_id] * n_queries
    assert all(bound[k] == v for k, v in zip(queries[1::3], queries[2::3]))  # every query's value is its binding
    row = task.lm_example(ex)
    pos = np.flatnonzero(row["mask"])
    assert pos.tolist() == list(range(2 + 3 * n_pairs, len(ex.prompt), 3))
    assert row["targets"][pos].tolist() == queries[2::3]
    assert np.flatnonzero(task.eval_example(ex)["mask"]).tolist() == [len(ex.prompt) - 1]


def test_recall_rejects_bad_sizes():
    for kwargs, field in [(dict(n_pairs=0), "n_pairs"), (dict(n_queries=0), "n_queries"),
                          (dict(n_values=1), "n_values"), (dict(n_pairs=5, n_keys=4), "n_keys"),
                          (dict(dense_labels=1), "dense_labels"), (dict(n_pairs=2.0), "n_pairs"),
                          (dict(seq_len=3), "seq_len")]:
        with pytest.raises(ValueError, match=field):
            Recall(**kwargs)


# ---- shared layout and determinism ----------------------------------------------------------------------------------

# ---- fact table and mixture ----------------------------------------------------------------------------------------


def test_fact_table_is_fixed_by_table_seed_and_spells_distinct_subjects_with_shared_syllables():
    t = FactTable(n_subjects=50, n_relations=3, n_objects=7, subject_tokens=2, n_syllables=9, table_seed=4)
    again = FactTable(n_subjects=50, n_relations=3, n_objects=7, subject_tokens=2, n_syllables=9, table_seed=4)
    other = dataclasses.replace(t, table_seed=5)
    np.testing.assert_array_equal(t.objects, again.objects)
    assert not np.array_equal(t.objects, other.objects)
    assert len({tuple(s) for s in t.subjects.tolist()}) == 50
    assert t.subjects.max() < 9 and t.objects.max() < 7
    assert np.bincount(t.subjects[:, 0]).max() > 1  # a syllable alone does not name a subject
    ex = t.fact(11, 2)
    assert t.decode(ex.prompt) == "<bos> " + " ".join(f"s{s}" for s in t.subjects[11]) + " R2"
    assert ex.answer.tolist() == [t.objects[11, 2]]


@settings(max_examples=20, deadline=None)
@given(seeds, st.integers(0, 3))
def test_fact_table_one_pass_visits_every_fact_once_and_checker_agrees(seed, passes):
    t = FactTable(n_subjects=12, n_relations=2, n_objects=5, subject_tokens=3, n_syllables=3)
    start = passes * t.n_facts
    prompts = [tuple(t.example(seed, i).prompt.tolist()) for i in range(start, start + t.n_facts)]
    assert len(set(prompts)) == t.n_facts
    assert all(t.check(t.example(seed, i)) for i in range(start, start + t.n_facts))


def test_fact_table_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_subjects"):
        FactTable(n_subjects=17, subject_tokens=2, n_syllables=4)  # 4**2 = 16 spellings
    with pytest.raises(ValueError, match="n_objects"):
        FactTable(n_objects=1)
    with pytest.raises(ValueError, match="subject_tokens"):
        FactTable(subject_tokens=0)


def _mix(**kw):
    return Mixture((PHop(alphabet=3, n=10, hops=(1, 2)), Addition(n_terms=(2, 3), digits=2),
                    FactTable(n_subjects=20, n_syllables=6)), ("phop", "addition", "facts"), **kw)


def test_mixture_members_live_in_disjoint_vocab_slices_and_rows_are_the_members_rows_shifted():
    mix = _mix(weights=(1, 1, 2))
    assert mix.vocab_size == sum(t.vocab_size for t in mix.tasks) and mix.length == max(t.length for t in mix.tasks)
    seen = set()
    for i in range(60):
        ex = mix.example(3, i)
        name, _ = ex.difficulty
        j = mix.names.index(name)
        seen.add(name)
        member, off = mix.tasks[j], mix.offsets[j]
        own = member.example(3, i)  # the member's own stream under the same seed
        np.testing.assert_array_equal(ex.prompt, own.prompt + off)
        assert mix.check(ex) and off <= ex.prompt.min() and ex.prompt.max() < off + member.vocab_size
        row, own_row = mix.lm_example(ex), member.lm_example(own)
        n = member.length
        np.testing.assert_array_equal(row["inputs"][:n], own_row["inputs"] + off)
        np.testing.assert_array_equal(row["targets"][:n], own_row["targets"] + off)
        np.testing.assert_array_equal(row["mask"][:n], own_row["mask"])
        assert (row["mask"][n:] == 0).all() and (row["inputs"][n:] == off + member.pad_id).all()
        assert mix.decode(ex.prompt).startswith(f"[{name}] ")
    assert seen == {"phop", "addition", "facts"}


def test_mixture_weights_and_member_view():
    mix = _mix(weights=(1, 0, 3))
    names = [mix.example(0, i).difficulty[0] for i in range(400)]
    assert "addition" not in names and 0.65 < names.count("facts") / 400 < 0.85
    facts = mix.member("facts")
    assert facts.vocab_size == mix.vocab_size and facts.length == mix.length
    table = facts.tasks[2]
    prompts = {tuple(facts.example(9, i).prompt.tolist()) for i in range(table.n_facts)}
    assert len(prompts) == table.n_facts  # scoring a member view of the table covers the whole table
    with pytest.raises(ValueError, match="name="):
        mix.member("nope")
    with pytest.raises(ValueError, match="weights="):
        _mix(weights=(0, 0, 0))
    with pytest.raises(ValueError, match="names="):
        Mixture((PHop(alphabet=3, n=10, hops=(1,)),), ("a", "b"))


TASKS = [PHop(alphabet=3, n=20, hops=(2, 4)), Addition(n_terms=(3, 5)), IGSM(difficulties=((2, 3), (3, 4))),
         Recall(n_pairs=5, n_queries=3, dense_labels=False), FactTable(n_subjects=40, n_syllables=8)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: type(t).__name__)
def test_same_seed_same_examples_other_seed_other_examples(task):
    again = type(task)(**{f: getattr(task, f) for f in task.__dataclass_fields__})
    a = [task.example(7, i) for i in range(8)]
    b = [again.example(7, i) for i in reversed(range(8))][::-1]  # access order does not matter
    assert all(np.array_equal(x.prompt, y.prompt) and np.array_equal(x.answer, y.answer) for x, y in zip(a, b))
    c = [task.example(8, i) for i in range(8)]
    assert any(not np.array_equal(x.prompt, y.prompt) for x, y in zip(a, c))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: type(t).__name__)
def test_lm_layout_shifts_by_one_and_counts_only_answer(task):
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 10**6, size=5):
        ex = task.example(1, int(i))
        row = task.lm_example(ex)
        n = len(ex.prompt) + len(ex.answer) - 1
        seq = np.concatenate([ex.prompt, ex.answer])
        assert row["inputs"].dtype == row["targets"].dtype == np.int32 and row["mask"].dtype == np.float32
        assert row["inputs"].shape == (task.length,)
        np.testing.assert_array_equal(row["inputs"][:n], seq[:-1])
        np.testing.assert_array_equal(row["targets"][:n], seq[1:])
        assert (row["inputs"][n:] == task.pad_id).all() and (row["targets"][n:] == task.pad_id).all()
        answer_positions = np.arange(len(ex.prompt) - 1, n)
        np.testing.assert_array_equal(np.flatnonzero(row["mask"]), answer_positions)
        assert row["inputs"].max() < task.vocab_size


def test_answer_correct_is_exact_match_on_masked_positions():
    task = Addition(n_terms=(4,))
    batch = task.eval_batch(seed=0, count=3)
    pred = batch["targets"].copy()
    assert answer_correct(pred, batch).tolist() == [True, True, True]
    pred[0, 0] = (pred[0, 0] + 1) % task.vocab_size         # a prompt position: does not count
    ans = np.flatnonzero(batch["mask"][1])[-1]
    pred[1, ans] = (pred[1, ans] + 1) % task.vocab_size      # the answer's EOS: counts
    assert answer_correct(pred, batch).tolist() == [True, False, True]


def test_seq_len_override_pads_and_too_short_raises():
    task = PHop(alphabet=4, n=10, hops=(2,), seq_len=16)
    assert task.lm_example(task.example(0, 0))["inputs"].shape == (16,)
    with pytest.raises(ValueError, match="seq_len"):
        PHop(alphabet=4, n=10, hops=(2,), seq_len=8)
    with pytest.raises(ValueError, match="n="):
        PHop(alphabet=4, n=9, hops=(4,))
    with pytest.raises(ValueError, match="seq_len"):
        lm_arrays(Example(np.zeros(5, np.int32), np.zeros(2, np.int32), 0), seq_len=5, pad_id=0)
