"""Shared fixtures: one real local Ray cluster on loopback, one real MLflow server, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default, and a fit waits for the poll that
# sees the end: ~2 s of each of the suite's ~10 fits. Measured here: an empty fit 16.4 s -> 14.9 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parent.parent


def bench_module(name: str):
    """bench/NAME.py as a module: bench/ is scripts, not a package, and the tests share their code."""
    return script_module(f"bench/{name}.py")


def script_module(path: str):
    """The script at PATH (relative to the repo) as a module, to test or share its code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    from cwpo_ray.ports import free_ports

    return free_ports(1)[0]


def pids_running(*fragments: str) -> set[int]:
    """This test process's descendants whose command line contains every fragment (Ray names actors
    there, e.g. "ray::MapWorker(...)"). Descendants only: the Ray node this process started is its
    child, while another test process on the machine (pytest-xdist) runs actors of the same names."""
    import psutil

    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if all(f in cmdline for f in fragments):
            found.add(proc.pid)
    return found


def wait_for_mlflow(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Until the server answers /health; patient: on a loaded 2-core machine it has taken over 90 s."""
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=5)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster, started once, bound to 127.0.0.1, as a `cwpo` command starts one
    (``init_ray``: so Ray Train runs here as it does for a user's local command)."""
    from cwpo_ray.ray_env import init_ray

    ray = init_ray(num_cpus=2, env_vars={"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                                         "PYTHONPATH": str(REPO) + os.pathsep + str(Path(__file__).parent)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1; every command in the tests logs to it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_mlflow(uri, proc, root / "server.log")
    except RuntimeError:
        proc.kill()
        raise
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_decoder

    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
