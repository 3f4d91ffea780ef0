"""Run by test_placement.py in its own process (a Ray cluster is one per process): simulate a
two-node cluster on this machine with Ray's multi-node test utility, a CPU "data" node and a
"trainer" node standing in for a GPU node, train on it with placement from the config, and print
where every actor actually ran, as one JSON line.

    python tests/system/placement_run.py CONFIG_TOML
"""

import json
import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil
import ray
from ray.cluster_utils import Cluster

from omnistream.cluster.connect import free_port, job_runtime_env
from omnistream.cluster.driver import run_training
from omnistream.configs import load_config


def _listening(p) -> list:
    try:
        return [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def main(path: str) -> None:
    loopback = {"node_ip_address": "127.0.0.1"}
    c = Cluster(
        initialize_head=True,
        head_node_args={
            **loopback,
            "num_cpus": 2,
            "resources": {"data": 2},
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "gcs_server_port": free_port(),
            # the suite's own Ray may hold the default ports of a second node's agents
            "dashboard_agent_listen_port": free_port(),
        },
    )
    trainer = c.add_node(**loopback, num_cpus=1, resources={"trainer": 2})
    try:
        ray.init(address=c.address, runtime_env=job_runtime_env({}))
        res = run_training(load_config(path))
        from ray.util.state import list_actors

        listed = list_actors(detail=True, limit=1000)
        actors = [{"class": a.class_name, "node": a.node_id} for a in listed]
        # rank 0 is the one training worker here: the node its actor ran on
        rank0 = next(a.node_id for a in listed if "TrainWorker" in a.class_name)
        listening = sorted(
            {f"{p.name()} {c.laddr.ip}" for p in psutil.Process().children(recursive=True) for c in _listening(p)}
        )
        print(
            json.dumps(
                {
                    "data_node": c.head_node.node_id,
                    "trainer_node": trainer.node_id,
                    "actors": actors,
                    "run_id": res.run_id,
                    "rank0_node": rank0,
                    "step": res.metrics.get("train/loss") is not None,
                    "listening": listening,
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        c.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
