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
    listener_pid,
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


def _temp_dir(port: int) -> Path:
    # Ray's socket paths must stay under ~107 bytes, so the head's temp dir is short and ours alone:
    # `down` ends exactly the processes whose command line names it
    return Path(tempfile.gettempdir()) / f"omni-ray-{port}"


def port_holder(port: int) -> str:
    """Who listens on `port`, as ' (pid N, name)' where the OS tells us, else ''."""
    import psutil

    pid = listener_pid(port)
    try:
        return f" (pid {pid}, {psutil.Process(pid).name()})" if pid else ""
    except psutil.Error:
        return f" (pid {pid})"


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to Ray's servers too
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _port_in_use(port: int, flag: str) -> UserError:
    return UserError(
        f"port {port} on 127.0.0.1 is in use{port_holder(port)}: stop that process, or pick another port with {flag}"
    )


def _ray_start_error(p: subprocess.CompletedProcess, flags: dict[int, str]) -> UserError:
    """One line for a failed `ray start`: a port it could not bind named with its holder and the flag that
    picks another; else Ray's last line."""
    import re

    out = f"{p.stdout}\n{p.stderr}"
    m = re.search(r"[Ff]ailed to bind to [\d.:\[\]]*?:(\d+)|[Aa]ddress already in use.*?:(\d+)", out)
    if m:
        port = int(m.group(1) or m.group(2))
        return _port_in_use(port, flags.get(port, "--port or --dashboard-port"))
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return UserError(f"ray start failed (exit {p.returncode}): {tail[0]}")


def cluster_up(
    port: int,
    dashboard_port: int,
    num_cpus: int,
    resources: dict | None,
    mlflow_port: int = 5000,
    tracking_auth: bool = False,
    artifacts: str = "",
) -> dict:
    """Start the head and its tracking server. Recorded before any process starts; if any step fails,
    every process it started is ended, its temp folder and record removed, and the cause raised."""
    private_dir(STATE)
    state_file = STATE / f"head-{port}.json"
    if state_file.exists():
        raise UserError(
            f"a head started here is already recorded on port {port} ({state_file}): "
            f"`omnistream cluster down --port {port}` first"
        )
    temp = _temp_dir(port)
    if _unrecorded_head(port):
        raise UserError(
            f"a head of ours runs on port {port} unrecorded (its processes name {temp}): "
            f"`omnistream cluster down --port {port}` ends it"
        )
    flags = {port: "--port", dashboard_port: "--dashboard-port"}
    for p_, flag in flags.items():  # a taken port, named before Ray starts anything
        if _port_taken(p_):
            raise _port_in_use(p_, flag)
    tok = ensure_token()
    # Ray makes its own temp dir 0777, so it is a folder inside a private one (0700): its sockets, logs and
    # the jobs' code, this user's alone
    private_dir(temp)
    # a job's entrypoint runs `python` from the head's PATH: put this environment's first, as an activated
    # venv would, so jobs run with the interpreter (and packages) omnistream is installed in
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    agent_port, client_port = free_port(), free_port()
    info = {
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": str(temp),
        "token_path": str(tok) if not os.environ.get("RAY_AUTH_TOKEN") else "$RAY_AUTH_TOKEN",
        "ports": [port, dashboard_port, agent_port, client_port],
        "started": time.time(),
        "starting": True,
    }
    state_file.write_text(json.dumps(info, indent=1))  # recorded first: whatever fails later, it is undone
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus or os.cpu_count()}",
        f"--temp-dir={temp / 'r'}",
        "--disable-usage-stats",
        # the job agent's fixed default port (52365) is taken by any other Ray on this machine, an
        # in-process one of `omnistream train` included, and without its agent a head takes no jobs
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if p.returncode != 0:
            raise _ray_start_error(p, flags)
        # the jobs' tracking server: its store outlives the head (STATE/mlflow-<port>), so runs stay browsable
        info["tracking"] = start_tracking_server(
            STATE / f"mlflow-{port}", free_port(mlflow_port), auth=tracking_auth, artifacts=artifacts
        )
    except BaseException as e:  # a head half up is worse than none: the next `cluster up` could not start
        _end_head(info, ports=[agent_port, client_port])  # (a port taken by someone else is never ours to end)
        state_file.unlink(missing_ok=True)
        if isinstance(e, subprocess.TimeoutExpired):
            raise UserError(
                f"ray start did not finish within {e.timeout:.0f} s; nothing of it is left running"
            ) from None
        raise
    info["ports"].append(info["tracking"]["port"])
    del info["starting"]
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
    """This head's processes, and no one else's: those of this user whose command line names its temp dir
    as a whole path (omni-ray-6379 must not match omni-ray-63790), the Ray processes listening on the ports
    it was started with (Ray's client server names no temp dir), and the processes of the process groups
    it started (its tracking server and that server's worker). Another user's process is never ours, even
    when its command line names our folder."""
    import re

    import psutil

    me = os.getuid()

    def mine(p) -> bool:
        try:
            return p.uids().real == me
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    own = re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=$|/|[\s'\",;:])")
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(own.search(a) for a in (p.info["cmdline"] or [])) and mine(p):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if groups:
        for p in psutil.process_iter():
            if p.pid not in found and process_group(p.pid) in groups and mine(p):
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
                    if "ray" in " ".join(p.cmdline()).lower() and mine(p):
                        found[c.pid] = p
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
    return list(found.values())


def _terminate(procs: list) -> list:
    """SIGTERM each, then reap; a process gone meanwhile, or not ours to signal, is passed over."""
    import psutil

    sent = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            sent.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    reap(sent, timeout=5)
    return sent


def _end_head(info: dict, ports: list[int]) -> int:
    """End a head's processes (its tracking server's, Ray's) by PID and remove its temp folder."""
    n_tracking = stop_tracking_server(info["tracking"]) if info.get("tracking") else 0
    procs = _terminate(head_processes(info["temp_dir"], ports))
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    return len(procs) + n_tracking


def _unrecorded_head(port: int) -> list:
    """The processes of a head of ours on `port` that has no record (a `cluster up` that died half-way, or
    an older omnistream's): Ray's, which name its temp folder, and its tracking server's process group."""
    tracking = [q.pid for q in head_processes(str(STATE / f"mlflow-{port}"))]
    return head_processes(str(_temp_dir(port)), (), tracking)


def cluster_down(port: int) -> tuple[int, bool]:
    """End the head started by `cluster up` on `port`: its own processes, by PID. A head of ours running
    unrecorded is found by its temp folder and ended too. Returns (processes ended, whether it was recorded)."""
    state_file = STATE / f"head-{port}.json"
    if not state_file.exists():
        stray = _unrecorded_head(port)
        if not stray:
            raise UserError(
                f"no head started by `omnistream cluster up` is recorded on port {port} (in {STATE}), "
                f"and none of ours is running there"
            )
        ended = _terminate(stray)
        shutil.rmtree(_temp_dir(port), ignore_errors=True)
        return len(ended), False
    info = json.loads(state_file.read_text())
    n = _end_head(info, info.get("ports", []))
    state_file.unlink()
    return n, True
