"""The Ray that `omnistream train` starts in its own process runs with token authentication: its
dashboard's Jobs API (the door to running code on it) refuses a caller without the token, as its
GCS does a Ray client without it. Real requests to the session's in-process Ray, on 127.0.0.1."""

import subprocess
import sys
import urllib.error
import urllib.request

from common import REPO


def test_the_in_process_ray_refuses_callers_without_the_token(ray_local):
    import ray

    url = ray._private.worker.get_dashboard_url()
    assert url.startswith("127.0.0.1:"), url
    try:
        urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=30)
        raise AssertionError("the Jobs API answered a request without the token")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code
    # another process on this machine, with a token of its own, cannot join it either: the GCS refuses it
    gcs = ray._private.worker.global_worker.node.gcs_address
    p = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{gcs}', _node_ip_address='127.0.0.1')"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": "guess",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        },
    )
    assert p.returncode != 0 and "InvalidAuthToken" in p.stderr + p.stdout, (p.stdout + p.stderr)[-1500:]
    assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42  # and its own tasks run
    # and its temp dir (logs, sockets, the code unpacked for workers) sits in a folder only this user enters
    import os
    from pathlib import Path

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    assert os.stat(session.parent.parent).st_mode & 0o777 == 0o700, session


def test_the_in_process_rays_workers_inherit_the_jobs_environment_and_know_their_cluster(ray_local):
    """A local Ray hands its workers the job's environment by inheritance, with no runtime_env (with one,
    Ray starts each worker through a shim process that imports Ray first): a task sees the job's settings
    and its own cluster's address, its job has no runtime_env; none of it stays in this process's
    environment, where a later command would inherit it."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def seen() -> dict:
        keys = ("RAY_ADDRESS", "OMP_WAIT_POLICY", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
        return {**{k: os.environ.get(k) for k in keys}, "runtime_env": ray.get_runtime_context().runtime_env}

    got = ray.get(seen.remote())
    assert got["RAY_ADDRESS"] == ray.get_runtime_context().gcs_address, got
    assert got["OMP_WAIT_POLICY"] == "PASSIVE" and got["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0", got
    assert got["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0", got
    assert not got["runtime_env"], got["runtime_env"]
    assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ


def test_a_protected_tracking_server_answers_only_with_its_password(tmp_path, monkeypatch):
    """`cluster up --tracking-auth`'s server: MLflow's basic auth, with a user and password made once and
    kept mode 0600 in the 0700 store. A request without them is refused (401: another local user cannot
    read or change runs); an MLflow client given them (client_env, as a submitted job is) logs a run."""
    import json
    import os

    from omnistream.cluster.connect import free_port
    from omnistream.tracking.server import client_env, start_tracking_server, stop_tracking_server

    srv = start_tracking_server(tmp_path / "store", free_port(), auth=True)
    try:
        assert os.stat(srv["dir"]).st_mode & 0o777 == 0o700
        assert os.stat(srv["credentials"]).st_mode & 0o777 == 0o600
        for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/"):
            try:
                urllib.request.urlopen(srv["uri"] + path, timeout=30)
                raise AssertionError(f"{path} answered without the password")
            except urllib.error.HTTPError as e:
                assert e.code == 401, (path, e.code)
        env = client_env(srv)
        assert env["MLFLOW_TRACKING_PASSWORD"] == json.loads(open(srv["credentials"]).read())["password"]
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        from mlflow.tracking import MlflowClient

        c = MlflowClient(srv["uri"])
        run = c.create_run(c.create_experiment("protected"))
        c.log_metric(run.info.run_id, "train/loss", 1.5, step=1)
        assert c.get_run(run.info.run_id).data.metrics == {"train/loss": 1.5}
    finally:
        stop_tracking_server(srv)


# Another Ray on the machine, as `ray start` or Ray's own test cluster leaves one: it writes its address to
# /tmp/ray/ray_current_cluster, where Ray's address lookups without an address go when they find several.
OTHER_RAY = """
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.cluster_utils import Cluster
from omnistream.cluster.connect import free_port
c = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 0,
    "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
    "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port()})
print(c.address, flush=True)
try:
    sys.stdin.read()
finally:
    c.shutdown()
"""


def test_a_run_beside_another_ray_on_the_machine_asks_its_own(ray_local):
    """Ray Train's PlacementGroupCleaner asks the state API, every second, whether the run's controller is
    still alive, and removes the run's placement group when told no. Asked from one of our workers while
    another Ray runs on the machine, the lookup went to that other Ray, heard "no such actor", and a
    healthy run's workers were destroyed (a CI run of the suite failed so). The same question, asked the
    same way (Ray Train's own is_actor_alive, from a detached actor as the cleaner is), must be answered by
    the worker's own Ray."""
    import ray
    from ray.train.v2._internal.state.util import is_actor_alive

    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        other_address = other.stdout.readline().strip()
        assert other_address and other_address != ray.get_runtime_context().gcs_address, other_address

        @ray.remote(num_cpus=0)
        class Cleaner:
            def controller_alive(self, actor_id: str) -> bool:
                return is_actor_alive(actor_id, timeout=30)

        @ray.remote(num_cpus=0)
        class Controller:
            def actor_id(self) -> str:
                return ray.get_runtime_context().get_actor_id()

        controller = Controller.remote()
        cleaner = Cleaner.options(lifetime="detached").remote()
        try:
            assert ray.get(cleaner.controller_alive.remote(ray.get(controller.actor_id.remote())), timeout=120)
        finally:
            ray.kill(cleaner)
            ray.kill(controller)
    finally:
        other.stdin.close()
        other.wait(timeout=120)
