"""`omnistream export` and `omnistream generate`: a usable model out of a checkpoint, and what it makes."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="consolidate a checkpoint's ZeRO shards into one safetensors model",
        description="Rebuild the full fp32 weights from a training checkpoint's DeepSpeed shards "
        "(ZeRO 0-3, any number of ranks), and write OUT_DIR/model.safetensors, "
        "OUT_DIR/model.json and the tokenizer bundle under OUT_DIR/tokenizers.",
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory (the MLflow tag omnistream.checkpoint names the last one), "
        "or a run's folder (cluster.storage_path): its newest complete checkpoint; a path "
        "or a URL such as s3://bucket/runs/... (copied here first)",
    )
    p.add_argument("out_dir", help="folder to write the model into")
    p.add_argument("--bundle", help="tokenizer bundle, if not where the checkpoint was trained (must be the same one)")
    p.add_argument(
        "--register",
        metavar="NAME",
        help="also log the exported model (with its tokenizer bundle) as an MLflow model into the run "
        "that trained it and register a version of NAME; load it with "
        "mlflow.pyfunc.load_model('models:/NAME/<version>')",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI to register in (default: the one the checkpoint's run logged to)"
    )
    p.set_defaults(func=export)

    p = sub.add_parser(
        "generate",
        help="generate from a prompt in any modality",
        description="Load an exported model (or a checkpoint) and continue a prompt given as a file "
        "or text in modality --from, as modality --to: greedily, or sampled (--temperature, "
        "--top-k, --top-p, --seed, --samples). What is written is always what --to can decode: "
        "an image exactly its tokenizer's ids, a codec clip whole frames of its codebooks. Text "
        "is printed; images and audio are written to --out (PNG, WAV) and the path printed. "
        "Example: omnistream generate out/model --from text --input 'a picture of seven' --to image "
        "--temperature 1 --top-k 50 --seed 3 --samples 4. Options not given take the model's defaults for --to "
        "(the training config's [generate.<modality>], kept in the export), else greedy.",
    )
    p.add_argument("model", help="exported model folder or checkpoint directory")
    p.add_argument("--from", dest="src", required=True, help="modality of the prompt, e.g. text, image, audio")
    p.add_argument("--to", dest="dst", default="text", help="modality to generate (default text)")
    p.add_argument("--input", required=True, help="prompt: a file (.png/.jpg/.wav/...) or, for --from text, the text")
    p.add_argument("--out", help="where to write a generated image or audio (default generated.<ext>)")
    # None: the model's own default for --to ([generate.<modality>] of the run that trained it), else the one named
    p.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: the model's, else its room)")
    p.add_argument(
        "--temperature", type=float, help="sample at this temperature (default: the model's, else 0: greedy)"
    )
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: the model's, else 0: all)")
    p.add_argument(
        "--top-p",
        type=float,
        help="sample from the smallest set of tokens reaching p (default: the model's, else 1: all)",
    )
    p.add_argument("--seed", type=int, help="seed of the draw: the same seed gives the same samples")
    p.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance: mix the prompt's logits with the unconditional ones at this scale "
        "(e.g. 3; default: the model's, else 1: the prompt alone; best with a model trained with data.cfg_dropout)",
    )
    p.add_argument("--negative", help="with --cfg-scale: a text prompt to steer away from")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="samples of the prompt, in one batch (images and audio: --out's name gets -0, -1, ...)",
    )
    p.add_argument("--bundle", help="tokenizer bundle, when MODEL is a checkpoint trained elsewhere")
    p.set_defaults(func=generate)


def export(args) -> int:
    from omnistream.training.checkpoint import release_copies

    try:
        return _export(args)
    finally:
        release_copies()  # of a checkpoint in object storage: the export holds what it needed


def _export(args) -> int:
    from omnistream.serving.export import export as do_export
    from omnistream.training.checkpoint import checkpoint_or_newest_in, local_copy

    args.checkpoint = checkpoint_or_newest_in(args.checkpoint, "export CHECKPOINT")
    local = local_copy(args.checkpoint)  # one in object storage (s3://...) is read from a copy here
    out = do_export(local, args.out_dir, args.bundle)
    print(f"exported {args.checkpoint} -> {out}")
    if args.register:
        from omnistream.common.checkpoint import read_checkpoint_meta
        from omnistream.common.logs import redact
        from omnistream.serving.pyfunc import log_and_register

        meta = read_checkpoint_meta(local)
        if args.tracking_uri or not meta.get("run_id"):
            from omnistream import tracking

            settings = meta["config"]["tracking"]
            uri = args.tracking_uri or tracking.registry_uri(settings["backend"], settings["uri"])
            ref = log_and_register(out, args.register, tracking_uri=uri)
        else:  # into the run that trained it
            from omnistream import tracking
            from omnistream.configs import TrackingConfig

            tracker = tracking.attach(TrackingConfig.model_validate(meta["config"]["tracking"]), meta["run_id"])
            uri = tracker.uri
            ref = log_and_register(out, args.register, tracker)
        print(f"registered {ref} ({redact(uri)}): mlflow.pyfunc.load_model({ref!r})")
    return 0


def generate(args) -> int:
    from omnistream.common.errors import BadSample, UserError
    from omnistream.serving.export import generation_defaults, load_model
    from omnistream.serving.generate import generate_many, sampling_for

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
    else:  # not a file: the value itself, as the modality's first key would hold it (text: the text)
        ext, data = src.keys[0], args.input.encode()
    try:
        obj = src.decode_bytes(ext, data)
    except BadSample as e:
        what = "no such file, nor" if not path.is_file() else "the file is not"
        raise UserError(f"--input {args.input}: {what} a {args.src} value ({e.reason}: {e.detail})") from None
    sampling, n = sampling_for(
        generation_defaults(args.model),
        args.dst,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        max_new_tokens=args.max_new_tokens,
    )
    negative = ("text", args.negative) if args.negative else None
    (outs,) = generate_many(model, vocab, [(args.src, obj)], args.dst, n, sampling, args.samples, negative)
    for i, out in enumerate(outs):
        if isinstance(out, str):  # a modality that decodes to text is printed
            print(out)
            continue
        ext, blob = vocab.by_name[args.dst].to_bytes(out)
        target = Path(args.out or f"generated.{ext}")
        if len(outs) > 1:
            target = target.with_name(f"{target.stem}-{i}{target.suffix}")
        target.write_bytes(blob)
        print(f"wrote {target}")
    return 0
