"""The scale rehearsal (issue 38): eight training ranks on four Ray nodes simulated on this machine, fed by
seven shards of very different sizes (fewer shards than ranks), a node removed mid-run with its ranks and
data actors, and a resume across 8 -> 3 -> 8 ranks with named sources and a schedule switch between. Every
run's global order of consumption is compared by its ledger digest with the uninterrupted run's. The
cluster is heterogeneous (three data nodes, one "GPU" node with a `trainer` resource), and the uninterrupted
run is also the placement run: tokenizing only where the data resource is, its rank where its resource is,
logging over HTTP to the tracking server the head would run.

One process of its own (tests/system/scale_run.py: a Ray cluster is one per process) runs the four runs;
the tests read its JSON. Cost on 2 cores, alone: about 4 minutes (1 + 8 + 8 + 3 + 8 ranks started, a tiny
model, 12 steps); `make test` runs it (first, as its longest scope), `make test-scale` runs it alone."""

import ipaddress
import json
from pathlib import Path

import pytest

from common import DIGIT_TASKS, REPO, SMALL_MODALITIES, cluster_script, mlflow_client, tar_records
from common import _tar as write_tar

pytestmark = [pytest.mark.slow, pytest.mark.scale, pytest.mark.usefixtures("own_ray_only")]

# records of the seven shards, 3 to 150: source a gets the 1st, 3rd, 5th and 7th, source b the others
SIZES = (3, 8, 20, 35, 60, 100, 150)
STEPS, LOST_AT, THREE_TO, SWITCH = 12, 6, 10, 8  # (scale_run.py's); the schedule switches at step 8
ROWS = 24  # the global batch: 8 ranks × micro-batch 1 × grad_accum 3 (3 ranks: × 8)


@pytest.fixture(scope="module")
def rehearsal(corpus, bundle, tmp_path_factory):
    from omnistream.cluster.connect import free_port
    from omnistream.tracking.server import start_tracking_server, stop_tracking_server

    tmp = tmp_path_factory.mktemp("scale")
    server = start_tracking_server(tmp / "tracking", free_port())
    repo_db = REPO / "mlflow.db"
    repo_db_mtime = repo_db.stat().st_mtime if repo_db.exists() else None
    records = [r for s in corpus["train"] for r in tar_records(s)]
    shards, at = {"a": [], "b": []}, 0
    for i, n in enumerate(SIZES):
        name = "ab"[i % 2]
        shards[name].append(write_tar(records[at : at + n], tmp / f"{name}-{len(shards[name])}.tar"))
        at += n
    cfg = tmp / "scale.toml"
    cfg.write_text(f"""
name = "scale"
{SMALL_MODALITIES}{DIGIT_TASKS}[eval]
examples = 10
loss_rows = 4
samples = 1
max_new_tokens = 3
[data]
bundle_dir = "{bundle}"
eval_shards = []
seq_len = 64
epochs = 4
packers = 2
data_resources = {{ data = 1 }}
[data.sources.a]
shards = {json.dumps(shards["a"])}
weight = [[0, 0.7], [{SWITCH}, 0.2]]
[data.sources.b]
shards = {json.dumps(shards["b"])}
weight = [[0, 0.3], [{SWITCH}, 0.8]]
[model]
n_layers = 1
d_model = 32
n_heads = 2
[train]
micro_batch_size = 1
grad_accum = 3
warmup_steps = 1
log_every = 1
zero_stage = 3
checkpoint_every = 2
keep_checkpoints = 10
[cluster]
num_workers = 8
cpus_per_worker = 0.25
placement_strategy = "SPREAD"
storage_path = "{tmp}/ray"
[tracking]
uri = "{server["uri"]}"
# a node's monitor imports MLflow in its first rank: 3 of 4 nodes' in each 8-rank start; the placement run
# (`whole`) samples its node's
system_metrics_interval_s = 0
""")
    # the placement run: evaluated on the held-out shard (images, tasks), its node's system metrics sampled
    placement = [f'data.eval_shards=["{corpus["eval"][0]}"]', "tracking.system_metrics_interval_s=1"]
    try:
        p = cluster_script("scale_run.py", cfg, 900, *placement)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        (tmp / "rehearsal.json").write_text(json.dumps(out, indent=1))  # what happened, kept for a reader
        out |= {"shards": shards, "server": server, "tmp": tmp}
        out["repo_db_unchanged"] = repo_db_mtime == (repo_db.stat().st_mtime if repo_db.exists() else None)
        yield out  # the tests read the runs back from the tracking server
    finally:
        stop_tracking_server(server)


