"""Connecting to Ray: an existing cluster when there is one, else a local one on loopback."""

from __future__ import annotations

import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

# Without this Ray binds the machine's external interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


_started_local_node = False  # by init_ray, in this process


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True, meanwhile: Callable[[], object] | None = None,
             env_vars: dict[str, str] | None = None):
    """Join ``RAY_ADDRESS`` (set by `ray job submit` and by `cluster/local.sh`) or start Ray on 127.0.0.1.

    ``env_vars``: more environment for every worker of a local node started here (the tests' PYTHONPATH);
    a cluster's job sets its own.

    ``meanwhile``: what the caller does next that needs no Ray (imports, opening the MLflow store),
    run on a thread while Ray starts: a local start is mostly waiting on its processes coming up,
    with the CPU partly idle (bench/RESULTS.md, fixed cost per stage). Its exception is raised here.
    """
    import ray

    if ray.is_initialized():
        if meanwhile is not None:
            meanwhile()
        return ray
    with ThreadPoolExecutor(1, thread_name_prefix="cwpo-meanwhile") as pool:
        pending = pool.submit(meanwhile) if meanwhile is not None else None
        _init(ray, num_cpus, log_to_driver, env_vars or {})
        _stop_on_sigterm()
        if pending is not None:
            pending.result()
    return ray


def _stop_on_sigterm() -> None:
    """A SIGTERM (`ray job stop`, a scheduler's kill) raises SystemExit in the driver's main thread, so its
    ``finally`` blocks run: the OUT lock, the metrics relay's last drain, the MLflow run's end.

    ray.init sets such a handler (sys.exit) and then its core worker puts absl's failure-signal handler in
    front of it, which treats SIGTERM as a crash: a stack dump in the log, then the handler before it,
    and in one suite run the driver ended after the dump without Python's exit running (no message, no
    ``finally``). Setting Python's handler again takes absl off SIGTERM only (it keeps the crash signals)."""
    import signal
    import sys
    import threading

    if threading.current_thread() is threading.main_thread():  # Python allows signal handlers only there
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))


def _init(ray, num_cpus, log_to_driver, env_vars: dict[str, str]) -> None:
    global _started_local_node
    runtime_env = {"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false", **env_vars}}
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime_env already applies; repeating one of its
        # env_vars here makes Ray refuse the driver, so join as is.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        _started_local_node = False
        return
    # No dashboard unless CWPO_RAY_DASHBOARD=1: its processes lengthen every local start, which
    # nobody looks at (bench/notes/history.md, fixed cost per stage). Without its state API, Ray
    # Train's placement-group cleaner warns every second that it cannot query the controller (only
    # meaningful on a long-lived cluster, where the dashboard runs): the hook silences that.
    dashboard = os.environ.get("CWPO_RAY_DASHBOARD", "0") == "1"
    if not dashboard:
        runtime_env["worker_process_setup_hook"] = "cwpo_ray.ray_env.quiet_local_cluster_loggers"
    # Ray starts one idle worker per CPU for the first driver, with no runtime env: every worker
    # of ours has one (the env_vars above), so none is ever used, and they import Ray on both
    # cores just as Ray Train's actors start. The raylet reads this from its environment.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1",
             num_cpus=num_cpus, log_to_driver=log_to_driver, runtime_env=runtime_env)
    _started_local_node = True


def before_train_on_local_node() -> None:
    """Before a Ray Train fit on a local node that init_ray started (nothing otherwise): two things
    Ray Train does for real clusters, which cost a one-stage command here seconds of its fixed time.

    - Each worker group gets a preemption watcher, one more actor process polling for nodes being
      drained (spot instances); a local node is not drained. Off through Ray Train's own switch
      (the driver's value reaches the controller), unless the environment says otherwise.
    - The controller waits (up to 5 s) on Ray Data's autoscaling-coordinator actor, which the
      cluster's first fit creates: made here without waiting, its process starts while the
      controller's does. Ray-internal API (no public one), so skipped if it moves.
    """
    if not _started_local_node:
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


# Loggers of Ray Train's controller that only speak to a long-lived or autoscaling cluster. On a
# local node started here: the placement-group cleaner polls the dashboard's state API (not
# started) and warns every second; the autoscaling-coordinator client asks for resources no
# autoscaler will add, and when the coordinator's actor takes over 5 s to start (a busy 2-core
# machine) it logs a full traceback per fit. Errors still come through.
LOCAL_CLUSTER_QUIET_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


def quiet_local_cluster_loggers() -> None:
    """Ray worker setup hook for a local cluster: LOCAL_CLUSTER_QUIET_LOGGERS log errors only (see init_ray)."""
    import logging

    for name in LOCAL_CLUSTER_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, IPv4-mapped included (gRPC lists its 127.0.0.1 sockets as ::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:  # a host name
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def keep_serve_replica_grpc_on_loopback() -> None:
    """In a Serve replica whose node is on loopback (a local `cwpo serve`): its inter-deployment gRPC
    server, which Serve starts after the deployment's constructor, listens on the node IP only.

    Serve binds that server to "[::]:0", every interface, with no setting to change it (Ray 2.60,
    serve/_private/replica.py), while whatever calls it dials the node IP; on a local run nothing
    else may reach it. The replica module's own binding function is wrapped: a Ray-internal name,
    so nothing is done if it moves (tests/test_listening_sockets.py then fails).
    """
    import ray

    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        return
    try:
        from ray.serve._private import replica
        bind = replica.add_port_to_grpc_server
    except (ImportError, AttributeError):
        return
    if getattr(bind, "on_loopback", False):  # a second replica in this process
        return
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def bind_on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    bind_on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback
