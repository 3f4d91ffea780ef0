"""The `omnistream` command line.

    omnistream demo                          write the demo corpus, fit tokenizers, train, evaluate
    omnistream data demo OUT_DIR             write the demo corpus (WebDataset .tar shards)
    omnistream data tokenize CONFIG          tokenize the training shards once, into the token cache
    omnistream data inspect SHARDS...        account every record: kept, filtered or errored, and why
    omnistream tokenizers fit CONFIG         fit every configured modality; write the tokenizer bundle
    omnistream tokenizers eval CONFIG        image PSNR/SSIM or audio STOI of a tokenizer, beside k-means
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
import os

# Ray reads these when it is first imported: a local Ray binds 127.0.0.1 only and reports no usage
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# One module per command group. Each imports torch, deepspeed, ray or mlflow only inside the
# commands that use them, so `--help`, `jobs`, `config show` and `modalities list` start fast.
from . import cluster, config, data, demo, jobs, modalities, model, tokenizers, train
from ._common import add_verbosity, error_line

GROUPS = (demo, data, tokenizers, train, modalities, config, cluster, jobs, model)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="omnistream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_verbosity(ap, top=True)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for g in GROUPS:
        g.register(sub)
    _every_command(sub, add_verbosity)
    return ap


def _every_command(sub, fn) -> None:
    """Apply fn to every leaf command's parser (`omnistream data inspect`, `omnistream train`, ...)."""
    for p in set(sub.choices.values()):
        inner = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if inner:
            _every_command(inner[0], fn)
        else:
            fn(p)


def main(argv: list[str] | None = None) -> int:
    from omnistream.common import logs
    from omnistream.common.errors import UserError
    from omnistream.pipelines.context import PROGRESS_ENV

    args = build_parser().parse_args(argv)
    logs.setup(args.verbosity)
    if args.verbosity > 0:
        os.environ.setdefault(PROGRESS_ENV, "1")
    try:
        return args.func(args)
    except UserError as e:
        error_line(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
