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
    p.add_argument(
        "--format",
        default="webdataset",
        choices=["webdataset", "parquet", "jsonl", "folder"],
        help="write the corpus as tar shards (default), or also as Parquet files (Hugging Face media structs, "
        "documents in list columns), JSONL manifests with media files, or folders of files: a worked "
        "example of each format omnistream reads (the tar shards go to OUT_DIR/tar)",
    )
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
        "--config's data.sources, each under its own filters and name, or its data.train_shards)",
    )
    add_config(p, flag=True)
    _format_args(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=inspect)
    _register_own_data(data)


def _register_own_data(data) -> None:
    p = data.add_parser(
        "prepare",
        help="turn Parquet, JSONL, media folders (or tar) into WebDataset shards",
        description="Read SOURCE (Parquet or JSONL files, imagefolder/audiofolder or LibriSpeech folders, "
        "tar shards; paths, globs, {000..009} braces, s3://) with its format's reader, as training "
        "reads it, and write OUT_DIR/shard-<input>-<part>.tar: one Ray task per input, a progress "
        "bar with records/s and errors so far. The same input gives byte-identical shards; a "
        "prepare stopped half-way, run again, finishes the inputs it had not and gives the same "
        "shards. OUT_DIR/prepare.json reports every record read, written or errored (with its "
        "reason). Exit 0 when every input was read (bad records are data); 2 for a user mistake.",
    )
    p.add_argument("source", nargs="+", help="the input files or folders (paths, globs, braces, s3:// URLs)")
    p.add_argument("out_dir", help="folder to write the shards into")
    p.add_argument(
        "--format",
        default="",
        help="parquet, jsonl, folder or webdataset (default: data.format with --config, else from the names: "
        ".parquet, .jsonl, a folder, else tar)",
    )
    p.add_argument(
        "--options",
        default="",
        help='the format\'s options as JSON, e.g. \'{"columns": {"text": "caption", "image": "img"}}\' '
        "(default: data.format_options)",
    )
    p.add_argument(
        "--shard-size", default="1000", help="records per output shard (1000), or bytes (256MB); default 1000"
    )
    p.add_argument("--workers", type=int, default=0, help="inputs prepared at once (default: the Ray CPUs)")
    p.add_argument(
        "--in-process", action="store_true", help="no Ray: prepare the inputs one after another in this process"
    )
    add_config(p, flag=True)
    p.set_defaults(func=prepare)

    p = data.add_parser(
        "info",
        help="counts and histograms of what shards hold: tokens, image sizes, clip and text lengths, parts",
        description="Read up to --records records of SHARDS (or of each of --config's sources) as training "
        "reads them (decode, quality filters; with the config's fitted bundle, encode) and print, per "
        "measure, n, min, median, p90, max and mean: tokens per document and per part of each "
        "modality (with a bundle), image width and height, clip seconds, text characters, parts per "
        "document, and the outcomes (kept, filtered, errored with reasons). The histograms go to the "
        "tracker (tracking.*) as a picture, and to --plot.",
    )
    _look_args(p)
    p.add_argument("--plot", default="", help="also write the histograms to this PNG file")
    p.add_argument("--no-track", action="store_true", help="do not log to the tracker")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=info)

    p = data.add_parser(
        "preview",
        help="one HTML page of sampled records: images, audio players, text, labels, tokens, outcome",
        description="Draw N records (seeded) from the first --records records of SHARDS (or of --config's "
        "sources) and write one self-contained HTML page: each record's parts in order (images "
        "inline, clips as audio players, text), its labels, its outcome (kept, or why not) and, with "
        "the config's fitted bundle, its token count. The page needs no network and runs no script.",
    )
    _look_args(p)
    p.add_argument("-n", type=int, default=24, help="records on the page (default 24)")
    p.add_argument("--out", default="preview.html", help="the page to write (default preview.html)")
    p.set_defaults(func=preview)


def _look_args(p) -> None:
    p.add_argument(
        "shards", nargs="*", help="shards, files or folders (none: every source of --config, or its train_shards)"
    )
    _format_args(p)
    p.add_argument("--records", type=int, default=2000, help="records read at most, per source (default 2000)")
    add_config(p, flag=True)


def _format_args(p) -> None:
    p.add_argument(
        "--format",
        default="",
        help="how SHARDS are stored: parquet, jsonl, folder or webdataset (default: data.format; without "
        "--config, from the names: .parquet, .jsonl, a folder, else tar)",
    )
    p.add_argument(
        "--options",
        default="",
        help='the format\'s options as JSON, e.g. \'{"columns": {"text": "caption"}}\' (default: data.format_options)',
    )


def _shards_data(args, cfg):
    """The data section SHARDS named on the command line are read under: --format (or guessed from their
    names when no config says) and --options over the config's."""
    from omnistream.pipelines.prepare import guess_format

    data = cfg.data
    fmt = args.format or ("" if args.config or data.format != "webdataset" else guess_format(args.shards[0]))
    update = {"format": fmt} if fmt else {}
    if args.options:
        update["format_options"] = _options(args.options)
    return data.model_copy(update=update) if update else data


