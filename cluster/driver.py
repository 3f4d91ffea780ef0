"""The driver of a training run on a Ray cluster.

`run_training` resolves the config, starts the tracking run and the data stream (tokenizing what the
token cache lacks, planning the row stream), and hands `worker.train_worker` to Ray Train's
TorchTrainer; after a failure it starts the worker group again from the newest complete checkpoint,
and at the end it reports the data accounting. Everything it records goes through the tracking door
(omnistream.tracking), whichever backend the config names.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from omnistream import tracking
from omnistream.common.checkpoint import read_checkpoint_meta
from omnistream.common.errors import ErrorRateExceeded, UserError
from omnistream.common.logs import redact
from omnistream.configs import RunConfig
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.rows import StreamStart
from omnistream.training.checkpoint import (
    check_checkpoint,
    checkpoint_or_newest_in,
    checkpoint_step,
    complete_checkpoints,
    describe_stream_change,
    is_remote,
    local_copy,
    read_data_position,
    release_copies,
    to_universal,
)

from .worker import train_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    metrics: dict
    checkpoint: str | None
    data_report: dict
    wall_s: float
    checkpoints: list = None  # every checkpoint Ray Train kept, oldest first
    ledger_digest: str | None = None  # over the ordered (rank, record key) lists consumed
    tracker: object = None  # the run in its tracking store: metric_history(), tags(), link()


def prepare(cfg: RunConfig) -> tuple[RunConfig, Vocabulary]:
    """Resolve paths, load the vocabulary and size the model from it; all user mistakes surface here."""
    from omnistream.pipelines.formats import reader
    from omnistream.pipelines.shards import REMOTE, list_shards
    from omnistream.training.evaluate import task_kind

    cfg = cfg.resolved_paths()
    for task in cfg.eval.tasks.values():  # an unknown kind is said before any cluster starts
        task_kind(task.kind)
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities)
    cfg.model.vocab_size = vocab.size
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.data.seq_len)
    for specs, fmt, opts in cfg.data.shard_formats():
        reader(fmt, opts)  # an unknown format or option, or its library missing: one line, here
        # local shards are checked here, before any cluster starts; remote ones are listed once, by the plan
        # (plan.open_sources: a listing of 20,000 objects is 20 requests, not worth making twice)
        local = [s for s in specs if not s.startswith(REMOTE)]
        if local:
            list_shards(local)
    if cfg.data.eval_shards:
        list_shards(cfg.data.eval_shards)
    if cfg.train.resume_from:
        cfg.train.resume_from = checkpoint_or_newest_in(cfg.train.resume_from, "train.resume_from")
        check_checkpoint(local_copy(cfg.train.resume_from), vocab)
    return cfg, vocab


def _describe_data(cfg: RunConfig) -> str:
    d = cfg.data
    if d.sources:
        return "- data: " + "; ".join(
            f"source `{n}` ({len(s.shards)} shard pattern(s), weight {s.weight}, {s.exhausted})"
            for n, s in sorted(d.sources.items())
        )
    return (
        f"- data: {len(d.train_shards)} shard pattern(s) ({', '.join(d.train_shards[:2])}"
        f"{', ...' if len(d.train_shards) > 2 else ''}), {d.epochs} epoch(s)"
    )


def resume_plan(cfg: RunConfig, ckpt: str | None, stream: dict) -> tuple[RunConfig, StreamStart, str | None]:
    """Where a run resumed from `ckpt` starts: (its config, the stream's start, the universal checkpoint
    to load when the checkpoint was written by another number of workers).

    On another number of workers the global batch is kept where it can be: train.grad_accum is set so
    that workers × micro_batch_size × grad_accum rows equal the checkpoint's global batch; then a step
    consumes the same rows as it would have on the old workers. Where it cannot (say 2 -> 3 workers at
    grad_accum 1), the global batch changes, and the log says so: the stream still goes on at the row
    it stood at, but a step then covers another number of rows.
    """
    if not ckpt:
        return cfg, StreamStart(), None
    local = local_copy(ckpt)  # a checkpoint in object storage is read from a copy on this machine
    meta, data = read_checkpoint_meta(local), read_data_position(local)
    change = describe_stream_change(data["stream"], stream)
    if change:
        raise UserError(
            f"checkpoint {ckpt} consumed another data stream ({change}): resuming it here would repeat or skip records"
        )
    pos = data["position"]
    last = pos.get("last")
    start = (
        StreamStart(last["window"], last["row"], last["row_hash"], int(pos["rows"]), last.get("state"))
        if last
        else StreamStart()
    )
    old, new = meta["world_size"], cfg.cluster.num_workers
    if old == new:
        return cfg, start, None
    t = meta["config"]["train"]
    global_batch = old * t["micro_batch_size"] * t["grad_accum"]
    cfg = cfg.model_copy(deep=True)
    per_step = new * cfg.train.micro_batch_size
    if global_batch % per_step == 0:
        cfg.train.grad_accum = global_batch // per_step
        log.info(
            "checkpoint of %d workers resumes on %d: train.grad_accum=%d keeps the global batch at %d rows",
            old,
            new,
            cfg.train.grad_accum,
            global_batch,
        )
    else:
        log.info(
            "checkpoint of %d workers resumes on %d: the global batch changes from %d to %d rows (it is not "
            "a multiple of %d)",
            old,
            new,
            global_batch,
            per_step * cfg.train.grad_accum,
            per_step,
        )
    universal = None
    if t["zero_stage"] > 0 or t["precision"] != "fp32":
        import hashlib

        tag = hashlib.sha256(str(ckpt if is_remote(ckpt) else Path(ckpt).resolve()).encode()).hexdigest()[:12]
        folder = f"universal/step{meta['step']}-{tag}"
        if is_remote(cfg.cluster.storage_path):  # converted here, kept beside the run's checkpoints for every node
            import shutil
            import tempfile

            universal = f"{cfg.cluster.storage_path.rstrip('/')}/{folder}"
            # in a new folder of this process's own (mkdtemp: 0700, a name nobody could plant beforehand), never
            # beside the download under a name another user could guess and fill with a converted.json
            work = Path(tempfile.mkdtemp(prefix="omnistream-universal-"))
            try:
                _upload(to_universal(local, work / "universal"), universal)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            universal = str(to_universal(local, Path(cfg.cluster.storage_path) / folder))
    return cfg, start, universal


def _upload(folder: Path, url: str) -> None:
    """Every file under `folder` to `url`, after checking that none is a link: a link would upload whatever
    it points to, outside the folder, as the run's weights."""
    import fsspec

    files = []
    for top, dirs, names in os.walk(folder):  # os.walk follows no link to a folder; the check below sees them
        for n in sorted(dirs + names):
            p = Path(top, n)
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise UserError(
                    f"{p} is a link or not a plain file: a converted checkpoint holds none, refused "
                    f"(nothing uploaded to {url})"
                )
            if p.is_file():
                files.append(p)
    fs, base = fsspec.core.url_to_fs(url)
    for p in sorted(files):
        fs.put_file(str(p), f"{base}/{p.relative_to(folder).as_posix()}")


