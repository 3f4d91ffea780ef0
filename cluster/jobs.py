"""Jobs on a Ray cluster: a local head to try them on, submission through the Ray Jobs API.

`omnistream cluster up` starts a Ray head whose every server listens on 127.0.0.1, with Ray's token
authentication on. The token is looked up the way Ray does it: $RAY_AUTH_TOKEN, else the file
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created, like `ray get-auth-token --generate`,
if there is none), so Ray's own `ray job list` works with it unchanged.

`omnistream submit CONFIG` validates and resolves the config here (a mistake is one line, exit 2,
before anything is sent), then sends the project's code plus the resolved config as the job's
working directory; the job runs `python -m omnistream.cluster.cli train job.toml` on the cluster.
The code sent is the omnistream this client runs (installed or editable), so the job runs the
same code; the cluster's Python must have omnistream's dependencies installed.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omnistream.modalities.base import UserError

from .ray_local import LOOPBACK_ENV, WORKER_ENV, free_port

PACKAGES = ("cluster", "model", "modalities", "pipelines", "configs")  # omnistream.<name>: what a job needs
STATE = Path(os.environ.get("OMNISTREAM_CLUSTER_DIR", Path.home() / ".omnistream" / "cluster"))
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


# ---- the token ------------------------------------------------------------------------------------
def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    p = token_path()
    if not p.exists():
        return None
    check_private(p)
    return p.read_text().strip()


def check_private(p: Path) -> None:
    """A token file others can read is a leaked password: refuse it (as ssh refuses such a key)."""
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"the Ray token file {p} can be read by other users (mode {mode:o}): chmod 600 {p}")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_transport(address: str, insecure: bool = False) -> None:
    """The token is a password: never send it in clear to another host. Plain http is fine on
    loopback (the traffic never leaves the machine); elsewhere https, or an explicit --insecure."""
    from urllib.parse import urlparse

    u = urlparse(address if "://" in address else f"http://{address}")
    host = u.hostname or ""
    if u.scheme == "http" and not _is_loopback(host) and not insecure:
        raise UserError(f"refusing to send the Ray token over plain http to {host}: use https:// (e.g. behind a "
                        f"TLS proxy), or pass --insecure if every hop of this network is trusted")


def ensure_token() -> Path:
    p = token_path()
    if not os.environ.get("RAY_AUTH_TOKEN") and not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    elif p.exists():
        check_private(p)
    return p


# ---- the tracking server ----------------------------------------------------------------------------
def start_tracking_server(root: Path, port: int, host: str = "127.0.0.1", timeout: float = 120.0) -> dict:
    """An MLflow tracking server for a head's jobs: SQLite behind it, artifacts proxied through it
    (--serve-artifacts), so a worker on any node logs metrics, images and files over HTTP and nothing
    is written on the node it runs on. MLflow's light settings: one worker, job execution off. Its own
    process group, so `cluster down` ends it with its worker. Returns {uri, pid, dir, port}."""
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
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
        group = [q for q in psutil.process_iter() if _pgid(q.pid) == srv["pid"]]
    except psutil.NoSuchProcess:
        return 0
    os.killpg(srv["pid"], signal.SIGTERM)
    _reap(group, timeout=10)
    return len(group)


def _reap(procs: list, timeout: float) -> None:
    """Wait up to `timeout` s for processes sent SIGTERM, then SIGKILL those still there."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ---- a local head ---------------------------------------------------------------------------------
def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def cluster_up(port: int, dashboard_port: int, num_cpus: int, resources: dict | None,
               mlflow_port: int = 5000) -> dict:
    STATE.mkdir(parents=True, exist_ok=True)
    state_file = STATE / f"head-{port}.json"
    if state_file.exists():
        raise UserError(f"a head started here is already recorded on port {port} ({state_file}): "
                        f"`omnistream cluster down --port {port}` first")
    tok = ensure_token()
    # Ray's socket paths must stay under ~107 bytes, so the head's temp dir is short and ours alone:
    # `down` ends exactly the processes whose command line names it.
    temp = Path(tempfile.gettempdir()) / f"omni-ray-{port}"
    # a job's entrypoint runs `python` from the head's PATH: put this environment's first, as an activated
    # venv would, so jobs run with the interpreter (and packages) omnistream is installed in
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    agent_port, client_port = free_port(), free_port()
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
           f"--num-cpus={num_cpus or os.cpu_count()}", f"--temp-dir={temp}", "--disable-usage-stats",
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
        info["tracking"] = start_tracking_server(STATE / f"mlflow-{port}", free_port(mlflow_port))
    except UserError as e:
        raise UserError(f"{e}; the Ray head is up: `omnistream cluster down --port {port}` ends it") from None
    info["ports"].append(info["tracking"]["port"])
    state_file.write_text(json.dumps(info, indent=1))
    return info


def head_tracking_uri(dashboard: str) -> str | None:
    """The tracking server `cluster up` started with the head whose dashboard is `dashboard`, if any."""
    want = dashboard.rstrip("/")
    for f in sorted(STATE.glob("head-*.json")) if STATE.exists() else []:
        try:
            info = json.loads(f.read_text())
        except ValueError:
            continue
        if info.get("dashboard", "").rstrip("/") == want and info.get("tracking"):
            return info["tracking"]["uri"]
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
            if p.pid not in found and _pgid(p.pid) in groups:
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
    _reap(procs, timeout=5)
    state_file.unlink()
    shutil.rmtree(info["temp_dir"], ignore_errors=True)
    return len(procs) + n_tracking


