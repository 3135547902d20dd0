"""Annotator quality: accuracy, Bradley-Terry loss, calibration (ECE, reliability bins), accuracy by confidence decile.

Pure numpy: no Ray, no I/O. A pair is described by its *margin* ``r(chosen) - r(rejected)``
against a reference label (human or gold): the annotator is right when the margin is
positive. Its probability that its own call is right is ``sigma(|margin|) = (1 + C) / 2``,
with C the paper's confidence, so calibration compares that probability with accuracy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _array(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError("values must be finite")
    return a


def sigmoid(x) -> np.ndarray:
    x = _array(x)
    return np.exp(-np.logaddexp(0.0, -x))


def bt_loss(margins) -> float:
    """Mean Bradley-Terry loss ``-log sigma(margin)`` (numerically stable)."""
    m = _array(margins)
    return float(np.logaddexp(0.0, -m).mean()) if m.size else float("nan")


def correctness(margins) -> np.ndarray:
    """1 where the annotator agrees with the label, 0 where not, 0.5 on an exact tie."""
    m = _array(margins)
    return np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))


def accuracy(margins) -> float:
    m = _array(margins)
    return float(correctness(m).mean()) if m.size else float("nan")


def confidence_of(margins) -> np.ndarray:
    """The paper's C = 2 (sigma(|m|) - 0.5) = tanh(|m| / 2), in [0, 1]."""
    return np.tanh(np.abs(_array(margins)) / 2)


def calibrated_confidence(margins, temperature: float = 1.0) -> np.ndarray:
    """C = 2 (sigma(|m| / T) - 0.5): temperature scaling of the margin, then the paper's confidence.
    T only rescales |m|, so which response is chosen never changes; T = 1 is the raw confidence."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return confidence_of(_array(margins) / temperature)


def fit_temperature(margins, min_t: float = 0.01, max_t: float = 100.0) -> float:
    """The T minimizing the mean Bradley-Terry loss of ``margins / T`` against their labels.

    ``margins`` are held-out ones (out-of-fold), signed against the label. The loss is convex in
    s = 1/T, so a few Newton steps on s find it; T is kept in [min_t, max_t]. Returns 1.0 when there is
    nothing to fit: no margins, or no wrong call (or no right one) among them.
    """
    m = _array(margins)
    if not np.any(m < 0) or not np.any(m > 0):
        return 1.0  # every call right (or every call wrong): the loss falls all the way to T -> 0, no optimum
    s = 1.0
    for _ in range(100):
        p = sigmoid(-s * m)                    # d/ds of softplus(-s m) is -m * sigma(-s m)
        grad = float(np.mean(-m * p))
        hess = float(np.mean(m * m * p * (1 - p)))
        if hess <= 1e-12:
            break
        step = grad / hess
        s = float(np.clip(s - step, 1 / max_t, 1 / min_t))
        if abs(step) < 1e-10 * max(1.0, s):
            break
    return float(1 / s)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = {0.9: 1.6448536, 0.95: 1.959964, 0.99: 2.5758293}[level]
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval holds phat; clipped so that float rounding at phat = 0 or 1 does not put it outside
    return float(max(0.0, min(centre - half, phat))), float(min(1.0, max(centre + half, phat)))


def reliability_bins(margins, n_bins: int = 10) -> list[dict]:
    """Equal-width bins of the predicted probability ``sigma(|m|)`` over [0.5, 1].

    Each bin: its range, how many pairs fell in it, their mean predicted probability and
    their accuracy (None for an empty bin).
    """
    m = _array(margins)
    prob = sigmoid(np.abs(m))
    right = correctness(m)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "mean_prob": float(prob[sel].mean()) if n else None,
                    "accuracy": float(right[sel].mean()) if n else None})
    return out


def ece(margins, n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (share of pairs) x |accuracy - mean probability|."""
    bins = reliability_bins(margins, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["mean_prob"]) for b in bins if b["count"]))


def accuracy_by_decile(confidences: Sequence[float], correct: Sequence[float], n_groups: int = 10) -> list[dict]:
    """Pairs sorted by confidence and cut into ``n_groups`` near-equal groups, lowest first.

    ``correct`` is 1/0 (or 0.5 for a tie) per pair. Each group: its index (1 = least
    confident), size, confidence range and mean, and accuracy.
    """
    c, r = _array(confidences), _array(correct)
    if c.shape != r.shape:
        raise ValueError(f"confidences and correct differ in length: {c.size} vs {r.size}")
    order = np.argsort(c, kind="stable")
    out = []
    for i, idx in enumerate(np.array_split(order, n_groups), 1):
        if not idx.size:
            continue
        out.append({"decile": i, "count": int(idx.size), "conf_min": float(c[idx].min()),
                    "conf_max": float(c[idx].max()), "mean_confidence": float(c[idx].mean()),
                    "accuracy": float(r[idx].mean())})
    return out


def weighted_accuracy(confidences, correct) -> float:
    """Accuracy with every pair counted by its confidence (what CW-PO's weights make of the labels);
    nan when every confidence is 0."""
    c, r = _array(confidences), _array(correct)
    return float((c * r).sum() / c.sum()) if c.sum() > 0 else float("nan")


def top_fraction_accuracy(confidences, correct, fraction: float) -> float:
    """Accuracy on the ``fraction`` most confident pairs (the paper's top-k% view)."""
    c, r = _array(confidences), _array(correct)
    k = max(1, int(round(fraction * c.size))) if c.size else 0
    if not k:
        return float("nan")
    return float(r[np.argsort(-c, kind="stable")[:k]].mean())


def learned_p_value(margins) -> float:
    """One-sided Wilcoxon signed-rank p-value of "the margins against the labels are not shifted above 0".

    Why this test and not accuracy's interval: the labels themselves are noisy (crowd labels agree with
    each other ~65-75% of the time), so even a good annotator's plain accuracy against them sits near
    0.55, and its interval at a few hundred pairs includes 0.5. What a useless annotator cannot do is be
    right more often on the pairs it is sure of; the signed-rank test weighs each call by the rank of
    its |margin|, so it has that power, and needs no model of the label noise. nan below 10 pairs."""
    from scipy.stats import wilcoxon

    m = _array(margins)
    m = m[m != 0]  # an exact tie says nothing either way
    if m.size < 10:
        return float("nan")
    return float(wilcoxon(m, alternative="greater").pvalue)


# The signed-rank p-value at or above which an annotator's out-of-fold calls lean wrong or even: its
# confidence-weighted calls are not right more often than wrong. Below it but above 0.05 the labeled pairs
# only fail to show learning, which with human labels ~65-75% right a useful annotator often does at a few
# hundred pairs (docs/METHOD.md, "Did the annotator learn?").
LEANS_WRONG_P = 0.5


def learned_verdict(p: float) -> str:
    """"learned" (p < 0.05), "not shown" (0.05 <= p < LEANS_WRONG_P) or "no sign" (the calls lean wrong or
    even, or too few pairs to test): what the labeled pairs say about the annotator, from learned_p_value."""
    if p < 0.05:
        return "learned"
    return "not shown" if p < LEANS_WRONG_P else "no sign"  # nan compares False: "no sign"


def confident_third_accuracy(margins) -> tuple[float, float]:
    """Accuracy on the third of pairs with the largest |margin|, and on the other two thirds: the
    figure that shows whether an annotator's confidence means something."""
    m = _array(margins)
    if m.size < 3:
        return float("nan"), float("nan")
    order = np.argsort(-np.abs(m), kind="stable")
    k = int(round(m.size / 3))
    right = correctness(m)
    return float(right[order[:k]].mean()), float(right[order[k:]].mean())


def summarize(margins, n_bins: int = 10) -> dict:
    """Every held-out figure of an annotator from its margins against the labels."""
    m = _array(margins)
    conf = confidence_of(m)
    right = correctness(m)
    lo, hi = wilson_interval(float(right.sum()), int(m.size))
    third, rest = confident_third_accuracy(m)
    return {
        "n": int(m.size),
        "bt_loss": bt_loss(m),
        "accuracy": accuracy(m),
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "ece": ece(m, n_bins),
        "mean_confidence": float(conf.mean()) if m.size else float("nan"),
        "confidence_weighted_accuracy": weighted_accuracy(conf, right),
        "top10_accuracy": top_fraction_accuracy(conf, right, 0.1),
        "top30_accuracy": top_fraction_accuracy(conf, right, 0.3),
        "confident_third_accuracy": third,
        "other_accuracy": rest,
        "learned_p": learned_p_value(m),
    }
