"""A `cluster up` that fails leaves nothing behind, and the next one starts: a dashboard port held by
another listener, a step that fails after Ray's processes are up, and `cluster down` for a head of ours
that has no record (after the `up` that works, to start one head fewer on 2 cores). Each head uses its own token file
and state folder, not the user's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common import REPO
from omnistream.cluster.connect import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_only")]
BIN = Path(sys.executable).parent


def omni(args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "omnistream"), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


def ours(port: int) -> list:
    """Every process whose command line names the head's temp folder, or its tracking store."""
    from omnistream.cluster.head import head_processes

    state = Path(os.environ["OMNI_TEST_STATE"])
    tracking = [q.pid for q in head_processes(str(state / f"mlflow-{port}"))]
    return [q for q in head_processes(str(Path(_tmp()) / f"omni-ray-{port}"), (), tracking) if q.is_running()]


def _tmp() -> str:
    import tempfile

    return tempfile.gettempdir()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_TEST_STATE", str(tmp_path / "state"))
    e = {
        **os.environ,
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"),
        "OMNISTREAM_CLUSTER_DIR": str(tmp_path / "state"),
    }
    e.pop("RAY_ADDRESS", None)
    return e


def test_a_taken_port_fails_in_one_line_leaves_nothing_the_next_up_starts_and_down_ends_an_unrecorded_head(
    env, tmp_path
):
    port, dport = free_port(), free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", dport))
    holder.listen()
    try:
        p = omni(["cluster", "up", "--port", str(port), "--dashboard-port", str(dport), "--num-cpus", "1"], env)
    finally:
        holder.close()
    assert p.returncode == 2, p.stdout + p.stderr
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert f"port {dport}" in line and "--dashboard-port" in line, line
    assert f"pid {os.getpid()}" in line, f"the holder (this test's process) is named: {line}"
    assert not ours(port), [q.cmdline() for q in ours(port)]
    assert not (tmp_path / "state" / f"head-{port}.json").exists()
    assert not Path(_tmp(), f"omni-ray-{port}").exists()

    # the port free again, the same command starts a head
    up = omni(["cluster", "up", "--port", str(port), "--dashboard-port", str(dport), "--num-cpus", "1"], env)
    assert up.returncode == 0, up.stdout + up.stderr
    running = ours(port)
    assert len(running) >= 3

    # a head of ours that lost its record (a `cluster up` killed half-way, an older omnistream): a new `up`
    # says how to end it, and `down` finds it by its folder and ends it
    (tmp_path / "state" / f"head-{port}.json").unlink()
    again = omni(["cluster", "up", "--port", str(port), "--dashboard-port", str(free_port())], env)
    assert again.returncode == 2 and "cluster down --port" in again.stderr, again.stderr
    down = omni(["cluster", "down", "--port", str(port)], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "no record" in down.stdout, down.stdout
    assert not [q for q in running if q.is_running() and q.status() != "zombie"]
    assert not ours(port) and not Path(_tmp(), f"omni-ray-{port}").exists()
    nothing = omni(["cluster", "down", "--port", str(port)], env)
    assert nothing.returncode == 2 and "none of ours" in nothing.stderr, nothing.stderr


def test_a_step_failing_after_ray_started_ends_every_process_it_started(env, tmp_path):
    """Ray's head is up when its tracking server cannot start (its store's path is a file): every process
    of the head ends, its folder and record go, and the one-line cause is what the user sees."""
    port, dport = free_port(), free_port()
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / f"mlflow-{port}").write_text("in the way")
    p = omni(["cluster", "up", "--port", str(port), "--dashboard-port", str(dport), "--num-cpus", "1"], env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and f"mlflow-{port}" in p.stderr, p.stderr
    assert not ours(port), [q.cmdline() for q in ours(port)]
    assert not (tmp_path / "state" / f"head-{port}.json").exists()
    assert not Path(_tmp(), f"omni-ray-{port}").exists()
    listening = {c.laddr.port for c in __import__("psutil").net_connections(kind="inet") if c.status == "LISTEN"}
    assert port not in listening and dport not in listening