# ---- the Jobs API ---------------------------------------------------------------------------------
def client(address: str, insecure: bool = False):
    """A JobSubmissionClient for `address`, sending the token if there is one (never in clear to another
    host, see check_transport); unreachable or refused is a UserError (one line, exit 2)."""
    os.environ.update(LOOPBACK_ENV)
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD
    tok = read_token()
    if tok:
        check_transport(address, insecure)  # before any connection is made
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        raise _user_error(address, e) from None


_REFUSED = re.compile(r"authenticat|unauthori[sz]ed|forbidden|(?<![\w.:/])(?:401|403)(?![\w.])", re.IGNORECASE)


def _refused(msg: str) -> bool:
    """An authentication refusal, by its words or HTTP status; never a 401/403 inside a port or address
    (http://127.0.0.1:40391 holds "403")."""
    return bool(_REFUSED.search(re.sub(r"\w+://\S+", "", msg)))


def _user_error(address: str, e: Exception) -> UserError:
    msg = " ".join(str(e).split())
    if _refused(msg) or "token" in msg.lower():
        return UserError(f"the Ray cluster at {address} refused the token ({token_path()}): {msg[:200]}")
    return UserError(f"cannot reach the Ray cluster at {address}: {msg[:200]}")


def _call(address: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except UserError:
        raise
    except Exception as e:
        if type(e).__name__ in ("ConnectionError", "ConnectionRefusedError") or _refused(str(e)):
            raise _user_error(address, e) from None
        if "does not exist" in str(e) or "not found" in str(e).lower():
            raise UserError(f"{' '.join(str(e).split())[:200]} (on {address})") from None
        raise


def submit(config_path: str | None, overrides: list[str], address: str, insecure: bool = False) -> tuple[object, str]:
    """Validate and resolve the config here, then submit it with the code as the working directory."""
    from .config import load_config

    named = load_config(config_path, overrides)
    cfg = named.resolved_paths()
    cfg.cluster.address = ""  # inside the job, connect() joins the cluster the job runs on (RAY_ADDRESS)
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD
    if not named.tracking.uri:
        # the head's tracking server: rank 0 may run on any node, where a SQLite path of this machine
        # would silently become a new, empty database
        cfg.tracking.uri = head_tracking_uri(address) or cfg.tracking.uri
    c = client(address, insecure)
    with tempfile.TemporaryDirectory(prefix="omnistream-job-") as d:
        copy_code(Path(d))
        Path(d, "job.toml").write_text(cfg.to_toml())
        deadline = time.time() + 90
        while True:
            try:
                job_id = _call(address, c.submit_job,
                               entrypoint="python -m omnistream.cluster.cli train job.toml",
                               runtime_env={"working_dir": d, "env_vars": {**LOOPBACK_ENV, **WORKER_ENV}},
                               metadata={"omnistream": "train", "name": cfg.name, "config": config_path or ""})
                break
            except RuntimeError as e:
                # a head that has just started answers 500 until its job agent is up
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2)
    return c, job_id


def copy_code(dst: Path) -> None:
    """omnistream's packages as dst/omnistream/<name>, from wherever this process imports them.

    No omnistream/__init__.py: like the installed package, it is a namespace package, and the job's
    working directory comes first on its path, so the job imports this copy."""
    import importlib

    for name in PACKAGES:
        src = Path(importlib.import_module(f"omnistream.{name}").__file__).parent
        shutil.copytree(src, dst / "omnistream" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_old*"))


_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([^)]*\)(?:\x1b\[[0-9;]*m)?\s*")  # "(RayTrainWorker pid=12) "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN = re.compile(r"MLflow run ([0-9a-f]{32}) \((https?://[^)]+)\)")


def follow(c, job_id: str, out=sys.stdout, raw: bool = False) -> str:
    """Follow the job until it ends; returns its final status. Shows omnistream's own lines (steps,
    evaluations, warnings) without Ray's process prefixes, and the run's page on the tracking server;
    `raw` streams every line of the job's log as Ray writes it. When the job fails, the last 60 lines
    of the whole log follow, so the error is never hidden."""
    import collections

    last: collections.deque = collections.deque(maxlen=60)

    def show(line: str) -> None:
        last.append(line)
        text = _ANSI.sub("", _RAY_PREFIX.sub("", line))
        if "[omnistream]" in text or text.startswith(("omnistream:", "MLflow run id", "Open it")):
            out.write(text + "\n")
            m = _RUN.search(text)
            if m:
                try:
                    from .tracking import run_url

                    out.write(f"[omnistream] the run's page: {run_url(m.group(2), m.group(1))}\n")
                except Exception:  # noqa: BLE001 - a link is a convenience; the job goes on regardless
                    pass
            out.flush()

    async def tail():
        pending = ""
        async for chunk in c.tail_job_logs(job_id):
            if raw:
                out.write(chunk)
                out.flush()
                continue
            pending += chunk
            *lines, pending = pending.split("\n")
            for ln in lines:
                show(ln)
        if pending:
            show(pending)

    asyncio.run(tail())
    while True:
        status = str(c.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if status != "SUCCEEDED" and not raw:
                out.write(f"--- the last {len(last)} lines of job {job_id}'s log ---\n" + "\n".join(last) + "\n")
            return status
        time.sleep(1)
