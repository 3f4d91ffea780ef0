"""Ray Train's torch process group, with its rendezvous store bound to the node's address only.

Ray Train's stock torch backend lets rank 0's `TCPStore` listen on every
interface (torch binds its store server to the wildcard address). Here rank 0
binds the listening socket itself, to the node IP Ray reports (127.0.0.1 for
a local cluster), and hands it to torch (`master_listen_fd`). For local
clusters gloo and NCCL are pinned to the loopback interface too. Everything else is
Ray's own `_TorchBackend` (shutdown, env vars).

The ordered data split is in cluster/split.py, a module without torch: Ray Train hands the split to its
DatasetManager actor, which would otherwise import torch only to unpickle it (split.py has the figures).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from omnistream.training.engine import pin_collectives_to_loopback

_STORE_SOCKET: socket.socket | None = None  # kept open in rank 0's process for the store's lifetime


def _open_store_socket() -> tuple[str, int]:
    global _STORE_SOCKET
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 0))
    s.listen(1024)
    _STORE_SOCKET = s
    return addr, s.getsockname()[1]


def _join(addr: str, port: int, world_rank: int, world_size: int, backend: str, timeout_s: int) -> None:
    import torch.distributed as dist

    if addr.startswith("127."):
        pin_collectives_to_loopback()
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(
            addr,
            port,
            world_size,
            is_master=True,
            master_listen_fd=_STORE_SOCKET.fileno(),
            wait_for_workers=False,
            timeout=timeout,
        )
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _open_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _join,
                    addr=addr,
                    port=port,
                    world_rank=i,
                    world_size=len(worker_group),
                    backend=backend,
                    timeout_s=backend_config.timeout_s,
                )
                for i in range(len(worker_group))
            ]
        )


@dataclass
class BoundTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _BoundStoreBackend
