"""What every command module shares: the --set flag, the config argument, --verbose/--quiet, the error line."""

from __future__ import annotations

import argparse
import sys

from omnistream.common.logs import ERROR_PREFIX

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


def add_verbosity(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/--verbose and -q/--quiet, before or after the command (`omnistream -q train ...` or `... train -q`).
    Only the top-level parser sets a default: a subcommand's copy must not reset what was given before it."""
    default = 0 if top else argparse.SUPPRESS
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=1,
        default=default,
        help="also debug lines, and Ray Data's own progress",
    )
    g.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=-1,
        default=default,
        help="only warnings and errors on stderr (a command's result still goes to stdout)",
    )


def error_line(message: str) -> None:
    """The one line a failed command ends with, on stderr (`jobs follow` recognises it by ERROR_PREFIX)."""
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
