"""Statistics of an annotation run in fixed memory (histograms, not rows), merged across units,
and the report they become. Pure: numpy, no Ray, no files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


HIST_BINS = 20
# Agreement with human_choice by confidence: a fixed histogram, log-spaced from 1e-6 to 1
# (a relative width of ~1.4% per bin), so memory does not grow with the pairs; the deciles
# are cut at its bin edges.
AGREE_BINS, AGREE_LOG_MIN = 1024, -6.0
# confidence ensemble: pairs, sum of the share of folds against the ensemble's choice, pairs no fold was
# against, sum of the fold margins' standard deviation
FOLD_KEYS = ("fold_pairs", "fold_disagreement_sum", "fold_unanimous", "fold_margin_std_sum")


def new_stats() -> dict:
    return {"annotated": 0, "quarantined": 0, "reasons": Counter(), "confidence_sum": 0.0,
            "histogram": np.zeros(HIST_BINS, dtype=np.int64),
            "agree_n": np.zeros(AGREE_BINS, dtype=np.int64), "agree_right": np.zeros(AGREE_BINS, dtype=np.int64),
            "agree_sum": np.zeros(AGREE_BINS), "agree_right_conf": np.zeros(AGREE_BINS),
            "agree_min": np.full(AGREE_BINS, np.inf), "agree_max": np.full(AGREE_BINS, -np.inf),
            **{k: 0 for k in FOLD_KEYS}}


def agree_bin(conf: np.ndarray) -> np.ndarray:
    """Bin of each confidence in the log-spaced agreement histogram (below 1e-6: bin 0)."""
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(conf, 1e-300))
    idx = np.floor((logs - AGREE_LOG_MIN) / -AGREE_LOG_MIN * AGREE_BINS).astype(np.int64)
    return np.clip(idx, 0, AGREE_BINS - 1)


def add_stats(stats: dict, conf: np.ndarray, reasons: list[str], right: np.ndarray, judged_conf: np.ndarray) -> None:
    """Fold one batch in: confidences of its annotated pairs, reasons of its quarantined rows, and
    for the pairs with a human_choice their confidence and whether the annotator agreed (1/0)."""
    stats["annotated"] += len(conf)
    stats["quarantined"] += len(reasons)
    stats["reasons"].update(reasons)
    stats["confidence_sum"] += float(conf.sum())
    stats["histogram"] += np.histogram(conf, bins=HIST_BINS, range=(0.0, 1.0))[0]
    if len(judged_conf):
        idx = agree_bin(judged_conf)
        np.add.at(stats["agree_n"], idx, 1)
        np.add.at(stats["agree_right"], idx, right.astype(np.int64))
        np.add.at(stats["agree_sum"], idx, judged_conf)
        np.add.at(stats["agree_right_conf"], idx, judged_conf * right)
        np.minimum.at(stats["agree_min"], idx, judged_conf)
        np.maximum.at(stats["agree_max"], idx, judged_conf)


def add_fold_stats(stats: dict, disagreement: np.ndarray, margin_std: np.ndarray) -> None:
    """Fold in the ensemble's per-pair disagreement (share of folds against its choice) and fold margin std."""
    stats["fold_pairs"] += len(disagreement)
    stats["fold_disagreement_sum"] += float(disagreement.sum())
    stats["fold_unanimous"] += int((disagreement == 0).sum())
    stats["fold_margin_std_sum"] += float(margin_std.sum())


def merge_stats(total: dict, part: dict) -> None:
    for key in ("annotated", "quarantined", "confidence_sum", *FOLD_KEYS):
        total[key] += part[key]
    total["reasons"].update(part["reasons"])
    for key in ("histogram", "agree_n", "agree_right", "agree_sum", "agree_right_conf"):
        total[key] += part[key]
    total["agree_min"] = np.minimum(total["agree_min"], part["agree_min"])
    total["agree_max"] = np.maximum(total["agree_max"], part["agree_max"])


def stats_to_json(stats: dict) -> dict:
    """A sidecar's statistics: the agreement histogram stored sparse (its non-empty bins only)."""
    nz = np.flatnonzero(stats["agree_n"])
    return {"annotated": stats["annotated"], "quarantined": stats["quarantined"],
            "reasons": dict(stats["reasons"]), "confidence_sum": stats["confidence_sum"],
            "histogram": stats["histogram"].tolist(), **{k: stats[k] for k in FOLD_KEYS},
            "agreement": {"bin": nz.tolist(), **{k: stats[f"agree_{k}"][nz].tolist()
                                                 for k in ("n", "right", "sum", "right_conf", "min", "max")}}}


def stats_from_json(d: dict) -> dict:
    stats = new_stats()
    stats.update(annotated=d["annotated"], quarantined=d["quarantined"], confidence_sum=d["confidence_sum"],
                 reasons=Counter(d["reasons"]), histogram=np.array(d["histogram"], dtype=np.int64),
                 **{k: d.get(k, 0) for k in FOLD_KEYS})  # a sidecar from before the ensemble has none
    nz = np.array(d["agreement"]["bin"], dtype=np.int64)
    for k in ("n", "right", "sum", "right_conf", "min", "max"):
        stats[f"agree_{k}"][nz] = d["agreement"][k]
    return stats


