"""What `cwpo annotate --confidence ensemble` costs: pairs/s of single vs ensemble on the same input.

The annotator is MiniLM-L6 (all-MiniLM-L6-v2) with fresh scalar heads: a refit and ``--folds`` fold
models (speed does not depend on the weights), laid out as `cwpo train-annotator --keep-fold-models`
leaves them (the same step, ``fold_models.keep_chosen``, makes the layout). The pairs are
bench/annotate.py's synthetic ones (30-60 tokens per prompt + response). Each run is `cwpo annotate`
in a fresh driver process with its own local Ray (bench/annotate.py's ``ray_annotate``), single and
ensemble alternating, ``--repeats`` of each; pairs/s over the whole job and without start-up
(report.json's startup_seconds), and the ratio of the medians.

Usage: .venv/bin/python bench/annotate_ensemble.py --pairs 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from annotate import make_pairs, ray_annotate  # noqa: E402  (bench/ is the script's own folder on sys.path)
from cwpo_ray.tables import write_table  # noqa: E402


def build_annotator(folder: Path, folds: int, max_length: int) -> None:
    """A refit and ``folds`` fold models of MiniLM-L6 with fresh heads, as keep_fold_models leaves them."""
    import torch

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.annotator_training.fold_models import epoch_dir, keep_chosen
    from cwpo_ray.models import resolve_model

    store = folder.with_name(folder.name + ".store")
    for f in range(folds):
        torch.manual_seed(f)
        save_annotator(new_annotator(resolve_model("minilm-l6"), max_length=max_length),
                       epoch_dir(store, f"fold-{f}", 1))
    torch.manual_seed(folds)
    save_annotator(new_annotator(resolve_model("minilm-l6"), max_length=max_length), folder)
    (folder / "eval.json").write_text(json.dumps({"best": {"epoch": 1}}))
    keep_chosen(store, folder, folds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--work", default="", help="work folder (kept); default: a new temporary folder")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    work.mkdir(parents=True, exist_ok=True)
    annotator, data = work / "annotator", work / f"pairs-{args.pairs}.parquet"
    if not annotator.exists():
        build_annotator(annotator, args.folds, args.max_length)
    if not data.exists():
        write_table(pa.Table.from_pylist(make_pairs(args.pairs)), data)

    rows = []
    for r in range(args.repeats):
        for confidence in ("single", "ensemble"):
            out = work / f"out-{confidence}-r{r}"
            sec, _, done = ray_annotate(data, annotator, out, args.actors, args.cpus_per_actor,
                                        ("--precision", "fp32", "--confidence", confidence))
            assert done == args.pairs, (confidence, r, done)
            report = json.loads((out / "report.json").read_text())
            startup = report.get("startup_seconds") or 0.0
            rows.append((confidence, r, sec, startup, args.pairs / sec, args.pairs / (sec - startup)))
            print(f"{confidence} repeat {r + 1}: {sec:.1f} s, start-up {startup:.1f} s, {args.pairs / sec:.1f} "
                  f"pairs/s, {args.pairs / (sec - startup):.1f} without start-up", flush=True)

    print(f"\n`cwpo annotate`, {args.actors} actors x {args.cpus_per_actor} CPU, {args.pairs:,} pairs, MiniLM-L6, "
          f"max_length {args.max_length}, fp32; ensemble of {args.folds} fold models")
    print("| confidence | repeat | seconds | start-up s | pairs/s | pairs/s w/o start-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for confidence, r, sec, startup, rate, warm in rows:
        print(f"| {confidence} | {r + 1} | {sec:.1f} | {startup:.1f} | {rate:.1f} | {warm:.1f} |")
    med = {c: (statistics.median(x[4] for x in rows if x[0] == c), statistics.median(x[5] for x in rows if x[0] == c))
           for c in ("single", "ensemble")}
    for c, (rate, warm) in med.items():
        print(f"| {c} | median | | | {rate:.1f} | {warm:.1f} |")
    print(f"\nsingle / ensemble (medians): {med['single'][0] / med['ensemble'][0]:.2f}x, without start-up "
          f"{med['single'][1] / med['ensemble'][1]:.2f}x (folds: {args.folds})")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
