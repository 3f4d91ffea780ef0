"""Run by test_scale.py in its own process (a Ray cluster is one per process): the scale rehearsal of issue 38
on a cluster of four Ray nodes simulated on this machine (Ray's multi-node test utility), and one JSON line of
what happened.

    python tests/system/scale_run.py CONFIG_TOML [KEY=VALUE ...]

The cluster is heterogeneous, as one with CPU and GPU nodes: three nodes with the config's data resource
(the head and two workers: the tokenizing and packing actors run there), and one "GPU" node with a
`trainer` resource in their place. The config trains 8 ranks (ZeRO-3, gloo), spread over all four nodes
(cluster.placement_strategy = "SPREAD"), on named sources with a weight schedule, logging over HTTP to a
tracking server. Four runs, one after another:
- `whole`: uninterrupted, train.steps = STEPS, a checkpoint every 2 steps (the digests compared with), on
  one rank (grad_accum 24: the same global batch; the global order does not depend on the ranks, so one
  rank gives the same digests as eight, for an eighth of the processes). It is also the placement run: its
  rank asks for the `trainer` resource, and the KEY=VALUE overrides (the test's evaluation and system
  metrics) apply to it alone;
- `lost`: 8 ranks to step LOST_AT; as soon as its first checkpoint is complete, a data node holding training
  ranks and data actors is removed with everything on it, as a machine that dies; the driver starts the
  worker group again from that checkpoint (train.max_failures = 1) on the three nodes left;
- `three`: `lost`'s last checkpoint resumed on 3 ranks (grad_accum keeps the global batch), to THREE_TO,
  across the schedule's switch; the removed node is added back first (the cluster grows back to four);
- `eight`: `three`'s last checkpoint resumed on 8 ranks over the four nodes, to STEPS.

The nodes start with the job's environment (connect.own_environment, as a local Ray's do), not with a
runtime_env: Ray would start each of the rehearsal's ~100 workers through a shim process that imports Ray
first, 0.4 s of CPU each (10 actors: 8.7 -> 4.6 s of CPU, measured).
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: its `common`
from common import LogLines, sockets_of_this_tree, tcp_listeners
from omnistream.cluster.connect import LOCAL_ENV, free_port, own_environment, own_ray_env, started_own_ray
from omnistream.cluster.controller import missing_on_nodes
from omnistream.cluster.driver import run_training
from omnistream.configs import load_config
from omnistream.training.checkpoint import latest_checkpoint

STEPS, LOST_AT, THREE_TO = 12, 6, 10
LOOPBACK = {"node_ip_address": "127.0.0.1"}
# 2 logical CPUs a node (8 on the machine's 2 cores): 8 ranks at 0.25 fit on three nodes with room for the
# data actors; 2 units of the config's data resource a data node, so that the stream's actors (data.packers
# packers and the one that deals the rows, one unit each) cannot all sit on one node; a small object store
# each (the stream's blocks are kilobytes)
CPU_NODE = {**LOOPBACK, "num_cpus": 2, "resources": {"data": 2}, "object_store_memory": 150 * 1024**2}
GPU_NODE = {**CPU_NODE, "resources": {"trainer": 2}}


def _actors() -> list[dict]:
    from ray.util.state import list_actors

    return [
        {"id": a.actor_id, "class": a.class_name, "node": a.node_id, "state": a.state}
        for a in list_actors(detail=True, limit=10000)
    ]


def _ranks_alive() -> list[str]:
    """The node of every live training worker."""
    return [a["node"] for a in _actors() if "TrainWorker" in a["class"] and a["state"] == "ALIVE"]


def _placed(before: set[str]) -> dict:
    """Where the actors started since `before` (actor ids) ran: each training rank's node, and the nodes of
    the stream's data actors (Ray Data's map workers)."""
    new = [a for a in _actors() if a["id"] not in before]
    return {
        "ranks": [a["node"] for a in new if "TrainWorker" in a["class"]],
        "data": sorted({a["node"] for a in new if "MapWorker" in a["class"]}),
    }


def _ids() -> set[str]:
    return {a["id"] for a in _actors()}


def _digests(res) -> dict[int, str]:
    """step -> the data position's ledger digest, of every checkpoint the run kept."""
    out = {}
    for c in res.checkpoints:
        meta = json.loads((Path(c) / "omnistream.json").read_text())
        out[meta["step"]] = json.loads((Path(c) / "data.json").read_text())["position"]["digest"]
    return out


def _summary(res) -> dict:
    return {
        "run_id": res.run_id,
        "digest": res.ledger_digest,
        "checkpoint": res.checkpoint,
        "digests": _digests(res),
        "metrics": {k: v for k, v in res.metrics.items() if k.startswith(("data/", "train/loss"))},
        "report": res.data_report,
        "wall_s": round(res.wall_s, 1),
    }


