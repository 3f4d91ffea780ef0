"""Training on a Ray cluster: Ray Train workers, each a DeepSpeed rank running the Trainer.

`run_training` (the driver) resolves the config, starts the MLflow run and the data stream,
and hands `train_worker` to Ray Train's TorchTrainer. `train_worker` is wiring only: it gives
the Trainer (trainer.py) this rank's shard of the stream, MLflow on rank 0, a Checkpointer that
reports to Ray Train, the Evaluator, and the data ledger; then restores a checkpoint if Ray
Train (after a failure) or train.resume_from names one, and trains.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from omnistream.modalities.base import UserError
from omnistream.modalities.vocab import Vocabulary

from .checkpoint import check_checkpoint, read_checkpoint_meta
from .config import RunConfig


class LedgerMonitor:
    """The DataLedger actor as the Trainer's data monitor (trainer.DataMonitor)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def metrics(self) -> dict[str, float]:
        import ray

        return ray.get(self.ledger.snapshot.remote()).metrics()

    def stop_reason(self) -> str | None:
        import ray

        return ray.get(self.ledger.stop_reason.remote())


def train_worker(config: dict) -> None:
    """One Ray Train worker: wire the Trainer's components, resume if asked, train."""
    import ray.train
    import torch

    from .checkpoint import Checkpointer
    from .evaluate import Evaluator
    from .tracking import MLflowTracker
    from .trainer import Trainer

    cfg = RunConfig.model_validate(config["cfg"])
    os.environ["OMP_NUM_THREADS"] = str(cfg.train.torch_threads)
    torch.set_num_threads(cfg.train.torch_threads)
    rank = ray.train.get_context().get_world_rank()
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modality_names())
    batches = iter(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=cfg.train.micro_batch_size, batch_format="numpy", drop_last=True, prefetch_batches=4))
    trainer = Trainer(
        cfg, vocab, batches,
        tracker=MLflowTracker(cfg.tracking.uri, config["run_id"]) if rank == 0 else None,
        checkpointer=Checkpointer(lambda d, m: ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d)),
                                  config["run_id"]),
        evaluator=Evaluator(cfg, vocab),
        monitor=LedgerMonitor(config["ledger"]) if rank == 0 and config.get("ledger") is not None else None,
        log=lambda line: print(line, flush=True))
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint.from_directory(cfg.train.resume_from)
                                          if cfg.train.resume_from else None)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.checkpointer.load(trainer, d)
        if rank == 0:
            print(f"[omnistream] resumed at step {trainer.step} (replayed {trainer.consumed.batches} consumed "
                  f"batches per rank)", flush=True)
    trainer.train()


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    metrics: dict
    checkpoint: str | None
    data_report: dict
    wall_s: float
    checkpoints: list = None          # every checkpoint Ray Train kept, oldest first
    ledger_digest: str | None = None  # over the ordered (rank, record key) lists consumed


def prepare(cfg: RunConfig) -> tuple[RunConfig, Vocabulary]:
    """Resolve paths, load the vocabulary and size the model from it; all user mistakes surface here."""
    from omnistream.pipelines.shards import list_shards

    cfg = cfg.resolved_paths()
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities)
    cfg.model.vocab_size = vocab.size
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.data.seq_len)
    list_shards(cfg.data.train_shards)
    if cfg.data.eval_shards:
        list_shards(cfg.data.eval_shards)
    if cfg.train.resume_from:
        check_checkpoint(cfg.train.resume_from, vocab, cfg.cluster.num_workers)
    return cfg, vocab


def run_training(cfg: RunConfig, run_id: str | None = None) -> TrainResult:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from omnistream.pipelines.ledger import DataLedger
    from omnistream.pipelines.stream import build_train_stream

    from . import tracking
    from .backend import BoundTorchConfig
    from .ray_local import WORKER_ENV, connect

    t0 = time.time()
    cfg, vocab = prepare(cfg)
    connect(cfg.cluster.address, cfg.cluster.local_cpus)
    uri = cfg.tracking.uri
    if run_id is None:
        run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, cfg.flat(),
                                    tags={"omnistream.vocab_fingerprint": vocab.fingerprint})
    tracking.log_text(uri, run_id, cfg.to_toml(), "config/resolved.toml")
    tracking.log_text(uri, run_id, tracking.dumps(vocab.layout()), "vocab.json")
    print(f"[omnistream] MLflow run {run_id} ({uri})", flush=True)

    ledger = DataLedger.remote(cfg.data.max_error_rate, cfg.data.error_rate_window)
    ds = build_train_stream(cfg.data, cfg.modalities, cfg.seed, ledger,
                            rows_per_batch=cfg.train.micro_batch_size * cfg.train.grad_accum)
    trainer = TorchTrainer(
        train_worker,
        torch_config=BoundTorchConfig(),
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_id": run_id, "ledger": ledger},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **cfg.cluster.worker_resources}),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-{run_id[:12]}", storage_path=cfg.cluster.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": dict(WORKER_ENV)}),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.client(uri).set_terminated(run_id, "FAILED")
        reason = ray.get(ledger.stop_reason.remote())
        if reason:
            _log_data(uri, run_id, ray.get(ledger.snapshot.remote()), 0)
            raise UserError(reason) from None
        raise RuntimeError(f"training failed: {_root_message(e)}") from e
    tally = ray.get(ledger.snapshot.remote())
    step = int((result.metrics or {}).get("step", cfg.train.steps))
    report = _log_data(uri, run_id, tally, step)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt:
        tracking.MLflowTracker(uri, run_id).set_tag("omnistream.checkpoint", ckpt)
    tracking.client(uri).set_terminated(run_id, "FINISHED")
    metrics = tracking.final_metrics(uri, run_id)
    kept = sorted((c.path for c, _ in (result.best_checkpoints or [])),
                  key=lambda p: read_checkpoint_meta(p)["step"])
    digest = tracking.client(uri).get_run(run_id).data.tags.get("data.ledger_digest")
    return TrainResult(run_id, uri, metrics, ckpt, report, time.time() - t0, kept, digest)


def _log_data(uri: str, run_id: str, tally, step: int) -> dict:
    """The data report next to the loss curves: counts as metrics, report and dead letters as files."""
    from . import tracking

    report = tally.report()
    tracking.MLflowTracker(uri, run_id).log(tally.metrics(), step)
    tracking.log_text(uri, run_id, tracking.dumps(report), "data/report.json")
    tracking.log_text(uri, run_id, "".join(json.dumps(d) + "\n" for d in tally.dead_letter), "data/dead_letter.jsonl")
    return report


def _root_message(e: BaseException) -> str:
    """The most telling line of a worker's error: the last 'SomethingError: ...' line, else the last line."""
    import re

    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    lines = [ln.strip() for ln in str(seen).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln, re.IGNORECASE)]
    return (named or lines or [type(seen).__name__])[-1]
