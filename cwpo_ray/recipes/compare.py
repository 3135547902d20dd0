"""Compare a pipeline's arms x losses from MLflow: GRA with its 95% bootstrap interval (ties
half) and strict GRA (ties 0, the paper's definition) with its own, mean
gold reward of the policy and of its SFT start, implicit-reward pair accuracy, the
annotator's accuracy (against the gold judge when the data has one, else against the hidden
human labels) and how many human labels each arm used. Then the contrasts the paper's claim is
about (cw - human, cw - ws, ws - human, cw - human_labeled_only, per loss) as paired GRA
differences: every arm is judged on the same test prompts against the same start responses,
so the per-prompt differences are resampled together (gra.paired_difference), which
separates arms that two overlapping GRA intervals cannot.

When the evaluation ran extra judges (`cwpo evaluate`'s extra_judges), every arm's GRA is also
shown under each of them, and every paired difference is computed under each judge from the
per-judge score columns of the arm's responses.parquet. A contrast whose interval excludes 0
under some judges but not under others is flagged ``judge-specific``: the gain may come from
how one judge scores rather than from better responses (gra.across_judges).

Reads the child runs of a pipeline parent run (--parent-run-id, default: the latest pipeline
run of --experiment). Prints the tables, writes OUT/compare.md, OUT/compare.png (GRA per
arm, one bar per loss, interval whiskers, the 0.5 line) and OUT/compare_paired.png (the
differences with their intervals, the 0 line), and logs them to the parent run.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cwpo_ray.config import option

EPILOG = """examples:
  cwpo compare                                   # latest pipeline run of experiment cwpo-pipeline
  cwpo compare --experiment my-exp --out runs/compare
  cwpo compare --parent-run-id 0123abcd... --out runs/compare
