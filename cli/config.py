"""`omnistream config show`: the resolved config, or every key with its default and doc."""

from __future__ import annotations

from ._common import add_config


def register(sub) -> None:
    cfgp = sub.add_parser("config", help="config commands").add_subparsers(
        dest="cfg_cmd", required=True, metavar="COMMAND"
    )
    p = cfgp.add_parser(
        "show",
        help="print the resolved config as TOML (or every key with its doc: --doc)",
        description="Print the config as the run would see it: defaults, then CONFIG, then --set "
        "overrides. --doc lists every key with its default and a one-line doc, and "
        "each installed modality's options and quality filters.",
    )
    add_config(p, required=False)
    p.add_argument("--doc", action="store_true", help="list every key with its default and a one-line doc")
    p.add_argument(
        "--demo",
        action="store_true",
        help="start from the demo config that ships with omnistream (what `omnistream demo` runs) instead of CONFIG",
    )
    p.set_defaults(func=show)


def show(args) -> int:
    from omnistream.configs import describe, describe_modalities, load_config

    if args.doc:
        print("\n".join(describe() + describe_modalities()))
    else:
        from .demo import demo_config

        print(load_config(demo_config() if args.demo else args.config, args.overrides).to_toml())
    return 0
