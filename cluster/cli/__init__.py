"""The `omnistream` command line.

    omnistream demo                          write the demo corpus, fit tokenizers, train, evaluate
    omnistream data demo OUT_DIR             write the demo corpus (WebDataset .tar shards)
    omnistream data tokenize CONFIG          tokenize the training shards once, into the token cache
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
import sys

# One module per command group. Each imports torch, deepspeed, ray or mlflow only inside the
# commands that use them, so `--help`, `jobs`, `config show` and `modalities list` start fast.
from . import cluster, config, data, demo, jobs, modalities, model, tokenizers, train

GROUPS = (demo, data, tokenizers, train, modalities, config, cluster, jobs, model)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omnistream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for g in GROUPS:
        g.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from omnistream.modalities.base import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"omnistream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnistream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
