"""Connecting to Ray: a local cluster in this process (loopback only) or an existing one."""
from __future__ import annotations

import os
import sys

from omnistream.modalities.base import UserError

# With this set to 0 a local Ray binds its servers to 127.0.0.1, not every interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray Train's print patch tees worker prints into its logger, which prints each line twice here
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONWARNINGS": "ignore::FutureWarning"}


def quiet_env() -> None:
    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report to the outside
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def free_port(preferred: int = 0) -> int:
    """`preferred` if nothing on 127.0.0.1 holds it, else a port the OS says is free."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(address: str = "", num_cpus: int = 0, log_to_driver: bool = True):
    """'' starts a local Ray here, every server on 127.0.0.1 only; else joins `address` (or, inside a
    submitted job, the cluster running it).

    The local Ray runs its dashboard (on 127.0.0.1): Ray Train's state queries go through it.
    """
    quiet_env()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS", "")  # set for a Ray job's driver: join that cluster
    if address:
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        return ray
    ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(8265),  # another Ray here (a `cluster up` head) may hold it
                   _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, configure_logging=True,
                   logging_level="WARNING",
                   runtime_env={"env_vars": {**LOOPBACK_ENV, **WORKER_ENV, "RAY_TRAIN_V2_ENABLED": "1"}})
    if ctx.dashboard_url:
        # a status line: stderr, so a command's --json output stays JSON alone on stdout
        print(f"[omnistream] local Ray started (127.0.0.1 only); dashboard: http://{ctx.dashboard_url}",
              file=sys.stderr, flush=True)
    return ray