def main(path: str, whole_overrides: list[str]) -> None:
    gcs = free_port()
    # every node starts with the job's environment (see above); the simulated nodes are this one machine, none
    # preemptible: no preemption watcher per worker group (connect.LOCAL_ENV, as for a local Ray)
    os.environ.update(own_environment(LOCAL_ENV, gcs))
    started_own_ray()  # the nodes inherit it: Ray Train's controller needs no runtime_env (cluster/controller.py)
    c = Cluster(
        initialize_head=True,
        head_node_args={
            **CPU_NODE,
            "include_dashboard": True,  # the state API (where each actor runs) reads through it
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "gcs_server_port": gcs,
            "dashboard_agent_listen_port": free_port(),
        },
    )
    workers = [c.add_node(**CPU_NODE, dashboard_agent_listen_port=free_port()) for _ in range(2)]
    gpu = c.add_node(**GPU_NODE, dashboard_agent_listen_port=free_port())
    out: dict = {
        "head": c.head_node.node_id,
        "nodes": [n.node_id for n in [*workers, gpu]],
        "data_nodes": [c.head_node.node_id, *(n.node_id for n in workers)],
        "trainer_node": gpu.node_id,
    }
    base = load_config(path)
    storage = Path(base.cluster.storage_path)

    def cfg(name: str, *extra: str):
        return load_config(path, [f'name="{name}"', f'cluster.storage_path="{storage / name}"', *extra])

    with LogLines() as lines:  # the driver's log
        try:
            ray.init(address=c.address)
            t0 = time.time()
            before = _ids()
            whole = run_training(
                cfg(
                    "whole",
                    f"train.steps={STEPS}",
                    "cluster.num_workers=1",
                    "train.grad_accum=24",
                    "cluster.worker_resources={ trainer = 1 }",
                    *whole_overrides,
                )
            )
            out["whole"] = _summary(whole) | {
                "placed": _placed(before),
                "actors": [{"class": a["class"], "node": a["node"]} for a in _actors() if a["id"] not in before],
                # every listening socket of this cluster's processes: "name[pid] address"
                "listening": sockets_of_this_tree({ino: addr for ino, addr, _ in tcp_listeners()}),
            }

            # the node loss: watch `lost`'s storage for its first complete checkpoint, then remove a worker node
            # that holds ranks and a data actor, with every process on it
            seen: dict = {}
            done = threading.Event()
            before = _ids()

            def remove_a_node():
                try:
                    while not done.is_set():
                        if latest_checkpoint(storage / "lost") is not None:
                            actors = [a for a in _actors() if a["id"] not in before]  # this run's
                            ranks = [a["node"] for a in actors if "TrainWorker" in a["class"] and a["state"] == "ALIVE"]
                            data = [a["node"] for a in actors if "MapWorker" in a["class"]]
                            by_node = {n.node_id: n for n in workers}
                            # a worker data node with ranks, the one that ran the most of this run's data actors
                            ranked = sorted({n for n in ranks if n in by_node}, key=lambda n: -data.count(n))
                            if not ranked:
                                done.wait(0.05)
                                continue
                            victim = ranked[0]
                            seen.update(
                                before=ranks,
                                data_nodes=sorted(set(data)),
                                removed=victim,
                                removed_ranks=ranks.count(victim),
                                removed_data_actors=data.count(victim),
                                at_checkpoint=str(latest_checkpoint(storage / "lost")),
                            )
                            c.remove_node(by_node[victim], allow_graceful=False)
                            workers.remove(by_node[victim])
                            # the worker group started again, without the node: where. Asked once a second (each
                            # ask is a state query through the dashboard, over every actor the cluster has had);
                            # the ranks then train for tens of seconds
                            while not done.is_set():
                                after = _ranks_alive()
                                if len(after) == 8 and victim not in after:
                                    seen["after"] = after
                                    return
                                done.wait(1.0)
                            return
                        done.wait(0.05)
                except Exception as e:  # noqa: BLE001 - said in the JSON; the test fails on it
                    seen["error"] = f"{type(e).__name__}: {e}"

            th = threading.Thread(target=remove_a_node, daemon=True)
            th.start()
            try:
                lost = run_training(cfg("lost", f"train.steps={LOST_AT}", "train.max_failures=1"))
            finally:
                done.set()
                th.join(timeout=30)
            out["lost"] = _summary(lost) | {"node_loss": seen}

            # grow back to four nodes, then 8 -> 3 -> 8 ranks
            workers.append(c.add_node(**CPU_NODE, dashboard_agent_listen_port=free_port()))
            three = run_training(
                cfg(
                    "three",
                    f"train.steps={THREE_TO}",
                    "cluster.num_workers=3",
                    f'train.resume_from="{lost.checkpoint}"',
                )
            )
            out["three"] = _summary(three)
            before = _ids()
            eight = run_training(cfg("eight", f"train.steps={STEPS}", f'train.resume_from="{three.checkpoint}"'))
            out["eight"] = _summary(eight) | {"placed": _placed(before)}
            out["wall_s"] = round(time.time() - t0, 1)
            out["driver_log"] = [ln for ln in lines.lines if "restarting" in ln or "resumes on" in ln]
            out["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            # what Ray Train would hand its controller that the nodes do not hold already: nothing, so that no
            # worker of the runs went through Ray's runtime_env shim (cluster/controller.py)
            out["controller_env_missing"] = missing_on_nodes(own_ray_env() or {})
            print(json.dumps(out), flush=True)
        finally:
            ray.shutdown()
            c.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
