"""`omnistream tokenizers fit`: fit every configured modality and write the tokenizer bundle."""

from __future__ import annotations

import time

from ._common import add_config


def register(sub) -> None:
    tok = sub.add_parser("tokenizers", help="tokenizer commands").add_subparsers(
        dest="tok_cmd", required=True, metavar="COMMAND"
    )
    p = tok.add_parser(
        "fit",
        help="fit every configured modality on a sample of the training shards",
        description="Read data.fit_records records of data.train_shards with Ray, fit each modality "
        "(BPE, k-means codebooks), and write the bundle (vocab.json + fitted state) "
        "to data.bundle_dir.",
    )
    add_config(p)
    p.add_argument("--out", help="bundle folder (default: data.bundle_dir from the config)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="fit over a bundle already in that folder; every checkpoint and token cache made with the "
        "old one is then refused (by default a fit there is refused, naming the checkpoints it serves)",
    )
    p.set_defaults(func=fit_command)
    e = tok.add_parser(
        "eval",
        help="how well the image or audio tokenizer keeps its input, beside k-means",
        description="Image (the default): on held-out images of data.eval_shards, PSNR and SSIM of "
        "decode(encode(x)) for the bundle's image tokenizer, for omnistream's k-means "
        "tokenizer at the same ids per image (fitted here on data.fit_records records of "
        "data.train_shards), and for a thumbnail of side×side pixels blown back up; and "
        "batched encode throughput on one core. Audio (--modality audio): on held-out "
        "clips, STOI and mel distance of decode(encode(x)) for the bundle's audio "
        "tokenizer and for k-means at the same ids per second, with encode and decode "
        "speed on one core as multiples of real time. Prints the figures as JSON and "
        "records them in a tracking run, with a picture of originals | k-means | "
        "thumbnail | learned, or the clips and their reconstructions as WAV files.",
    )
    add_config(e)
    e.add_argument("--images", type=int, default=512, help="held-out images to measure (default 512)")
    e.add_argument("--clips", type=int, default=64, help="held-out audio clips to measure (default 64)")
    e.add_argument(
        "--modality",
        default="image",
        help="the modality's name in the config: an image or audio modality (default image)",
    )
    e.set_defaults(func=eval_command)


def fit_command(args) -> int:
    from omnistream.configs import load_config

    fit(load_config(args.config, args.overrides), args.out, args.overwrite)
    return 0


def refuse_to_replace(cfg, out: str) -> None:
    """A bundle already in `out` is what every checkpoint and token cache made with it names by fingerprint:
    fitting over it would make them all unusable, so it is refused, naming the checkpoints it serves."""
    import json
    from pathlib import Path

    from omnistream.common.checkpoint import read_checkpoint_meta
    from omnistream.common.errors import UserError
    from omnistream.training.checkpoint import complete_checkpoints

    vj = Path(out) / "vocab.json"
    if not vj.exists():
        return
    try:
        fp = json.loads(vj.read_text())["fingerprint"]
    except (ValueError, KeyError, TypeError):
        return  # not a bundle of ours (damaged): nothing can be made with it
    served = []
    try:
        for c in complete_checkpoints(cfg.cluster.storage_path):
            if read_checkpoint_meta(c)["vocab"]["fingerprint"] == fp:
                served.append(str(c))
    except Exception:  # noqa: BLE001 - a storage path not there (yet), or unreachable: none found
        pass
    uses = (
        f"it serves {len(served)} checkpoint(s) under {cfg.cluster.storage_path} (the newest: {served[-1]})"
        if served
        else f"checkpoints made with it name that fingerprint (none under {cfg.cluster.storage_path})"
    )
    raise UserError(
        f"{out} already holds a tokenizer bundle (vocabulary fingerprint {fp[:12]}); {uses}, and a refit "
        f"would make them unusable: fit into another folder (--out DIR, then data.bundle_dir = DIR), or "
        f"pass --overwrite to replace it"
    )


