"""`cwpo annotate --confidence ensemble`: a pair labeled by the k fold models of the annotator together.

train-annotator chooses the refit's epoch count E by k-fold cross-validation and fits the
temperature T on the pooled out-of-fold margins at E; with keep_fold_models it keeps each fold's
model at E (ANNOTATOR/folds/fold-F/). Their held-out margins are what T was fit on, so the mean of
their margins is calibrated by the same T, and the ensemble costs no training: only k forward
passes per response instead of one (the texts are tokenized once: the fold models share the
backbone's tokenizer and text format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cwpo_ray.config import ConfigError

CONFIDENCES = ("single", "ensemble")


def ensemble_labels(rewards_a, rewards_b, temperature: float) -> dict[str, list]:
    """The label of each pair from the k fold models' rewards (arrays k x n, fold by pair).

    The pair's rewards are the folds' mean rewards, so its margin r_a - r_b is the mean of the fold
    margins; the response it favours is chosen (a on a tie, as a single annotator does), with
    confidence 2(sigma(|margin| / T) - 1/2) (``confidence``) and with T = 1 (``confidence_raw``).
    How much the folds disagree: the share of folds whose own margin favours the other response
    (``fold_disagreement``) and the standard deviation of the fold margins (``fold_margin_std``).
    """
    from cwpo_ray.calibration import calibrated_confidence

    ra, rb = np.asarray(rewards_a, dtype=np.float64), np.asarray(rewards_b, dtype=np.float64)
    if ra.ndim != 2 or ra.shape != rb.shape or not ra.shape[0]:
        raise ValueError(f"rewards must be two k x n arrays with k >= 1, got {ra.shape} and {rb.shape}")
    mean_a, mean_b = ra.mean(axis=0), rb.mean(axis=0)
    margin = mean_a - mean_b
    first = mean_a >= mean_b
    folds = ra - rb
    against = np.where(first, folds < 0, folds > 0)  # a fold at exactly 0 favours neither: not against
    return {
        "reward_a": mean_a.tolist(),
        "reward_b": mean_b.tolist(),
        "preferred": ["a" if f else "b" for f in first],
        "confidence": calibrated_confidence(margin, temperature).tolist(),
        "confidence_raw": calibrated_confidence(margin, 1.0).tolist(),
        "fold_disagreement": against.mean(axis=0).tolist(),
        "fold_margin_std": folds.std(axis=0).tolist(),
    }


def fold_folders(annotator_dir: str | Path) -> list[Path]:
    """The fold models of an annotator folder, or a ConfigError (one line) saying how to get them."""
    from cwpo_ray.annotator import META_FILE, fold_model_dirs

    folder = Path(annotator_dir)
    found = fold_model_dirs(folder)
    if not found:
        raise ConfigError(f"confidence ensemble: {folder} has no fold models (no \"fold_models\" in its {META_FILE}); "
                          "retrain it with `cwpo train-annotator ... --keep-fold-models` (folds > 1)")
    missing = [str(f) for f in found if not (f / META_FILE).is_file()]
    if missing:
        raise ConfigError(f"confidence ensemble: fold models named in {folder / META_FILE} are missing: "
                          f"{', '.join(missing)}; retrain with --keep-fold-models")
    return found


class Ensemble:
    """The fold annotators, scoring as one: ``label_pairs`` as ``Annotator.label_pairs`` gives it, plus
    the folds' disagreement."""

    def __init__(self, members: list, temperature: float):
        formats = {repr(m.meta.text_format) for m in members}
        if len(formats) != 1:
            raise ValueError("the fold models encode text differently; they cannot share one encoding")
        self.members, self.temperature = members, temperature

    def label_pairs(self, prompts, responses_a, responses_b, batch_size: int = 64) -> dict[str, list]:
        n = len(prompts)
        seqs, truncated = self.members[0].encode(list(prompts) * 2, list(responses_a) + list(responses_b))
        rewards = np.array([m.score_ids(seqs, batch_size) for m in self.members], dtype=np.float64).reshape(
            len(self.members), 2 * n)
        labels = ensemble_labels(rewards[:, :n], rewards[:, n:], self.temperature)
        labels["truncated"] = [ta or tb for ta, tb in zip(truncated[:n], truncated[n:])]
        return labels


def load_ensemble(annotator_dir: str | Path, device: str = "cpu", precision: str = "fp32") -> Ensemble:
    """The k fold models of ``annotator_dir`` with its temperature (the one fit on their held-out margins)."""
    from cwpo_ray.annotator import META_FILE, AnnotatorMeta, load_annotator

    members = [load_annotator(f, device=device, precision=precision) for f in fold_folders(annotator_dir)]
    meta = AnnotatorMeta.from_json((Path(annotator_dir) / META_FILE).read_text())
    return Ensemble(members, meta.temperature)


def ensemble_name(annotator_dir: str | Path, k: int) -> str:
    """The annotated table's ``annotator`` value for the ensemble: the folder, and that its k folds labeled."""
    return f"{Path(annotator_dir).resolve()} (ensemble: mean margin of {k} fold models)"
