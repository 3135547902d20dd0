"""Serve the annotator over HTTP with dynamic batching (Ray Serve), until Ctrl-C.

POST /v1/annotate takes one pair {prompt, response_a, response_b, id?}, a list of pairs, or
{"pairs": [...]}, and answers {"results": [{id, preferred, confidence, reward_a, reward_b,
truncated}]} with the same scores as `cwpo annotate`. GET /v1/health, GET /v1/info (the
annotator's metadata) and GET /openapi.json describe it. Pairs from concurrent requests are
scored together in batches of up to --max-batch-size.

Binds 127.0.0.1 unless --host says otherwise. When the environment variable CWPO_API_TOKEN is
set, every request except GET /v1/health needs the header "Authorization: Bearer <token>".
Joins the Ray cluster at RAY_ADDRESS when set, else starts a local one.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from cwpo_ray.config import option
from cwpo_ray.serving import ServeSettings

EPILOG = """examples:
  cwpo serve --annotator runs/annotator
  cwpo serve --annotator runs/annotator --port 8080 --replicas 2 --max-batch-size 64
  curl -s 127.0.0.1:8000/v1/annotate -H 'content-type: application/json' \\
       -d '{"prompt": "Hi?", "response_a": "Hello!", "response_b": "Go away."}'
the same app without this command:
  serve run cwpo_ray.serving:build_app annotator=runs/annotator
  serve deploy cluster/serve_annotator.yaml
"""


@dataclass
class Config(ServeSettings):
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 exposes it to the network)")
    port: int = option(8000, "HTTP port")
    app_name: str = option("annotator", "Serve application name")
    route_prefix: str = option("/", "URL prefix of the API")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")


def settings_of(cfg: Config) -> ServeSettings:
    """The app's own settings out of the command's config (host/port belong to Serve, not the app)."""
    names = ServeSettings.__dataclass_fields__
    return ServeSettings(**{name: getattr(cfg, name) for name in names})


def start(cfg: Config) -> str:
    """Start Serve on ``host:port`` and deploy the app; returns the base URL. Does not block."""
    from ray import serve

    from cwpo_ray.ray_env import init_ray
    from cwpo_ray.serving import build_application

    init_ray()
    # http_options are cluster-wide and fixed once Serve runs: a second `cwpo serve` on the same
    # cluster keeps the first one's host and port (Serve warns).
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_application(settings_of(cfg)), name=cfg.app_name, route_prefix=cfg.route_prefix)
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}"


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (what Kubernetes and systemd send) both end the command cleanly.

    SIGINT is set explicitly: a process started in the background by a script inherits it ignored.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def run(cfg: Config) -> int:
    import os

    from ray import serve

    _stop_on_signals()
    url = start(cfg)
    print(f"cwpo serve: annotator {cfg.annotator} at {url}/v1/annotate (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        # Also on Ctrl-C. On a shared cluster only our app goes: other apps keep Serve running.
        serve.delete(cfg.app_name)
        if not os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
    return 0
