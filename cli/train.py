"""`omnistream train`: train as the config says, on a Ray cluster, tracked in MLflow."""

from __future__ import annotations

import json

from ._common import add_config, error_line


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model as the config says",
        description="Train on the Ray cluster of cluster.address ('' = a local one started here) with "
        "DeepSpeed; metrics, config and samples go to the tracking store (tracking.backend: "
        "MLflow by default, at tracking.uri). Prints the run id, the accuracies, the loss "
        "of each modality, the data accounting and how to open the run.",
    )
    add_config(p)
    p.set_defaults(func=train_command)


def train_command(args) -> int:
    from omnistream.configs import load_config

    cfg = load_config(args.config, args.overrides)
    print_result(run(cfg), cfg)
    return 0


def run(cfg):
    from omnistream.cluster.driver import run_training

    try:
        return run_training(cfg)
    except RuntimeError as e:
        # a failed worker is not a user mistake, but a traceback from a Ray actor helps nobody: one line, exit 1
        error_line(str(e))
        raise SystemExit(1) from None


def print_result(res, cfg) -> None:
    """What `train` returns, on stdout: the run id, accuracies, loss curves in brief, data, how to open it."""
    m = res.metrics
    print()
    print(f"run id: {res.run_id} ({cfg.tracking.backend})")
    for k in sorted(m):
        if k.endswith("/accuracy"):
            print(f"  {k} = {m[k]:.3f}")
    for name in cfg.modality_names():
        h = res.tracker.metric_history(f"train/loss/{name}")
        if len(h) >= 2:
            h.sort()
            n = max(1, len(h) // 10)
            first = sum(v for _, v in h[:n]) / n
            last = sum(v for _, v in h[-n:]) / n
            print(f"  train/loss/{name}: {first:.3f} (first tenth) -> {last:.3f} (last tenth)")
    d = res.data_report
    print(
        f"  data: seen {d['seen']}, kept {d['kept']}, filtered {sum(d['filtered'].values())}, "
        f"errored {sum(d['errored'].values())}{' ' + json.dumps(d['errored']) if d['errored'] else ''}"
    )
    if res.checkpoint:
        print(f"  checkpoint: {res.checkpoint}")
    print(f"  wall time: {res.wall_s:.0f}s")
    print(f"Open it: {res.tracker.link()}")
