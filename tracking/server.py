"""The MLflow tracking-server process a head runs for its jobs (`omnistream cluster up` starts it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omnistream.common.errors import UserError
from omnistream.common.private import private_dir


def start_tracking_server(root: Path, port: int, host: str = "127.0.0.1", timeout: float = 120.0) -> dict:
    """An MLflow tracking server: SQLite behind it, artifacts proxied through it (--serve-artifacts), so a
    worker on any node logs metrics, images and files over HTTP and nothing is written on the node it
    runs on. MLflow's light settings: one worker, job execution off. Its own process group, so
    `stop_tracking_server` ends it with its worker. Returns {uri, pid, dir, port}."""
    import urllib.request

    private_dir(root)  # the store (SQLite and artifacts): this user's alone
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "ab")
    p = subprocess.Popen(
        [str(mlflow), "server", "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://{host}:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            tail = (root / "server.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"the MLflow tracking server did not start (exit {p.returncode}): {tail[0][:200]}")
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return {"uri": uri, "pid": p.pid, "dir": str(root), "port": port}
        except OSError:
            time.sleep(0.5)
    stop_tracking_server({"pid": p.pid, "dir": str(root)})
    raise UserError(f"the MLflow tracking server on {uri} did not answer within {timeout:.0f} s "
                    f"(its log: {root / 'server.log'})")


def stop_tracking_server(srv: dict) -> int:
    """End the server's process group, if its leader is still the server started in srv['dir']."""
    import psutil

    try:
        leader = psutil.Process(srv["pid"])
        if srv["dir"] not in " ".join(leader.cmdline()):
            return 0  # the pid was reused by something else: not ours to end
        group = [q for q in psutil.process_iter() if process_group(q.pid) == srv["pid"]]
    except psutil.NoSuchProcess:
        return 0
    os.killpg(srv["pid"], signal.SIGTERM)
    reap(group, timeout=10)
    return len(group)


def reap(procs: list, timeout: float) -> None:
    """Wait up to `timeout` s for processes sent SIGTERM, then SIGKILL those still there."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