def _options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as e:
        raise UserError(f"--options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise UserError('--options is a JSON object, e.g. \'{"columns": {"text": "caption"}}\'')
    return options


def _passes(args, what: str):
    """(cfg, bundle or None, [(source name, shard specs, its DataConfig)]) of `data inspect|info|preview`:
    the SHARDS named (under --format/--options), or each of --config's sources under its own settings; no
    shards is a user mistake, said before any cluster starts."""
    from pathlib import Path

    from omnistream.configs import load_config
    from omnistream.pipelines.plan import source_data
    from omnistream.pipelines.shards import list_shards

    cfg = load_config(args.config, args.overrides).resolved_paths()
    if args.shards:
        passes = [("", args.shards, _shards_data(args, cfg))]
    elif cfg.data.sources:
        passes = [(name, src.shards, source_data(cfg.data, name, src)) for name, src in cfg.data.source_items()]
    elif args.config:  # the one-source shorthand, data.train_shards
        passes = [("", list(cfg.data.train_shards), cfg.data)]
    else:
        raise UserError(f"name the SHARDS{what}, or give a --config whose data names them")
    for _, specs, _ in passes:
        list_shards(specs)
    bundle = cfg.data.bundle_dir if args.config and (Path(cfg.data.bundle_dir) / "vocab.json").exists() else None
    return cfg, bundle, passes


def _looked(args):
    """_passes for `data info` / `data preview`, with --records checked."""
    if args.records < 1:
        raise UserError(f"--records {args.records}: read at least one record")
    return _passes(args, "")


def info(args) -> int:
    from omnistream.pipelines import info as look

    cfg, bundle, passes = _looked(args)
    reports, pictures = {}, {}
    for name, specs, dcfg in passes:
        stats = look.collect(look.records(specs, dcfg, cfg.modalities, cfg.seed, bundle, args.records))
        reports[name] = look.report(stats)
        pictures[name] = look.figure(stats, title=f"source {name}" if name else ", ".join(specs)[:80])
    if args.plot:
        from pathlib import Path

        for name, png in pictures.items():
            Path(args.plot if not name else f"{args.plot.removesuffix('.png')}-{name}.png").write_bytes(png)
    link = run_id = None
    if not args.no_track:
        from omnistream import tracking

        settings = cfg.tracking.model_copy(update={"run_name": f"{cfg.tracking.run_name or cfg.name}-data-info"})
        t = tracking.start_run(settings, {"data.info.records": args.records}, tags={"omnistream.kind": "data-info"})
        for name, png in pictures.items():
            t.log_image(f"data_info/{name or 'shards'}/histograms", png, step=0)
            t.log_text(json.dumps(reports[name], indent=1), f"data_info/{name or 'shards'}.json")
        t.finish()
        link, run_id = t.link(), getattr(t, "run_id", None)
    if args.json:
        out = {**reports[""]} if list(reports) == [""] else {"sources": reports}
        print(json.dumps({**out, "tracking": link, "run_id": run_id}))
    else:
        for name, rep in reports.items():
            print((f"source {name}:\n" if name else "") + look.table(rep))
        if link:
            print(f"histograms: {link}")
    return 0


def preview(args) -> int:
    import itertools

    from omnistream.pipelines import info as look
    from omnistream.pipelines.preview import page

    cfg, bundle, passes = _looked(args)
    if args.n < 1:
        raise UserError(f"-n {args.n}: show at least one record")
    items = itertools.chain.from_iterable(
        look.records(specs, dcfg, cfg.modalities, cfg.seed, bundle, args.records) for _, specs, dcfg in passes
    )
    title = "omnistream data preview: " + ", ".join(s for _, specs, _ in passes for s in specs)[:200]
    doc, shown = page(items, args.n, cfg.seed, title)
    from pathlib import Path

    Path(args.out).write_text(doc, encoding="utf-8")
    print(f"{shown} records: {args.out}")
    return 0


def prepare(args) -> int:
    from omnistream.cluster.connect import connect
    from omnistream.configs import load_config
    from omnistream.pipelines.formats import ReadBounds
    from omnistream.pipelines.prepare import guess_format, prepare, shard_size
    from omnistream.pipelines.shards import list_shards

    cfg = load_config(args.config, args.overrides).resolved_paths()
    size = shard_size(args.shard_size)
    shards = list_shards(args.source)  # no input is a user mistake, said before any cluster starts
    fmt = args.format or (cfg.data.format if args.config else guess_format(shards[0]))
    options = _options(args.options) if args.options else dict(cfg.data.format_options)
    if args.in_process:
        workers = 0
    else:
        ray = connect(cfg.cluster.address, cfg.cluster.local_cpus)
        workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    report = prepare(shards, fmt, options, ReadBounds.of(cfg.data), args.out_dir, size, workers)
    errored = sum(report["errored"].values())
    print(
        f"{report['inputs']} inputs ({report['inputs'] - report['prepared_now']} already prepared): "
        f"{report['seen']} records read, {report['written']} written to {len(report['shards'])} shards in "
        f"{args.out_dir}, {errored} errored, {len(report['shard_errors'])} inputs unreadable "
        f"(report: {args.out_dir}/prepare.json)"
    )
    return 0


def write_demo(args) -> int:
    from omnistream.pipelines.democorpus import CorpusSpec, write_demo_corpus

    spec = CorpusSpec(
        out_dir=args.out_dir,
        train_records=args.train_records,
        eval_records=args.eval_records,
        records_per_shard=args.per_shard,
        seed=args.seed,
    )
    if args.format == "webdataset":
        paths = write_demo_corpus(args.out_dir, spec)
    else:
        from omnistream.pipelines.democorpus import PARQUET_OPTIONS, write_demo_as

        paths = write_demo_as(args.out_dir, args.format, spec)
        if args.format == "parquet":
            log.info("read them with format_options = %s", json.dumps(PARQUET_OPTIONS))
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
    from omnistream.cluster.connect import connect
    from omnistream.pipelines.inspect import format_report, inspect_shards

    cfg, bundle, passes = _passes(args, " to inspect")
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
