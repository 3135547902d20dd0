"""fp32 against bf16 annotation with a TRAINED annotator on the built-in benchmark's unlabeled pairs.

What `annotate.precision` defaults to is decided on this: bf16 only where its labels agree with
fp32's on >= 99.5% of the pairs and its confidences are within 0.01 of fp32's (the bar).

1. The pipeline's own stage functions (stages.run_data, stages.run_annotator) with a preset's
   settings (``--preset full``: cwpo_ray/configs/full.yaml, what the pipeline would use; ``quick``
   the README's preset), seed ``--seed``: the split of the built-in benchmark and an annotator
   trained on its labeled pairs. Kept in ``--work``/PRESET-seedS/ and reused by a later run
   (``--retrain`` trains again).
2. In this one process, with ``--threads`` torch threads (the presets' annotate.torch_threads): the
   annotator is loaded once, and the unlabeled pairs are labeled with fp32 and with bf16 in turn,
   ``--repeats`` times each, alternating (fp32, bf16, fp32, bf16, ...), through the very function
   an annotate actor calls (cwpo_ray.annotation.rows.label_rows: batches of annotate.batch_size pairs,
   model batches of annotate.model_batch_size sequences sorted by length). pairs/s is over the
   labeling alone (model loading and the Ray start-up of `cwpo annotate` are left out); the
   median of the repeats is the figure, and the ratio is bf16 / fp32 of the medians.
3. Labels of the first fp32 and the first bf16 repeat compared by id: the share of pairs with the
   same chosen response; max and mean |confidence difference| (calibrated confidence, what the cw
   arm weights with) and the same for confidence_raw (T = 1, what the cw_raw arm weights with).
   The bar is judged on both confidences. Repeats of one precision are checked to give identical
   labels. pairs/s also as the best repeat: on a shared machine the fastest repeat is the one
   least slowed by others.

    .venv/bin/python bench/annotate_precision.py --preset full --repeats 3
    .venv/bin/python bench/annotate_precision.py --preset quick --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(k, v)

BAR_AGREEMENT, BAR_CONF = 0.995, 0.01


def prepare(preset: str, seed: int, work: Path, retrain: bool):
    """(pipeline config, unlabeled table, annotator folder) of the preset and seed; trained once, then reused."""
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import pipeline
    from cwpo_ray.orchestration import stages

    cfg = load_config(pipeline.Config, str(REPO / "cwpo_ray" / "configs" / f"{preset}.yaml"))
    cfg = replace(cfg, seed=seed, seeds=[], experiment="cwpo-annotate-precision")
    out = work / f"{preset}-seed{seed}"
    done = out / "prepared.json"
    if retrain or not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        tables = stages.run_data(cfg, out / "data")
        ann = stages.run_annotator(cfg, tables["labeled"], out, parent_run_id="")
        done.write_text(json.dumps({"unlabeled": tables["unlabeled"], "annotator": ann["annotator"],
                                    "labeled_pairs": tables["n_labeled"], "metrics": ann["metrics"],
                                    "train_seconds": round(time.time() - t0, 1)}, indent=1))
    return cfg, json.loads(done.read_text())


def label_all(annotator, rows: list, batch_size: int, model_batch_size: int):
    """Every row through cwpo_ray.annotation.rows.label_rows in batches of ``batch_size``: (table, seconds)."""
    import pyarrow as pa

    from cwpo_ray.annotation.rows import label_rows

    parts = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        parts.append(label_rows(annotator, "bench", rows[i: i + batch_size], model_batch_size))
    return pa.concat_tables(parts), time.perf_counter() - start


def compare(ref, got) -> dict:
    """Same chosen response by id; |confidence difference| (calibrated and raw)."""
    r, g = ref.to_pydict(), got.to_pydict()
    by_id = {i: k for k, i in enumerate(r["id"])}
    assert len(by_id) == len(g["id"]) == len(set(g["id"])), "ids differ between the runs"
    same, dconf, draw = 0, [], []
    for j, i in enumerate(g["id"]):
        k = by_id[i]
        same += g["chosen"][j] == r["chosen"][k]
        dconf.append(abs(g["confidence"][j] - r["confidence"][k]))
        draw.append(abs(g["confidence_raw"][j] - r["confidence_raw"][k]))
    n = len(by_id)
    return {"pairs": n, "same_label": same / n, "differing": n - same,
            "max_conf_diff": max(dconf), "mean_conf_diff": sum(dconf) / n,
            "conf_diff_over_bar": sum(d > BAR_CONF for d in dconf),
            "max_conf_raw_diff": max(draw), "mean_conf_raw_diff": sum(draw) / n,
            "conf_raw_diff_over_bar": sum(d > BAR_CONF for d in draw)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="full", choices=("full", "quick"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="labelings per precision (alternating)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the preset's annotate.torch_threads)")
    p.add_argument("--work", default=str(REPO / "runs" / "annotate_precision"), help="scratch folder (kept)")
    p.add_argument("--retrain", action="store_true", help="train the annotator again even if one is kept")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")

    cfg, prep = prepare(args.preset, args.seed, work, args.retrain)

    import torch

    from cwpo_ray.annotator import Annotator, load_annotator, resolve_precision
    from cwpo_ray.tables import read_table

    threads = args.threads or cfg.annotate.torch_threads or max(1, round(cfg.annotate.cpus_per_actor))
    torch.set_num_threads(threads)
    fp32 = load_annotator(prep["annotator"], precision="fp32")
    bf16 = Annotator(fp32.model, fp32.tokenizer, fp32.meta, "bf16")  # the same weights
    rows = read_table(prep["unlabeled"]).to_pylist()
    bs, mbs = cfg.annotate.batch_size, cfg.annotate.model_batch_size
    label_all(fp32, rows[:mbs], bs, mbs)  # warm-up (first-call allocations, oneDNN kernel choice)
    label_all(bf16, rows[:mbs], bs, mbs)
    tables, seconds = {}, {"fp32": [], "bf16": []}
    load_before, started = os.getloadavg()[0], time.strftime("%H:%M:%S", time.gmtime())
    for r in range(args.repeats):
        for name, ann in (("fp32", fp32), ("bf16", bf16)):
            table, sec = label_all(ann, rows, bs, mbs)
            assert table.num_rows == len(rows) and table["reason"].null_count == len(rows), "rows quarantined"
            if name in tables:
                assert table["chosen"].equals(tables[name]["chosen"]), f"{name}: repeats labeled differently"
            tables.setdefault(name, table)
            seconds[name].append(sec)
            print(f"{name} repeat {r + 1}: {sec:.2f} s, {len(rows) / sec:.1f} pairs/s", flush=True)
    agree = compare(tables["fp32"], tables["bf16"])
    rate = {k: len(rows) / statistics.median(v) for k, v in seconds.items()}
    meta = fp32.meta
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    print(f"\npreset {args.preset}, seed {args.seed}: annotator {meta.backbone} (pooling {meta.pooling}, max_length "
          f"{meta.max_length}, temperature {meta.temperature:.3f}; held-out accuracy "
          f"{prep['metrics'].get('annotator.heldout_accuracy', float('nan')):.3f}), trained on "
          f"{prep['labeled_pairs']} labeled pairs; {len(rows)} unlabeled pairs")
    print(f"commit {commit}{' (work tree modified)' if dirty else ''}, torch {torch.__version__}, {threads} threads, "
          f"{os.cpu_count()} CPUs: {cpu_name()}; 'auto' resolves here to {resolve_precision('auto', 'cpu')}; "
          f"labeling {started}-{time.strftime('%H:%M:%S', time.gmtime())} UTC, 1-min load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (this process: ~{threads})")
    best = {k: len(rows) / min(v) for k, v in seconds.items()}
    print("| precision | repeats (pairs/s, in run order) | median pairs/s | best pairs/s |")
    print("|---|---|---:|---:|")
    for k in ("fp32", "bf16"):
        print(f"| {k} | {', '.join(f'{len(rows) / s:.1f}' for s in seconds[k])} | {rate[k]:.1f} | {best[k]:.1f} |")
    print(f"bf16 / fp32: {rate['bf16'] / rate['fp32']:.2f}x (medians), {best['bf16'] / best['fp32']:.2f}x (best)")
    ok = {"label": agree["same_label"] >= BAR_AGREEMENT, "confidence": agree["max_conf_diff"] <= BAR_CONF,
          "confidence_raw": agree["max_conf_raw_diff"] <= BAR_CONF}
    print(f"labels: same chosen response on {agree['same_label']:.2%} of {agree['pairs']} pairs "
          f"({agree['differing']} differ)")
    print(f"|confidence difference|: max {agree['max_conf_diff']:.5f}, mean {agree['mean_conf_diff']:.6f}, "
          f"{agree['conf_diff_over_bar']} pairs over {BAR_CONF}")
    print(f"|confidence_raw difference|: max {agree['max_conf_raw_diff']:.5f}, mean {agree['mean_conf_raw_diff']:.6f}, "
          f"{agree['conf_raw_diff_over_bar']} pairs over {BAR_CONF}")
    print(f"bar (>= {BAR_AGREEMENT:.1%} same label, every |dconf| <= {BAR_CONF}): "
          + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in ok.items())
          + f" -> {'PASS' if all(ok.values()) else 'FAIL'}")
    print(json.dumps({"preset": args.preset, "seed": args.seed, "pairs_per_s": rate, "best_pairs_per_s": best,
                      "seconds": seconds, **agree, "pass": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
