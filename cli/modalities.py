"""`omnistream modalities list`: installed modality plugins, versions, keys and id ranges."""

from __future__ import annotations

from pathlib import Path

from ._common import add_config


def register(sub) -> None:
    mods = sub.add_parser("modalities", help="modality plugins").add_subparsers(
        dest="mod_cmd", required=True, metavar="COMMAND"
    )
    p = mods.add_parser(
        "list",
        help="installed modality plugins with version, keys and id range",
        description="Every plugin registered under the `omnistream.modalities` entry-point group "
        "(the built-ins too). With --config, also the id ranges of that config's "
        "tokenizer bundle.",
    )
    add_config(p, flag=True)
    p.set_defaults(func=list_modalities)


def list_modalities(args) -> int:
    from omnistream.modalities.registry import discover

    rows = []
    for name, (cls, version) in sorted(discover().items()):
        rows.append((name, version, f"v{cls.version}", ",".join(cls.keys), cls.__module__ + "." + cls.__qualname__))
    ranges = {}
    if args.config:
        from omnistream.configs import load_config
        from omnistream.modalities.vocab import Vocabulary

        cfg = load_config(args.config, args.overrides)
        bundle = Path(cfg.data.bundle_dir)
        if (bundle / "vocab.json").exists():
            v = Vocabulary.load(bundle, cfg.modality_names())
            ranges = {n: "[{}, {})".format(*v.block(n)) for n in v.names}
    print(f"{'name':10s} {'package':10s} {'format':7s} {'ids':14s} {'keys':22s} class")
    for name, version, fmt, keys, where in rows:
        print(f"{name:10s} {version:10s} {fmt:7s} {ranges.get(name, '-'):14s} {keys:22s} {where}")
    return 0
