"""Jobs on a Ray cluster through the Ray Jobs API: submit, follow, and the client the `jobs` commands use.

`omnistream submit CONFIG` validates and resolves the config here (a mistake is one line, exit 2,
before anything is sent), then sends the project's code plus the resolved config as the job's
working directory; the job runs `python -m omnistream.cli train job.toml` on the cluster. The code
sent is the omnistream this client runs (installed or editable), so the job runs the same code; the
cluster's Python must have omnistream's dependencies installed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omnistream.common import logs
from omnistream.common.errors import UserError
from omnistream.tracking.server import client_env, write_job_credentials

from .auth import check_transport, read_token, token_path
from .connect import LOOPBACK_ENV, job_runtime_env
from .head import head_tracking

# omnistream.<name>: what a job needs (everything but the CLI's own folder is imported by `train`)
PACKAGES = (
    "common",
    "modalities",
    "model",
    "pipelines",
    "configs",
    "tracking",
    "training",
    "serving",
    "cluster",
    "cli",
)
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


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
    except Exception as e:  # noqa: BLE001 - any failure to reach the Jobs API is said as one line
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
    from omnistream.configs import load_config

    named = load_config(config_path, overrides)
    cfg = named.resolved_paths()
    cfg.cluster.address = ""  # inside the job, connect() joins the cluster the job runs on (RAY_ADDRESS)
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD
    server = None
    if not named.tracking.uri:
        # the head's tracking server: rank 0 may run on any node, where a SQLite path of this machine
        # would silently become a new, empty database
        server = head_tracking(address)
        if server:
            cfg.tracking.uri = server["uri"]
            os.environ.update(client_env(server))  # its user and password, for this client's own reads of the run
    c = client(address, insecure)
    with tempfile.TemporaryDirectory(prefix="omnistream-job-") as d:
        copy_code(Path(d))
        Path(d, "job.toml").write_text(cfg.to_toml())
        # where `cluster up --tracking-auth` protects it: the job's processes read the user and password from a
        # 0600 file of the working directory; the runtime env, which `ray job list` shows, only names that file
        tracking_env = write_job_credentials(Path(d), server) if server else {}
        deadline = time.time() + 120
        while True:
            try:
                job_id = _call(
                    address,
                    c.submit_job,
                    entrypoint="python -m omnistream.cli train job.toml",
                    runtime_env={"working_dir": d, **job_runtime_env(tracking_env)},
                    metadata={"omnistream": "train", "name": cfg.name, "config": config_path or ""},
                )
                break
            except RuntimeError as e:
                # a head that has just started answers 500 until its job agent is up
                if "No available agent" not in str(e):
                    raise
                if time.time() > deadline:
                    raise UserError(
                        f"the Ray head at {address} has no job agent to take the job (none came up "
                        f"within 120 s): its dashboard agent's log is dashboard_agent.log in the head's "
                        f"session folder (session_latest/logs); `omnistream cluster down` and `up` "
                        f"start it again"
                    ) from None
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


def ours(line: str) -> str | None:
    """The line as omnistream wrote it, if omnistream wrote it: a log line (common/logs.py's format,
    recognised by its own parser) or the CLI's one-line error, once Ray's process prefix and colours are
    taken off; else None (Ray's own lines, a library's warnings)."""
    text = _ANSI.sub("", _RAY_PREFIX.sub("", line))
    return text if logs.parse(text) is not None or text.startswith(logs.ERROR_PREFIX) else None


def follow(c, job_id: str, out=sys.stdout, raw: bool = False) -> str:
    """Follow the job until it ends; returns its final status. Shows omnistream's own lines (steps,
    evaluations, warnings, the run's page) without Ray's process prefixes; `raw` streams every line of
    the job's log as Ray writes it. When the job fails, the last 60 lines of the whole log follow, so
    the error is never hidden."""
    import collections

    last: collections.deque = collections.deque(maxlen=60)

    def show(line: str) -> None:
        last.append(line)
        text = ours(line)
        if text is not None:
            out.write(text + "\n")
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
