"""`cwpo preflight`: the cluster checked for a pipeline config before any stage runs.

Fast: the checks that need no cluster, on real sockets, files and configs.
Slow: a real 2-node cluster on 127.0.0.1 (cluster/local.sh, as tests/test_cluster.py starts it) and
conftest's real MLflow server; `cwpo preflight` runs as a user runs it, a driver process joining the
cluster, and passes with a good config, fails with the right fix for each broken one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cwpo_ray import cli
from cwpo_ray.config import load_config
from cwpo_ray.cluster_checks import node, plan
from cwpo_ray.recipes import preflight

REPO = Path(__file__).resolve().parent.parent
LOCAL_SH = str(REPO / "cluster" / "local.sh")


# ----------------------------------------------------------------------------- no cluster

def test_preflight_reads_the_pipeline_config_and_its_overrides(monkeypatch):
    """The same file and key=value overrides as `cwpo pipeline`; the GPU preset asks for GPUs in four stages,
    the quick preset for none, and preflight=false is a pipeline setting (on by default)."""
    from cwpo_ray import config

    monkeypatch.setattr(config, "check_paths", lambda cfg, prefix="": None)  # /mnt/shared does not exist here
    gpu = load_config(preflight.Config, str(REPO / "jobs" / "configs" / "hh_pipeline_gpu.yaml"), {},
                      ["annotator.storage_path=s3://bucket/ckpt", "timeout_s=5"])
    assert gpu.preflight and gpu.timeout_s == 5
    assert [(s, n) for s, n, _, _ in plan.gpu_requests(gpu)] == [
        ("annotator", 4), ("annotate", 1.0), ("policy", 8), ("evaluate", 1.0)]
    assert plan.written_paths(gpu, None)["annotator.storage_path"] == "s3://bucket/ckpt"
    assert ("policy.model", "model", "Qwen/Qwen2.5-1.5B", None) in plan.read_inputs(gpu)
    quick = load_config(preflight.Config, str(REPO / "cwpo_ray" / "configs" / "quick.yaml"), {}, ["preflight=false"])
    assert not quick.preflight and plan.gpu_requests(quick) == []
    rows = preflight.gpu_resource_rows(gpu, {"CPU": 2.0}, [0.0])
    assert [r.status for r in rows] == ["FAIL"] * 4 and rows[2].fix.endswith("policy.use_gpu=false")


def test_the_disk_check_counts_models_as_the_stages_write_them():
    """The quick preset (one seed, two arms, one DPO run each, no SFT) from a GGUF policy: each arm saves an
    fp32 policy, the annotator is saved once, and the start stage's dequantized folder is counted once, by
    the estimate the pipeline checks that stage by (disk_space.start_model_bytes); one training run's
    checkpoints at their peak, policy and annotator, go under out too (no storage_path)."""
    from cwpo_ray import disk_space
    from cwpo_ray.fingerprints import files_of
    from cwpo_ray.orchestration.stages import resolve_source

    quick = load_config(preflight.Config, str(REPO / "cwpo_ray" / "configs" / "quick.yaml"), {}, [])
    policy = disk_space.model_bytes(quick.policy.model, quick.policy.gguf_file)[0]
    start = disk_space.start_model_bytes(quick.policy.model, quick.policy.gguf_file)
    annotator = disk_space.model_bytes(quick.annotator.model, quick.annotator.gguf_file)[0]
    tables = 4 * sum(size for _, size, _ in files_of(resolve_source("builtin").partition(":")[2]))
    assert start == policy > 0 and len(quick.arms) == 2 and quick.seed_list() == [0]
    (need, what), = [v for k, v in plan.disk_needs(quick).items() if k.endswith(quick.out)]
    checkpoints = disk_space.checkpoint_bytes(policy) + disk_space.checkpoint_bytes(annotator)  # both under out
    assert need == 2 * policy + start + annotator + tables + checkpoints, what


def test_a_closed_port_and_a_local_store_fail_the_mlflow_check():
    from conftest import free_port

    row = node.check_tracking("n", f"http://127.0.0.1:{free_port()}", nodes=1)
    assert row.status == "FAIL" and "MLFLOW_TRACKING_URI" in row.fix
    assert node.check_tracking("n", "sqlite:////tmp/x/mlflow.db", nodes=2).status == "FAIL"
    assert node.check_tracking("n", "sqlite:////tmp/x/mlflow.db", nodes=1).status == "ok"


def test_storage_and_disk_checks_on_real_files(tmp_path):
    token = tmp_path / ".cwpo-preflight-x"
    token.write_text("abc")
    assert node.check_storage("n", {str(token): ("abc", ["out"])})[0].status == "ok"
    assert node.check_storage("n", {str(token): ("other", ["out"])})[0].status == "FAIL"
    missing = node.check_storage("n", {str(tmp_path / "gone" / "t"): ("abc", ["out"])})[0]
    assert missing.status == "FAIL" and "NFS" in missing.fix
    # A folder that does not exist yet is measured at its nearest existing parent.
    (ok,) = node.check_disk("n", {str(tmp_path / "not" / "yet"): (1, "x")})
    (full,) = node.check_disk("n", {str(tmp_path): (10**18, "x")})
    assert ok.status == "ok" and full.status == "FAIL" and "larger disk" in full.fix


def test_preflight_is_a_subcommand_and_a_job():
    assert "preflight" in cli.RECIPES
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "run.py"), "preflight", "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and "--timeout-s" in out.stdout and "--out" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- a real 2-node cluster

@pytest.fixture(scope="module")
def two_nodes():
    """`cluster/local.sh up 1` (a head and a worker node on 127.0.0.1), down at the end of the module; the
    environment of a driver that joins it (its GCS address and token)."""
    state_dir = tempfile.mkdtemp(prefix="cwpo-pf-", dir="/tmp")  # short: Ray's socket paths are limited
    env = dict(os.environ, CWPO_LOCAL_CLUSTER_DIR=state_dir, RAY=str(Path(sys.executable).parent / "ray"))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    try:
        up = subprocess.run(["bash", LOCAL_SH, "up", "1"], env=env, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, f"cluster/local.sh up failed:\n{(up.stdout + up.stderr)[-3000:]}"
        for line in (Path(state_dir) / "env").read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
        yield dict(env, RAY_ADDRESS=env["CWPO_RAY_GCS_ADDRESS"])  # a driver joins by the GCS address
    finally:
        subprocess.run(["bash", LOCAL_SH, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def good_config(tmp_path_factory, tiny_encoder, tiny_decoder):
    """The GPU preset with its GPU keys off and tiny models (tests/test_pipeline.py's tiny_preset), two arms
    so that the annotator's model is read too."""
    from test_pipeline import synthetic_benchmark, tiny_preset

    root = tmp_path_factory.mktemp("preflight")
    preset = tiny_preset(root, synthetic_benchmark(root / "bench", n_train=16, n_test=4), tiny_encoder, tiny_decoder)
    preset.update(arms=["human_labeled_only", "cw"])
    preset["evaluate"]["extra_judges"] = []
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _preflight(env: dict, config: Path, *overrides: str, tracking_uri: str, prefix: tuple = (),
               command: str = "preflight") -> tuple[int, str, float]:
    t0 = time.monotonic()
    out = subprocess.run([*prefix, sys.executable, "-m", "cwpo_ray", command, "--config", str(config), *overrides],
                         env=dict(env, MLFLOW_TRACKING_URI=tracking_uri), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


def _rows(text: str, check: str, status: str) -> list[str]:
    """The table's lines of one check with one status (columns: check, node, status + result, fix)."""
    return [line for line in text.splitlines() if line.split()[:1] == [check] and f" {status} " in line]


def _nodes(lines: list[str]) -> set[str]:
    return {m.group(1) for line in lines if (m := re.search(r"127\.0\.0\.1 ([0-9a-f]{6})", line))}


@pytest.mark.slow
def test_a_good_config_passes_on_two_nodes(two_nodes, mlflow_server, good_config):
    code, text, seconds = _preflight(two_nodes, good_config, tracking_uri=mlflow_server)
    assert code == 0, text[-4000:]
    for check in ("imports", "storage", "mlflow", "inputs", "disk"):
        assert len(_nodes(_rows(text, check, "ok"))) == 2, (check, text[-4000:])
    (summary,) = [line for line in text.splitlines() if line.startswith("preflight:")]
    assert " 0 failed," in summary and "; 2 node(s)" in summary, summary
    print(f"\n{summary}; the driver process end to end (Python start, joining the cluster): {seconds:.1f} s")
    assert not list(Path(yaml.safe_load(good_config.read_text())["out"]).glob(".cwpo-preflight-*"))  # cleaned up


@pytest.mark.slow
def test_the_job_entry_point_runs_it_on_the_cluster(two_nodes, mlflow_server, good_config, tmp_path):
    """`ray job submit ... python jobs/run.py preflight --config FILE`: the driver on the head node, in the
    job's copy of the working dir; the nodes run the same code (by its hash) from their own copies."""
    from test_cluster import _runtime_env, _submit

    t0 = time.monotonic()
    log = _submit(dict(two_nodes, RAY_ADDRESS=two_nodes["CWPO_RAY_DASHBOARD"]), _runtime_env(tmp_path, mlflow_server),
                  ["jobs/run.py", "preflight", "--config", str(good_config)], timeout=300)
    (summary,) = [line for line in log.splitlines() if line.startswith("preflight:")]
    assert " 0 failed," in summary and "; 2 node(s)" in summary, log[-4000:]
    print(f"\n{summary} (as a Ray job; `ray job submit` end to end: {time.monotonic() - t0:.1f} s)")


def _namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _namespace_works(), reason="needs `unshare -Urm` (user + mount namespaces) to give the "
                                                   "driver a disk of its own")
def test_a_folder_only_the_driver_sees_fails_storage(two_nodes, mlflow_server, good_config, tmp_path):
    """`out` on a disk only the driver's machine has, as a node-local /tmp is on a real cluster.

    Both local nodes run on this machine and share its filesystem, so the driver is given a disk of its
    own: it runs in its own mount namespace (`unshare -Urm`, no root needed where user namespaces are
    allowed) with a fresh tmpfs mounted over an empty folder. The driver writes its token there; every
    node's task looks at the same path and finds the empty folder under it -- exactly what a node sees
    when `out` is another machine's local disk. Nothing else differs: same cluster, same processes, same
    path string.
    """
    local = tmp_path / "driver-disk"
    local.mkdir()
    mount = ("unshare", "-Urm", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(local))
    code, text, _ = _preflight(two_nodes, good_config, f"out={local / 'run'}", tracking_uri=mlflow_server,
                               prefix=mount)
    assert code == 1, text[-4000:]
    failed = [line for line in _rows(text, "storage", "FAIL") if "out:" in line]
    assert _nodes(failed) == _nodes(_rows(text, "imports", "ok")) and len(_nodes(failed)) == 2, text[-4000:]
    assert all("storage every node mounts at the same path" in line for line in failed)
    assert not list(local.iterdir())  # the token never reached this machine's view of the folder


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_on_every_node(two_nodes, good_config):
    from conftest import free_port

    code, text, _ = _preflight(two_nodes, good_config, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert code == 1
    failed = _rows(text, "mlflow", "FAIL")
    assert len(_nodes(failed)) == 2 and all("set MLFLOW_TRACKING_URI" in line for line in failed), text[-4000:]


@pytest.mark.slow
def test_a_gpu_request_on_a_cpu_cluster_fails(two_nodes, mlflow_server, good_config):
    code, text, _ = _preflight(two_nodes, good_config, "policy.use_gpu=true", "evaluate.num_gpus=1",
                               tracking_uri=mlflow_server)
    assert code == 1
    failed = _rows(text, "gpu", "FAIL")
    assert len(failed) == 2, text[-4000:]
    assert "policy asks for 1 GPU(s)" in failed[0] and "the cluster has 0" in failed[0]
    assert failed[0].rstrip().endswith("policy.use_gpu=false") and failed[1].rstrip().endswith("evaluate.num_gpus=0")


@pytest.mark.slow
def test_a_missing_input_fails_and_stops_the_pipeline_before_any_stage(two_nodes, mlflow_server, good_config,
                                                                        tmp_path):
    missing = tmp_path / "nowhere" / "test.parquet"
    code, text, _ = _preflight(two_nodes, good_config, f"test={missing}", tracking_uri=mlflow_server)
    assert code == 1
    failed = _rows(text, "inputs", "FAIL")
    assert len(_nodes(failed)) == 2 and all(f"test: {missing} not found" in line for line in failed), text[-4000:]
    assert all("a path every node has" in line for line in failed)

    # `cwpo pipeline` runs the same checks first and stops with them, before its first stage.
    out = tmp_path / "run"
    code, text, _ = _preflight(two_nodes, good_config, f"test={missing}", f"out={out}", tracking_uri=mlflow_server,
                               command="pipeline")
    assert code == 2 and "preflight: " in text and f"test: {missing} not found" in text, text[-4000:]
    assert not (out / "data").exists() and not (out / "mlflow_runs.json").exists()


@pytest.mark.slow
def test_the_pipeline_hook_passes_on_a_local_node(ray_cluster, mlflow_server, good_config, capsys):
    """The pipeline's own call, in this process, on the local node `cwpo pipeline` starts (conftest's ray_cluster,
    as the pipeline tests run it): it passes quietly, one line on the terminal, and leaves no token behind."""
    from cwpo_ray.recipes import pipeline

    cfg = load_config(pipeline.Config, str(good_config))
    rows = preflight.require(cfg)
    assert rows and not [r for r in rows if r.status == "FAIL"] and {r.node for r in rows} >= {"driver"}
    assert len({r.node for r in rows} - {"driver", "cluster"}) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("preflight:")]
    assert "checks passed" in line, line
    assert not list(Path(cfg.out).glob(".cwpo-preflight-*"))
