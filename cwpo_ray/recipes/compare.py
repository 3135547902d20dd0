"""Compare a pipeline's arms x losses from MLflow: GRA with its 95% bootstrap interval, mean
gold reward of the policy and of its SFT start, implicit-reward pair accuracy, the
annotator's accuracy (against the gold judge when the data has one, else against the hidden
human labels) and how many human labels each arm used. Then the contrasts the paper's claim is
about (cw - human, cw - ws, ws - human, cw - human_labeled_only, per loss) as paired GRA
differences: every arm is judged on the same test prompts against the same start responses,
so the per-prompt differences are resampled together (gra.paired_difference), which
separates arms that two overlapping GRA intervals cannot.

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
        rows.append({
            "arm": arm, "loss": tags.get("loss", ""), "run_id": run.info.run_id,
            "gra": m.get("eval/gra"), "gra_lo": m.get("eval/gra_lo"), "gra_hi": m.get("eval/gra_hi"),
            "n": m.get("eval/n"), "gold_policy": m.get("eval/gold_policy"),
            "gold_reference": m.get("eval/gold_reference"), "pair_accuracy": m.get("eval/pair_accuracy"),
            # Only the weak-label arms rest on the annotator's labels.
            "annotator_accuracy": None if arm.startswith("human") or arm == "gold" else annotator_acc,
            "human_labels_used": m.get("human_labels_used"),
        })
    order = {a: i for i, a in enumerate(ARM_ORDER)}
    return sorted(rows, key=lambda r: (r["loss"], order.get(r["arm"], len(order)), r["arm"]))


def per_prompt_wins(client, run_id: str, dst: Path) -> dict | None:
    """prompt id -> 1 / 0.5 / 0 (the arm's response scored above / equal to / below the start's),
    from the responses.parquet the pipeline logs to each arm's run; None when it is not there."""
    from mlflow.exceptions import MlflowException

    from cwpo_ray.gra import wins
    from cwpo_ray.tables import read_table

    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, "responses.parquet", str(dst))
    except (MlflowException, OSError):
        return None
    rows = read_table(path).to_pylist()
    outcome = wins([r["policy_score"] for r in rows], [r["reference_score"] for r in rows])
    return dict(zip((r["id"] for r in rows), outcome.tolist()))


def paired_rows(client, rows: list[dict]) -> list[dict]:
    """The CONTRASTS present in ``rows``, per loss, as paired GRA differences on shared prompts."""
    from cwpo_ray.gra import paired_difference

    by_key = {(r["arm"], r["loss"]): r for r in rows}
    found: dict[str, dict | None] = {}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        def outcomes(row):
            if row["run_id"] not in found:
                found[row["run_id"]] = per_prompt_wins(client, row["run_id"], Path(tmp) / row["run_id"])
            return found[row["run_id"]]

        for loss in dict.fromkeys(r["loss"] for r in rows):
            for a, b in CONTRASTS:
                ra, rb = by_key.get((a, loss)), by_key.get((b, loss))
                wa, wb = (outcomes(ra), outcomes(rb)) if ra and rb else (None, None)
                if not wa or not wb:
                    continue
                ids = sorted(wa.keys() & wb.keys())
                out.append({"loss": loss, "a": a, "b": b,
                            **paired_difference([wa[i] for i in ids], [wb[i] for i in ids])})
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(rows: list[dict], title: str) -> str:
    head = ("| arm | loss | GRA | 95% CI | gold (policy) | gold (SFT start) | pair acc. | annotator acc. "
            "| human labels | test prompts |")
    lines = [f"### {title}", "", head, "|" + "---|" * 10]
    for r in rows:
        ci = f"[{_f(r['gra_lo'])}, {_f(r['gra_hi'])}]" if r["gra_lo"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['loss']} | {_f(r['gra'])} | {ci} | {_f(r['gold_policy'])} | "
                     f"{_f(r['gold_reference'])} | {_f(r['pair_accuracy'])} | {_f(r['annotator_accuracy'])} | "
                     f"{_f(r['human_labels_used'], 0)} | {_f(r['n'], 0)} |")
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: list[dict]) -> str:
    lines = ["### Paired GRA differences (same prompts, same start responses; 95% bootstrap over prompts)", "",
             "| loss | contrast | difference | 95% CI | interval excludes 0 | prompts |", "|" + "---|" * 6]
    for p in pairs:
        excludes = "yes" if p["lo"] > 0 or p["hi"] < 0 else "no"
        lines.append(f"| {p['loss']} | {p['a']} - {p['b']} | {p['diff']:+.3f} | [{p['lo']:+.3f}, {p['hi']:+.3f}] | "
                     f"{excludes} | {p['n']} |")
    return "\n".join(lines) + "\n"


def paired_chart(pairs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['a']} - {p['b']} ({p['loss']})" for p in pairs]
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
    text = markdown(rows, title) + ("\n" + paired_markdown(pairs) if pairs else "")
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
