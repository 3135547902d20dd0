"""PNG figures of an annotator's calibration (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cwpo_ray import calibration


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(margins, path: str | Path, n_bins: int = 10, title: str = "") -> Path:
    """Accuracy against predicted probability per bin; the diagonal is perfect calibration."""
    plt = _pyplot()
    bins = calibration.reliability_bins(margins, n_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    full = [b for b in bins if b["count"]]
    centers = [(b["lo"] + b["hi"]) / 2 for b in full]
    ax.bar(centers, [b["accuracy"] for b in full], width=0.5 / n_bins * 0.9, color="#4c72b0", label="accuracy")
    ax.plot([b["mean_prob"] for b in full], [b["accuracy"] for b in full], "o", color="#dd8452", label="bin mean")
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="calibrated")
    ax.set(xlim=(0.5, 1.0), ylim=(0.0, 1.0), xlabel="predicted probability sigma(|margin|)", ylabel="accuracy",
           title=title or f"reliability (ECE {calibration.ece(margins, n_bins):.3f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def confidence_histogram(margins, path: str | Path, n_bins: int = 20, title: str = "") -> Path:
    """Distribution of the confidence C, split by right and wrong calls."""
    plt = _pyplot()
    conf = calibration.confidence_of(margins)
    right = calibration.correctness(margins) > 0.5
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.hist([conf[right], conf[~right]], bins=edges, stacked=True, color=["#55a868", "#c44e52"],
            label=["right", "wrong"])
    ax.set(xlabel="confidence C", ylabel="pairs", title=title or "confidence on held-out pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
