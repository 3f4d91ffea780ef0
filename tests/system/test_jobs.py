"""Submitting to a real Ray head, as a user does: `omnistream cluster up`, `omnistream submit --follow`,
Ray's own `ray job list`, the job's MLflow run, one-line errors for a bad token or address, and
`omnistream cluster down`. The head uses its own token file and state folder, not the user's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common import SMALL_MODALITIES, mlflow_client, mlflow_run
from omnistream.cluster.connect import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_only")]

from common import REPO as ROOT  # noqa: E402

BIN = Path(sys.executable).parent


def run(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"), "OMNISTREAM_CLUSTER_DIR": str(tmp / "state")}
    env.pop("RAY_ADDRESS", None)
    port, dport = free_port(), free_port()
    up = run(
        [
            "omnistream",
            "cluster",
            "up",
            "--port",
            str(port),
            "--dashboard-port",
            str(dport),
            "--num-cpus",
            "2",
            "--tracking-auth",
        ],
        env,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    # this process reads the job's run from the protected tracking server as a user would: with its credentials
    from omnistream.tracking.server import client_env

    creds = client_env(json.loads((tmp / "state" / f"head-{port}.json").read_text())["tracking"])
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        yield {
            "env": env,
            "port": port,
            "dashboard": f"http://127.0.0.1:{dport}",
            "tmp": tmp,
            "up": up.stdout,
            "password": creds["MLFLOW_TRACKING_PASSWORD"],
        }
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if (tmp / "state" / f"head-{port}.json").exists():  # the last test takes it down itself
            down = run(["omnistream", "cluster", "down", "--port", str(port)], env)
            assert down.returncode == 0, down.stdout + down.stderr


def test_head_is_loopback_only_with_a_token(head):
    from omnistream.cluster.head import head_processes

    assert "token authentication on" in head["up"] and str(head["tmp"] / "auth_token") in head["up"]
    assert (head["tmp"] / "auth_token").stat().st_mode & 0o077 == 0, "the token file is private"
    temp = next(
        ln.split('"')[3]
        for ln in (head["tmp"] / "state" / f"head-{head['port']}.json").read_text().splitlines()
        if '"temp_dir"' in ln
    )
    state = json.loads((head["tmp"] / "state" / f"head-{head['port']}.json").read_text())
    # private to this user: the folder Ray's temp dir (0777 by Ray's own doing) is in, its state and the
    # tracking server's store (other users could read the jobs' logs and replace their uploaded code)
    for d in (temp, head["tmp"] / "state", state["tracking"]["dir"]):
        assert os.stat(d).st_mode & 0o777 == 0o700, (d, oct(os.stat(d).st_mode))
    assert (Path(temp) / "r").is_dir() and any((Path(temp) / "r").glob("session_*")), "Ray's temp dir is inside"
    procs = head_processes(temp, state["ports"], [state["tracking"]["pid"]])
    assert len(procs) >= 3
    assert any("mlflow" in " ".join(p.cmdline()) for p in procs), "the tracking server is one of them"
    listening = []
    for p in procs:
        try:
            listening += [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    assert listening and all(ip.startswith(("127.", "::ffff:127.")) or ip == "::1" for ip in listening), listening


def test_submit_follow_runs_the_job_to_success(head, corpus, bundle):
    tmp, d = head["tmp"], corpus["dir"]
    cfg = tmp / "job.toml"
    cfg.write_text(f"""
