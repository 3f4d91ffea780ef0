"""`omnistream tokenizers fit`: fit every configured modality and write the tokenizer bundle."""
from __future__ import annotations

import time

from ._common import add_config


def register(sub) -> None:
    tok = sub.add_parser("tokenizers", help="tokenizer commands").add_subparsers(dest="tok_cmd", required=True,
                                                                                metavar="COMMAND")
    p = tok.add_parser("fit", help="fit every configured modality on a sample of the training shards",
                       description="Read data.fit_records records of data.train_shards with Ray, fit each modality "
                                   "(BPE, k-means codebooks), and write the bundle (vocab.json + fitted state) "
                                   "to data.bundle_dir.")
    add_config(p)
    p.add_argument("--out", help="bundle folder (default: data.bundle_dir from the config)")
    p.set_defaults(func=fit_command)


def fit_command(args) -> int:
    from omnistream.configs import load_config

    fit(load_config(args.config, args.overrides), args.out)
    return 0


def fit(cfg, out: str | None = None):
    from omnistream.cluster.connect import connect
    from omnistream.pipelines.fit import fit_bundle
    from omnistream.pipelines.shards import list_shards

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
        print(f"  {m.name:8s} ids [{lo}, {hi})  markers {vocab.begin(m.name)},{vocab.end(m.name)}  "
              f"fingerprint {m.fingerprint()}")
    print(f"tokenizer bundle: {out or cfg.data.bundle_dir} (vocabulary of {vocab.size} ids, "
          f"fingerprint {vocab.fingerprint})")
    return vocab
