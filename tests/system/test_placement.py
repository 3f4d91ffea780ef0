"""Placement on a heterogeneous cluster, simulated as two Ray nodes on this machine: tokenizing runs
only where the config's data resource is, training workers only where their resource is."""
import json
import os
import subprocess
import sys

import pytest
from common import SMALL_MODALITIES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_only")]

from common import REPO as ROOT  # noqa: E402


def test_tokenizers_on_data_nodes_and_training_on_trainer_nodes(corpus, bundle, tmp_path):
    d = corpus["dir"]
    cfg = tmp_path / "placed.toml"
    cfg.write_text(f"""
name = "placed"
{SMALL_MODALITIES}[data]
train_shards = ["{d}/train-*.tar"]
eval_shards = []
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
uri = "sqlite:///{tmp_path}/mlflow.db"
""")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "system" / "placement_run.py"), str(cfg)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=ROOT)
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
    assert out["listening"] and all(ln.split()[-1].startswith(("127.", "::ffff:127.")) or ln.split()[-1] == "::1"
                                    for ln in out["listening"]), out["listening"]
