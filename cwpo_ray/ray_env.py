"""Connecting to Ray: an existing cluster when there is one, else a local one on loopback."""

from __future__ import annotations

import os

# Without this Ray binds the machine's external interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True):
    """Join ``RAY_ADDRESS`` (set by `ray job submit` and by `cluster/local.sh`) or start Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime_env already applies; repeating one of its
        # env_vars here makes Ray refuse the driver, so join as is.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        # No dashboard unless CWPO_RAY_DASHBOARD=1: its ~10 processes take 1-2.5 s of each local start
        # on 2 cores (bench/RESULTS.md, fixed cost per stage). Without its state API, Ray Train's
        # placement-group cleaner warns every second that it cannot query the controller (only
        # meaningful on a long-lived cluster, where the dashboard runs): the hook silences that.
        dashboard = os.environ.get("CWPO_RAY_DASHBOARD", "0") == "1"
        if not dashboard:
            runtime_env["worker_process_setup_hook"] = "cwpo_ray.ray_env.quiet_placement_group_cleaner"
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 num_cpus=num_cpus, log_to_driver=log_to_driver, runtime_env=runtime_env)
    return ray


def quiet_placement_group_cleaner() -> None:
    """Ray worker setup hook: Ray Train's placement-group cleaner logs errors only (see init_ray)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
