"""Pair weights of a training table: which pairs are kept and how much each counts. Pure Python.

``confidence`` is the paper's CW-PO (weight = the annotator's confidence C), ``none`` gives
every pair weight 1 (the ws and human arms), ``topk:F`` keeps the fraction F most confident
pairs with weight 1 (the paper's top-k baseline). ``confidence_raw`` weighs by the uncalibrated
confidence (T = 1) of an annotated table, to measure what calibration changes.
"""

from __future__ import annotations

# Which arms train on weak labels is the arms registry's to say; re-exported for callers that import it from here.

WEIGHTINGS = ("none", "confidence", "confidence_raw", "topk:F")


def parse_weighting(spec: str) -> tuple[str, float | None]:
    """``none`` | ``confidence`` | ``confidence_raw`` | ``topk:F`` with F in (0, 1] -> (kind, fraction);
    ``confidence_raw`` is of kind ``confidence`` (it only reads another column)."""
    spec = spec.strip().lower()
    if spec in ("none", "confidence"):
        return spec, None
    if spec == "confidence_raw":
        return "confidence", None
    if spec.startswith("topk:"):
        try:
            fraction = float(spec[5:])
        except ValueError:
            fraction = -1.0
        if 0 < fraction <= 1:
            return "topk", fraction
    raise ValueError(f"weighting must be none, confidence, confidence_raw or topk:F with F in (0, 1], got {spec!r}")


def confidence_column(spec: str) -> str:
    """The column of an annotated table that ``spec`` weighs by (or ranks by, for topk)."""
    return "confidence_raw" if spec.strip().lower() == "confidence_raw" else "confidence"


def pair_weights(confidence: list[float] | None, spec: str, n: int) -> tuple[list[int], list[float]]:
    """Which rows to keep and their weights.

    ``confidence`` is None for human-labeled tables (weights 1 whatever the spec says,
    except topk, which needs confidences). topk keeps the ceil(F * n) most confident
    pairs (ties broken by row order) with uniform weights.
    """
    kind, fraction = parse_weighting(spec)
    if confidence is None:
        if kind == "topk":
            raise ValueError("weighting topk:F needs an annotated table (a confidence column)")
        return list(range(n)), [1.0] * n  # human labels
    if len(confidence) != n:
        raise ValueError(f"{len(confidence)} confidences for {n} rows")
    if kind == "none":
        return list(range(n)), [1.0] * n
    if kind == "confidence":
        return list(range(n)), [float(c) for c in confidence]
    k = max(1, -(-int(round(fraction * n * 1e6)) // 1_000_000))  # ceil, robust to 0.3 * 10 = 3.0000000004
    order = sorted(range(n), key=lambda i: (-confidence[i], i))[:k]
    return sorted(order), [1.0] * k
