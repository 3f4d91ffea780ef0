"""`omnistream data demo|tokenize|inspect`: write the demo corpus; fill the token cache; account for every
record of some shards."""

from __future__ import annotations

import json
import logging
import sys

from omnistream.common.errors import UserError

from ._common import add_config

log = logging.getLogger(__name__)


def register(sub) -> None:
    from omnistream.pipelines.democorpus import CorpusSpec

    data = sub.add_parser("data", help="data commands").add_subparsers(
        dest="data_cmd", required=True, metavar="COMMAND"
    )
    p = data.add_parser(
        "demo",
        help="write the demo corpus as WebDataset shards",
        description="Write train-NNN.tar and eval-NNN.tar: digits 0-9 as images (JPEG/PNG), DTMF audio "
        "(WAV/FLAC) and captions; some records carry all three, some one or two. "
        "Deterministic under --seed.",
    )
    p.add_argument("out_dir", help="folder to write the shards into")
    d = CorpusSpec()
    p.add_argument(
        "--train-records",
        type=int,
        default=d.train_records,
        help=f"records in the training split (default {d.train_records})",
    )
    p.add_argument(
        "--eval-records",
        type=int,
        default=d.eval_records,
        help=f"records in the held-out split (default {d.eval_records})",
    )
    p.add_argument(
        "--per-shard", type=int, default=d.records_per_shard, help=f"records per shard (default {d.records_per_shard})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.set_defaults(func=write_demo)

    p = data.add_parser(
        "tokenize",
        help="tokenize the training shards once, into the token cache",
        description="Read, decode, filter, dedup and encode every training shard of CONFIG that is not "
        "yet in data.token_cache (default: token_cache/ next to the tokenizer bundle), on a "
        "local Ray (or cluster.address). Training reads tokens from the cache; it runs this "
        "step itself when the cache is missing or unfinished. A cache cut off mid-write is "
        "finished, not re-done; one made with other settings is refused, naming them. Exit "
        "0 when every shard is cached; 2 for a user mistake.",
    )
    add_config(p)
    p.set_defaults(func=tokenize)

    p = data.add_parser(
        "inspect",
        help="read, decode, filter and dedup shards without training; print the report",
        description="Run the pipeline's read, decode, quality-filter and dedup stages over SHARDS on a "
        "local Ray (or cluster.address) and report every record as kept, filtered or errored, "
        "with reasons, per modality and per shard. Exit 0 when the pass completed (bad "
        "records are data, not failure); 2 for a user mistake. With --json, stdout holds "
        "the JSON report alone (status lines go to stderr).",
    )
    p.add_argument(
        "shards",
        nargs="*",
        help="shard paths, globs or {000..009} braces (none: every source of the "
        "--config's data.sources, each under its own filters and name)",
    )
    add_config(p, flag=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=inspect)


def write_demo(args) -> int:
    from omnistream.pipelines.democorpus import CorpusSpec, write_demo_corpus

    spec = CorpusSpec(
        out_dir=args.out_dir,
        train_records=args.train_records,
        eval_records=args.eval_records,
        records_per_shard=args.per_shard,
        seed=args.seed,
    )
    paths = write_demo_corpus(args.out_dir, spec)
    print(f"wrote {len(paths['train'])} train and {len(paths['eval'])} eval shards to {args.out_dir}")
    return 0


def tokenize(args) -> int:
    from omnistream.cluster.connect import connect
    from omnistream.common.errors import ErrorRateExceeded
    from omnistream.configs import load_config
    from omnistream.modalities.vocab import Vocabulary
    from omnistream.pipelines.plan import fill_caches, open_sources

    cfg = load_config(args.config, args.overrides).resolved_paths()
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities)
    sources = open_sources(cfg.data, vocab.fingerprint, cfg.seed)  # no shards, another cache: before Ray starts
    connect(cfg.cluster.address, cfg.cluster.local_cpus)
    try:
        fill_caches(sources, cfg.modalities, cfg.seed)
    except ErrorRateExceeded as e:
        raise UserError(str(e)) from None
    for src in sources:
        built, tally = src.built, src.tally
        print(
            f"{f'source {src.name}: ' if src.named else ''}token cache {built['url']}: {built['shards']} shards "
            f"({built['already_cached']} already cached, {built['tokenized']} tokenized in {built['seconds']:.1f} s); "
            f"{tally.seen} records: {tally.kept} kept, {sum(tally.filtered.values())} filtered, "
            f"{sum(tally.errored.values())} errored"
        )
    return 0


def inspect(args) -> int:
    from pathlib import Path

    from omnistream.cluster.connect import connect
    from omnistream.configs import load_config
    from omnistream.pipelines.inspect import format_report, inspect_shards
    from omnistream.pipelines.plan import source_data
    from omnistream.pipelines.shards import list_shards

    cfg = load_config(args.config, args.overrides).resolved_paths()
    if args.shards:
        passes = [("", args.shards, cfg.data)]
    elif cfg.data.sources:
        passes = [(name, src.shards, source_data(cfg.data, name, src)) for name, src in cfg.data.source_items()]
    else:
        raise UserError("name the SHARDS to inspect, or give a --config whose data.sources lists them")
    for _, specs, _ in passes:
        list_shards(specs)  # no shards is a user mistake, reported before any cluster starts
    bundle = cfg.data.bundle_dir if (Path(cfg.data.bundle_dir) / "vocab.json").exists() and args.config else None
    out = sys.stdout
    if args.json:  # stdout is the report alone: Ray prints its raylet's messages (a dead actor, say) there
        sys.stdout = sys.stderr
    connect(cfg.cluster.address, cfg.cluster.local_cpus, log_to_driver=not args.json)
    reports = {name: inspect_shards(specs, dcfg, cfg.modalities, cfg.seed, bundle) for name, specs, dcfg in passes}
    if args.shards:
        report = reports[""]
    else:  # one report per source, under its name, and their counts side by side
        report = {
            "sources": reports,
            **{f"data/source/{n}/{k}": v for n, r in reports.items() for k, v in _counts(r).items()},
        }
    if args.json:
        print(json.dumps(report), file=out, flush=True)
    else:
        for name, r in reports.items():
            print((f"source {name}:\n" if name else "") + format_report(r))
        log.info("inspected %d shards", sum(r["shards"] for r in reports.values()))
    return 0


def _counts(report: dict) -> dict[str, int]:
    return {
        "seen": report["seen"],
        "kept": report["kept"],
        "filtered": sum(report["filtered"].values()),
        "errored": sum(report["errored"].values()) + len(report["shard_errors"]),
    }