def describe_run(cfg: RunConfig, vocab: Vocabulary) -> str:
    """The run's description in MLflow (markdown): what ran, in a few lines a person reads first."""
    m, t, c = cfg.model, cfg.train, cfg.cluster
    # decoder parameters: 12·d² per layer (attention 4·d², MLP 8·d²) plus the tied embedding
    approx = 12 * m.n_layers * m.d_model**2 + vocab.size * m.d_model
    mods = ", ".join(f"{n} ({vocab.by_name[n].vocab_size} ids)" for n in vocab.names)
    return (
        f"**omnistream** `{cfg.name}`: one decoder over {mods}; vocabulary {vocab.size}, fingerprint "
        f"`{vocab.fingerprint[:12]}`\n\n"
        f"- model: {m.n_layers} layers × d_model {m.d_model}, {m.n_heads} heads, ~{approx / 1e6:.2f}M parameters\n"
        f"- training: {t.steps} steps, {c.num_workers} worker(s){' on GPUs' if c.use_gpu else ''}, "
        f"DeepSpeed ZeRO-{t.zero_stage}, {t.precision}, micro-batch {t.micro_batch_size} × grad_accum "
        f"{t.grad_accum}, seq_len {cfg.data.seq_len}\n"
        f"{_describe_data(cfg)}, seed {cfg.seed}\n"
        f"- config: `config/resolved.toml` in this run's artifacts"
    )


