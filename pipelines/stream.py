"""The Ray Data stages every pass shares: records -> documents in actors (documents.RecordProcessor),
and documents -> rows.

    record_stream     an (epoch, shard) plan -> RecordProcessor actors (`omnistream data inspect`)
    PackRows          a window of documents -> packed rows (packing.py), or mixed batches (mixing.py)
    RETRIES           bounded restarts and retries of every actor; shards_may_die / lost_shard account
                      a shard that kills its actor every time

The training rows are made from the token cache by rows.py.
"""

from __future__ import annotations

import hashlib
import logging
import warnings

import numpy as np
import ray

from omnistream.modalities import registry

from .accounting import Tally
from .config import DataConfig
from .context import data_context
from .dedup import start_dedup
from .documents import RecordProcessor
from .mixing import MixConfig, mix_pack
from .packing import pack_documents


class PackRows:
    """A window of documents -> packed rows (first-fit decreasing), or, with a token mixture configured,
    -> batches of `rows` rows whose token shares meet the targets (mixing.py). A pure function of the
    window: a resumed run that packs the window again gets the same rows."""

    def __init__(
        self,
        seq_len: int,
        seed: int,
        rows: int = 1,
        mix: MixConfig | None = None,
        names: list[str] | None = None,
        ledger=None,
    ):
        self.seq_len, self.seed, self.rows, self.ledger = seq_len, seed, rows, ledger
        self.mix = mix if mix is not None and mix.on else None
        self.names = list(names or [])
        self.target = np.array([self.mix.shares.get(n, 0.0) for n in self.names]) if self.mix else None

    def __call__(
        self, keys: list[str], tokens: list[np.ndarray], mods: list[np.ndarray], cuts: list | None = None
    ) -> dict[str, np.ndarray]:
        """`cuts`: per document, where its parts begin (a document longer than a row is split only there)."""
        if self.mix is not None:
            out, dropped, n_docs = mix_pack(
                tokens, mods, keys, self.seq_len, self.rows, self.target, self.mix.tolerance, cuts
            )
            if self.ledger is not None and n_docs:
                t = Tally()
                t.mix_dropped = n_docs
                t.mix_dropped_tokens.update({n: int(c) for n, c in zip(self.names, dropped) if c})
                self.ledger.add.remote(t, f"mix:{keys[0]}")
        else:
            out = pack_documents(tokens, mods, keys, self.seq_len, cuts)
            # mix rows of a window in a seeded order so a step does not see only long documents
            if len(out["keys"]):
                seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{keys[:1]}".encode()).digest()[:8], "little")
                perm = np.random.default_rng(seed).permutation(len(out["keys"]))
                out = {k: v[perm] for k, v in out.items()}
        return {k: (v.astype(np.int32) if k != "keys" else v) for k, v in out.items()}


# Ray Data restarts a dead actor and retries its task without end by default: a record that kills its
# actor (out of memory, a crash in a decoder library) would hang the run. Two restarts, two retries.
RETRIES = {"max_restarts": 2, "max_task_retries": 2}
ACTOR_DIED = "actor_died"
# Ray 2.60 deprecates map_batches' free-form remote arguments (`ray_remote_args`) in favour of named ones, but
# names none for max_restarts, max_task_retries or allow_out_of_order_execution: bounding retries (above) and
# keeping the Interleave and Positions actors in order (rows.py) still need them. Its warning, printed at every
# pass, is silenced for omnistream's own calls only; Ray 2.64 removes the argument, and this with it.
warnings.filterwarnings(
    "ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning, module=r"omnistream\.pipelines\."
)


def shards_may_die(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A pass over shards, one shard a task, that goes on when a shard kills its actor every time it is
    tried (RETRIES): Ray Data drops that task's block (max_errored_blocks) and the caller, which knows
    which shards reported back, errors the missing ones as shards (`lost_shard`). Only for passes whose
    output is accounted per shard; the training row stream never drops a block."""
    ds.context.max_errored_blocks = -1
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").addFilter(_DroppedBlockFilter())
    return ds


class _DroppedBlockFilter(logging.Filter):
    """Ray Data logs each dropped block with its traceback; the shard is reported in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Ignoring this exception" not in record.getMessage()

    def __eq__(self, other) -> bool:  # added once per logger, however many passes run
        return isinstance(other, _DroppedBlockFilter)

    __hash__ = logging.Filter.__hash__


def lost_shard(shard: str, tally: Tally, what: str = "") -> None:
    tries = 1 + RETRIES["max_task_retries"]
    tally.shard_error(
        shard,
        ACTOR_DIED,
        f"the actor reading this shard died each of the {tries} times it was "
        f"tried (killed for memory, or a crash in a decoder library); none of "
        f"its records is used{what}",
    )


def processor_options(cfg: DataConfig, modalities: dict[str, dict]) -> dict:
    """How one RecordProcessor actor asks Ray for resources: the most any of its modalities declares
    (capped at 1 CPU: one actor works on one record at a time), plus the config's data resources."""
    cpus, custom = 0.0, dict(cfg.data_resources)
    for n in modalities:
        res = dict(registry.get(n).resources)
        cpus = max(cpus, float(res.pop("num_cpus", 1)))
        for k, v in res.items():
            custom[k] = max(custom.get(k, 0.0), v)
    opts = {"num_cpus": min(cpus, 1.0)}
    if custom:
        opts["resources"] = custom
    return opts


def record_stream(
    cfg: DataConfig,
    modalities: dict[str, dict],
    seed: int,
    plan: list[tuple[int, str]],
    bundle_dir: str | None,
    ledger=None,
) -> ray.data.Dataset:
    """(epoch, shard) plan -> RecordProcessor actors: documents when a bundle is given, else accounting only."""
    data_context()
    shards = start_dedup(cfg.dedup)
    ds = ray.data.from_items([{"epoch": e, "shard": s} for e, s in plan], override_num_blocks=max(1, len(plan)))
    return ds.map_batches(
        RecordProcessor,
        fn_constructor_kwargs={
            "modalities": modalities,
            "bundle_dir": bundle_dir,
            "cfg": cfg,
            "seed": seed,
            "dedup_shards": shards,
            "ledger": ledger,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors),
        batch_format="numpy",
        **RETRIES,
        **processor_options(cfg, modalities),
    )
