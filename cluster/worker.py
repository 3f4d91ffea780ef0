"""What runs in each Ray Train worker: wiring only. The Trainer (training/trainer.py) gets this rank's shard
of the stream, the tracker on rank 0, a Checkpointer that reports to Ray Train, the Evaluator and the data
ledger; then a checkpoint is restored if Ray Train (after a failure) or train.resume_from names one, and
it trains."""

from __future__ import annotations

import logging
import os

from omnistream.common import logs
from omnistream.common.checkpoint import name_cpu_accelerator
from omnistream.configs import RunConfig
from omnistream.modalities.vocab import Vocabulary

log = logging.getLogger(__name__)


class LedgerMonitor:
    """The DataLedger actor as the Trainer's data monitor (trainer.DataMonitor)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def metrics(self) -> dict[str, float]:
        import ray

        return ray.get(self.ledger.metrics.remote())

    def stop_reason(self) -> str | None:
        import ray

        return ray.get(self.ledger.stop_reason.remote())


def quiet_ray_train() -> None:
    """Ray Train logs every report at INFO with its whole metrics dict (one per checkpoint per worker);
    the trainer logs its own step lines. Its logger is named by its file's path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def import_deepspeed(needs_mlflow: bool) -> None:
    """Import DeepSpeed, hiding MLflow from it on a rank that logs nothing: its autotuner imports MLflow
    whenever it is installed (5 s of CPU per rank here, measured with -X importtime), though training never
    uses it. A None in sys.modules makes that `import mlflow` fail, which DeepSpeed takes as "not installed"."""
    import sys

    name_cpu_accelerator()
    if needs_mlflow or "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed  # imported here, before the Trainer's first use, with MLflow visible

        return
    sys.modules["mlflow"] = None
    try:
        import deepspeed  # noqa: F401 - the import is the point: DeepSpeed loaded once, MLflow hidden from it
    finally:
        del sys.modules["mlflow"]


def train_worker(config: dict) -> None:
    """One Ray Train worker: wire the Trainer's components, resume if asked, train."""
    import ray
    import ray.train
    import torch

    from omnistream import tracking
    from omnistream.pipelines.documents import held_out
    from omnistream.training.checkpoint import Checkpointer, local_copy, release_copies
    from omnistream.training.evaluate import Evaluator
    from omnistream.training.trainer import Trainer

    logs.setup()  # this process's level came with the environment the driver gave it
    quiet_ray_train()
    cfg = RunConfig.model_validate(config["cfg"])
    os.environ["OMP_NUM_THREADS"] = str(cfg.train.torch_threads)
    torch.set_num_threads(cfg.train.torch_threads)
    rank = ray.train.get_context().get_world_rank()
    monitors = cfg.tracking.system_metrics_interval_s > 0 and ray.train.get_context().get_local_rank() == 0
    import_deepspeed(needs_mlflow=rank == 0 or monitors)
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modality_names())
    batches = iter(
        ray.train.get_dataset_shard("train").iter_batches(
            batch_size=cfg.train.micro_batch_size, batch_format="numpy", drop_last=True, prefetch_batches=4
        )
    )
    tracker = None
    if rank == 0:
        # the tracker's thread retries on its own: one quick try per request (MLflow's default retries with
        # backoff for minutes), and it never holds up a step
        os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"})
        tracker = tracking.BufferedTracker(tracking.attach(cfg.tracking, config["run_id"]), cfg.tracking.buffer_metrics)
    # before the Trainer is built: building it (DeepSpeed's engine, ZeRO's partitioning) is part of the run's
    # CPU and memory story
    stop_monitor = None
    if monitors:
        node = ray.get_runtime_context().get_node_id()[:8]  # one monitor per node, named by its Ray node id
        stop_monitor = (
            tracker.inner if tracker is not None else tracking.attach(cfg.tracking, config["run_id"])
        ).start_system_metrics(f"node-{node}", cfg.tracking.system_metrics_interval_s)
    try:
        trainer = Trainer(
            cfg,
            vocab,
            batches,
            tracker=tracker,
            checkpointer=Checkpointer(
                lambda d, m: ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d)),
                config["run_id"],
                config["stream"],
            ),
            evaluator=Evaluator(cfg, vocab, held_out),
            monitor=LedgerMonitor(config["ledger"]) if rank == 0 and config.get("ledger") is not None else None,
            load_universal=bool(config.get("universal")),
        )
        if config.get("resume"):
            # a checkpoint in object storage is read from a copy on this worker's node
            trainer.checkpointer.load(trainer, local_copy(config["resume"]), local_copy(config.get("universal")))
            release_copies()  # loaded: the copies' disk back
            if rank == 0:
                log.info(
                    "resumed at step %d: %d rows of the stream consumed, reading on from there",
                    trainer.step,
                    trainer.start.rows,
                )
        trainer.train()
    finally:
        if stop_monitor is not None:
            stop_monitor()
        if tracker is not None:
            tracker.close(cfg.tracking.flush_timeout_s)
