"""The Ray token: a password for the cluster, looked up the way Ray does it.

$RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created, like
`ray get-auth-token --generate`, if there is none), so Ray's own `ray job list` works with it
unchanged. A token file others can read is refused; the token never travels in clear to another host.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omnistream.common.errors import UserError


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
        raise UserError(
            f"refusing to send the Ray token over plain http to {host}: use https:// (e.g. behind a "
            f"TLS proxy), or pass --insecure if every hop of this network is trusted"
        )


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
