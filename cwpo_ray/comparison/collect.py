"""A pipeline's arm runs as `cwpo compare` reads them from MLflow: one row of logged metrics per child
run, and each run's per-prompt outcomes from the responses.parquet the pipeline logs beside them."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cwpo_ray.arms import display_key, find
from cwpo_ray.comparison.aggregate import INTERVAL_KEYS, seed_key

GRA_KEYS = (*INTERVAL_KEYS, "gold_policy", "gold_reference")  # what compare reads of each judge


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking

    return MlflowClient(tracking.tracking_uri())


def find_parent(client, experiment: str, parent_run_id: str, run_name: str = ""):
    """(experiment, pipeline parent run): the one whose id is given, else the experiment's latest pipeline run
    (of that run name, when one is given)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    if parent_run_id:
        return exp, client.get_run(parent_run_id)
    named = f" and attributes.run_name = '{run_name}'" if run_name else ""
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'" + named,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"no pipeline run{f' named {run_name!r}' if run_name else ''} in experiment {experiment!r}")
    return exp, runs[0]


def logged_by_judge(metrics: dict, prefix: str = "eval") -> tuple[dict, dict]:
    """(main judge's GRA metrics, {extra judge: its GRA metrics}) from a run's ``eval/*`` metrics
    (``validation/*`` for the validation split); an extra judge's are logged as ``eval/JUDGE.gra`` ...."""
    p = prefix + "/"
    main = {k: metrics.get(p + k) for k in GRA_KEYS}
    extra_names = sorted(k[len(p):-len(".gra")] for k in metrics if k.startswith(p) and k.endswith(".gra"))
    return main, {j: {k: metrics.get(f"{p}{j}.{k}") for k in GRA_KEYS} for j in extra_names}


def pooled_logged(metrics: dict, prefixes: list[str]) -> tuple[dict, dict]:
    """logged_by_judge for several evaluated splits pooled: each judge's gold rewards as the prompt-weighted
    mean of the parts' (each part logged its mean over its own ``PREFIX/n`` prompts), and no GRA or interval,
    since no logged figure covers the pooled prompts: compare recomputes those from the per-prompt wins."""
    parts = [(logged_by_judge(metrics, p), metrics.get(f"{p}/n") or 0) for p in prefixes]

    def pooled(per_part: list[tuple[dict, float]]) -> dict:
        out = dict.fromkeys(INTERVAL_KEYS)
        for k in ("gold_policy", "gold_reference"):
            known = [(m[k], n) for m, n in per_part if m.get(k) is not None and n]
            out[k] = sum(v * n for v, n in known) / sum(n for _, n in known) if known else None
        return out

    judges = set.intersection(*(set(extra) for (_, extra), _ in parts))
    return (pooled([(main, n) for (main, _), n in parts]),
            {j: pooled([(extra[j], n) for (_, extra), n in parts]) for j in sorted(judges)})


def collect_rows(client, exp, parent, split: str = "test") -> list[dict]:
    """One row per child (arm x loss x seed) run, sorted by loss, arm (display order) and seed; its metrics
    are those of the arm's evaluation on ``split``."""
    from cwpo_ray.evaluation.reporting import metric_prefix

    prefixes = [metric_prefix(p) for p in split_parts(split)]
    prefix = prefixes[0]  # a pooled split's judge tag and pair accuracy: its first part's (test has the pairs)
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                                                                    f"'{parent.info.run_id}' and tags.stage = 'arm'")
    pm = parent.data.metrics

    def annotator_accuracy(seed, labels: str):
        # The pipeline prefixes a seed's annotator metrics with "seedS." when it runs several seeds;
        # ``labels``: "annotator", or "annotator_ensemble" for an arm on the fold ensemble's labels.
        for prefix in ([f"seed{seed}."] if seed is not None else []) + [""]:
            for k in (f"{labels}.gold_accuracy", f"{labels}.human_agreement"):
                if prefix + k in pm:
                    return pm[prefix + k]
        return None

    rows = []
    for run in children:
        m, tags = run.data.metrics, run.data.tags
        arm = tags.get("arm", run.info.run_name)
        seed = tags.get("seed")
        known = find(arm)
        main, extra = logged_by_judge(m, prefix) if len(prefixes) == 1 else pooled_logged(m, prefixes)
        rows.append({
            "split": split,
            "arm": arm, "loss": tags.get("loss", ""), "seed": seed, "run_id": run.info.run_id,
            "start_time": run.info.start_time or 0, **main,
            # runs evaluated before the judge was tagged: "gold"
            "judge": tags.get(f"{prefix}/judge", "gold"), "judges": extra,
            "n": (sum(m.get(f"{metric_prefix(p)}/n") or 0 for p in split_parts(split)) or None),
            "pair_accuracy": m.get(f"{prefix}/pair_accuracy"),
            # Only the weak-label arms rest on the annotator's labels.
            "annotator_accuracy": (annotator_accuracy(seed, known.annotator_metrics)
                                   if known and known.reads_weak_labels else None),
            "human_labels_used": m.get("human_labels_used"),
        })
    return sorted(rows, key=lambda r: (r["loss"], display_key(r["arm"]), seed_key(r["seed"])))


