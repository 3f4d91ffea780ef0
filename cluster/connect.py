"""Connecting to Ray: a local cluster in this process (loopback only) or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from pathlib import Path

from omnistream.common import logs
from omnistream.common.errors import UserError
from omnistream.common.private import private_dir

log = logging.getLogger(__name__)

# With this set to 0 a local Ray binds its servers to 127.0.0.1, not every interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray Train's print patch tees worker prints into its logger, which prints each line twice here
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONWARNINGS": "ignore::FutureWarning"}
# A local Ray has no preemptible nodes: no preemption-watcher actor per worker group (a process of its own,
# ~6 s of CPU to start on 2 cores, measured). On a cluster Ray Train's default stands.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def own_cluster() -> None:
    """Run in every Ray worker process of our jobs (runtime_env's worker_process_setup_hook): point Ray's
    address lookups at the cluster the worker belongs to, and take up the job's tracking credentials.

    Without an address, Ray's state API finds "the" cluster by scanning the machine for GCS processes
    and, where it finds several, takes the one a plain `ray start` (or Ray's test cluster) last wrote to
    /tmp/ray/ray_current_cluster. Ray Train's PlacementGroupCleaner asks it every second whether the
    run's controller is alive; asked of another user's or test's Ray it hears "no such actor" and removes
    the placement group of a healthy run, whose workers then die ("Destroying worker since its
    placement group was removed"): a local run beside any other Ray on the machine could end that way.
    """
    import ray

    from omnistream.tracking.server import load_job_credentials

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # a submitted job's tracking credentials, read here at the worker's start, while its working directory is
    # still the job's (Ray Train then moves a worker into its run's folder, where a relative path finds nothing)
    load_job_credentials()


# the module path Ray imports and calls in each worker (a string, so nothing is pickled)
OWN_CLUSTER_HOOK = f"{__name__}.own_cluster"


def worker_env(env_vars: dict) -> dict:
    """The environment of a job of ours' Ray workers.

    OpenMP's threads (torch's intra-op pool: a tokenizer fit's convolutions, a codec's) sleep when they run
    out of work, unless the user says otherwise: by default libgomp has each spin for a while first, on a
    node whose cores Ray has packed with other processes (tokenizing actors, packers, ranks). Measured on 2
    cores, the learned image tokenizer's test (its fit a Ray task on 2 threads) beside one busy process: 147 s of
    wall time with the default, 51 s passive."""
    omp = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return {**LOOPBACK_ENV, **WORKER_ENV, **omp, **logs.inherited(), **env_vars}


def job_runtime_env(env_vars: dict) -> dict:
    """The runtime_env for a Ray job of ours on a cluster it did not start: its workers' environment, and
    every worker looking up its own cluster (own_cluster). Ray starts each worker of a job with a runtime_env
    through a shim process that imports Ray before the worker does (about 0.7 s of CPU a worker, measured on
    2 cores); a Ray started here needs none (own_environment)."""
    return {"env_vars": worker_env(env_vars), "worker_process_setup_hook": OWN_CLUSTER_HOOK}


def own_environment(env_vars: dict, gcs_port: int) -> dict:
    """What a Ray started by this process (a local Ray, a test cluster's nodes) hands its workers through the
    environment they inherit from its processes, in place of a runtime_env: the job's environment, and the
    cluster's own address (what own_cluster sets in a worker of a cluster joined by address), its GCS put
    on `gcs_port` (RAY_GCS_SERVER_PORT, read by the head's start)."""
    address = f"127.0.0.1:{gcs_port}"
    return {
        **worker_env(env_vars),
        "RAY_GCS_SERVER_PORT": str(gcs_port),
        "RAY_ADDRESS": address,
        # no idle workers started ahead, one per CPU, as the job connects: each cost 1.4 s of CPU (measured),
        # and most of a run's workers are actors, which start their own
        "RAY_prestart_worker_first_driver": "0",
        # what Ray Train hands its controller (its v2 API, its default for this warning): with them here, the
        # controller needs no runtime_env (cluster/controller.py)
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
    }


# The environment the processes of the Ray this process started inherit (connect's local Ray, a test
# cluster's nodes), as it was when they started; None when this process joined a Ray started elsewhere
_OWN_RAY_ENV: dict[str, str] | None = None


def started_own_ray() -> None:
    """Say that the Ray about to be started here takes this process's environment (own_environment applied):
    cluster/controller.py then starts Ray Train's controller without a runtime_env."""
    global _OWN_RAY_ENV
    _OWN_RAY_ENV = dict(os.environ)


def own_ray_env() -> dict[str, str] | None:
    """The environment the processes of the Ray this process is connected to inherit, if this process started
    that Ray (started_own_ray); None for any other (a Ray joined by address, one started before and shut down)."""
    import ray

    if _OWN_RAY_ENV is None or not ray.is_initialized():
        return None
    return _OWN_RAY_ENV if ray.get_runtime_context().gcs_address == _OWN_RAY_ENV.get("RAY_ADDRESS") else None


@contextlib.contextmanager
def environment(env: dict):
    """`env` in this process's environment while the block runs, then put back as it was: the processes a
    Ray started in the block runs inherit it, programs this process starts later do not."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_env() -> None:
    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the outside
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
    global _OWN_RAY_ENV
    quiet_env()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS", "")  # set for a Ray job's driver: join that cluster
    if address:
        _OWN_RAY_ENV = None  # another's Ray: its workers' environment is not this process's
        try:
            # a submitted job's driver runs with the runtime env `jobs submit` gave it, which Ray refuses to
            # merge with a second one naming the same fields
            in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
            ray.init(
                address=address,
                log_to_driver=log_to_driver,
                runtime_env=None if in_job else job_runtime_env({}),
                logging_config=_worker_logging(),
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        return ray
    # Ray Train hands the preemption switch to its controller from this process's environment only (its
    # ENV_VARS_TO_PROPAGATE), not from the workers' environment below.
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    temp = private_dir(Path(tempfile.gettempdir()) / f"omnistream-{os.getuid()}") / "ray"
    data_logging = _ray_data_logging(temp)
    # the workers' environment, inherited from the processes of this Ray (no runtime_env: no shim process per
    # worker); its GCS on a port picked here, so that the workers know their cluster's address from the start
    # (an ephemeral port the OS chose free, unlike the dashboard's fixed 8265 below that two commands would
    # both pick: taken in the second before Ray binds it, Ray says it failed to start GCS)
    env = own_environment({**LOCAL_ENV, **data_logging}, free_port())
    with _token_auth() as whose, environment(env):
        started_own_ray()
        # no dashboard_port: Ray then binds 8265, or the next port up that is free (50 tries), where a port
        # picked free here and bound later by Ray could be taken meanwhile by another command starting
        # beside this one
        # address="local": a Ray of this command's own, even where a user's `ray start` left its address in
        # /tmp/ray (ray.init() with no address would join that one, or refuse num_cpus for it)
        # Ray's own default, /tmp/ray, is made 0777 and shared by every user of the machine: its logs, and
        # the code it unpacks for workers, readable and replaceable by them. Here: a 0700 folder of ours.
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=True,
            _temp_dir=str(temp),
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=log_to_driver,
            configure_logging=True,
            logging_level="WARNING",
            logging_config=_worker_logging(),
        )
    if ctx.dashboard_url:
        log.info(
            "local Ray started (127.0.0.1 only, token authentication with %s); dashboard: http://%s",
            whose,
            ctx.dashboard_url,
        )
    return ray


def _ray_data_logging(folder: Path) -> dict[str, str]:
    """A local Ray's Ray Data logging: its documented door, a config file named by RAY_DATA_LOGGING_CONFIG,
    with Ray Data's own default (everything to the session's logs/ray-data/ file) and its console at ERROR
    unless --verbose. Every pass's "Starting execution of Dataset ...", "Execution plan ...", "Progress bars
    disabled ..." lines otherwise reach the terminal from whichever process runs the pass. The environment
    ({name: path}) for the driver and the workers; {} with --verbose or where the user named a config."""
    if logs.verbose() or "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return {}
    import copy
    import json

    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    path = folder.parent / "ray-data-logging.json"  # JSON is YAML, which Ray Data reads it as
    path.write_text(json.dumps(config))
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    return {"RAY_DATA_LOGGING_CONFIG": str(path)}


def _worker_logging():
    """Ray's own Python loggers in its worker processes at WARNING unless omnistream runs with --verbose: Ray
    Train's controller and Ray Data's coordinators otherwise send a new user's terminal their INFO lines
    ("Attempting to start training worker group ...") beside omnistream's. omnistream's own loggers keep their
    level (common/logs.py: the level travels in the environment)."""
    import ray

    from omnistream.common import logs

    return ray.LoggingConfig(log_level="INFO" if logs.verbose() else "WARNING")


@contextlib.contextmanager
def _token_auth():
    """Token authentication for a Ray started in this process: every one of its servers (GCS, raylet,
    dashboard and its Jobs API) refuses a caller without the token, so another user of this machine
    cannot run code in it. The token is the user's when they name one ($RAY_AUTH_TOKEN, or a private
    $RAY_AUTH_TOKEN_PATH); otherwise a fresh one that lives only in the environment of the processes
    this Ray starts, never on disk. (Ray's own default would write ~/.ray/auth_token readable by all.)

    Ray reads the mode and token once (its C++ config and token cache), so both are reloaded here,
    and this process's environment is put back afterwards: programs it starts later do not inherit them.
    """
    from ray._raylet import (  # no public API reloads them yet
        AuthenticationTokenLoader,
        Config,
    )

    env = {"RAY_AUTH_MODE": "token"}
    if os.environ.get("RAY_AUTH_TOKEN"):
        whose = "the token in $RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        from .auth import ensure_token

        ensure_token()  # made private if missing; refused if others can read it
        whose = f"the token in {os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        whose = "a token of this run's own"
    with environment(env):
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        yield whose
