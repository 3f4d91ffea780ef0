"""What every command module shares: the --set flag, the config argument, status lines on stderr."""
from __future__ import annotations

import argparse
import sys

SET_HELP = "override one config key, e.g. --set model.n_layers=4 --set train.lr=1e-3 (TOML values; repeatable)"


def add_config(p: argparse.ArgumentParser, required: bool = True, flag: bool = False) -> None:
    """The run config (positional, or --config with flag=True) and its --set overrides."""
    if flag:
        p.add_argument("--config", help="TOML run config (default: built-in defaults)")
    elif required:
        p.add_argument("config", help="TOML run config, e.g. configs/demo.toml")
    else:
        p.add_argument("config", nargs="?", help="TOML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def status(line: str) -> None:
    """A progress or status line: stderr, so that a command's --json output is JSON alone on stdout."""
    print(line, file=sys.stderr, flush=True)
