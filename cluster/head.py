"""A local Ray head to submit jobs to: `omnistream cluster up` and `omnistream cluster down`.

The head's every server listens on 127.0.0.1, with Ray's token authentication on (auth.py), and an
MLflow tracking server (tracking/server.py) runs beside it for its jobs. `down` ends exactly the
processes this head started, by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omnistream.common.errors import UserError
from omnistream.common.private import private_dir
from omnistream.tracking.server import (
    process_group,
    reap,
    start_tracking_server,
    stop_tracking_server,
)

from .auth import ensure_token
from .connect import LOOPBACK_ENV, free_port

STATE = Path(os.environ.get("OMNISTREAM_CLUSTER_DIR", Path.home() / ".omnistream" / "cluster"))


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def cluster_up(port: int, dashboard_port: int, num_cpus: int, resources: dict | None,
               mlflow_port: int = 5000, tracking_auth: bool = False, artifacts: str = "") -> dict:
    private_dir(STATE)
    state_file = STATE / f"head-{port}.json"
    if state_file.exists():
        raise UserError(f"a head started here is already recorded on port {port} ({state_file}): "
                        f"`omnistream cluster down --port {port}` first")
    tok = ensure_token()
    # Ray's socket paths must stay under ~107 bytes, so the head's temp dir is short and ours alone:
    # `down` ends exactly the processes whose command line names it. Ray makes its own temp dir 0777, so
    # it is a folder inside a private one (0700): its sockets, logs and the jobs' code, this user's alone.
    temp = private_dir(Path(tempfile.gettempdir()) / f"omni-ray-{port}")
    # a job's entrypoint runs `python` from the head's PATH: put this environment's first, as an activated
    # venv would, so jobs run with the interpreter (and packages) omnistream is installed in
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    agent_port, client_port = free_port(), free_port()
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--num-cpus={num_cpus or os.cpu_count()}", f"--temp-dir={temp / 'r'}", "--disable-usage-stats",
           # the job agent's fixed default port (52365) is taken by any other Ray on this machine, an
           # in-process one of `omnistream train` included, and without its agent a head takes no jobs
           f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"ray start failed (exit {p.returncode}): {tail[0]}")
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "temp_dir": str(temp), "token_path": str(tok) if not os.environ.get("RAY_AUTH_TOKEN") else "$RAY_AUTH_TOKEN",
            "ports": [port, dashboard_port, agent_port, client_port], "started": time.time()}
    state_file.write_text(json.dumps(info, indent=1))  # recorded now: `down` can end the head if the rest fails
    # the jobs' tracking server: its store outlives the head (STATE/mlflow-<port>), so runs stay browsable
    try:
        info["tracking"] = start_tracking_server(STATE / f"mlflow-{port}", free_port(mlflow_port), auth=tracking_auth,
                                                  artifacts=artifacts)
    except UserError as e:
        raise UserError(f"{e}; the Ray head is up: `omnistream cluster down --port {port}` ends it") from None
    info["ports"].append(info["tracking"]["port"])
    state_file.write_text(json.dumps(info, indent=1))
    return info


def head_tracking(dashboard: str) -> dict | None:
    """The tracking server `cluster up` started with the head whose dashboard is `dashboard`, if any:
    {uri, pid, dir, port[, credentials]}."""
    want = dashboard.rstrip("/")
    for f in sorted(STATE.glob("head-*.json")) if STATE.exists() else []:
        try:
            info = json.loads(f.read_text())
        except ValueError:
            continue
        if info.get("dashboard", "").rstrip("/") == want and info.get("tracking"):
            return info["tracking"]
    return None


def head_processes(temp_dir: str, ports: list[int] = (), groups: list[int] = ()) -> list:
    """This head's processes, and no one else's: those whose command line names its temp dir as a
    whole path (omni-ray-6379 must not match omni-ray-63790), the Ray processes listening on the
    ports it was started with (Ray's client server names no temp dir), and the processes of the
    process groups it started (its tracking server and that server's worker)."""
    import re

    import psutil

    own = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=$|/|[\s'\",;:])")
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(own.search(a) for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if groups:
        for p in psutil.process_iter():
            if p.pid not in found and process_group(p.pid) in groups:
                found[p.pid] = p
    if ports:
        try:
            conns = psutil.net_connections(kind="inet")
        except psutil.AccessDenied:
            conns = []
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.pid and c.pid not in found:
                try:
                    p = psutil.Process(c.pid)
                    if "ray" in " ".join(p.cmdline()).lower():
                        found[c.pid] = p
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
    return list(found.values())


def cluster_down(port: int) -> int:
    """End the head started by `cluster up` on `port`: its own processes, by PID. Returns how many."""
    import psutil

    state_file = STATE / f"head-{port}.json"
    if not state_file.exists():
        raise UserError(f"no head started by `omnistream cluster up` is recorded on port {port} (in {STATE})")
    info = json.loads(state_file.read_text())
    n_tracking = stop_tracking_server(info["tracking"]) if info.get("tracking") else 0
    procs = head_processes(info["temp_dir"], info.get("ports", []))
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    reap(procs, timeout=5)
    state_file.unlink()
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    return len(procs) + n_tracking