def _history(rehearsal, run: str, key: str) -> dict[int, float]:
    """A metric's values by step, as the run's tracking run holds them (a step logged twice: the last)."""
    c = mlflow_client(rehearsal["server"]["uri"])
    return {m.step: m.value for m in c.get_metric_history(rehearsal[run]["run_id"], key)}


def _window(rehearsal) -> int:
    """Documents per packing window, as the uninterrupted run planned it (a window of each source's)."""
    return sum(json.loads((Path(rehearsal["whole"]["checkpoint"]) / "data.json").read_text())["stream"]["window"])


def _balanced(run: dict) -> None:
    """Every record of the seven shards seen once, and accounted for under its source."""
    m = run["metrics"]
    for i, name in enumerate("ab"):
        records = sum(SIZES[i::2])
        assert m[f"data/source/{name}/seen"] == records
        assert records == sum(m.get(f"data/source/{name}/{k}", 0) for k in ("kept", "filtered", "errored"))
    assert (
        m["data/seen"]
        == sum(SIZES)
        == m["data/kept"] + sum(v for k, v in m.items() if k.startswith(("data/filtered/", "data/errored/")))
    )


def test_eight_ranks_on_four_nodes_take_seven_uneven_shards_whole_and_in_order(rehearsal):
    """8 ranks, 2 on each of the 4 nodes, the stream's data actors on more than one; the 7 shards (3 to 150
    records) are tokenized whole and every record is accounted for under its source; every step took the
    global batch, each rank its blocks in the global order (the Trainer checks each micro-batch's place: a
    rank given another's block stops the run), the same order as one rank's (the digests)."""
    lost, whole = rehearsal["lost"], rehearsal["whole"]
    nodes = [rehearsal["head"], *rehearsal["nodes"]]
    ranks = lost["node_loss"]["before"]
    assert len(ranks) == 8 and sorted(ranks.count(n) for n in nodes) == [2, 2, 2, 2], ranks
    assert len(lost["node_loss"]["data_nodes"]) > 1, lost["node_loss"]
    for run in ("whole", "lost", "three", "eight"):
        _balanced(rehearsal[run])
    assert whole["metrics"]["data/consumed_rows"] == STEPS * ROWS
    assert sorted(map(int, whole["digests"])) == list(range(2, STEPS + 1, 2))
    assert whole["digest"] == whole["digests"][str(STEPS)]
    assert lost["digests"]["2"] == whole["digests"]["2"]  # 8 ranks before the loss, as one rank


def test_a_node_lost_mid_run_resumes_on_the_nodes_left_with_the_same_ranks_and_digest(rehearsal):
    """The removed node held 2 ranks and a data actor of the run; the driver started the worker group again
    from the checkpoint made before, and Ray placed the same 8 ranks on the 3 nodes left; the run's digest
    at its end equals the uninterrupted run's at the same step."""
    lost = rehearsal["lost"]
    loss = lost["node_loss"]
    assert "error" not in loss, loss
    assert loss["removed_ranks"] == 2 and loss["removed_data_actors"] >= 1, loss
    assert len(loss["after"]) == 8 and loss["removed"] not in loss["after"] and len(set(loss["after"])) == 3, loss
    assert any("restarting from" in ln for ln in rehearsal["driver_log"]), rehearsal["driver_log"]
    assert lost["metrics"]["data/consumed_rows"] == LOST_AT * ROWS
    assert lost["digest"] == rehearsal["whole"]["digests"][str(LOST_AT)]
    # one tracking run: its step axis goes on to the end across the restart, which resumed from a checkpoint
    # made before the loss, re-reading at most one packing window of documents
    assert set(_history(rehearsal, "lost", "train/loss")) == set(range(1, LOST_AT + 1))
    (resumed,) = _history(rehearsal, "lost", "data/resume/seconds")  # logged with the first step after
    assert resumed - 1 in (2, 4), resumed
    replayed = _history(rehearsal, "lost", "data/resume/replayed_records")[resumed]
    assert 0 < replayed <= _window(rehearsal), replayed


