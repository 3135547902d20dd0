"""The arms registry (cwpo_ray/arms.py): the one place that says what an arm trains on, how it weighs its
pairs, where compare shows it and what it is compared with; the pipeline and compare read it (pure)."""

from __future__ import annotations

import pytest

from cwpo_ray import arms
from cwpo_ray.weighting import parse_weighting

TABLES = (arms.HUMAN_LABELS, arms.LABELED, arms.WEAK_LABELS, arms.ENSEMBLE_LABELS, arms.GOLD_LABELS)


def test_every_arm_the_pipeline_accepts_is_in_the_registry():
    from cwpo_ray.recipes.pipeline import Config
    from cwpo_ray.orchestration.stages import arm_inputs

    names = [a.name for a in arms.ARMS] + ["topk:0.3", "topk:1"]
    Config(arms=names).validate()
    assert Config().arms == list(arms.DEFAULT_ARMS) and set(arms.DEFAULT_ARMS) <= {a.name for a in arms.ARMS}
    tables = {t: t.upper() for t in TABLES}
    for name in names:
        spec = arms.spec(name)
        assert spec.reads in TABLES and arm_inputs(name, tables) == (spec.reads.upper(), spec.weighting)
        parse_weighting(spec.weighting)  # a weighting the trainer knows
    # What the registry refuses, the pipeline refuses, with the registry's reason.
    for bad, reason in (("golden", "unknown arm 'golden'"), ("topk:0", "weighting must be"), ("topk:x", "weighting")):
        with pytest.raises(ValueError, match=reason):
            arms.spec(bad)
        with pytest.raises(ValueError, match=f"arms: .*{reason}"):
            Config(arms=[bad]).validate()
        assert arms.find(bad) is None


def test_the_pipeline_documents_every_arm():
    from cwpo_ray.recipes import pipeline

    assert all(f"\n  {a.name} " in pipeline.__doc__ for a in arms.ARMS)
    assert f"\n  {arms.TOPK}F " in pipeline.__doc__


def test_contrasts_name_known_arms():
    known = {a.name for a in arms.ARMS}
    assert len(set(arms.CONTRASTS)) == len(arms.CONTRASTS)
    for a, b in arms.CONTRASTS:
        assert a in known and b in known and a != b and (b, a) not in arms.CONTRASTS


def test_weak_labels_display_order_and_human_labels():
    names = ("human", "human_labeled_only", "ws", "cw", "cw_raw", "gold", "topk:0.3", "cw_ens")
    # Exactly the arms on an annotated table (the annotator's or its fold ensemble's) read weak labels: no
    # annotator is trained for the others, and compare shows the annotator's accuracy only beside these.
    assert [arms.reads_weak_labels(n) for n in names] == [False, False, True, True, True, False, True, True]
    # Only cw_ens needs the fold models kept, and compare shows the ensemble's accuracy beside it.
    assert [arms.needs_ensemble(n) for n in names] == [False] * 7 + [True]
    assert [arms.spec(n).annotator_metrics for n in ("cw", "cw_ens")] == ["annotator", "annotator_ensemble"]
    assert arms.spec("cw_ens").weighting == arms.spec("cw").weighting and ("cw_ens", "cw") in arms.CONTRASTS

    # compare's order: the registry's, then topk:F and arms it does not know (older runs), by name
    assert sorted(["zz", "topk:0.3", "cw", "gold", "human"], key=arms.display_key) == [
        "human", "cw", "gold", "topk:0.3", "zz"]
    # 30 labeled, 70 unlabeled pairs: the shared SFT start consumed the labeled split's labels for every arm
    used = {sft: [arms.human_labels_used(n, 30, 70, shared_sft=sft) for n in names] for sft in (True, False)}
    assert used == {True: [100, 30, 30, 30, 30, 30, 30, 30], False: [70, 30, 30, 30, 30, 0, 30, 30]}
