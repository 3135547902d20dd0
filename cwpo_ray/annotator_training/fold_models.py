"""train-annotator's ``keep_fold_models``: the k fold models, kept for `cwpo annotate --confidence ensemble`.

While the folds train, the epoch count E is not known yet (it is chosen from every fold's held-out
losses once the last fold is done), so each fold's model is saved after every epoch into a store
beside the staged annotator: STORE/fold-F/epoch-E/, an annotator folder each, written atomically
by rank 0. Once E is chosen and the temperature T fit, ``keep_chosen`` moves each fold's epoch E
into the annotator as folds/fold-F/ (T written into its annotator.json) and deletes the rest. At
its peak the store holds k x epochs model copies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def epoch_dir(store: Path, fold: str, epoch: int) -> Path:
    return Path(store) / fold / f"epoch-{epoch}"


def save_fold_epoch(engine, annotator, fold: str, epoch: int, heldout_ids: list[str], margins: list[float],
                    rank: int, store: str) -> None:
    """A fold's model after ``epoch`` (1-based) with its held-out pairs' ids and margins (eval.json).
    Every rank calls it (the state dict is gathered collectively under ZeRO-3); rank 0 writes. A
    retried epoch (after a worker restart) replaces the folder whole."""
    from cwpo_ray import calibration
    from cwpo_ray.annotator import save_annotator
    from cwpo_ray.tables import atomic_path

    full = engine.full_state_dict()  # what the refit's save uses: full weights on rank 0
    if rank != 0:
        return
    annotator.meta.metrics = {**calibration.summarize(margins), "epoch": epoch, "round": fold}
    with atomic_path(epoch_dir(Path(store), fold, epoch)) as tmp:
        save_annotator(annotator, tmp, state_dict=full)
        (tmp / "eval.json").write_text(json.dumps({"round": fold, "epoch": epoch, "heldout_ids": heldout_ids,
                                                   "heldout_margins": margins}))


def keep_chosen(store: Path, staging: Path, folds: int) -> dict:
    """Each fold's model at the chosen epoch (eval.json's best) into ``staging``/folds/fold-F/ with the
    annotator's temperature; the other epochs and the store deleted. Records what was kept under
    "fold_models" in annotator.json and eval.json; returns the updated eval.json."""
    from cwpo_ray.annotator import FOLDS_DIR, META_FILE

    meta_path, report_path = staging / META_FILE, staging / "eval.json"
    meta, report = json.loads(meta_path.read_text()), json.loads(report_path.read_text())
    epoch, temperature = report["best"]["epoch"], meta["temperature"]
    kept = []
    for f in range(folds):
        name = f"fold-{f}"
        src = epoch_dir(store, name, epoch)
        if not (src / META_FILE).is_file():
            raise RuntimeError(f"keep_fold_models: {src} is missing; the fold's model at epoch {epoch} was not saved")
        fold_meta = json.loads((src / META_FILE).read_text())
        fold_meta["temperature"] = temperature  # fit on these models' own held-out margins at this epoch
        (src / META_FILE).write_text(json.dumps(fold_meta, indent=2))
        dst = staging / FOLDS_DIR / name
        dst.parent.mkdir(exist_ok=True)
        os.rename(src, dst)  # the staged annotator is published in one rename afterwards
        kept.append(name)
    shutil.rmtree(store, ignore_errors=True)
    info = {"folder": FOLDS_DIR, "folds": kept, "epoch": epoch, "temperature": temperature,
            "what": "each fold's model after the chosen epoch count, trained without its held-out fold; "
                    "`cwpo annotate --confidence ensemble` averages their margins"}
    meta["fold_models"] = report["fold_models"] = info
    meta_path.write_text(json.dumps(meta, indent=2))
    report_path.write_text(json.dumps(report, indent=1))
    return report
