"""Training: Ray Train workers, each a DeepSpeed rank, over the Ray Data token stream.

The model (model/) is plain PyTorch; everything about distribution happens
here, around it: `deepspeed.initialize` applies ZeRO sharding, precision,
gradient accumulation and clipping; checkpoints are DeepSpeed's per-rank
shards, reported to Ray Train so that every rank's files land in one
checkpoint directory.

Equal batch counts: before every micro-batch the ranks agree (all_reduce MIN
of "I have a batch"), so when one rank's share of the stream runs dry all stop
together instead of deadlocking in the next collective.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from modalities.base import UserError
from modalities.vocab import Vocabulary, describe_mismatch
from pipelines.accounting import Consumed, ErrorRateExceeded, ledger_digest

from .config import RunConfig, TrainConfig

CKPT_TAG = "model"
META = "omnistream.json"

# dense bf16 peak FLOP/s per device, for train/mfu; CPUs have no dependable figure, so no MFU there
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class DataResumeMismatch(RuntimeError):
    """A resumed rank's replay of the stream differs from what its checkpoint recorded."""


def deepspeed_config(t: TrainConfig) -> dict:
    zero = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        # our optimizer is torch's AdamW: DeepSpeed's fused one needs CUDA ops compiled
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(t: TrainConfig):
    """Linear warmup to 1, then cosine down to min_lr_ratio at train.steps."""
    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        p = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def param_groups(model, weight_decay: float):
    """Decay matrices only; norms' gains and 1-D params are left alone (standard AdamW practice)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def read_checkpoint_meta(path: str | Path) -> dict:
    p = Path(path) / META
    if not p.exists():
        raise UserError(f"{path} is not an omnistream checkpoint ({META} missing)")
    return json.loads(p.read_text())


def check_checkpoint(path: str | Path, vocab: Vocabulary, world_size: int) -> dict:
    """Refuse a checkpoint made with another vocabulary or world size, saying what differs."""
    meta = read_checkpoint_meta(path)
    layout = meta["vocab"]
    if layout["fingerprint"] != vocab.fingerprint:
        raise UserError(f"checkpoint {path} was trained with another vocabulary: "
                        f"{describe_mismatch(layout, vocab.layout())}")
    if meta["world_size"] != world_size:
        raise UserError(f"checkpoint {path} was written by {meta['world_size']} training workers, this run has "
                        f"{world_size}: resume with cluster.num_workers={meta['world_size']} "
                        f"(the data position is per rank and cannot be split exactly)")
    return meta


# --------------------------------------------------------------------------------------------
# inside each Ray Train worker
# --------------------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from model.model import GPT, flops_per_token, loss_by_group
    from pipelines.mixing import shares_of, token_counts
    from pipelines.packing import COLUMNS, label_modalities

    from .evaluate import EvalSet, eval_metrics, local_eval, samples
    from .tracking import MetricLogger, log_bytes

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.train
    os.environ["OMP_NUM_THREADS"] = str(t.torch_threads)
    torch.set_num_threads(t.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_id, uri = config["run_id"], cfg.tracking.uri
    ledger = config.get("ledger")
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modality_names())
    n_groups = len(vocab.names) + 1
    n_mods = len(vocab.names)
    mix = cfg.data.mix
    target = torch.tensor([mix.shares.get(n, 0.0) for n in vocab.names], dtype=torch.float64)
    total_tokens = torch.zeros(n_mods, dtype=torch.float64)  # per modality, all ranks, since step 0
    logger = MetricLogger(uri, run_id) if rank == 0 else None

    torch.manual_seed(cfg.seed)  # same init on every rank (ZeRO partitions it; stage 0 needs it equal)
    model = GPT(cfg.model)
    n_params = model.num_params()
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(t))
    engine.checkpoint_engine = _weights_only_engine(engine)

    # ---- resume -----------------------------------------------------------------------------
    start_step, resume_from = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and t.resume_from:
        ckpt = ray.train.Checkpoint.from_directory(t.resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = check_checkpoint(d, vocab, world)
            engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=True)
            start_step = meta["step"]
            total_tokens = torch.tensor([meta.get("tokens", {}).get(n, 0) for n in vocab.names], dtype=torch.float64)
            resume_from = Consumed.from_json(json.loads((Path(d) / f"data_rank{rank}.json").read_text()))
        if rank == 0:
            print(f"[omnistream] resumed at step {start_step} (replaying {resume_from.batches} consumed batches "
                  f"per rank)", flush=True)

    # ---- the stream ---------------------------------------------------------------------------
    it = iter(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=t.micro_batch_size, batch_format="numpy", drop_last=True, prefetch_batches=4))

    stop = False  # set on rank 0 when the ledger says the data is mostly bad; the MIN below stops all

    def next_batch():
        t0 = time.perf_counter()
        b = next(it, None)
        wait = time.perf_counter() - t0
        have = torch.tensor([0 if b is None or stop else 1])
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        return (b if have.item() else None), wait

    # ---- exact data resume: replay what this rank consumed before, and prove it is the same ----------
    consumed = Consumed()
    if resume_from is not None:
        while consumed.batches < resume_from.batches:
            b, _ = next_batch()
            if b is None:
                break
            consumed.add(b["keys"])
        if consumed.to_json() != resume_from.to_json():
            raise DataResumeMismatch(
                f"rank {rank}: the rebuilt data stream does not replay what the checkpoint consumed "
                f"({consumed.batches} batches / {consumed.records} records, chain {consumed.chain[:12]}, vs "
                f"{resume_from.batches} / {resume_from.records}, chain {resume_from.chain[:12]}): shards, seed or "
                f"data settings changed, so resuming would repeat or skip records")

    es: EvalSet | None = None

    def gather_plain() -> GPT:
        """A full, unsharded copy of the model on this rank (ZeRO-3 gathers the partitions)."""
        plain = GPT(cfg.model)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        for n, p in plain.named_parameters():
            p.data.copy_(full[n])
        return plain

    def run_eval(step: int) -> dict:
        nonlocal es
        if not cfg.data.eval_shards:
            return {}
        if es is None:
            es = EvalSet.load(cfg, vocab)
        plain = gather_plain()
        local = local_eval(plain, es, cfg, vocab, rank, world)
        for v in local.values():
            dist.all_reduce(v)
        m = eval_metrics(local, vocab)
        if rank == 0:
            logger.log(m, step)
            for name, data in samples(plain, es, cfg, vocab).items():
                log_bytes(uri, run_id, data, name, f"samples/step_{step:06d}")
            print(f"[omnistream] eval step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(m.items())), flush=True)
        engine.module.train()
        return m

    def save(step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step})
            Path(d, f"data_rank{rank}.json").write_text(json.dumps({"rank": rank, **consumed.to_json()}))
            if rank == 0:
                meta = {"format": 1, "step": step, "world_size": world, "run_id": run_id, "tag": CKPT_TAG,
                        "vocab": vocab.layout(), "config": cfg.model_dump(mode="json"), "n_params": n_params,
                        "tokens": {n: int(v) for n, v in zip(vocab.names, total_tokens)}}
                Path(d, META).write_text(json.dumps(meta, indent=1))
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d))

    # ---- the loop -------------------------------------------------------------------------------
    fpt = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
    peak = _peak_flops(torch)
    if rank == 0:
        print(f"[omnistream] {n_params / 1e6:.2f}M parameters, vocab {vocab.size}, {world} workers, "
              f"ZeRO-{t.zero_stage}, {t.precision}, steps {start_step}->{t.steps}", flush=True)
        logger.log({"model/params": n_params}, start_step)
    engine.module.train()
    acc = _Interval(n_groups)
    step, last_metrics = start_step, {}
    exhausted = False
    while step < t.steps and not exhausted:
        step_t0 = time.perf_counter()
        step_tokens = torch.zeros(n_mods, dtype=torch.float64)
        for _ in range(t.grad_accum):
            b, wait = next_batch()
            if b is None:
                exhausted = True
                break
            consumed.add(b["keys"])
            x = {c: torch.as_tensor(b[c], dtype=torch.long) for c in COLUMNS}
            _, loss, tok_loss = engine(x["input_ids"], x["position_ids"], x["doc_ids"], x["labels"])
            engine.backward(loss)
            engine.step()
            lm = torch.as_tensor(label_modalities(b["modality_ids"]), dtype=torch.long)
            s, c = loss_by_group(tok_loss.detach(), x["labels"], lm, n_groups)
            acc.add(s, c, tokens=int((x["doc_ids"] > 0).sum()), wait=wait)
            step_tokens += torch.as_tensor(token_counts(b["modality_ids"], n_mods), dtype=torch.float64)
        if exhausted:
            break
        step += 1
        # the global batch's token shares (data/token_share/*): one small all_reduce per step
        dist.all_reduce(step_tokens)
        total_tokens += step_tokens
        dev = (shares_of(step_tokens) - target).abs().max().item() if mix.on else None
        acc.add_shares(step_tokens, dev)
        acc.time += time.perf_counter() - step_t0
        if step % t.log_every == 0 or step == t.steps:
            red = acc.reduce(dist, world)
            m = red.metrics(vocab)
            m.update({f"data/tokens/{n}": float(v) for n, v in zip(vocab.names, total_tokens)})
            gn = engine.get_global_grad_norm()
            m.update({"train/lr": scheduler.get_last_lr()[0],
                      "train/grad_norm": float(gn) if gn is not None else None,
                      "train/memory_gb": _memory_gb(torch)})
            if peak:
                m["train/mfu"] = m["train/tokens_per_s"] * fpt / (peak * world)
            last_metrics = m
            if rank == 0:
                if ledger is not None:
                    import ray
                    m.update(ray.get(ledger.snapshot.remote()).metrics())
                    stop = ray.get(ledger.stop_reason.remote()) is not None
                logger.log(m, step)
                per = " ".join(f"{n}={m[f'train/loss/{n}']:.3f}" for n in vocab.names if f"train/loss/{n}" in m)
                print(f"[omnistream] step {step}/{t.steps} loss={m['train/loss']:.3f} ({per}) "
                      f"{m['train/tokens_per_s']:.0f} tok/s data_wait={m['train/data_wait_frac']:.2f}", flush=True)
            acc = _Interval(n_groups)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            last_metrics.update(run_eval(step))
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
            save(step, _scalars(last_metrics))

    if exhausted and ledger is not None:
        import ray

        reason = ray.get(ledger.stop_reason.remote())
        if reason:
            raise ErrorRateExceeded(reason)
    if rank == 0 and exhausted:
        print(f"[omnistream] the stream ended at step {step} (before train.steps={t.steps}): "
              f"raise data.epochs to train longer", flush=True)
    last_metrics.update(run_eval(step))
    ranks: list = [None] * world
    dist.all_gather_object(ranks, consumed.to_json())
    if rank == 0:
        digest = ledger_digest(ranks)
        logger.set_tag("data.ledger_digest", digest)
        logger.log({"data/consumed_records": sum(r["records"] for r in ranks)}, step)
        print(f"[omnistream] consumed {sum(r['records'] for r in ranks)} records, ledger digest {digest[:16]}",
              flush=True)
    save(step, _scalars(last_metrics))


def _weights_only_engine(engine):
    """DeepSpeed's torch checkpoint engine, but loading with weights_only=True (DESIGN.md, security
    defaults): a checkpoint can hold tensors and plain containers, never code. DeepSpeed's own
    engine loads with weights_only=False; its files need only its ZeRO stage enum and loss scalers."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and v is not None}


