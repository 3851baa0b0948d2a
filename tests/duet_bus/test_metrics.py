import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_bus.metrics import auc, group_auc, positive_rank, ranking_metrics


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

