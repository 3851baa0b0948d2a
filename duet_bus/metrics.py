"""Ranking and classification metrics, pure numpy.

Scores come as ``(N, K)`` arrays with the positive in column 0 and K-1 sampled
negatives after it (one row per user for validation and test).
"""

from __future__ import annotations

import numpy as np


# Scores this close (relative to the positive's size, at least 1) are tied. The same pair scored by the same model
# in batches of different shapes can differ in the last bits (matrix products sum in a different order), and
# exact ties are common (the same item as a positive in one row and a negative in another, with the same
# user state): without a tolerance, float rounding would decide such pairs, and a session's AUC would depend on
# how the simulator batched it.
TIE = 1e-5


def _tolerance(scores: np.ndarray) -> np.ndarray:
    return TIE * np.maximum(np.abs(scores), 1.0)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve over all pairs; ties (`TIE`) count one half.

    The Mann-Whitney count: for each positive, the negatives below it, plus half those tied with it
    (one sort of the negatives and two binary searches per positive).
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = scores[labels], np.sort(scores[~labels])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    tol = _tolerance(pos)
    below = np.searchsorted(neg, pos - tol, "left")
    tied = np.searchsorted(neg, pos + tol, "right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (len(pos) * len(neg)))


def positive_rank(scores: np.ndarray) -> np.ndarray:
    """1-based rank of column 0 in each row; negatives tied with it (`TIE`) rank it lower."""
    scores = np.asarray(scores, np.float64)
    return 1 + (scores[:, 1:] >= scores[:, :1] - _tolerance(scores[:, :1])).sum(axis=1)


def group_auc(scores: np.ndarray) -> float:
    """User-averaged AUC (GAUC): each row's share of negatives ranked below the positive (ties half)."""
    scores = np.asarray(scores, np.float64)
    pos, neg = scores[:, :1], scores[:, 1:]
    tol = _tolerance(pos)
    per_row = ((neg < pos - tol).sum(1) + 0.5 * (np.abs(neg - pos) <= tol).sum(1)) / neg.shape[1]
    return float(per_row.mean())


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(scores), computed stably from logits."""
    z = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, np.float64).ravel()
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def ranking_metrics(scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """AUC, GAUC, NDCG@k, HR@k and log-loss of ``(N, K)`` scores, positive first."""
    labels = np.zeros(scores.shape, dtype=bool)
    labels[:, 0] = True
    rank = positive_rank(scores)
    hit = rank <= k
    return {
        "auc": auc(labels, scores),
        "gauc": group_auc(scores),
        f"ndcg{k}": float(np.where(hit, 1.0 / np.log2(rank + 1), 0.0).mean()),
        f"hr{k}": float(hit.mean()),
        "logloss": log_loss(labels, scores),
    }


def session_ranking_metrics(scores: list[np.ndarray], k: int = 10) -> dict[str, np.ndarray]:
    """`ranking_metrics`' AUC, NDCG@k, HR@k and log-loss of many sessions at once, one value per session:
    ``scores[i]`` is session i's ``(n_i, K)`` scores, positive first (the same K for all). The same
    counts as `auc` and `positive_rank` (each AUC to the bit), in a few array operations per batch instead
    of a dozen per session: the runner scores thousands of sessions a second."""
    rows = np.array([len(s) for s in scores])
    z = np.concatenate(scores).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
    pos = z[:, 0]
    tol = _tolerance(pos)
    rank = 1 + (z[:, 1:] >= (pos - tol)[:, None]).sum(axis=1)
    hit = rank <= k
    terms = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
    terms[:, 0] -= pos  # - z * y, y = 1 for the positive only
    out = {
        "auc": np.empty(len(scores)),
        f"ndcg{k}": np.add.reduceat(np.where(hit, 1.0 / np.log2(rank + 1), 0.0), starts) / rows,
        f"hr{k}": np.add.reduceat(hit.astype(np.float64), starts) / rows,
        "logloss": np.add.reduceat(terms.sum(axis=1), starts) / (rows * z.shape[1]),
    }
    # AUC pools a session's positives against all its negatives: sessions of n rows compare as one
    # (S, n, n (K-1)) array, in chunks that bound it.
    for n in np.unique(rows):
        chosen = np.flatnonzero(rows == n)
        chunk = max(1, 4_000_000 // (n * n * z.shape[1]))
        for part in (chosen[i: i + chunk] for i in range(0, len(chosen), chunk)):
            block = z[starts[part][:, None] + np.arange(n)]  # (S, n, K)
            p, t = block[:, :, 0, None], tol[starts[part][:, None] + np.arange(n)][:, :, None]
            neg = block[:, :, 1:].reshape(len(part), 1, -1)
            below = (neg < p - t).sum(axis=(1, 2))
            tied = ((neg >= p - t) & (neg <= p + t)).sum(axis=(1, 2))
            out["auc"][part] = (below + 0.5 * tied) / (n * neg.shape[2])
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy (log-loss) of class logits ``(..., C)`` against labels ``(...)``."""
    z = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    y = np.asarray(labels).ravel()
    if len(y) == 0:
        raise ValueError("classification metrics need at least one labelled image")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {"accuracy": float((z.argmax(1) == y).mean()), "logloss": float(-log_p[np.arange(len(y)), y].mean())}
