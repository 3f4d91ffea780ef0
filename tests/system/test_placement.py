"""Placement on a heterogeneous cluster, simulated as two Ray nodes on this machine: tokenizing runs
only where the config's data resource is, training workers only where their resource is."""

import json

import pytest

from common import DIGIT_TASKS, SMALL_MODALITIES, cluster_script

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_only")]

from common import REPO as ROOT  # noqa: E402


def test_tokenizers_on_data_nodes_and_training_on_trainer_nodes(corpus, bundle, tmp_path):
    """Also the tracking of a real cluster: rank 0 runs on the second node and logs over HTTP to the
    tracking server the head would run (`cluster up` starts the same one); its metrics, system metrics,
    sample images and checkpoint tag all reach that server, and no SQLite store appears anywhere else."""
    from omnistream.cluster.connect import free_port
    from omnistream.tracking.server import start_tracking_server, stop_tracking_server

    d = corpus["dir"]
    server = start_tracking_server(tmp_path / "tracking", free_port())
    repo_db = ROOT / "mlflow.db"
    repo_db_mtime = repo_db.stat().st_mtime if repo_db.exists() else None
    cfg = tmp_path / "placed.toml"
    cfg.write_text(f"""
name = "placed"
{SMALL_MODALITIES}{DIGIT_TASKS}[eval]
examples = 10
loss_rows = 4
samples = 1
max_new_tokens = 3
[data]
train_shards = ["{d}/train-*.tar"]
eval_shards = ["{d}/eval-000.tar"]
bundle_dir = "{bundle}"
seq_len = 128
data_resources = {{ data = 1 }}
[model]
n_layers = 1
d_model = 32
n_heads = 2
[train]
steps = 3
micro_batch_size = 4
warmup_steps = 1
log_every = 1
[cluster]
num_workers = 1
cpus_per_worker = 0.25
worker_resources = {{ trainer = 1 }}
storage_path = "{tmp_path}/ray"
[tracking]
uri = "{server["uri"]}"
system_metrics_interval_s = 1
""")
    try:
        p = cluster_script("placement_run.py", cfg, timeout=600)
        _check_tracking(p, server, tmp_path)
    finally:
        stop_tracking_server(server)
    assert repo_db_mtime == (repo_db.stat().st_mtime if repo_db.exists() else None), "nothing written to ./mlflow.db"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    data_node, trainer_node = out["data_node"], out["trainer_node"]
    where: dict[str, set] = {}
    for a in out["actors"]:
        where.setdefault(a["class"], set()).add(a["node"])
    data_actors = ("ShardTokenizer", "WindowRows", "Positions")  # tokenizing, packing, numbering the rows
    tokenizers = {n for cls, nodes in where.items() if any(a in cls for a in data_actors) for n in nodes}
    trainers = {n for cls, nodes in where.items() if "TrainWorker" in cls for n in nodes}
    assert tokenizers == {data_node}, where
    assert trainers == {trainer_node}, where
    assert out["step"]
    # every server of both simulated nodes listens on loopback only
    assert out["rank0_node"] == trainer_node
    assert out["listening"] and all(
        ln.split()[-1].startswith(("127.", "::ffff:127.")) or ln.split()[-1] == "::1" for ln in out["listening"]
    ), out["listening"]


def _check_tracking(p, server, tmp_path) -> None:
    from common import mlflow_client

    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    uri, run_id = server["uri"], out["run_id"]
    c = mlflow_client(uri)
    run = c.get_run(run_id)
    m = run.data.metrics
    assert {"train/loss", "train/loss/text", "eval/loss", "data/seen"} <= set(m), sorted(m)
    node = out["rank0_node"][:8]
    assert any(k.startswith(f"system/node-{node}/cpu_utilization_percentage") for k in m), sorted(m)
    assert run.data.tags.get("omnistream.checkpoint", "").startswith(str(tmp_path / "ray"))
    images = [a.path for a in c.list_artifacts(run_id, "images")]
    assert any("text_to_image" in a for a in images), images
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert "ZeRO-" in run.data.tags.get("mlflow.note.content", "")
    dbs = [str(f) for f in tmp_path.rglob("mlflow.db")]
    assert dbs == [server["dir"] + "/mlflow.db"], dbs