def deciles_from_histogram(n: np.ndarray, right: np.ndarray, conf_sum: np.ndarray, cmin: np.ndarray,
                           cmax: np.ndarray, groups: int = 10) -> list[dict]:
    """Approximate confidence deciles: whole bins, in confidence order, assigned to the group their
    middle pair falls in; counts, accuracy, mean and range are exact for the groups so cut."""
    total = int(n.sum())
    if not total:
        return []
    nz = np.flatnonzero(n)
    before = np.cumsum(n[nz]) - n[nz]
    group = np.minimum(((before + n[nz] / 2) * groups // total).astype(np.int64), groups - 1)
    out = []
    for g in range(groups):
        bins = nz[group == g]
        if not bins.size:
            continue
        count = int(n[bins].sum())
        out.append({"decile": g + 1, "count": count, "conf_min": float(cmin[bins].min()),
                    "conf_max": float(cmax[bins].max()), "mean_confidence": float(conf_sum[bins].sum() / count),
                    "accuracy": float(right[bins].sum() / count)})
    return out


def build_report(stats: dict, seconds: float, annotator: str, run_info: dict) -> dict:
    n = stats["annotated"]
    this_run = run_info["annotated_this_run"]
    report = {
        "annotator": annotator,
        "input_rows": n + stats["quarantined"],
        "annotated": n,
        "quarantined": stats["quarantined"],
        "quarantine_reasons": dict(stats["reasons"].most_common()),
        "seconds": round(seconds, 3),
        # over the pairs this run labeled (a resumed run labels only what the killed one had not committed)
        "pairs_per_second": round(this_run / seconds, 2) if seconds > 0 else None,
        "mean_confidence": stats["confidence_sum"] / n if n else None,
        "confidence_histogram": {"edges": np.linspace(0, 1, HIST_BINS + 1).round(3).tolist(),
                                 "counts": stats["histogram"].tolist()},
        **run_info,
    }
    if stats["fold_pairs"]:
        k = stats["fold_pairs"]
        report["ensemble"] = {
            "pairs": k, "mean_fold_disagreement": stats["fold_disagreement_sum"] / k,
            "unanimous_share": stats["fold_unanimous"] / k, "mean_fold_margin_std": stats["fold_margin_std_sum"] / k,
            "note": "fold_disagreement: the share of the fold models whose own margin favours the response the "
                    "ensemble rejected; unanimous: pairs where none does"}
    judged = int(stats["agree_n"].sum())
    if judged:
        csum = float(stats["agree_sum"].sum())
        report["human_agreement"] = {
            "pairs": judged, "accuracy": float(stats["agree_right"].sum() / judged),
            "confidence_weighted_accuracy": float(stats["agree_right_conf"].sum() / csum) if csum > 0 else None,
            "by_confidence_decile": deciles_from_histogram(stats["agree_n"], stats["agree_right"],
                                                           stats["agree_sum"], stats["agree_min"], stats["agree_max"]),
            "deciles_approximate": True,
            "deciles_note": (f"groups are whole bins of a {AGREE_BINS}-bin log-spaced confidence histogram "
                             f"(1e-6 to 1), so their sizes are only near-equal; count, accuracy, mean and "
                             f"range of each group are exact")}
    return report


def print_report(report: dict, out: Path) -> None:
    print(f"annotated {report['annotated']} pairs, quarantined {report['quarantined']} "
          f"(of {report['input_rows']} rows) in {report['seconds']:.1f}s: {report['pairs_per_second']} pairs/s"
          + (f", {report['precision']}" if report.get("precision") else "")
          + (f" ({report['annotated_this_run']} labeled by this run, {report['resumed_units']} units resumed)"
             if report.get("resumed_units") else ""))
    for reason, count in report["quarantine_reasons"].items():
        print(f"  quarantine: {count:>8}  {reason}")
    ens = report.get("ensemble")
    if ens:
        print(f"fold models: {ens['unanimous_share']:.1%} of pairs unanimous; on average {ens['mean_fold_disagreement']:.1%} "
              f"of folds against the ensemble's choice; fold margin std {ens['mean_fold_margin_std']:.3f}")
    human = report.get("human_agreement")
    if human:
        print(f"agreement with human_choice: {human['accuracy']:.3f} on {human['pairs']} pairs "
              f"(confidence-weighted {human['confidence_weighted_accuracy']})")
        print("  decile  pairs   confidence      accuracy   (approximate deciles: whole histogram bins)")
        for d in human["by_confidence_decile"]:
            print(f"  {d['decile']:>6} {d['count']:>6}   {d['conf_min']:.3f}-{d['conf_max']:.3f}   {d['accuracy']:.3f}")
    files = report.get("output_files", {})
    print(f"wrote {out}/annotated.parquet/ ({files.get('annotated', '?')} files), {out}/quarantine.parquet/ "
          f"({files.get('quarantine', '?')} files), {out}/report.json")


