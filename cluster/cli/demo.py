"""`omnistream demo`: the whole path on this machine, with the demo config shipped in the package."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ._common import SET_HELP


def demo_config() -> Path:
    from omnistream.configs import path

    return path("demo")


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole path on this machine: corpus, tokenizers, training, evaluation",
                       description="Write the demo corpus (digits drawn, dialled and captioned) under ./runs/demo, fit "
                                   "the tokenizers, train on a local Ray cluster with DeepSpeed ZeRO-3, evaluate the "
                                   "cross-modal tasks, and print the MLflow run id and how to open it. Uses the demo "
                                   "config that ships with omnistream (`omnistream config show --demo` prints it); "
                                   "works from any directory.")
    p.add_argument("--config", help="run config (default: the shipped demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--refit", action="store_true", help="refit the tokenizers even if a bundle exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnistream.cluster.config import load_config

    from .train import print_result
    from .train import run as train

    t0 = time.time()
    cfg = load_config(args.config or demo_config(), args.overrides)
    prepare_demo(cfg, args.refit)
    res = train(cfg)
    print_result(res, cfg)
    if cfg.train.register_as:
        from omnistream.cluster.serving import latest_version, name_the_digits

        ref = latest_version(res.tracking_uri, cfg.train.register_as)
        ok, asked, example = name_the_digits(ref, res.tracking_uri, cfg.resolved_paths().data.eval_shards)
        print(f"  registered model {ref}, loaded with mlflow.pyfunc.load_model: {ok}/{asked} held-out digit "
              f"images named (e.g. {example})")
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
        print(f"[omnistream] demo corpus already in {spec.out_dir}")
    else:
        write_demo_corpus(spec.out_dir, spec)
    vj = Path(cfg.data.bundle_dir) / "vocab.json"
    stale = vj.exists() and bundle_mismatch(json.loads(vj.read_text()), cfg.modalities)
    if stale:
        print(f"[omnistream] refitting: the tokenizer bundle was {stale}")
    if refit or stale or not vj.exists():
        fit(cfg)
    else:
        print(f"[omnistream] tokenizer bundle already in {cfg.data.bundle_dir} (--refit to refit)")
