"""Check the cluster for a pipeline config in seconds, before hours of work.

Reads the same FILE and key=value overrides as `cwpo pipeline`; a Ray task pinned to each alive node
(and a GPU task on each GPU node) checks there:

  imports  torch, transformers, ray, deepspeed, mlflow, pyarrow at the driver's versions; cwpo_ray's code
  storage  every folder the config writes (out, storage_path, the reference cache, a local MLflow
           artifact location) is the same storage: the driver's random token read back on each node
           (s3:// / gs:// URIs: not checked)
  mlflow   the tracking server answers from each node; a SQLite / file store fails on several nodes
  gpu      the GPUs asked for are Ray resources; torch sees CUDA, fits the driver, has bf16 if asked
  inputs   models, judges and tables the stages read resolve on every node (the data source on the
           driver, which reads it); hub ids "not checked" unless HF_HUB_OFFLINE is set
  disk     free space where models, checkpoints and tables go, against a rough estimate

Prints one table (check, node, result, fix); exits 1 if a check failed. `cwpo pipeline` runs the same
checks first and stops before any stage on a failure (`preflight=false` skips them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cwpo_ray.cluster_checks.node import gpu_checks, installed_version, node_checks
from cwpo_ray.cluster_checks.plan import (MODULES, Plan, Row, artifact_location, disk_needs, gpu_precisions,
                                          gpu_requests, is_uri, read_inputs, tracking_uri, written_paths)
from cwpo_ray.config import ConfigError, option
from cwpo_ray.orchestration import stages
from cwpo_ray.recipes import pipeline

EPILOG = """examples:
  cwpo preflight --config cwpo_ray/configs/quick.yaml
  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
      python jobs/run.py preflight --config jobs/configs/hh_pipeline_gpu.yaml
"""

@dataclass
class Config(pipeline.Config):
    """The pipeline's config (same file, flags and overrides) and how long to wait for the nodes."""

    timeout_s: float = option(60.0, "seconds to wait for the nodes' answers (a node that does not answer fails)")


# ----------------------------------------------------------------------------- the driver and Ray

def gpu_resource_rows(cfg: pipeline.Config, total: dict, per_node: list[float]) -> list[Row]:
    rows, have = [], total.get("GPU", 0.0)
    for stage, need, task, key in gpu_requests(cfg):
        ok = have >= need and max(per_node, default=0.0) >= task
        rows.append(Row("gpu", "cluster", "ok" if ok else "FAIL", f"{stage} asks for {need:g} GPU(s) ({task:g} in "
                        f"one task); the cluster has {have:g}", "" if ok else f"add GPU nodes, or use CPUs: {key}"))
    return rows


def driver_rows(cfg: pipeline.Config, plan: Plan, artifacts: str | None) -> list[Row]:
    """On the driver: the data source (the data stage reads it here); a token in every folder written."""
    from cwpo_ray.source_reading import locate, parse_source

    rows = []
    try:
        kind, where = locate(parse_source(stages.resolve_source(cfg.source))[1])
        rows.append(Row("inputs", "driver", "ok" if kind == "local" else "skip", f"source: {where}"
                        + ("" if kind == "local" else ": hub dataset, not checked")))
    except ValueError as e:
        rows.append(Row("inputs", "driver", "FAIL", str(e), "give source=KIND:PATH that exists on the driver"))
    probes: dict[str, str] = {}  # folder -> its probe file
    for key, path in written_paths(cfg, artifacts).items():
        if is_uri(path):  # reaching a bucket may hang for long without credentials: not worth the seconds
            rows.append(Row("storage", "driver", "skip", f"{key}: {path}: a URI, not checked (every node needs "
                            "credentials for it: an instance role / service account)"))
        elif path in probes:
            plan.tokens[probes[path]][1].append(key)
        else:
            try:  # folders the pipeline creates anyway
                os.makedirs(path, exist_ok=True)
                probe, token = os.path.join(path, f".cwpo-preflight-{secrets.token_hex(8)}"), secrets.token_hex(16)
                Path(probe).write_text(token)
                plan.tokens[probe], probes[path] = (token, [key]), probe
            except OSError as e:
                rows.append(Row("storage", "driver", "FAIL", f"{key}: cannot write {path}: {e.strerror or e}",
                                f"point {key} at a folder this user can write"))
    return rows


