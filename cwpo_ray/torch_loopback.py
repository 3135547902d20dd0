"""Ray Train's torch process group kept on loopback when the run's Ray nodes are on loopback.

Ray Train's TorchConfig hands the rendezvous to torch (``env://`` with MASTER_ADDR = the node IP),
and two of torch's servers then listen beyond it, unauthenticated:

- rank 0's TCPStore server binds every interface ("::", else 0.0.0.0) whatever MASTER_ADDR says;
  torch's only way to choose the address is ``master_listen_fd``, a socket bound beforehand;
- gloo (and NCCL's bootstrap) bind the address the host name resolves to, or the first
  non-loopback interface: a laptop's LAN address. Their interface is chosen by
  GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.

On a local run (init_ray's node, or cluster/local.sh's nodes, all on 127.0.0.1) nothing needs either
beyond loopback, so ``LoopbackTorchConfig`` makes the process group itself: the store on a socket
bound to the node IP, gloo and NCCL on the loopback interface. On any other cluster it is
Ray's TorchConfig, unchanged.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as td
from ray.train.torch import TorchConfig

from cwpo_ray.ray_env import is_loopback

# Ray's torch backend, through TorchConfig's public property (the class itself is Ray-private).
RAY_TORCH_BACKEND = TorchConfig().backend_cls

_store_listener: socket.socket | None = None  # worker 0's, between on_start's two steps


def loopback_interface() -> str:
    """The loopback interface's name (GLOO_SOCKET_IFNAME takes a name, not an address)."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), "lo")


def node_ip_on_loopback() -> str | None:
    """This worker's node IP when it is loopback, else None."""
    ip = ray.util.get_node_ip_address()
    return ip if is_loopback(ip) else None


def listen_for_store(host: str) -> int:
    """On worker 0: a socket bound to ``host`` on a free port, listening, kept for rank 0's store
    (bound now, not probed and closed, so nothing else takes the port meanwhile); its port."""
    global _store_listener
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _store_listener = socket.socket(family, socket.SOCK_STREAM)
    _store_listener.bind((host, 0))
    _store_listener.listen()
    return _store_listener.getsockname()[1]


def start_process_group(backend: str, world_rank: int, world_size: int, host: str, port: int,
                        timeout_s: int) -> None:
    """On every worker: the default process group, its store served by rank 0 on ``host:port``."""
    global _store_listener
    interface = loopback_interface()
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=interface,
                      NCCL_SOCKET_IFNAME=interface)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray sets it: fail on a hung collective
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        # The store takes the descriptor over (and closes it).
        listen_fd, _store_listener = _store_listener.detach(), None
        store = td.TCPStore(host, port, world_size, True, timeout, master_listen_fd=listen_fd)
    else:
        store = td.TCPStore(host, port, world_size, False, timeout)
    td.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def set_rank_env() -> None:
    """What Ray's torch backend sets in each worker (torchrun's variables; DeepSpeed reads LOCAL_RANK)."""
    import ray.train.torch

    context = ray.train.get_context()
    os.environ.update(LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
                      NODE_RANK=str(context.get_node_rank()), RANK=str(context.get_world_rank()),
                      WORLD_SIZE=str(context.get_world_size()),
                      ACCELERATE_TORCH_DEVICE=str(ray.train.torch.get_device()))


class LoopbackTorchBackend(RAY_TORCH_BACKEND):
    """Ray's torch backend, except that on loopback nodes the process group is made here."""

    on_loopback = False

    def on_start(self, worker_group, backend_config):
        hosts = set(worker_group.execute(node_ip_on_loopback))
        self.on_loopback = len(hosts) == 1 and None not in hosts
        if not self.on_loopback:
            return super().on_start(worker_group, backend_config)
        (host,) = hosts
        port = worker_group.execute_single(0, listen_for_store, host)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            i, start_process_group, backend=backend_config.backend or "gloo", world_rank=i, world_size=n,
            host=host, port=port, timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_training_start(self, worker_group, backend_config):
        super().on_training_start(worker_group, backend_config)
        if self.on_loopback:
            # Ray's on_start sets them under Ray Train V2 (V1: Ray's on_training_start); ours did not call it.
            worker_group.execute(set_rank_env)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group stays on loopback on a local run (module docstring)."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
