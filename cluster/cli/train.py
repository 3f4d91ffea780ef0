"""`omnistream train`: train as the config says, on a Ray cluster, tracked in MLflow."""
from __future__ import annotations

import json
import sys

from ._common import add_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model as the config says",
                       description="Train on the Ray cluster of cluster.address ('' = a local one started here) with "
                                   "DeepSpeed; metrics, config and samples go to MLflow (tracking.uri).")
    add_config(p)
    p.set_defaults(func=train_command)


def train_command(args) -> int:
    from omnistream.cluster.config import load_config

    cfg = load_config(args.config, args.overrides)
    print_result(run(cfg), cfg)
    return 0


def run(cfg):
    from omnistream.cluster.train import run_training

    try:
        return run_training(cfg)
    except RuntimeError as e:
        # a failed worker is not a user mistake, but a traceback from a Ray actor helps nobody: one line, exit 1
        print(f"omnistream: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def print_result(res, cfg) -> None:
    from omnistream.cluster import tracking

    m = res.metrics
    print()
    print(f"MLflow run id: {res.run_id}")
    for k in sorted(m):
        if k.endswith("/accuracy"):
            print(f"  {k} = {m[k]:.3f}")
    for name in cfg.modality_names():
        h = tracking.metric_history(res.tracking_uri, res.run_id, f"train/loss/{name}")
        if len(h) >= 2:
            h.sort()
            n = max(1, len(h) // 10)
            first = sum(v for _, v in h[:n]) / n
            last = sum(v for _, v in h[-n:]) / n
            print(f"  train/loss/{name}: {first:.3f} (first tenth) -> {last:.3f} (last tenth)")
    d = res.data_report
    print(f"  data: seen {d['seen']}, kept {d['kept']}, filtered {sum(d['filtered'].values())}, "
          f"errored {sum(d['errored'].values())}{' ' + json.dumps(d['errored']) if d['errored'] else ''}")
    if res.checkpoint:
        print(f"  checkpoint: {res.checkpoint}")
    print(f"  wall time: {res.wall_s:.0f}s")
    print(f"Open it: {tracking.ui_command(res.tracking_uri, res.run_id)}")