def check(cfg: pipeline.Config, timeout_s: float = 60.0) -> list[Row]:
    """Every check, on the cluster Ray joins (or the local one it starts): the table's rows."""
    from cwpo_ray import ray_env
    from cwpo_ray.fingerprints import code_version

    ray = ray_env.init_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    versions = {m: installed_version(m) for m in MODULES if importlib.util.find_spec(m)}
    versions["cwpo_ray"] = code_version.__wrapped__()  # uncached: the code on disk now, as the nodes read it
    plan = Plan(versions, tracking_uri(), len(nodes), read_inputs(cfg), disk_needs(cfg), gpu_precisions(cfg))
    rows: list[Row] = []
    try:
        rows += driver_rows(cfg, plan, artifact_location(plan.tracking_uri, cfg.experiment))
        # No CPU held (a busy node answers too), a sliver of a GPU; max_calls=1: the worker exits afterwards,
        # so neither its imports nor its CUDA context stay in a process the stages may reuse.
        on_node = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(node_checks)
        on_gpu = ray.remote(num_cpus=0, num_gpus=0.01, max_retries=0, max_calls=1)(gpu_checks)
        refs = {}
        for n in nodes:
            label = f"{n['NodeManagerAddress']} {n['NodeID'][:6]}" + (
                " head" if "node:__internal_head__" in n["Resources"] else "")
            pin = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            refs[on_node.options(scheduling_strategy=pin).remote(label, plan)] = label
            if n["Resources"].get("GPU", 0) > 0:
                refs[on_gpu.options(scheduling_strategy=pin).remote(label, plan)] = label
        rows += gpu_resource_rows(cfg, ray.cluster_resources(), [n["Resources"].get("GPU", 0.0) for n in nodes])
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in done:
            try:
                rows += ray.get(ref)
            except Exception as e:  # noqa: BLE001 - e.g. cwpo_ray is not importable there
                rows.append(Row("imports", refs[ref], "FAIL", f"the check task failed: {str(e).splitlines()[-1][:300]}",
                                "install the project on every node (pip install -e .), or submit with --working-dir ."))
        for ref in late:
            ray.cancel(ref, force=True)
            rows.append(Row("node", refs[ref], "FAIL", f"no answer in {timeout_s:g} s", "the node is busy, or its "
                            "workers cannot start (the runtime env's setup: see the node's Ray logs)"))
    finally:
        for probe in plan.tokens:
            Path(probe).unlink(missing_ok=True)
    return rows


def table(rows: list[Row]) -> str:
    cells = [("check", "node", "result", "fix")] + [(r.check, r.node, f"{r.status:4} {r.result}", r.fix) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3]).rstrip() for c in cells)


class PreflightFailed(ConfigError):
    """Failed checks: the pipeline stops before any stage (the CLI prints them, exit 2)."""


def require(cfg: pipeline.Config, timeout_s: float = 60.0) -> list[Row]:
    """The pipeline's hook: the checks; a line on the terminal, or PreflightFailed with the failed rows."""
    from cwpo_ray import console

    start = time.monotonic()
    rows = check(cfg, timeout_s)
    failed = [r for r in rows if r.status == "FAIL"]
    if failed:
        raise PreflightFailed(f"preflight: {len(failed)} of {len(rows)} checks failed (fix them, or skip the checks "
                              f"with preflight=false):\n{table(failed)}")
    for r in rows:
        if r.status == "warn":
            console.say(f"preflight warning: {r.node}: {r.result}")
    skipped = sum(r.status == "skip" for r in rows)
    console.say(f"preflight: {len(rows) - skipped} checks passed, {skipped} not checked, in "
                f"{time.monotonic() - start:.1f} s (`cwpo preflight` prints them)")
    return rows


def run(cfg: Config) -> int:
    from cwpo_ray import ray_env

    start = time.monotonic()
    ray_env.init_ray(log_to_driver=False)  # the nodes' import chatter would interleave with the table
    rows = check(cfg, cfg.timeout_s)
    print(table(rows))
    count = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "warn", "skip")}
    nodes = len({r.node for r in rows} - {"driver", "cluster"})
    print(f"preflight: {count['ok']} ok, {count['FAIL']} failed, {count['warn']} warnings, {count['skip']} not "
          f"checked; {nodes} node(s), {time.monotonic() - start:.1f} s", flush=True)
    return 1 if count["FAIL"] else 0