name = "submitted"
{SMALL_MODALITIES}[data]
train_shards = ["{d}/train-*.tar"]
eval_shards = []
bundle_dir = "{bundle}"
seq_len = 128
[model]
n_layers = 2
d_model = 64
n_heads = 2
[train]
steps = 4
micro_batch_size = 4
warmup_steps = 1
log_every = 1
zero_stage = 3
[cluster]
num_workers = 1
cpus_per_worker = 0.5
storage_path = "{tmp}/ray"
""")  # no [tracking]: the job logs to the tracking server `cluster up` started with the head
    p = run(["omnistream", "submit", str(cfg), "--address", head["dashboard"], "--follow"], head["env"])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    job_id = next(ln.split()[-1] for ln in p.stdout.splitlines() if ln.startswith("submitted job "))
    assert f"job {job_id} SUCCEEDED" in p.stdout
    # Ray's own CLI agrees, given what Ray's docs say a client needs: token mode and the token
    listed = run(
        ["ray", "job", "list", "--address", head["dashboard"]], {**head["env"], "RAY_AUTH_MODE": "token"}, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    # the tracking server's password reached the job (its run is there) but not its runtime env, which Ray
    # shows every client
    assert "OMNISTREAM_TRACKING_CREDENTIALS" in listed.stdout and head["password"] not in listed.stdout
    status = run(["omnistream", "jobs", "status", job_id, "--address", head["dashboard"]], head["env"])
    assert status.stdout.strip() == "SUCCEEDED"
    # the job's MLflow run is on the head's tracking server, and holds the metrics
    state = json.loads((tmp / "state" / f"head-{head['port']}.json").read_text())
    uri = state["tracking"]["uri"]
    # --follow shows omnistream's own lines of the job (its driver's and its workers'), Ray's prefixes taken off
    assert uri.startswith("http://127.0.0.1:") and f"(mlflow at {uri})" in p.stdout
    run_id = next(ln.split("tracking run ")[1].split()[0] for ln in p.stdout.splitlines() if "tracking run " in ln)
    assert any(ln.startswith("[omnistream] step 4/4 loss=") for ln in p.stdout.splitlines()), p.stdout[-3000:]
    assert "RayTrainWorker" not in p.stdout and "open http://127.0.0.1:" in p.stdout
    assert [str(f) for f in tmp.rglob("mlflow.db")] == [f"{state['tracking']['dir']}/mlflow.db"], (
        "no SQLite store but the server's"
    )
    assert not list(Path(state["temp_dir"]).rglob("mlflow.db")), "none where the job ran"
    m = mlflow_run(uri, run_id).final_metrics()
    for key in (
        "train/loss",
        "train/loss/text",
        "train/loss/image",
        "train/loss/audio",
        "train/tokens_per_s",
        "data/seen",
        "data/kept",
    ):
        assert key in m, key
    assert mlflow_client(uri).get_run(run_id).data.tags.get("data.ledger_digest")


def test_bad_token_and_unreachable_address_are_one_line_exit_2(head):
    env = {**head["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    p = run(["omnistream", "jobs", "list", "--address", head["dashboard"]], env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "token" in p.stderr, p.stderr
    p = run(["omnistream", "submit", "configs/demo.toml", "--address", f"http://127.0.0.1:{free_port()}"], head["env"])
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot reach" in p.stderr, p.stderr


def test_head_processes_match_whole_temp_dirs_only(tmp_path):
    """A head on port 6379 must not claim the processes of a head on 63790 (a substring match would)."""
    from omnistream.cluster.head import head_processes

    other = tmp_path / "omni-ray-63790"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--temp-dir={other}"])
    # another user's process naming the same folder is never ours to signal (root here: run it as nobody)
    theirs = (
        subprocess.Popen(["/bin/sh", "-c", "sleep 60; true", "sh", f"--temp-dir={other}"], user=65534)
        if os.getuid() == 0
        else None
    )
    try:
        assert p.pid in {q.pid for q in head_processes(str(other))}
        assert p.pid not in {q.pid for q in head_processes(str(tmp_path / "omni-ray-6379"))}
        if theirs is not None:
            assert theirs.pid not in {q.pid for q in head_processes(str(other))}
    finally:
        for q in (p, theirs):
            if q is not None:
                q.kill()
                q.wait()


def test_cluster_down_leaves_nothing_of_its_head(head):
    """Every process of the head ends, Ray's client server included, and nothing listens on its ports."""
    import json

    state = json.loads((head["tmp"] / "state" / f"head-{head['port']}.json").read_text())
    from omnistream.cluster.head import head_processes

    before = head_processes(state["temp_dir"], state["ports"], [state["tracking"]["pid"]])
    names = " ".join(" ".join(q.cmdline()) for q in before)
    assert "client.server" in names, "the client server is one of the head's processes"
    down = run(["omnistream", "cluster", "down", "--port", str(head["port"])], head["env"])
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [q.pid for q in before if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not listening & set(state["ports"]), sorted(listening & set(state["ports"]))
