import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_bus.metrics import auc, group_auc, positive_rank, ranking_metrics, session_ranking_metrics


def brute_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=30))
def test_auc_matches_pair_counting_with_ties(rows):
    labels = [y for y, _ in rows]
    if all(labels) or not any(labels):
        return
    scores = [float(s) for _, s in rows]
    assert abs(auc(np.array(labels), np.array(scores)) - brute_auc(labels, scores)) < 1e-12


def test_rank_hr_ndcg():
    scores = np.array([[5.0, 1, 2, 3], [0.0, 1, 2, 3], [2.0, 1, 2, 0]])
    assert list(positive_rank(scores)) == [1, 4, 2]
    m = ranking_metrics(scores, k=2)
    assert m["hr2"] == 2 / 3
    assert np.isclose(m["ndcg2"], (1 + 1 / np.log2(3)) / 3)
    assert np.isclose(group_auc(scores), (1 + 0 + 2.5 / 3) / 3)



def test_scores_equal_up_to_float_rounding_are_ties():
    """The same pair scored in batches of different shapes can differ in the last bits: still a tie."""
    exact = np.array([[1.0, 1.0, 0.0], [2.0, 3.0, 1.0]])
    noisy = exact + np.array([[0.0, 3e-7, 0.0], [0.0, 0.0, 0.0]])
    labels = np.zeros(exact.shape, bool)
    labels[:, 0] = True
    assert auc(labels, noisy) == auc(labels, exact) == 5 / 8  # 1: two ties, a win, a loss; 2: three wins
    assert list(positive_rank(noisy)) == list(positive_rank(exact)) == [2, 2]
    assert group_auc(noisy) == group_auc(exact)
    assert auc(labels, exact + np.array([[0.0, 1e-3, 0.0], [0.0, 0.0, 0.0]])) < auc(labels, exact)  # not a tie


def test_session_metrics_of_many_sessions_at_once_are_each_sessions_own():
    """The runner's batched metrics against `ranking_metrics` session by session: sessions of different
    lengths, exact ties, near ties within `TIE`, a session of one row."""
    rng = np.random.default_rng(0)
    sessions = [rng.normal(size=(n, 21)).astype(np.float32) for n in (5, 5, 1, 3, 5, 2)]
    sessions[1][:, 4] = sessions[1][:, 0]  # exact ties with every positive
    sessions[2] = np.round(sessions[2], 1)  # ties among negatives
    sessions[3][0, 7] = sessions[3][0, 0] * (1 + 1e-7)  # a tie by the tolerance
    sessions[4][2, 0] = sessions[4][0, 3]  # a positive tied with another row's negative
    batched = session_ranking_metrics(sessions)
    for i, scores in enumerate(sessions):
        alone = ranking_metrics(scores)
        assert batched["auc"][i] == alone["auc"]
        for name in ("ndcg10", "hr10", "logloss"):
            assert batched[name][i] == pytest.approx(alone[name], rel=1e-12, abs=1e-15)
