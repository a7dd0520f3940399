"""Standard probes of a frozen embedding on a held-out task (see docs/design.md, "Evaluation protocol"):
a linear probe (scikit-learn: logistic regression, or ridge for a regression task) and a k-NN probe
(faiss, cosine similarity), beside the paper's 2-layer head (gallery.evaluation.holdout).

Every probe is fitted on the train split only. Its one hyperparameter (the regularisation, or k) is
chosen out of fold: the scored galleries (those no embedding model trained on) are cut into `FOLDS`
folds by a stable hash of their id, and each fold's galleries get the predictions of the value that
did best on the *other* folds. So a probe never sees a scored gallery's label, directly or through
its hyperparameter, and every scored gallery is used.

Cost, with n_train train and n scored galleries of d dimensions: the linear probe is linear in both
(scikit-learn's solvers over the train galleries); the k-NN probe is an exact faiss search, O(n·n_train·d)
time on one thread, memory O((n + n_train)·d + n·k): no n×n matrix, but the time grows with the product
of the two splits (520k galleries at 8:1:1, d = 1,280: 5.5e13 multiply-adds per arm and task, ~45 min a core);
out-of-fold selection holds values x galleries.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from gallery.data.split import hash_unit
from gallery.retrieval.index import FloatIndex, one_faiss_thread

FOLDS = 5
# on standardised features; the strong ends are for wide embeddings (1,280 ImageNet dimensions) with about
# as many labelled train galleries, where weaker penalties overfit noisy labels
LOGISTIC_C = (0.001, 0.01, 0.1, 1.0, 10.0)                   # inverse L2 strength
RIDGE_ALPHA = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)           # L2 strength
NEIGHBOURS = (5, 10, 20, 40)
PROBES = {"head": "2-layer head (the paper's)", "linear": "linear probe", "knn": "k-NN probe (cosine)"}


def folds_of(gallery_ids, folds: int = FOLDS) -> np.ndarray:
    """Each gallery's fold: the same for a gallery in every run, task and arm. Time and memory O(n)."""
    return np.array([int(hash_unit(f"fold:{g}") * folds) for g in gallery_ids])


def scores_of(kind: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per gallery: 1/0 for a right/wrong class, or the squared error. Time and memory O(n)."""
    return (predictions - labels) ** 2 if kind == "regression" else (predictions == labels).astype(float)


@dataclass
class Candidates:
    """A probe's predictions on the scored galleries, one row per hyperparameter value."""

    values: tuple
    predictions: np.ndarray   # (values, scored galleries)


def scaler(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each dimension's mean and scale on the train galleries: its standard deviation, floored at 1% of
    the median dimension's. A dimension that barely varies on train (a ReLU unit almost always off: one
    of the default's ImageNet dimensions has a train spread of 0.0003) would otherwise put a scored
    gallery where it does vary 1,000 standard deviations out, and a linear probe's prediction with it.
    Time O(n_train·d), memory O(n_train·d) (numpy's std)."""
    mean, std = train.mean(0), train.std(0)
    floor = max(0.01 * float(np.median(std)), 1e-12)
    return mean, np.maximum(std, floor)


def _standardised(train: np.ndarray, scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = scaler(train)
    return (train - mean) / scale, (scored - mean) / scale


def linear_candidates(kind: str, train: np.ndarray, labels: np.ndarray, scored: np.ndarray) -> Candidates:
    """Logistic regression (classification) or ridge regression, one fit per regularisation value.
    Time O(values·iterations·n_train·d·classes) (ridge: O(values·(n_train·d² + d³))), memory
    O((n_train + n)·d + values·n)."""
    from sklearn.exceptions import ConvergenceWarning  # here: scikit-learn takes a second to import, in every
    from sklearn.linear_model import LogisticRegression, Ridge  # flow step otherwise (they import gallery.steps)

    x, xs = _standardised(train, scored)
    if kind == "regression":
        return Candidates(RIDGE_ALPHA, np.stack([Ridge(alpha=a).fit(x, labels).predict(xs) for a in RIDGE_ALPHA]))
    if len(np.unique(labels)) < 2:  # one class in train: every value predicts it
        return Candidates(LOGISTIC_C, np.full((len(LOGISTIC_C), len(scored)), labels[0], float))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a bounded fit: the selection judges what it gives
        for c in LOGISTIC_C:
            out.append(LogisticRegression(C=c, max_iter=300).fit(x, labels).predict(xs))
    return Candidates(LOGISTIC_C, np.stack(out).astype(float))


def knn_candidates(kind: str, train: np.ndarray, labels: np.ndarray, scored: np.ndarray) -> Candidates:
    """Each scored gallery's k most similar train galleries by cosine: their majority class (ties to the
    most similar) or mean label, for every k. Search's own index (gallery.retrieval.index.FloatIndex, on one
    thread): exact up to retrieval.approximate_above train galleries, time O(n·n_train·d), and HNSW above,
    about O((n + n_train)·log n_train·d), so a 500k catalogue's probe is not quadratic; memory
    O((n + n_train)·d + n·(k + classes)): votes are counted a class at a time, never an n x k x classes array."""
    k_max = min(max(NEIGHBOURS), len(train))
    with one_faiss_thread():
        rows = FloatIndex(train).search(scored, k_max).rows
    neighbour_labels = labels[rows]  # (scored, k_max), most similar first
    classes = np.unique(labels)
    out = []
    for k in NEIGHBOURS:
        near = neighbour_labels[:, :min(k, k_max)]
        if kind == "regression":
            out.append(near.mean(1))
        else:
            votes = np.empty((len(near), len(classes)))
            for j, c in enumerate(classes):
                votes[:, j] = np.count_nonzero(near == c, axis=1) + 1e-3 * (near[:, 0] == c)
            out.append(classes[votes.argmax(1)].astype(float))
    return Candidates(NEIGHBOURS[:len(out)], np.stack(out))


def chosen_out_of_fold(kind: str, scores: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Per scored gallery, the index of the candidate (a row of `scores`: values x galleries) that did best
    on the galleries of the *other* folds (higher accuracy, lower squared error; ties to the first).
    Time O(folds·values·n), memory O(values·n) (the scores given)."""
    sign = -1.0 if kind == "regression" else 1.0
    out = np.zeros(len(folds), int)
    for f in np.unique(folds):
        here = folds == f
        others = ~here if (~here).any() else here
        out[here] = int(np.argmax(sign * scores[:, others].mean(1)))
    return out


def out_of_fold(kind: str, candidates: Candidates, labels: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list]:
    """Each scored gallery's score with the value chosen on the other folds, and the value chosen per fold.
    Time O(folds·values·n), memory O(values·n)."""
    scores = np.stack([scores_of(kind, p, labels) for p in candidates.predictions])  # (values, galleries)
    best = chosen_out_of_fold(kind, scores, folds)
    chosen = [candidates.values[best[folds == f][0]] if (folds == f).any() else None
              for f in range(int(folds.max()) + 1 if len(folds) else 0)]
    return scores[best, np.arange(len(best))], chosen
