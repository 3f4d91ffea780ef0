"""omnistream's log lines: one logger tree, one format, set up once per process.

Every status line goes through `logging.getLogger("omnistream.<module>")` and reaches stderr as

    [omnistream] step 10/300 loss=2.1 ...          INFO
    [omnistream] warning: the tracking server ...  WARNING (error: for ERROR)
    [omnistream] debug: omnistream.x: ...          DEBUG (--verbose)

What a command returns (a run id, a JSON report) is print()ed to stdout, nothing else is.

`parse(line)` is the format's inverse, kept beside it: `omnistream jobs follow` picks omnistream's lines
out of a job's log with it (Ray puts "(RayTrainWorker pid=…)" before each worker's line), so the format
and what recognises it cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import re
import sys

ROOT = "omnistream"
TAG = "[omnistream]"
# the level a process's children (Ray's workers, a submitted job) log at: they inherit the environment
LEVEL_ENV = "OMNISTREAM_LOG_LEVEL"
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
_USER_MLFLOW_LEVEL = os.environ.get(MLFLOW_LEVEL_ENV)  # a level the user set stands
# how the CLI's one line for a user mistake begins ("omnistream: error: no shards found ...")
ERROR_PREFIX = "omnistream: "
_LINE = re.compile(r"^\[omnistream\] (?:(debug|warning|error|critical): )?(.*)$", re.DOTALL)


class LineFormatter(logging.Formatter):
    """`[omnistream] <level: >message`; a message of several lines gets the tag on each, so a reader
    filtering by `parse` keeps all of it."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.WARNING:
            head = f"{record.levelname.lower()}: "
        elif record.levelno < logging.INFO:
            head = f"debug: {record.name}: "
        else:
            head = ""
        first, *rest = msg.splitlines() or [""]
        return "\n".join([f"{TAG} {head}{first}", *(f"{TAG}   {ln}" for ln in rest)])


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of the call (pytest's capture, a
    redirected stream), not to the stream that was current when logging was set up."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def level_of(verbosity: int | None) -> int:
    """-1 (--quiet): warnings and errors; 0: status lines; 1 (--verbose): debug too. None: the level this
    process inherited ($OMNISTREAM_LOG_LEVEL), else status lines."""
    if verbosity is None:
        return (
            logging.getLevelName(os.environ.get(LEVEL_ENV, "INFO").upper())
            if os.environ.get(LEVEL_ENV)
            else logging.INFO
        )
    return logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO


def setup(verbosity: int | None = None) -> logging.Logger:
    """Send the `omnistream` logger's records to stderr in the line format (idempotent: once per process,
    the level updated on later calls). Records the level in the environment for the processes this one
    starts. Returns the `omnistream` logger."""
    level = level_of(verbosity)
    if not isinstance(level, int):
        level = logging.INFO
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        h = _Stderr()
        h.setFormatter(LineFormatter())
        root.addHandler(h)
    root.setLevel(level)
    root.propagate = False  # one line per record, whatever the host program did to the root logger
    # MLflow's own INFO lines ("Creating initial MLflow database tables...", its system-metrics monitor) only
    # with --verbose; MLflow reads the level when first imported, and here when already imported
    os.environ[MLFLOW_LEVEL_ENV] = _USER_MLFLOW_LEVEL or ("INFO" if level <= logging.DEBUG else "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ[MLFLOW_LEVEL_ENV])
    return root


def parse(line: str) -> tuple[str, str] | None:
    """(level, message) of a line written by LineFormatter, else None. Level is "info", "debug",
    "warning", "error" or "critical"."""
    m = _LINE.match(line)
    if not m:
        return None
    return (m.group(1) or "info"), m.group(2)


def verbose() -> bool:
    """Whether this process runs with -v (debug lines, and the libraries' own INFO lines)."""
    return logging.getLogger(ROOT).getEffectiveLevel() <= logging.DEBUG


def inherited() -> dict[str, str]:
    """The environment a process this one starts elsewhere (a Ray job, a worker) needs to log as it does."""
    return {
        LEVEL_ENV: os.environ.get(LEVEL_ENV, "INFO"),
        **({MLFLOW_LEVEL_ENV: os.environ[MLFLOW_LEVEL_ENV]} if MLFLOW_LEVEL_ENV in os.environ else {}),
    }


# scheme://userinfo@ : a password or token in a URL (tracking.uri = "https://user:secret@host")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with every URL's user and password (`scheme://user:secret@host`) replaced by ***: for what
    is logged, printed, or sent to a tracking store as a param or the run's config."""
    return _USERINFO.sub(r"\1***@", text)
