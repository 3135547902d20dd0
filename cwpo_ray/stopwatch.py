"""Where a training stage's fixed time goes: named wall-clock stamps, turned into seconds per item.

The driver and the rank-0 worker record ``time.time()`` at fixed points and log them to the
stage's MLflow run as ``time/<stamp>`` (run-wide) and ``time/<mode>/<stamp>`` (per phase, sft or
po; both phases are one Ray Train run, whose start counts to the first and whose end to the last) metrics; ``fixed_costs`` turns them into seconds per item, logged as
``fixed/<mode>/<item>``. Wall-clock time rather than ``perf_counter`` because the stamps come from
different processes (one clock on one machine; across machines, as far as their clocks agree).
"""

from __future__ import annotations


# key -> (what it is, from stamp, to stamp), in the order they happen. Stamps: driver run_start ..
# ray_ready .. mlflow_started, per phase stage_start (first phase), [worker rank 0: import_start (the worker
# begins importing the recipe's module; first phase) .. saved], fit_done (last phase); then driver
# stages_done, run_end.
RUN_ITEMS = {
    "train_pairs": ("write train_pairs.parquet", "run_start", "pairs_written"),
    "ray_start": ("ray.init, with the MLflow store and Ray Train's imports meanwhile (driver)", "pairs_written",
                  "ray_ready"),
    "mlflow_start": ("MLflow run start + params", "ray_ready", "mlflow_started"),
    "mlflow_end": ("MLflow run end + manifest", "stages_done", "run_end"),
}
STAGE_ITEMS = {
    "train_start": ("Ray Train controller + worker group + process group", "stage_start", "import_start"),
    "recipe_import": ("worker: import the recipe (torch)", "import_start", "loop_entered"),
    "loop_imports": ("worker: train_loop's imports", "loop_entered", "imports_done"),
    "tokenizer": ("tokenizer load", "imports_done", "tokenizer_loaded"),
    "model_load": ("model load", "tokenizer_loaded", "model_loaded"),
    "engine": ("engine + optimizer setup", "model_loaded", "engine_ready"),
    "resume": ("checkpoint lookup", "engine_ready", "resumed"),
    "prefault": ("heap prefault, what the loads did not hide", "resumed", "heap_ready"),
    "reference": ("reference pass (epoch)", "heap_ready", "reference_done"),
    "loop": ("training loop (epoch)", "reference_done", "loop_done"),
    "save": ("final save", "loop_done", "saved"),
    "train_end": ("worker group + controller shutdown", "saved", "fit_done"),
}


def fixed_costs(stamps: dict[str, float], items: dict = STAGE_ITEMS) -> dict[str, float]:
    """Seconds per item of ``items`` whose two stamps are both in ``stamps``."""
    return {key: stamps[b] - stamps[a] for key, (_, a, b) in items.items() if a in stamps and b in stamps}


def label(key: str) -> str:
    return {**RUN_ITEMS, **STAGE_ITEMS}[key][0]
