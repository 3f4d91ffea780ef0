"""The MLflow tracking-server process a head runs for its jobs (`omnistream cluster up` starts it)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from omnistream.common.errors import UserError
from omnistream.common.private import private_dir

CREDENTIALS = "credentials.json"  # a protected server's user and password, in its (0700) store, mode 0600


def start_tracking_server(
    root: Path, port: int, host: str = "127.0.0.1", timeout: float = 120.0, auth: bool = False, artifacts: str = ""
) -> dict:
    """An MLflow tracking server: SQLite behind it, artifacts proxied through it (--serve-artifacts), so a
    worker on any node logs metrics, images and files over HTTP and nothing is written on the node it
    runs on. MLflow's light settings: one worker, job execution off. Its own process group, so
    `stop_tracking_server` ends it with its worker. Returns {uri, pid, dir, port[, credentials]}.

    Without `auth` it answers every process that reaches 127.0.0.1, so every user of this machine
    (their runs, registered models). With `auth`: MLflow's basic-auth app, whose admin user and password
    are made once and kept in the private store (CREDENTIALS); a client sends them as
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (client_env), a browser asks for them.

    `artifacts`: where the server keeps artifacts, e.g. s3://bucket/mlflow (its store's artifacts/ folder by
    default); the server writes there with the standard AWS environment it is started in (AWS_ENDPOINT_URL,
    credentials), so the clients need none."""
    import urllib.request

    private_dir(root)  # the store (SQLite and artifacts): this user's alone
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "ab")
    cmd = [
        str(mlflow),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts or str(root / "artifacts"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if auth:
        cmd += ["--app-name", "basic-auth"]
        env.update(_auth_env(root))
    p = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    uri = f"http://{host}:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            tail = (root / "server.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"the MLflow tracking server did not start (exit {p.returncode}): {tail[0][:200]}")
        try:
            healthy = urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            healthy = False
        if healthy:
            # the port was free when picked, then released for MLflow to bind: whoever bound it in between
            # would answer here and receive the jobs' data (and, with auth, their password)
            owner = listener_pid(port)
            if owner not in _process_tree(p.pid):
                stop_tracking_server({"pid": p.pid, "dir": str(root)})
                raise UserError(
                    f"port {port} on {host} was taken by another process ({owner or 'not ours'}) before "
                    f"the MLflow tracking server could bind it: not started; try again, or pick a port"
                )
            return {
                "uri": uri,
                "pid": p.pid,
                "dir": str(root),
                "port": port,
                **({"credentials": str(root / CREDENTIALS)} if auth else {}),
            }
        time.sleep(0.5)
    stop_tracking_server({"pid": p.pid, "dir": str(root)})
    raise UserError(
        f"the MLflow tracking server on {uri} did not answer within {timeout:.0f} s (its log: {root / 'server.log'})"
    )


def listener_pid(port: int) -> int | None:
    """The pid listening on `port`, where the OS tells us (another user's process is not shown)."""
    import psutil

    try:
        return next(
            (
                c.pid
                for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ),
            None,
        )
    except psutil.AccessDenied:
        return None


def _process_tree(pid: int) -> set[int]:
    import psutil

    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _credentials(root: Path) -> dict:
    """The protected server's admin user, password and session key: made on its first start, then the
    same on every start on this store (MLflow keeps the user in the store's auth database)."""
    f = root / CREDENTIALS
    if f.exists():
        return json.loads(f.read_text())
    c = {"username": "omnistream", "password": secrets.token_urlsafe(24), "secret_key": secrets.token_urlsafe(32)}
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(c, out)
    return c


def _auth_env(root: Path) -> dict:
    """The environment of MLflow's basic-auth app: its settings file (no access for users it does not
    know), the admin user, and the key it signs sessions and CSRF tokens with."""
    c = _credentials(root)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": c["username"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": c["password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": c["secret_key"],
    }


def client_env(server: dict) -> dict:
    """What an MLflow client needs in its environment to use `server` (a start_tracking_server result, or
    what a head recorded of it): its user and password where it is protected, else nothing."""
    if not server.get("credentials"):
        return {}
    c = json.loads(Path(server["credentials"]).read_text())
    return {"MLFLOW_TRACKING_USERNAME": c["username"], "MLFLOW_TRACKING_PASSWORD": c["password"]}


# a job's environment names the file holding the tracking server's user and password (a file of the job's
# working directory, mode 0600), never the password itself: Ray shows a job's runtime_env to every client
# (`ray job list`, the dashboard), and its env_vars with it
JOB_CREDENTIALS = "OMNISTREAM_TRACKING_CREDENTIALS"
JOB_CREDENTIALS_FILE = ".tracking-credentials.json"


def write_job_credentials(folder: Path, server: dict) -> dict:
    """`server`'s client credentials (client_env) in a 0600 file of a job's working directory `folder`;
    returns the job's env var naming that file ({} for a server without authentication)."""
    env = client_env(server)
    if not env:
        return {}
    fd = os.open(Path(folder) / JOB_CREDENTIALS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(env, out)
    return {JOB_CREDENTIALS: JOB_CREDENTIALS_FILE}


def load_job_credentials() -> None:
    """In a job's processes (its driver, its ranks, on any node: each runs in a copy of the working
    directory): the credentials JOB_CREDENTIALS names, into the environment MLflow's client reads."""
    name = os.environ.get(JOB_CREDENTIALS)
    if not name or os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return
    f = Path(name)
    try:
        os.chmod(f, 0o600)  # Ray unpacks a working directory with the default mode
        os.environ.update(
            {
                k: str(v)
                for k, v in json.loads(f.read_text()).items()
                if k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            }
        )
    except (OSError, ValueError):
        return


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