def test_eight_to_three_to_eight_ranks_across_the_schedule_switch_keeps_the_digest(rehearsal):
    """`lost`'s step-6 checkpoint (8 ranks) on 3 ranks (grad_accum 8 keeps 24 rows a step) across the switch
    at step 8, then on 8 ranks over the four nodes again (the removed node added back) after it: the
    uninterrupted run's digest at steps 10 and 12."""
    whole = rehearsal["whole"]
    assert rehearsal["three"]["digest"] == whole["digests"][str(THREE_TO)]
    assert rehearsal["eight"]["digest"] == whole["digest"]
    log = rehearsal["driver_log"]
    assert any("of 8 workers resumes on 3: train.grad_accum=8" in ln for ln in log), log
    assert any("of 3 workers resumes on 8: train.grad_accum=3" in ln for ln in log), log
    assert len(rehearsal["alive_nodes"]) == 4 and len(set(rehearsal["eight"]["placed"]["ranks"])) == 4
    # each resume re-reads at most a window of documents before going on
    for run, first in (("three", LOST_AT + 1), ("eight", THREE_TO + 1)):
        assert min(_history(rehearsal, run, "train/loss")) == first, run
        replayed = _history(rehearsal, run, "data/resume/replayed_records")[first]
        assert 0 < replayed <= _window(rehearsal), (run, replayed)
        # tokenized once, by the uninterrupted run: every later run reads the token cache
        reused = sum(rehearsal[run]["metrics"][f"data/cache/{name}/shards_reused"] for name in "ab")
        assert reused == len(SIZES), (run, reused)


def test_the_placement_run_tokenizes_on_data_nodes_trains_on_its_node_and_logs_over_http(rehearsal):
    """The uninterrupted run on the heterogeneous cluster: tokenizing, packing and numbering the rows only on
    the three nodes with the data resource, its rank only on the node with the `trainer` resource; rank 0
    there logs over HTTP to the tracking server the head would run (`cluster up` starts the same one): its
    metrics, its node's system metrics, sample images and checkpoint tag all reach that server, and no
    SQLite store appears anywhere else; every server of the four nodes listens on loopback only."""
    whole, trainer_node = rehearsal["whole"], rehearsal["trainer_node"]
    where: dict[str, set] = {}
    for a in whole["actors"]:
        where.setdefault(a["class"], set()).add(a["node"])
    data_actors = ("ShardTokenizer", "WindowRows", "Positions")  # tokenizing, packing, numbering the rows
    tokenizers = {n for cls, nodes in where.items() if any(a in cls for a in data_actors) for n in nodes}
    trainers = {n for cls, nodes in where.items() if "TrainWorker" in cls for n in nodes}
    assert tokenizers and tokenizers <= set(rehearsal["data_nodes"]), where
    assert trainers == {trainer_node}, where
    assert whole["listening"] and all(ipaddress.ip_address(ln.split()[-1]).is_loopback for ln in whole["listening"]), (
        whole["listening"]
    )

    c = mlflow_client(rehearsal["server"]["uri"])
    run = c.get_run(whole["run_id"])
    m = run.data.metrics
    assert {"train/loss", "train/loss/text", "eval/loss", "data/seen"} <= set(m), sorted(m)
    assert any(k.startswith(f"system/node-{trainer_node[:8]}/cpu_utilization_percentage") for k in m), sorted(m)
    assert run.data.tags.get("omnistream.checkpoint", "").startswith(str(rehearsal["tmp"] / "ray"))
    images = [a.path for a in c.list_artifacts(whole["run_id"], "images")]
    assert any("text_to_image" in a for a in images), images
    assert c.get_experiment(run.info.experiment_id).tags.get("mlflow.experimentKind") == "custom_model_development"
    assert "ZeRO-" in run.data.tags.get("mlflow.note.content", "")
    dbs = [str(f) for f in rehearsal["tmp"].rglob("mlflow.db")]
    assert dbs == [rehearsal["server"]["dir"] + "/mlflow.db"], dbs
    assert rehearsal["repo_db_unchanged"], "nothing written to ./mlflow.db"
    # the nodes hold every variable Ray Train hands its controller: it starts with no runtime_env, and no worker
    # of the runs through Ray's shim (cluster/controller.py)
    assert rehearsal["controller_env_missing"] == [], rehearsal["controller_env_missing"]