"""

ARM_ORDER = ("human", "human_labeled_only", "ws", "cw", "gold")
CONTRASTS = (("cw", "human"), ("cw", "ws"), ("ws", "human"), ("cw", "human_labeled_only"), ("gold", "human"))


@dataclass
class Config:
    experiment: str = option("cwpo-pipeline", "MLflow experiment of the pipeline run")
    parent_run_id: str = option("", "pipeline parent run (default: the latest pipeline run of the experiment)")
    out: str = option("runs/compare", "folder for compare.md and compare.png")
    log: bool = option(True, "also log the table and chart to the parent run")


def _client():
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking

    return MlflowClient(tracking.tracking_uri())


def find_parent(client, experiment: str, parent_run_id: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    if parent_run_id:
        return exp, client.get_run(parent_run_id)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"no pipeline run in experiment {experiment!r}")
    return exp, runs[0]


GRA_KEYS = ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi", "gold_policy", "gold_reference")


def judge_metrics(metrics: dict) -> tuple[dict, dict]:
    """(main judge's GRA metrics, {extra judge: its GRA metrics}) from a run's ``eval/*`` metrics;
    an extra judge's are logged as ``eval/JUDGE.gra`` ...."""
    main = {k: metrics.get(f"eval/{k}") for k in GRA_KEYS}
    extra_names = sorted(k[len("eval/"):-len(".gra")] for k in metrics if k.startswith("eval/") and k.endswith(".gra"))
    return main, {j: {k: metrics.get(f"eval/{j}.{k}") for k in GRA_KEYS} for j in extra_names}


def collect_rows(client, exp, parent) -> list[dict]:
    """One row per child (arm x loss) run, in a stable arm order."""
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'arm'")
    pm = parent.data.metrics
    annotator_acc = pm.get("annotator.gold_accuracy", pm.get("annotator.human_agreement"))
    rows = []
    for run in children:
        m, tags = run.data.metrics, run.data.tags
        arm = tags.get("arm", run.info.run_name)
        main, extra = judge_metrics(m)
        rows.append({
            "arm": arm, "loss": tags.get("loss", ""), "run_id": run.info.run_id, **main,
            # runs evaluated before the judge was tagged: "gold"
            "judge": tags.get("eval/judge", "gold"), "judges": extra,
            "n": m.get("eval/n"), "pair_accuracy": m.get("eval/pair_accuracy"),
            # Only the weak-label arms rest on the annotator's labels.
            "annotator_accuracy": None if arm.startswith("human") or arm == "gold" else annotator_acc,
            "human_labels_used": m.get("human_labels_used"),
        })
    order = {a: i for i, a in enumerate(ARM_ORDER)}
    return sorted(rows, key=lambda r: (r["loss"], order.get(r["arm"], len(order)), r["arm"]))


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


def per_prompt_wins(client, run_id: str, dst: Path, main_judge: str = "gold") -> dict | None:
    """judge -> prompt id -> 1 / 0.5 / 0 (the arm's response scored above / equal to / below the
    start's), from the responses.parquet the pipeline logs to each arm's run; None when it is not there."""
    from mlflow.exceptions import MlflowException

    from cwpo_ray.tables import read_table

    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, "responses.parquet", str(dst))
    except (MlflowException, OSError):
        return None
    return wins_by_judge(read_table(path).to_pylist(), main_judge)


def paired_rows(client, rows: list[dict]) -> list[dict]:
    """The CONTRASTS present in ``rows``, per loss and per judge both arms were scored by, as paired
    GRA differences on shared prompts; each carries ``across``, the contrast's reading over judges."""
    from cwpo_ray.gra import across_judges, paired_difference

    by_key = {(r["arm"], r["loss"]): r for r in rows}
    found: dict[str, dict | None] = {}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        def outcomes(row):
            if row["run_id"] not in found:
                found[row["run_id"]] = per_prompt_wins(client, row["run_id"], Path(tmp) / row["run_id"], row["judge"])
            return found[row["run_id"]]

        for loss in dict.fromkeys(r["loss"] for r in rows):
            for a, b in CONTRASTS:
                ra, rb = by_key.get((a, loss)), by_key.get((b, loss))
                wa, wb = (outcomes(ra), outcomes(rb)) if ra and rb else (None, None)
                if not wa or not wb:
                    continue
                group = []
                for judge in [j for j in wa if j in wb]:  # the main judge first
                    ids = sorted(wa[judge].keys() & wb[judge].keys())
                    group.append({"loss": loss, "a": a, "b": b, "judge": judge,
                                  **paired_difference([wa[judge][i] for i in ids], [wb[judge][i] for i in ids])})
                verdict = across_judges([(p["lo"], p["hi"]) for p in group])
                out += [dict(p, across=verdict) for p in group]
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return "-" if lo is None or hi is None else f"[{_f(lo)}, {_f(hi)}]"


def markdown(rows: list[dict], title: str) -> str:
    judges = ", ".join(dict.fromkeys(r["judge"] for r in rows))
    head = ("| arm | loss | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) | pair acc. "
            "| annotator acc. | human labels | test prompts |")
    lines = [f"### {title}", "",
             f"Gold judge: {judges}. GRA counts a tie half; GRA strict counts only a higher score (the paper's "
             "definition).", "", head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['loss']} | {_f(r['gra'])} | {_ci(r, 'gra')} | {_f(r['gra_strict'])} | "
                     f"{_ci(r, 'gra_strict')} | {_f(r['gold_policy'])} | "
                     f"{_f(r['gold_reference'])} | {_f(r['pair_accuracy'])} | {_f(r['annotator_accuracy'])} | "
                     f"{_f(r['human_labels_used'], 0)} | {_f(r['n'], 0)} |")
    return "\n".join(lines) + "\n"


def judges_markdown(rows: list[dict]) -> str:
    """Every arm under every judge its evaluation ran (the main judge first); empty with one judge."""
    if not any(r["judges"] for r in rows):
        return ""
    lines = ["### GRA under every judge", "",
             "| arm | loss | judge | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) |",
             "|" + "---|" * 9]
    for r in rows:
        for judge, m in [(r["judge"], r), *r["judges"].items()]:
            lines.append(f"| {r['arm']} | {r['loss']} | {judge} | {_f(m['gra'])} | {_ci(m, 'gra')} | "
                         f"{_f(m['gra_strict'])} | {_ci(m, 'gra_strict')} | {_f(m['gold_policy'])} | "
                         f"{_f(m['gold_reference'])} |")
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: list[dict]) -> str:
    several = any(p.get("across") for p in pairs)
    lines = ["### Paired GRA differences (same prompts, same start responses; 95% bootstrap over prompts)", "",
             "| loss | contrast | judge | difference | 95% CI | interval excludes 0 | across judges | prompts |",
             "|" + "---|" * 8]
    for p in pairs:
        excludes = "yes" if p["lo"] > 0 or p["hi"] < 0 else "no"
        lines.append(f"| {p['loss']} | {p['a']} - {p['b']} | {p.get('judge', '-')} | {p['diff']:+.3f} | "
                     f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {excludes} | {p.get('across') or '-'} | {p['n']} |")
    if several:
        lines += ["", "across judges: *all judges* = the interval excludes 0 on the same side under every judge; "
                      "*judge-specific* = it excludes 0 under some judges and not under others (the difference may "
                      "come from how one judge scores); *judges disagree* = it excludes 0 on opposite sides; "
                      "*none* = under no judge."]
    return "\n".join(lines) + "\n"


def paired_chart(pairs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({p.get("judge") for p in pairs}) > 1
    labels = [f"{p['a']} - {p['b']} ({p['loss']}" + (f", {p['judge']})" if several else ")") for p in pairs]
    ys = list(range(len(pairs)))[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(pairs) + 1.4))
    ax.errorbar([p["diff"] for p in pairs], ys, fmt="o", capsize=3,
                xerr=[[p["diff"] - p["lo"] for p in pairs], [p["hi"] - p["diff"] for p in pairs]])
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GRA difference (95% paired bootstrap)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    width = 0.8 / max(len(losses), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.6))
    for j, loss in enumerate(losses):
        xs, ys, errs = [], [], [[], []]
        for i, arm in enumerate(arms):
            r = next((r for r in rows if r["arm"] == arm and r["loss"] == loss and r["gra"] is not None), None)
            if r is None:
                continue
            xs.append(i + (j - (len(losses) - 1) / 2) * width)
            ys.append(r["gra"])
            errs[0].append(max(r["gra"] - (r["gra_lo"] if r["gra_lo"] is not None else r["gra"]), 0))
            errs[1].append(max((r["gra_hi"] if r["gra_hi"] is not None else r["gra"]) - r["gra"], 0))
        ax.bar(xs, ys, width=width, yerr=np.array(errs), capsize=3, label=loss)
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("GRA vs SFT start (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(title="loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config) -> int:
    client = _client()
    exp, parent = find_parent(client, cfg.experiment, cfg.parent_run_id)
    rows = collect_rows(client, exp, parent)
    if not rows:
        raise ValueError(f"pipeline run {parent.info.run_id} has no arm runs yet")
    title = f"{cfg.experiment} / {parent.info.run_name} ({parent.info.run_id[:8]})"
    pairs = paired_rows(client, rows)
    by_judge = judges_markdown(rows)
    text = (markdown(rows, title) + ("\n" + by_judge if by_judge else "")
            + ("\n" + paired_markdown(pairs) if pairs else ""))
    print(text, flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    bar_chart(rows, out / "compare.png", title)
    files = [out / "compare.md", out / "compare.png"]
    if pairs:
        paired_chart(pairs, out / "compare_paired.png", title)
        files.append(out / "compare_paired.png")
    if cfg.log:
        for f in files:
            client.log_artifact(parent.info.run_id, str(f))
    print(f"cwpo compare: wrote {', '.join(str(f) for f in files)}", flush=True)
    return 0