class _Interval:
    """Sums over the steps between two log points; reduced across ranks before logging."""

    def __init__(self, n_groups: int):
        import torch

        self.sums = torch.zeros(n_groups)
        self.counts = torch.zeros(n_groups)
        self.tokens = 0
        self.wait = 0.0
        self.time = 0.0
        self.mod_tokens = torch.zeros(n_groups - 1, dtype=torch.float64)  # already summed over ranks
        self.max_dev = None  # largest |share - target| of any global step (token mixture on)

    def add_shares(self, step_tokens, dev: float | None) -> None:
        self.mod_tokens += step_tokens
        if dev is not None:
            self.max_dev = dev if self.max_dev is None else max(self.max_dev, dev)

    def add(self, s, c, tokens: int, wait: float) -> None:
        self.sums += s
        self.counts += c
        self.tokens += tokens
        self.wait += wait

    def reduce(self, dist, world: int) -> "_Interval":
        import torch

        v = torch.cat([self.sums, self.counts, torch.tensor([self.tokens, self.wait, self.time], dtype=torch.float32)])
        dist.all_reduce(v)
        n = len(self.sums)
        out = _Interval(n)
        out.sums, out.counts = v[:n], v[n:2 * n]
        out.tokens, out.wait, out.time = float(v[2 * n]), float(v[2 * n + 1]) / world, float(v[2 * n + 2]) / world
        out.mod_tokens, out.max_dev = self.mod_tokens, self.max_dev
        return out

    def metrics(self, vocab: Vocabulary) -> dict[str, float]:
        m = {"train/loss": float(self.sums.sum() / self.counts.sum().clamp(min=1)),
             "train/tokens_per_s": self.tokens / max(self.time, 1e-9),
             "train/data_wait_frac": self.wait / max(self.time, 1e-9)}
        for g, name in enumerate(vocab.names, start=1):
            if self.counts[g] > 0:
                m[f"train/loss/{name}"] = float(self.sums[g] / self.counts[g])
        total = float(self.mod_tokens.sum())
        if total:
            m.update({f"data/token_share/{n}": float(v) / total for n, v in zip(vocab.names, self.mod_tokens)})
        if self.max_dev is not None:
            m["data/token_share_max_dev"] = self.max_dev
        return m


def _memory_gb(torch) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _peak_flops(torch) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
    from pipelines.shards import list_shards

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

    from pipelines.accounting import DataLedger
    from pipelines.stream import build_train_stream

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
        tracking.MetricLogger(uri, run_id).set_tag("omnistream.checkpoint", ckpt)
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
    tracking.MetricLogger(uri, run_id).log(tally.metrics(), step)
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
