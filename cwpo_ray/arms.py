"""The arms of the comparison, in one place: which training table each reads, how it weighs its pairs,
where it shows in compare's tables, and which pairs of arms are compared. Pure Python.

An arm is crossed with every PO loss the pipeline runs; all arms of a seed share its split, its SFT
start and its test prompts, so they differ only in the labels they train on and the weights of
their pairs. `cwpo pipeline` reads ``spec(arm).reads`` / ``.weighting`` to train an arm, trains the
annotator only when some arm reads weak labels, and `cwpo compare` shows the arms in ``ARMS`` order
and the ``CONTRASTS`` as paired GRA differences.
"""

from __future__ import annotations

from dataclasses import dataclass

# The tables an arm can train on: keys of the pipeline's tables of one seed.
HUMAN_LABELS = "unlabeled_human"  # the unlabeled split with its hidden human labels
LABELED = "labeled"               # the labeled split alone (the human labels the annotator learns from)
WEAK_LABELS = "annotated"         # the unlabeled split labeled by the annotator, with its confidences
ENSEMBLE_LABELS = "annotated_ensemble"  # the same split labeled by the annotator's k fold models together
GOLD_LABELS = "unlabeled_gold"    # the unlabeled split labeled by the source's gold scores (ties dropped)

TOPK = "topk:"  # topk:F, a family of arms: the annotator's labels, only the fraction F most confident pairs


@dataclass(frozen=True)
class Arm:
    name: str
    reads: str      # one of the tables above
    weighting: str  # a weighting spec (cwpo_ray.weighting)
    default: bool   # run when the pipeline's `arms` is not given

    @property
    def reads_weak_labels(self) -> bool:
        return self.reads in (WEAK_LABELS, ENSEMBLE_LABELS)

    @property
    def needs_ensemble(self) -> bool:
        """Trains on the fold ensemble's labels: the annotator must keep its fold models."""
        return self.reads == ENSEMBLE_LABELS

    @property
    def annotator_metrics(self) -> str:
        """The prefix of the pipeline's metrics of the labels this arm reads (accuracy against gold, ...)."""
        return "annotator_ensemble" if self.needs_ensemble else "annotator"


ARMS = (  # in display order; what each one is: the arms list in cwpo_ray/recipes/pipeline.py's docstring
    Arm("human", HUMAN_LABELS, "none", True),
    Arm("human_labeled_only", LABELED, "none", True),
    Arm("ws", WEAK_LABELS, "none", True),
    Arm("cw", WEAK_LABELS, "confidence", True),  # CW-PO
    Arm("cw_raw", WEAK_LABELS, "confidence_raw", False),  # what calibrating the confidence changes
    Arm("cw_ens", ENSEMBLE_LABELS, "confidence", False),  # the k fold models' mean margin, the same T
    Arm("gold", GOLD_LABELS, "none", False),  # the noise-free ceiling, for a source with gold scores
)
DEFAULT_ARMS = tuple(a.name for a in ARMS if a.default)

# The differences the paper's claim is about, as (a, b): GRA(a) - GRA(b), each shown when both arms ran.
# cw - cw_raw: the calibrated confidence as weight against the uncalibrated one; cw_ens - cw: the fold
# ensemble's labels and confidences against the refit annotator's.
CONTRASTS = (("cw", "human"), ("cw", "ws"), ("cw", "cw_raw"), ("ws", "human"), ("cw", "human_labeled_only"),
             ("gold", "human"), ("cw_ens", "cw"))


def spec(name: str) -> Arm:
    """The arm named ``name`` (``topk:F`` for any F in (0, 1]); ValueError for an unknown one."""
    for arm in ARMS:
        if arm.name == name:
            return arm
    if name.startswith(TOPK):
        from cwpo_ray.weighting import parse_weighting

        parse_weighting(name)  # raises for an F outside (0, 1]
        return Arm(name, WEAK_LABELS, name, False)
    raise ValueError(f"unknown arm {name!r} (known: {', '.join(a.name for a in ARMS)}, {TOPK}F)")


def find(name: str) -> Arm | None:
    """The arm named ``name``, or None: runs of an unknown arm (an older pipeline's) are still shown."""
    try:
        return spec(name)
    except ValueError:
        return None


def reads_weak_labels(name: str) -> bool:
    """Whether an arm trains on the annotator's labels (its own or its fold models'): the pipeline trains
    an annotator only if one does, and compare shows the annotator's accuracy only beside those."""
    return spec(name).reads_weak_labels


def needs_ensemble(name: str) -> bool:
    """Whether an arm trains on the fold ensemble's labels: the pipeline then keeps the fold models and
    runs a second annotate stage (annotate-ensemble)."""
    return spec(name).needs_ensemble


def display_key(name: str) -> tuple[int, str]:
    """Sort key of an arm in the tables: ``ARMS`` order, then topk:F and unknown arms by name."""
    order = [a.name for a in ARMS]
    return (order.index(name) if name in order else len(order), name)


def human_labels_used(name: str, n_labeled: int, n_unlabeled: int, shared_sft: bool) -> int:
    """Human labels an arm consumed. The labeled split's: when the annotator learned from them (weak-label
    arms), when PO trained on them (human_labeled_only), or when the shared SFT start did (every arm).
    The unlabeled split's hidden labels: only for the arm that trains on them (human)."""
    reads = spec(name).reads
    labeled = n_labeled if shared_sft or reads in (LABELED, WEAK_LABELS, ENSEMBLE_LABELS) else 0
    return labeled + (n_unlabeled if reads == HUMAN_LABELS else 0)
