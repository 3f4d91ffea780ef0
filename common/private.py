"""Directories only their user can enter (mode 0700), for what another user of the machine must neither
read nor replace: a Ray head's sockets, logs, session files and uploaded job code, a tracking store.

Ray makes its temp directory mode 0777 itself (it shares /tmp/ray between users on purpose), at a path
anyone can predict; so its temp directory goes inside one of these, which Ray does not touch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError


def private_dir(path: str | os.PathLike) -> Path:
    """`path`, created 0700 (parents as usual) if missing; if it exists it must be a directory of this
    user's (not a link), and is made 0700. Another user's, or a link someone planted, is refused."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        p.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UserError(
            f"{p} is not a directory (a link, or a file): it would hold what other users must not "
            f"reach; remove it and run again"
        )
    if st.st_uid != os.getuid():
        raise UserError(
            f"{p} belongs to another user (uid {st.st_uid}), who could read or replace what would be "
            f"written there: remove it, or choose another place"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
    return p
