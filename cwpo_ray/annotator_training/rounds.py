"""train-annotator's data plan: which labeled pairs are held out or in which fold (a seeded hash
of the id), the rounds of training (k folds, then the refit on every pair), the refit's epoch
count chosen from the folds' out-of-fold losses, and the pairs as token ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cwpo_ray.config import ConfigError


def is_heldout(pair_id: str, seed: int, fraction: float) -> bool:
    """A seeded hash of the id (the one `cwpo data` splits by): the same split everywhere, no shuffle."""
    from cwpo_ray.sources import hash_unit

    return hash_unit(f"{seed}:heldout:{pair_id}") < fraction


def load_pairs(path: str) -> list[dict]:
    """The labeled pairs, with rows that cannot be trained on (missing / empty / identical) refused loudly."""
    from cwpo_ray.tables import LABELED_COLUMNS, iter_rows, require_columns

    require_columns(path, LABELED_COLUMNS)
    rows, bad = [], 0
    for row in iter_rows(path, columns=None):
        ok = all(isinstance(row.get(c), str) and row[c].strip() for c in LABELED_COLUMNS)
        if ok and row["chosen"] != row["rejected"]:
            rows.append({c: row[c] for c in LABELED_COLUMNS})
        else:
            bad += 1
    if bad:
        print(f"train-annotator: skipped {bad} unusable rows of {path} (run `cwpo data` to quarantine them)")
    return rows


def fold_of(pair_id: str, seed: int, folds: int) -> int:
    from cwpo_ray.sources import hash_unit

    return min(folds - 1, int(hash_unit(f"{seed}:fold:{pair_id}") * folds))


@dataclass
class Round:
    """One model trained from the start: on ``train`` rows for ``epochs`` epochs, scored on ``heldout``
    rows after every epoch. k-fold selection is k such rounds and a refit on every row."""

    name: str               # "heldout", "fold-2", "refit"
    train: list[int]        # row indices
    heldout: list[int]
    epochs: int             # 0: decided when the folds are done (the refit)
    saves: bool             # its model is the annotator written to OUT

    @property
    def is_fold(self) -> bool:
        """One of the k fold models (keep_fold_models saves these after every epoch)."""
        return self.name.startswith("fold-")


def plan_rounds(rows: list[dict], cfg, seed: int) -> list[Round]:
    """folds 1: one round, the best held-out epoch saved. folds k: k rounds (fold f held out) and a
    refit on all rows whose epoch count is chosen from the folds' held-out losses. Refuses, before
    any worker starts, a round with fewer training pairs than one global batch (its epoch would have
    no step: ``step_plan`` drops an incomplete global batch)."""
    rounds = _rounds(rows, cfg, seed)
    for spec in rounds:  # batch_size is the global batch (validated a multiple of num_workers)
        if len(spec.train) < cfg.batch_size:
            raise ConfigError(f"round {spec.name} has {len(spec.train)} training pairs, fewer than one batch of "
                              f"{cfg.batch_size}: lower batch_size or use more labeled pairs")
    return rounds


def _rounds(rows: list[dict], cfg, seed: int) -> list[Round]:
    if cfg.folds == 1:
        held = [i for i, r in enumerate(rows) if is_heldout(r["id"], seed, cfg.heldout_fraction)]
        train = [i for i, r in enumerate(rows) if not is_heldout(r["id"], seed, cfg.heldout_fraction)]
        if not train or not held:
            raise ConfigError(f"heldout_fraction {cfg.heldout_fraction} leaves {len(train)} training and "
                              f"{len(held)} held-out pairs of {len(rows)}; both must be non-empty")
        return [Round("heldout", train, held, cfg.epochs, saves=True)]
    fold = [fold_of(r["id"], seed, cfg.folds) for r in rows]
    rounds = []
    for f in range(cfg.folds):
        held = [i for i in range(len(rows)) if fold[i] == f]
        if not held or len(held) == len(rows):
            raise ConfigError(f"folds {cfg.folds}: fold {f} holds {len(held)} of {len(rows)} pairs; "
                              "use fewer folds or more pairs")
        rounds.append(Round(f"fold-{f}", [i for i in range(len(rows)) if fold[i] != f], held, cfg.epochs, False))
    return rounds + [Round("refit", list(range(len(rows))), [], 0, saves=True)]


def chosen_epochs(oof: dict[str, list[list[float]]], calibrated: bool = False) -> int:
    """The epoch count whose out-of-fold margins (all folds pooled) have the lowest BT loss; ``calibrated``:
    the lowest BT loss of ``margins / T`` with T fitted to those margins."""
    from cwpo_ray import calibration

    def loss(m: list[float]) -> float:
        t = calibration.fit_temperature(m) if calibrated else 1.0
        return calibration.bt_loss([x / t for x in m])

    n_epochs = min(len(v) for v in oof.values())
    losses = [loss([m for v in oof.values() for m in v[e]]) for e in range(n_epochs)]
    return int(min(range(n_epochs), key=lambda e: (losses[e], e))) + 1


def fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha1()
    for r in sorted(r["id"] for r in rows):
        h.update(r.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def encode_pairs(tokenizer, meta, rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    from cwpo_ray.annotator import encode

    prompts = [r["prompt"] for r in rows]
    chosen, _ = encode(tokenizer, prompts, [r["chosen"] for r in rows], meta.max_length, meta.separator)
    rejected, _ = encode(tokenizer, prompts, [r["rejected"] for r in rows], meta.max_length, meta.separator)
    return chosen, rejected


