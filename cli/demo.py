"""`omnistream demo`: the whole path on this machine, with the demo config shipped in the package."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ._common import SET_HELP

log = logging.getLogger(__name__)


def demo_config() -> Path:
    from omnistream.configs import path

    return path("demo")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on this machine: corpus, tokenizers, training, evaluation",
        description="Write the demo corpus (digits drawn, dialled and captioned) under ./runs/demo, fit "
        "the tokenizers, train on a local Ray cluster with DeepSpeed ZeRO-3, evaluate the "
        "cross-modal tasks, and print the MLflow run id and how to open it. Uses the demo "
        "config that ships with omnistream (`omnistream config show --demo` prints it); "
        "works from any directory.",
    )
    p.add_argument("--config", help="run config (default: the shipped demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--refit", action="store_true", help="refit the tokenizers even if a bundle exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnistream.configs import load_config

    from .train import print_result
    from .train import run as train

    t0 = time.time()
    cfg = load_config(args.config or demo_config(), args.overrides)
    prepare_demo(cfg, args.refit)
    res = train(cfg)
    print_result(res, cfg)
    if cfg.train.register_as:
        from omnistream.serving.pyfunc import latest_version

        ref = latest_version(res.tracking_uri, cfg.train.register_as)
        ok, asked, example = name_the_digits(ref, res.tracking_uri, cfg.resolved_paths().data.eval_shards)
        print(
            f"  registered model {ref}, loaded with mlflow.pyfunc.load_model: {ok}/{asked} held-out digit "
            f"images named (e.g. {example})"
        )
    print(f"demo finished in {time.time() - t0:.0f}s")
    return 0


def prepare_demo(cfg, refit: bool = False) -> None:
    """Write the demo corpus and fit the tokenizers unless what is on disk already matches."""
    from omnistream.modalities.vocab import bundle_mismatch
    from omnistream.pipelines.democorpus import FORMAT, write_demo_corpus

    from .tokenizers import fit

    spec = cfg.demo
    corpus = Path(spec.out_dir) / "corpus.json"
    written = json.loads(corpus.read_text()) if corpus.exists() else {}
    if written.get("format") == FORMAT and all(written.get(k) == v for k, v in spec.model_dump().items()):
        log.info("demo corpus already in %s", spec.out_dir)
    else:
        write_demo_corpus(spec.out_dir, spec)
    vj = Path(cfg.data.bundle_dir) / "vocab.json"
    stale = vj.exists() and bundle_mismatch(json.loads(vj.read_text()), cfg.modalities)
    if stale:
        log.info("refitting: the tokenizer bundle was %s", stale)
    if refit or stale or not vj.exists():
        fit(cfg, overwrite=True)  # the demo's own bundle, refitted as --refit asks or its config now says
    else:
        log.info("tokenizer bundle already in %s (--refit to refit)", cfg.data.bundle_dir)


def name_the_digits(
    ref: str, tracking_uri: str, shards: list[str], label_field: str = "digit", n: int = 10
) -> tuple[int, int, str]:
    """The demo's check of a registered model, through MLflow as a user loads it: the first `n` held-out
    images with a label, each asked for text; returns (answers naming the label, asked, one example)."""
    import json

    import mlflow
    import pandas as pd

    from omnistream.pipelines.records import read_shard
    from omnistream.training.evaluate import matches

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(ref)
    ok = asked = 0
    example = ""
    for shard in shards:
        for r in read_shard(shard, 1 << 26):
            if asked >= n:
                break
            png = r.fields.get("png")
            label = json.loads(r.fields["json"]).get(label_field) if "json" in r.fields else None
            if not png or label is None:
                continue
            text = model.predict(pd.DataFrame({"image": [png]}))["output"][0]
            asked += 1
            ok += bool(matches(text, label, "number"))
            example = example or f"{label_field} {label} -> {text!r}"
    return ok, asked, example