def fit(cfg, out: str | None = None, overwrite: bool = False):
    from omnistream.cluster.connect import connect
    from omnistream.pipelines.fit import fit_bundle
    from omnistream.pipelines.shards import list_shards

    cfg = cfg.resolved_paths()
    list_shards(cfg.data.all_shards())  # a user mistake is reported before any cluster starts
    if not overwrite:
        refuse_to_replace(cfg, out or cfg.data.bundle_dir)
    connect(cfg.cluster.address, cfg.cluster.local_cpus)
    t0 = time.time()
    vocab, summary = fit_bundle(cfg.data, cfg.modalities, cfg.seed, out)
    fitted = ", ".join(f"{n} ({summary['samples'][n]} samples)" for n in vocab.names)
    print(f"fitted {fitted} in {time.time() - t0:.0f}s; bad samples skipped: {summary['bad_samples'] or 'none'}")
    for m in vocab.modalities:
        lo, hi = vocab.block(m.name)
        print(
            f"  {m.name:8s} ids [{lo}, {hi})  markers {vocab.begin(m.name)},{vocab.end(m.name)}  "
            f"fingerprint {m.fingerprint()}"
        )
    print(
        f"tokenizer bundle: {out or cfg.data.bundle_dir} (vocabulary of {vocab.size} ids, "
        f"fingerprint {vocab.fingerprint})"
    )
    link = record_fit(cfg, vocab, summary)
    if link:
        print(f"fit curves and reconstructions: {link}")
    return vocab


def record_fit(cfg, vocab, summary: dict) -> str | None:
    """A tracking run for the fits that trained a model (their loss curves, reconstruction samples and
    summary figures, as `tokenizer/<modality>/<name>`); None when no fit trained one."""
    reports = {n: r for n, r in summary["reports"].items() if r}
    if not reports:
        return None
    from omnistream import tracking

    settings = cfg.tracking.model_copy(update={"run_name": f"{cfg.tracking.run_name or cfg.name}-tokenizers"})
    params = {f"modalities.{n}.{k}": v for n in reports for k, v in cfg.modalities[n].items()}
    t = tracking.start_run(
        settings, params, tags={"omnistream.kind": "tokenizers-fit", "omnistream.vocab_fingerprint": vocab.fingerprint}
    )
    try:
        for n, r in reports.items():
            steps, curves = r.get("steps", []), r.get("metrics", {})
            for i, step in enumerate(steps):
                t.log({f"tokenizer/{n}/{k}": float(v[i]) for k, v in curves.items()}, step=step)
            last = steps[-1] if steps else 0
            for k, png in r.get("images", {}).items():
                t.log_image(f"tokenizer/{n}/{k}", png, step=last)
            for k, wav in r.get("audio", {}).items():  # originals beside what the codec makes of them
                t.log_artifact(wav, f"{k}.wav", f"tokenizer/{n}")
            t.log({f"tokenizer/{n}/{k}": float(v) for k, v in r.get("summary", {}).items()}, step=last)
        t.finish()
    except BaseException:
        t.finish("FAILED")
        raise
    return t.link()