def split_parts(split: str) -> list[str]:
    """The evaluated splits a compared split pools: "test+test_unseen" is both sets' prompts together."""
    return split.split("+")


def latest_runs(rows: list[dict]) -> list[dict]:
    """One run per arm x loss x seed, the newest: a pipeline resumed after a change of code or settings
    starts a new child run for what it reruns, and the one it replaced stays under the parent."""
    newest: dict[tuple, dict] = {}
    for r in rows:
        k = (r["arm"], r["loss"], r["seed"])
        if k not in newest or r["start_time"] > newest[k]["start_time"]:
            newest[k] = r
    keep = {id(r) for r in newest.values()}
    return [r for r in rows if id(r) in keep]


def wins_by_judge(rows: list[dict], main_judge: str) -> dict[str, dict]:
    """judge -> {prompt id -> 1 / 0.5 / 0} from the rows of a responses.parquet: the main judge's from
    ``policy_score`` / ``reference_score``, every other judge's from ``policy_score_<judge>`` /
    ``reference_score_<judge>`` (pure)."""
    from cwpo_ray.gra import wins

    if not rows:
        return {}
    ids = [r["id"] for r in rows]
    out = {main_judge: dict(zip(ids, wins([r["policy_score"] for r in rows],
                                          [r["reference_score"] for r in rows]).tolist()))}
    for col in rows[0]:
        judge = col[len("policy_score_"):] if col.startswith("policy_score_") else None
        if judge and judge != main_judge and f"reference_score_{judge}" in rows[0]:
            out[judge] = dict(zip(ids, wins([r[col] for r in rows],
                                            [r[f"reference_score_{judge}"] for r in rows]).tolist()))
    return out


def per_prompt_wins(client, run_id: str, dst: Path, main_judge: str = "gold", split: str = "test") -> dict | None:
    """judge -> prompt id -> 1 / 0.5 / 0 (the arm's response scored above / equal to / below the
    start's), from the responses.parquet the pipeline logs to each arm's run (a validation evaluation's
    under validation/); None when it is not there."""
    from mlflow.exceptions import MlflowException

    from cwpo_ray.evaluation.reporting import artifact_dir
    from cwpo_ray.tables import read_table

    dst.mkdir(parents=True, exist_ok=True)
    folder = artifact_dir(split)
    try:
        path = client.download_artifacts(run_id, f"{folder}/responses.parquet" if folder else "responses.parquet",
                                         str(dst))
    except (MlflowException, OSError):
        return None
    return wins_by_judge(read_table(path).to_pylist(), main_judge)


def pooled_wins(splits: list[str], parts: list[dict | None]) -> dict | None:
    """One judge -> prompt -> win map from each split's (ids prefixed by their split, so two sets' ids never
    meet); None when a split left no responses, or when the splits do not share a judge."""
    if len(parts) == 1 or not all(parts):
        return parts[0] if len(parts) == 1 else None
    # The first split's judge order (the main judge first), not a set's, which varies with the hash seed.
    judges = [j for j in parts[0] if all(j in p for p in parts[1:])]
    return {j: {f"{s}:{i}": w for s, p in zip(splits, parts) for i, w in p[j].items()} for j in judges} or None


@contextmanager
def outcomes_of(client) -> Iterator[Callable[[dict], dict | None]]:
    """``outcomes(row)``: the row's run's per-prompt wins on the row's split (per_prompt_wins), each run's
    file of a split downloaded once into a temporary folder that lasts as long as the ``with`` block."""
    found: dict[tuple[str, str], dict | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def outcomes(row: dict) -> dict | None:
            key = (row["run_id"], row["split"])  # one run holds each split's evaluation
            if key not in found:
                parts = [per_prompt_wins(client, row["run_id"], Path(tmp) / row["run_id"] / part, row["judge"], part)
                         for part in split_parts(row["split"])]
                found[key] = pooled_wins(split_parts(row["split"]), parts)
            return found[key]

        yield outcomes