def run_training(cfg: RunConfig, run_id: str | None = None) -> TrainResult:
    """Train as `cfg` says; a new tracking run, or the run `run_id` continued."""
    try:
        return _run(cfg, run_id)
    finally:
        release_copies()  # of a checkpoint in object storage the run resumed from, however it ended


def _run(cfg: RunConfig, run_id: str | None) -> TrainResult:
    from .connect import connect

    t0 = time.time()
    cfg, vocab = prepare(cfg)
    connect(cfg.cluster.address, cfg.cluster.local_cpus)
    if run_id is None:
        tracker = tracking.start_run(
            cfg.tracking,
            cfg.flat(redacted=True),
            tags={"omnistream.vocab_fingerprint": vocab.fingerprint},
            description=describe_run(cfg, vocab),
        )
    else:
        tracker = tracking.attach(cfg.tracking, run_id)
    tracker.log_text(cfg.to_toml(redacted=True), "config/resolved.toml")
    tracker.log_text(tracking.dumps(vocab.layout()), "vocab.json")
    log.info(
        "tracking run %s (%s at %s); %s",
        tracker.run_id,
        cfg.tracking.backend,
        redact(tracker.uri),
        redact(tracker.link()),
    )

    try:
        return _train(cfg, vocab, tracker, t0)
    except BaseException as e:  # Ctrl-C: the run is KILLED; any other way out FAILED, never left RUNNING
        if not getattr(tracker, "omnistream_ended", False):
            _end_run(tracker, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _train(cfg: RunConfig, vocab: Vocabulary, tracker, t0: float) -> TrainResult:
    """Tokenize what the cache lacks, plan the stream, train (retrying from checkpoints), report."""
    import ray

    run_id = tracker.run_id

    # 1. tokenize once: the shards not yet in each source's token cache; 2. plan the row stream
    try:
        plan = _plan_data(cfg, vocab, tracker)
    except (ErrorRateExceeded, UserError) as e:
        _end_run(tracker, "FAILED")
        raise UserError(str(e)) from None
    tally, stream = plan.tally, plan.settings

    # 3. train; after a failure, again from the newest complete checkpoint (train.max_failures times)
    name = f"{cfg.name}-{run_id[:12]}"
    resume, attempt = cfg.train.resume_from or None, 0
    while True:
        run_cfg, start, universal = resume_plan(cfg, resume, stream)
        ledger = _ledger(tally)
        try:
            result = _fit(
                run_cfg,
                run_id,
                name + (f"-retry{attempt}" if attempt else ""),
                ledger,
                resume,
                universal,
                stream,
                plan,
                start,
            )
            break
        except Exception as e:  # a worker's failure, retried from a checkpoint or reported
            newest = _newest_checkpoint(cfg.cluster.storage_path, name)
            budget = cfg.train.max_failures
            if budget < 0 or attempt < budget:
                attempt += 1
                resume = str(newest) if newest else resume  # no checkpoint yet: from where this run began
                log.warning(
                    "training failed (%s); restarting from %s (retry %d of %s)",
                    _root_message(e),
                    resume or "step 0",
                    attempt,
                    "unlimited" if budget < 0 else budget,
                )
                continue
            _end_run(tracker, "FAILED")
            raise RuntimeError(f"training failed: {_root_message(e)}") from e
    tally = ray.get(ledger.snapshot.remote())
    report = _report(tally, plan.per_source)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt and is_remote(cfg.cluster.storage_path) and not is_remote(ckpt):  # Ray's path inside its filesystem
        ckpt = f"{cfg.cluster.storage_path.split('://', 1)[0]}://{ckpt}"
    metrics, digest = {}, None
    try:  # the run is trained and saved: a tracking store failing now is a warning, not a failed run
        _log_data(tracker, tally, int((result.metrics or {}).get("step", 0)), plan.per_source)
        if ckpt:
            tracker.set_tag("omnistream.checkpoint", ckpt)
        _end_run(tracker, "FINISHED")
        metrics = tracker.final_metrics()
        digest = tracker.tags().get("data.ledger_digest")
    except Exception as e:  # noqa: BLE001
        log.warning(
            "the tracking store did not take the run's data report (%s: %s); the checkpoint %s is complete",
            type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "",
            ckpt,
        )
    if cfg.train.register_as and ckpt:
        try:
            log.info("registered %s", _register(cfg, ckpt, tracker))
        except Exception as e:  # noqa: BLE001 - the trained checkpoint stands; registering can be redone
            log.warning(
                "could not register the model as %r (%s: %s); `omnistream export %s OUT --register %s` does it later",
                cfg.train.register_as,
                type(e).__name__,
                e,
                ckpt,
                cfg.train.register_as,
            )
    kept = [str(c) for c in _checkpoints(cfg.cluster.storage_path, name)]
    return TrainResult(run_id, tracker.uri, metrics, ckpt, report, time.time() - t0, kept, digest, tracker)


def _plan_data(cfg: RunConfig, vocab: Vocabulary, tracker):
    """Fill every source's token cache (tokenizing what it lacks), then plan the row stream
    (pipelines/plan.py); the cache figures go to the tracking run."""
    from omnistream.pipelines.plan import fill_caches, open_sources, plan_stream

    sources = open_sources(cfg.data, vocab.fingerprint, cfg.seed)
    try:
        fill_caches(sources, cfg.modalities, cfg.seed)
    except ErrorRateExceeded as e:
        _log_data(tracker, e.tally, 0)
        raise
    for src in sources:
        b = src.built
        tracker.log(
            {
                f"data/cache/{src.name}/shards_tokenized": b["tokenized"],
                f"data/cache/{src.name}/shards_reused": b["already_cached"],
            }
            if src.named
            else {
                "data/cache/shards_tokenized": b["tokenized"],
                "data/cache/shards_reused": b["already_cached"],
                "data/cache/seconds": b["seconds"],
            },
            0,
        )
    train = cfg.train
    # the schedule counts steps in the global batch the run started with: a resume keeps its figure
    rows_per_step = cfg.cluster.num_workers * train.micro_batch_size * train.grad_accum
    if cfg.data.sources and train.resume_from:
        position = read_data_position(local_copy(train.resume_from))
        rows_per_step = position["stream"].get("rows_per_step", rows_per_step)
    plan = plan_stream(cfg.data, sources, cfg.seed, train.steps, rows_per_step, train.micro_batch_size)
    unconsumed = plan.tally.unconsumed_line()
    if unconsumed:  # said once a run, here; counted in the report as data/unconsumed/<ext>
        log.warning("%s", unconsumed)
    return plan


def _register(cfg: RunConfig, ckpt: str, tracker) -> str:
    """train.register_as: export the final checkpoint next to it and register it in the tracking store's
    model registry (MLflow's)."""
    import shutil
    import tempfile

    from omnistream.serving.export import export
    from omnistream.serving.pyfunc import log_and_register

    folder = f"{cfg.name}-{tracker.run_id[:12]}-export"
    # beside a checkpoint in object storage: exported into a folder of its own, removed once registered (the
    # tracking store keeps the model)
    tmp = tempfile.mkdtemp(prefix="omnistream-") if is_remote(cfg.cluster.storage_path) else None
    try:
        out = export(local_copy(ckpt), Path(tmp or cfg.cluster.storage_path) / folder)
        return log_and_register(out, cfg.train.register_as, tracker)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _end_run(tracker, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED; a tracking store that cannot take it is a warning, never an
    error that would hide why the run ended."""
    tracker.omnistream_ended = True
    try:
        tracker.finish(status)
    except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than its status line
        log.warning("could not mark tracking run %s %s (%s: %s)", tracker.run_id, status, type(e).__name__, e)


def _ledger(tally):
    """The run's DataLedger, holding the token cache's accounting; the packers add what the mixer drops,
    and the stream's resume figures."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from omnistream.pipelines.ledger import DataLedger

    # On the driver's own node: the run's accounting shares the fate of the process that reports it. Left to
    # Ray it may land on any node, and after a node is lost the retry's new ledger went to that node before
    # Ray had noticed it was gone (the rehearsal of tests/system/test_scale.py): the run failed again.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = DataLedger.options(scheduling_strategy=here).remote()  # the error rate was judged at tokenizing
    ledger.add.remote(tally, "token_cache")
    return ledger


def _fit(cfg: RunConfig, run_id: str, name: str, ledger, resume, universal, stream, plan, start):
    """One Ray Train run of the worker group over the stream from `start`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from omnistream.common import logs
    from omnistream.pipelines.rows import build_train_stream

    from .backend import BoundTorchConfig
    from .connect import own_ray_env
    from .controller import OwnRayTorchTrainer
    from .split import OrderedSplit

    train = cfg.train
    ds = build_train_stream(
        cfg.data,
        cfg.modalities,
        cfg.seed,
        plan,
        unit_rows=train.micro_batch_size * train.grad_accum,
        mix_rows=train.micro_batch_size,
        start=start,
        ledger=ledger,
    )
    # on a Ray started here, Ray Train's controller without a runtime_env (cluster/controller.py)
    own = own_ray_env()
    trainer_cls = partial(OwnRayTorchTrainer, workers_env=own) if own is not None else TorchTrainer
    trainer = trainer_cls(
        train_worker,
        torch_config=BoundTorchConfig(),
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run_id": run_id,
            "ledger": ledger,
            "resume": resume,
            "universal": universal,
            "stream": stream,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **cfg.cluster.worker_resources},
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **_storage(cfg.cluster.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0),  # retried by run_training, from a checkpoint
            # Ray Train's controller says each worker group it requests and starts at INFO: with --verbose
            logging_config=ray.train.LoggingConfig(log_level="INFO" if logs.verbose() else "WARNING"),
        ),
        datasets={"train": ds},
        dataset_config=OrderedSplit(),
    )
    return _interruptible(trainer.fit)


def _storage(path: str) -> dict:
    """Ray Train's storage arguments. For s3:// the project's one S3 client, s3fs (endpoint, credentials and
    retries from the standard AWS settings, as for shards and caches), handed to Ray Train as a pyarrow
    filesystem. Not pyarrow's own S3 client: in the test suite, under a training run's load, it took moto's 200
    OK answers to the CompleteMultipartUpload of Ray Train's empty storage marker for errors ("got error
    embedded in a 200 OK response", twice), and the run failed before its first step, with 10 attempts and
    with a 60 s timeout alike. s3fs writes a small object in one PUT."""
    if not path.startswith("s3://"):
        return {"storage_path": path}
    import fsspec
    import pyarrow.fs as pafs

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("s3")))
    return {"storage_path": path[len("s3://") :], "storage_filesystem": fs}


def _interruptible(fn):
    """fn() in a thread of its own, so that Ctrl-C reaches this (main) thread as KeyboardInterrupt and the
    run is marked KILLED. On the main thread Ray Train's fit() installs a SIGINT handler of its own that
    aborts the run and exits the process with status 1 and no word, leaving the MLflow run RUNNING (and
    the handler installed). The training actors end with this driver."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            box["error"] = e

    thread = threading.Thread(target=target, name="omnistream-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _checkpoints(storage: str, name: str) -> list:
    """The complete checkpoints of this run's attempts (`name`, `name-retry1`, ...), by step (paths, or URLs
    when the run keeps them in object storage)."""
    if is_remote(storage):
        import fsspec

        fs, base = fsspec.core.url_to_fs(storage)
        scheme = storage.split("://", 1)[0]
        runs = [f"{scheme}://{d}" for d in fs.glob(f"{base.rstrip('/')}/{name}*")]
    else:
        runs = list(Path(storage).glob(f"{name}*"))
    found = [c for d in runs for c in complete_checkpoints(d)]
    return sorted(found, key=checkpoint_step)


def _newest_checkpoint(storage: str, name: str) -> Path | None:
    found = _checkpoints(storage, name)
    return found[-1] if found else None


def _log_data(tracker, tally, step: int, sources: dict | None = None) -> dict:
    """The data report next to the loss curves: counts as metrics, report and dead letters as files; with
    named sources each one's counts too (data/source/<name>/seen|kept|filtered|errored)."""
    report = _report(tally, sources)
    tracker.log(tally.metrics(), step)
    if sources:
        tracker.log({f"data/source/{n}/{k}": v for n, c in report["sources"].items() for k, v in c.items()}, step)
    tracker.log_text(tracking.dumps(report), "data/report.json")
    tracker.log_text("".join(json.dumps(d) + "\n" for d in tally.dead_letter), "data/dead_letter.jsonl")
    return report


def _report(tally, sources: dict | None) -> dict:
    """The run's data report; with its sources' counts under their names."""
    report = tally.report()
    if sources:
        report["sources"] = {n: t.source_counts() for n, t in sources.items()}
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