def eval_command(args) -> int:
    import json

    import numpy as np

    from omnistream.common.errors import UserError
    from omnistream.configs import load_config
    from omnistream.modalities import image_eval
    from omnistream.modalities.audio import AudioModality
    from omnistream.modalities.image import ImageModality
    from omnistream.modalities.vocab import Vocabulary

    cfg = load_config(args.config, args.overrides).resolved_paths()
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities)
    mod = vocab.by_name.get(args.modality)
    if isinstance(mod, AudioModality):
        return _eval_audio(args, cfg, vocab, mod)
    if not isinstance(mod, ImageModality):
        raise UserError(
            f"no image or audio modality named {args.modality!r} in {args.config} (its modalities: {vocab.names})"
        )
    held = _pixels(cfg.data, cfg.data.eval_shards, mod, args.images)
    train = _pixels(cfg.data, None, mod, cfg.data.fit_records)
    if len(held) < 1 or len(train) < 2:
        raise UserError(
            f"found {len(held)} readable images in data.eval_shards and {len(train)} in "
            f"data.train_shards: tokenizers eval needs some of each"
        )
    km = image_eval.kmeans_baseline(mod, train, codes=min(1024, max(2, len(train) * mod.tokens_per_image // 4)))
    res, grid = image_eval.compare(mod, km, held)
    res = {"bundle": str(cfg.data.bundle_dir), "fingerprint": mod.fingerprint(), **res}
    link = _record_eval(cfg, vocab, args.modality, res, grid)
    if link:
        res["tracking"] = link
    print(json.dumps(res, indent=1, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v)))
    return 0


def _eval_audio(args, cfg, vocab, mod) -> int:
    import json

    from omnistream.common.errors import UserError
    from omnistream.modalities import audio_eval

    held = _decoded(cfg.data, cfg.data.eval_shards, mod, args.clips, convert=clip_reader(mod))
    train = _decoded(cfg.data, None, mod, cfg.data.fit_records, convert=clip_reader(mod))
    if len(held) < 1 or len(train) < 2:
        raise UserError(
            f"found {len(held)} readable clips in data.eval_shards and {len(train)} in "
            f"data.train_shards: tokenizers eval needs some of each"
        )
    res = audio_eval.compare(mod, train, held)
    res = {"bundle": str(cfg.data.bundle_dir), "fingerprint": mod.fingerprint(), **res}
    kept = [a for a in held if a.seconds >= audio_eval.MIN_SECONDS][:4] or held[:4]
    sounds = {}
    for i, (a, b) in enumerate(zip(kept, audio_eval.roundtrip(mod, kept))):
        sounds[f"original_{i}.wav"] = mod.to_bytes(a)[1]
        sounds[f"{mod.options.tokenizer}_{i}.wav"] = mod.to_bytes(b)[1]
    flat = {k: v for k, v in res.items() if not isinstance(v, dict)}
    flat.update({f"{who}/{k}": v for who in ("learned", "kmeans") for k, v in res[who].items()})
    link = _record_eval(cfg, vocab, args.modality, flat, sounds=sounds)
    if link:
        res["tracking"] = link
    print(json.dumps(res, indent=1, default=str))
    return 0


def clip_reader(mod):
    """Each clip resampled as it is read to the rate it is measured at (the tokenizer's, or the comparison's
    16 kHz if higher): up to 2,064 clips were held at their native rate, 7.7 MB for 10 s at 192 kHz."""
    from omnistream.modalities import audio_eval
    from omnistream.modalities.audio import Audio

    rate = max(mod.options.sample_rate, audio_eval.RATE)
    return lambda a: a if a.sample_rate <= rate else Audio(audio_eval.at_rate(a, rate), rate)


def _decoded(data, shards, mod, limit: int, convert=None) -> list:
    """Up to `limit` decoded samples of `mod` in `shards`, each through `convert` as it is read (a photo is
    not held whole when its pixels will do); unreadable ones skipped."""
    from omnistream.common.errors import BadSample
    from omnistream.pipelines.formats import ReadBounds, reader
    from omnistream.pipelines.records import part_ext
    from omnistream.pipelines.shards import list_shards

    bounds = ReadBounds(data.max_member_bytes, data.limits)
    # `shards` None: the training sources, each in its own format; else held-out shards, in data.format
    groups = data.shard_formats() if shards is None else [(shards, data.format, data.format_options)]
    out = []
    for shard, fmt in ((s, reader(f, o)) for specs, f, o in groups for s in list_shards(specs)):
        for rec in fmt.read(shard, bounds):
            for f, raw in (rec.fields or {}).items():
                ext = part_ext(f)[1]  # a document's parts (KEY.<i>.<ext>) are samples too
                if ext in mod.keys:
                    try:
                        obj = mod.decode_bytes(ext, raw)
                        out.append(convert(obj) if convert else obj)
                    except BadSample:
                        pass
            if len(out) >= limit:
                return out[:limit]
    return out


def _pixels(data, shards, mod, limit: int):
    """Up to `limit` images of `shards`, as the tokenizer's size×size RGB pixels (unreadable ones skipped)."""
    import numpy as np

    out = _decoded(data, shards, mod, limit, convert=mod.pixels)
    return np.stack(out) if out else np.zeros((0, mod.options.size, mod.options.size, 3), np.uint8)


def _record_eval(cfg, vocab, name: str, res: dict, grid=None, sounds: dict | None = None) -> str | None:
    import io

    from PIL import Image

    from omnistream import tracking

    settings = cfg.tracking.model_copy(update={"run_name": f"{cfg.tracking.run_name or cfg.name}-tokenizer-eval"})
    t = tracking.start_run(
        settings,
        {f"modalities.{name}.{k}": v for k, v in cfg.modalities[name].items()},
        tags={"omnistream.kind": "tokenizer-eval", "omnistream.vocab_fingerprint": vocab.fingerprint},
    )
    t.log(
        {
            f"tokenizer_eval/{name}/{k}": float(v)
            for k, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        step=0,
    )
    if grid is not None:
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        t.log_image(f"tokenizer_eval/{name}/original_kmeans_thumbnail_learned", buf.getvalue(), step=0)
    for file, data in (sounds or {}).items():  # each original beside its reconstruction
        t.log_artifact(data, file, f"tokenizer_eval/{name}")
    t.finish()
    return t.link()
