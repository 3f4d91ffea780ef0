"""The `omnistream` command line.

    omnistream demo                          write the demo corpus, fit tokenizers, train, evaluate
    omnistream data demo OUT_DIR             write the demo corpus (WebDataset .tar shards)
    omnistream data inspect SHARDS...        account every record: kept, filtered or errored, and why
    omnistream tokenizers fit CONFIG         fit every configured modality; write the tokenizer bundle
    omnistream train CONFIG [--set k=v ...]  train on a Ray cluster with DeepSpeed, track in MLflow
    omnistream modalities list               installed modality plugins, versions and id ranges
    omnistream config show [CONFIG]          the resolved config (or every key with its doc: --doc)
    omnistream cluster up|down               a local Ray head to submit to (127.0.0.1 only, token auth)
    omnistream submit CONFIG [--follow]      send a training job through the Ray Jobs API
    omnistream jobs list|status|logs|stop    the jobs of a cluster
    omnistream export CHECKPOINT OUT_DIR     one safetensors model + the tokenizer bundle, from ZeRO shards
    omnistream generate MODEL --from M ...   continue a prompt of any modality as text, image (PNG) or audio (WAV)

A user mistake ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from modalities.base import BadSample, UserError

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.toml"

SET_HELP = "override one config key, e.g. --set model.n_layers=4 --set train.lr=1e-3 (TOML values; repeatable)"


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="TOML run config, e.g. configs/demo.toml")
    else:
        p.add_argument("config", nargs="?", help="TOML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.democorpus import CorpusSpec

    ap = argparse.ArgumentParser(prog="omnistream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole path on this machine: corpus, tokenizers, training, evaluation",
                       description="Write the demo corpus (digits drawn, dialled and captioned), fit the tokenizers, "
                                   "train on a local Ray cluster with DeepSpeed ZeRO-3, evaluate the cross-modal tasks, "
                                   "and print the MLflow run id and how to open it. Uses configs/demo.toml; "
                                   "`omnistream train configs/demo.toml` reproduces the training step.")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="run config (default: configs/demo.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--refit", action="store_true", help="refit the tokenizers even if a bundle exists")

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")
    p = data.add_parser("demo", help="write the demo corpus as WebDataset shards",
                        description="Write train-NNN.tar and eval-NNN.tar: digits 0-9 as images (JPEG/PNG), DTMF audio "
                                    "(WAV/FLAC) and captions; some records carry all three, some one or two. "
                                    "Deterministic under --seed.")
    p.add_argument("out_dir", help="folder to write the shards into")
    d = CorpusSpec()
    p.add_argument("--train-records", type=int, default=d.train_records, help=f"records in the training split (default {d.train_records})")
    p.add_argument("--eval-records", type=int, default=d.eval_records, help=f"records in the held-out split (default {d.eval_records})")
    p.add_argument("--per-shard", type=int, default=d.records_per_shard, help=f"records per shard (default {d.records_per_shard})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")

    p = data.add_parser("inspect", help="read, decode, filter and dedup shards without training; print the report",
                        description="Run the pipeline's read, decode, quality-filter and dedup stages over SHARDS on a "
                                    "local Ray (or cluster.address) and report every record as kept, filtered or errored, "
                                    "with reasons, per modality and per shard. Exit 0 when the pass completed (bad "
                                    "records are data, not failure); 2 for a user mistake.")
    p.add_argument("shards", nargs="+", help="shard paths, globs or {000..009} braces")
    p.add_argument("--config", help="run config for modalities, filters and dedup (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    tok = sub.add_parser("tokenizers", help="tokenizer commands").add_subparsers(dest="tok_cmd", required=True, metavar="COMMAND")
    p = tok.add_parser("fit", help="fit every configured modality on a sample of the training shards",
                       description="Read data.fit_records records of data.train_shards with Ray, fit each modality "
                                   "(BPE, k-means codebooks), and write the bundle (vocab.json + fitted state) "
                                   "to data.bundle_dir.")
    _add_config(p)
    p.add_argument("--out", help="bundle folder (default: data.bundle_dir from the config)")

    p = sub.add_parser("train", help="train a model as the config says",
                       description="Train on the Ray cluster of cluster.address ('' = a local one started here) with "
                                   "DeepSpeed; metrics, config and samples go to MLflow (tracking.uri).")
    _add_config(p)

    mods = sub.add_parser("modalities", help="modality plugins").add_subparsers(dest="mod_cmd", required=True, metavar="COMMAND")
    p = mods.add_parser("list", help="installed modality plugins with version, keys and id range")
    p.add_argument("--config", help="also show the id ranges of this config's tokenizer bundle")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    cfgp = sub.add_parser("config", help="config commands").add_subparsers(dest="cfg_cmd", required=True, metavar="COMMAND")
    p = cfgp.add_parser("show", help="print the resolved config as TOML (or every key with its doc: --doc)")
    _add_config(p, required=False)
    p.add_argument("--doc", action="store_true", help="list every key with its default and a one-line doc")

    cl = sub.add_parser("cluster", help="a local Ray head to submit jobs to").add_subparsers(
        dest="cluster_cmd", required=True, metavar="COMMAND")
    p = cl.add_parser("up", help="start a Ray head on this machine (127.0.0.1 only, token authentication)",
                      description="Start a Ray head whose servers all listen on 127.0.0.1, with Ray's token "
                                  "authentication on (the token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
                                  "~/.ray/auth_token, created if missing). Prints the dashboard address to "
                                  "submit to and where the token is.")
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs the head offers (default: all)")
    p.add_argument("--resources", default="", help='custom resources as JSON, e.g. \'{"data": 1}\'')
    p = cl.add_parser("down", help="stop the head `cluster up` started (its own processes only)")
    p.add_argument("--port", type=int, default=6379, help="GCS port it was started on (default 6379)")

    addr_help = f"Ray dashboard address (default $RAY_DASHBOARD_ADDRESS or {'http://127.0.0.1:8265'})"
    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (Ray Jobs API)",
                       description="Validate CONFIG here, resolve its paths, and submit `omnistream train` as a Ray "
                                   "job whose working directory carries the project code and the resolved config. "
                                   "Prints the job id; with --follow streams the logs and exits with the job's "
                                   "outcome (0 SUCCEEDED, 1 otherwise). Paths in the config must be readable from "
                                   "the cluster (shared disk or s3://...).")
    _add_config(p)
    p.add_argument("--address", default="", help=addr_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs and wait for it to end")
    jb = sub.add_parser("jobs", help="jobs on a Ray cluster").add_subparsers(dest="jobs_cmd", required=True,
                                                                              metavar="COMMAND")
    p = jb.add_parser("list", help="every job with its status")
    p.add_argument("--address", default="", help=addr_help)
    for name, hlp in (("status", "one job's status"), ("logs", "one job's logs (--follow to stream)"),
                      ("stop", "stop a running job")):
        p = jb.add_parser(name, help=hlp)
        p.add_argument("job_id", help="the id `omnistream submit` printed")
        p.add_argument("--address", default="", help=addr_help)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")

    p = sub.add_parser("export", help="consolidate a checkpoint's ZeRO shards into one safetensors model",
                       description="Rebuild the full fp32 weights from a training checkpoint's DeepSpeed shards "
                                   "(ZeRO 0-3, any number of ranks), and write OUT_DIR/model.safetensors, "
                                   "OUT_DIR/model.json and the tokenizer bundle under OUT_DIR/tokenizers.")
    p.add_argument("checkpoint", help="checkpoint directory (the MLflow tag omnistream.checkpoint names the last one)")
    p.add_argument("out_dir", help="folder to write the model into")
    p.add_argument("--bundle", help="tokenizer bundle, if not where the checkpoint was trained (must be the same one)")

    p = sub.add_parser("generate", help="generate from a prompt in any modality",
                       description="Load an exported model (or a checkpoint) and greedily continue a prompt given "
                                   "as a file or text in modality --from, as modality --to. Text is printed; "
                                   "images and audio are written to --out (PNG, WAV) and the path printed. "
                                   "Example: omnistream generate out/model --from image --input digit.png")
    p.add_argument("model", help="exported model folder or checkpoint directory")
    p.add_argument("--from", dest="src", required=True, help="modality of the prompt, e.g. text, image, audio")
    p.add_argument("--to", dest="dst", default="text", help="modality to generate (default text)")
    p.add_argument("--input", required=True, help="prompt: a file (.png/.jpg/.wav/...) or, for --from text, the text")
    p.add_argument("--out", help="where to write a generated image or audio (default generated.<ext>)")
    p.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: the model's room)")
    p.add_argument("--bundle", help="tokenizer bundle, when MODEL is a checkpoint trained elsewhere")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"omnistream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnistream: interrupted", file=sys.stderr)
        return 130


def _jobs(args) -> int:
    from . import jobs

    if args.cmd == "cluster" and args.cluster_cmd == "up":
        try:
            res = json.loads(args.resources) if args.resources else None
        except ValueError:
            raise UserError(f"--resources must be JSON, e.g. '{{\"data\": 1}}', not {args.resources!r}") from None
        info = jobs.cluster_up(args.port, args.dashboard_port, args.num_cpus, res)
        print(f"Ray head up on {info['address']} (127.0.0.1 only, token authentication on)\n"
              f"  dashboard / Jobs API: {info['dashboard']}\n  token: {info['token_path']}\n"
              f"  submit:  omnistream submit configs/demo.toml --address {info['dashboard']} --follow\n"
              f"  Ray's own CLI needs token mode: RAY_AUTH_MODE=token ray job list --address {info['dashboard']}\n"
              f"  stop:    omnistream cluster down --port {args.port}")
        return 0
    if args.cmd == "cluster":
        n = jobs.cluster_down(args.port)
        print(f"stopped the head on port {args.port} ({n} processes)")
        return 0
    if args.cmd == "submit":
        c, job_id = jobs.submit(args.config, args.overrides, args.address)
        print(f"submitted job {job_id}", flush=True)
        if not args.follow:
            return 0
        status = jobs.follow(c, job_id)
        print(f"job {job_id} {status}")
        return 0 if status == "SUCCEEDED" else 1
    c = jobs.client(args.address)
    if args.jobs_cmd == "list":
        for j in jobs._call(args.address, c.list_jobs):
            print(f"{j.submission_id or j.job_id}\t{str(j.status).split('.')[-1]}\t{j.entrypoint}")
        return 0
    if args.jobs_cmd == "status":
        print(str(jobs._call(args.address, c.get_job_status, args.job_id)).split(".")[-1])
        return 0
    if args.jobs_cmd == "logs":
        if args.follow:
            status = jobs.follow(c, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(jobs._call(args.address, c.get_job_logs, args.job_id))
        return 0
    stopped = jobs._call(args.address, c.stop_job, args.job_id)
    print(f"job {args.job_id} {'stopping' if stopped else 'was not running'}")
    return 0


def _generate(args) -> int:
    from .export import generate_from, load_model

    model, vocab = load_model(args.model, args.bundle)
    if args.src not in vocab.by_name:
        raise UserError(f"the model knows modalities {vocab.names}, not --from {args.src!r}")
    src = vocab.by_name[args.src]
    path = Path(args.input)
    if path.is_file():
        ext = path.suffix.lstrip(".").lower()
        if ext not in src.keys:
            raise UserError(f"--input {path}: modality {args.src!r} reads .{'/.'.join(src.keys)} files, not .{ext}")
        data = path.read_bytes()
    elif args.src == "text":
        ext, data = src.keys[0], args.input.encode()
    else:
        raise UserError(f"--input {args.input}: no such file")
    try:
        obj = src.decode_bytes(ext, data)
    except BadSample as e:
        raise UserError(f"--input {args.input}: {args.src} cannot read it ({e.reason}: {e.detail})") from None
    out = generate_from(model, vocab, args.src, obj, args.dst, args.max_new_tokens)
    if args.dst == "text":
        print(out)
        return 0
    ext, blob = vocab.by_name[args.dst].to_bytes(out)
    target = Path(args.out or f"generated.{ext}")
    target.write_bytes(blob)
    print(f"wrote {target}")
    return 0


def _dispatch(args) -> int:
    from .config import describe, load_config

    if args.cmd == "data" and args.data_cmd == "inspect":
        return _inspect(args)
    if args.cmd == "data":
        from pipelines.democorpus import CorpusSpec, write_demo_corpus

        spec = CorpusSpec(out_dir=args.out_dir, train_records=args.train_records, eval_records=args.eval_records,
                          records_per_shard=args.per_shard, seed=args.seed)
        paths = write_demo_corpus(args.out_dir, spec)
        print(f"wrote {len(paths['train'])} train and {len(paths['eval'])} eval shards to {args.out_dir}")
        return 0
    if args.cmd == "config":
        if args.doc:
            print("\n".join(describe()))
        else:
            print(load_config(args.config, args.overrides).to_toml())
        return 0
    if args.cmd == "modalities":
        return _modalities_list(args)
    if args.cmd == "tokenizers":
        cfg = load_config(args.config, args.overrides)
        _fit(cfg, args.out)
        return 0
    if args.cmd in ("cluster", "submit", "jobs"):
        return _jobs(args)
    if args.cmd == "export":
        from .export import export

        out = export(args.checkpoint, args.out_dir, args.bundle)
        print(f"exported {args.checkpoint} -> {out}")
        return 0
    if args.cmd == "generate":
        return _generate(args)
    if args.cmd == "train":
        cfg = load_config(args.config, args.overrides)
        res = _train(cfg)
        _print_result(res, cfg)
        return 0
    if args.cmd == "demo":
        return _demo(args)
    raise AssertionError(args.cmd)


def _fit(cfg, out: str | None = None):
    from pipelines.fit import fit_bundle

    from .ray_local import connect

    from pipelines.shards import list_shards

    cfg = cfg.resolved_paths()
    list_shards(cfg.data.train_shards)  # a user mistake is reported before any cluster starts
    connect(cfg.cluster.address, cfg.cluster.local_cpus)
    t0 = time.time()
    vocab, summary = fit_bundle(cfg.data, cfg.modalities, cfg.seed, out)
    fitted = ", ".join(f"{n} ({summary['samples'][n]} samples)" for n in vocab.names)
    print(f"fitted {fitted} in {time.time() - t0:.0f}s; "
          f"bad samples skipped: {summary['bad_samples'] or 'none'}")
    for m in vocab.modalities:
        lo, hi = vocab.block(m.name)
        print(f"  {m.name:8s} ids [{lo}, {hi})  markers {vocab.begin(m.name)},{vocab.end(m.name)}  fingerprint {m.fingerprint()}")
    print(f"tokenizer bundle: {out or cfg.data.bundle_dir} (vocabulary of {vocab.size} ids, fingerprint {vocab.fingerprint})")
    return vocab


def _train(cfg):
    from .train import run_training

    try:
        return run_training(cfg)
    except RuntimeError as e:
        # a failed worker is not a user mistake, but a traceback from a Ray actor helps nobody: one line, exit 1
        print(f"omnistream: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _print_result(res, cfg) -> None:
    from . import tracking

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


def prepare_demo(cfg, refit: bool = False) -> None:
    """Write the demo corpus and fit the tokenizers unless what is on disk already matches."""
    from modalities.vocab import bundle_mismatch
    from pipelines.democorpus import FORMAT, write_demo_corpus

    spec = cfg.demo
    corpus = Path(spec.out_dir) / "corpus.json"
    written = json.loads(corpus.read_text()) if corpus.exists() else {}
    if written.get("format") == FORMAT and all(written.get(k) == v for k, v in spec.model_dump().items()):
        print(f"[omnistream] demo corpus already in {spec.out_dir}")
    else:
        write_demo_corpus(spec.out_dir, spec)
    vj = Path(cfg.data.bundle_dir) / "vocab.json"
    stale = vj.exists() and bundle_mismatch(json.loads(vj.read_text()), cfg.modalities)
    if stale:
        print(f"[omnistream] refitting: the tokenizer bundle was {stale}")
    if refit or stale or not vj.exists():
        _fit(cfg)
    else:
        print(f"[omnistream] tokenizer bundle already in {cfg.data.bundle_dir} (--refit to refit)")


def _demo(args) -> int:
    from .config import load_config

    t0 = time.time()
    cfg = load_config(args.config, args.overrides)
    prepare_demo(cfg, args.refit)
    res = _train(cfg)
    _print_result(res, cfg)
    print(f"demo finished in {time.time() - t0:.0f}s")
    return 0


def _inspect(args) -> int:
    from pipelines.inspect import format_report, inspect_shards
    from pipelines.shards import list_shards

    from .config import load_config
    from .ray_local import connect

    cfg = load_config(args.config, args.overrides).resolved_paths()
    list_shards(args.shards)  # no shards is a user mistake, reported before any cluster starts
    bundle = cfg.data.bundle_dir if (Path(cfg.data.bundle_dir) / "vocab.json").exists() and args.config else None
    connect(cfg.cluster.address, cfg.cluster.local_cpus, log_to_driver=not args.json)
    report = inspect_shards(args.shards, cfg.data, cfg.modalities, cfg.seed, bundle)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _modalities_list(args) -> int:
    from modalities.registry import discover

    rows = []
    for name, (cls, version) in sorted(discover().items()):
        rows.append((name, version, f"v{cls.version}", ",".join(cls.keys), cls.__module__ + "." + cls.__qualname__))
    ranges = {}
    if args.config:
        from modalities.vocab import Vocabulary

        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        bundle = Path(cfg.data.bundle_dir)
        if (bundle / "vocab.json").exists():
            v = Vocabulary.load(bundle, cfg.modality_names())
            ranges = {n: "[%d, %d)" % v.block(n) for n in v.names}
    print(f"{'name':10s} {'package':10s} {'format':7s} {'ids':14s} {'keys':22s} class")
    for name, version, fmt, keys, where in rows:
        print(f"{name:10s} {version:10s} {fmt:7s} {ranges.get(name, '-'):14s} {keys:22s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
