"""Checkpoints: every rank's DeepSpeed shard, its data position, and the run's meta, in one directory.

    model/...                 DeepSpeed's per-rank ZeRO files (tag "model")
    data_rank<r>.json         rank r's data position (Trainer.state_dict()["data"])
    omnistream.json           step, world size, token totals, vocabulary layout + fingerprint, config

A checkpoint made with another vocabulary or world size is refused, saying what differs. Files are
loaded with weights_only=True (engine.weights_only_checkpoint_engine).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from omnistream.modalities.base import UserError
from omnistream.modalities.vocab import Vocabulary, describe_mismatch

CKPT_TAG = "model"
META = "omnistream.json"


def read_checkpoint_meta(path: str | Path) -> dict:
    """The checkpoint's meta; a missing, damaged or cut-off file is a UserError naming it and what is wrong."""
    p = Path(path) / META
    if not p.exists():
        raise UserError(f"{path} is not an omnistream checkpoint ({META} missing)")
    try:
        meta = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path}: {p.name} is damaged or cut off ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {path}: {p.name} holds {type(meta).__name__}, not an object")
    missing = [k for k in ("step", "world_size", "vocab", "config") if k not in meta]
    if not missing and not (isinstance(meta["vocab"], dict) and "fingerprint" in meta["vocab"]):
        missing = ["vocab.fingerprint"]
    if missing:
        raise UserError(f"checkpoint {path}: {p.name} lacks {', '.join(missing)} (damaged, or not written by omnistream)")
    return meta


def check_checkpoint(path: str | Path, vocab: Vocabulary, world_size: int) -> dict:
    """Refuse a checkpoint made with another vocabulary or world size, saying what differs."""
    meta = read_checkpoint_meta(path)
    layout = meta["vocab"]
    if layout["fingerprint"] != vocab.fingerprint:
        raise UserError(f"checkpoint {path} was trained with another vocabulary: "
                        f"{describe_mismatch(layout, vocab.layout())}")
    if meta["world_size"] != world_size:
        raise UserError(f"checkpoint {path} was written by {meta['world_size']} training workers, this run has "
                        f"{world_size}: resume with cluster.num_workers={meta['world_size']} "
                        f"(the data position is per rank and cannot be split exactly)")
    return meta


class Checkpointer:
    """Saves and restores a Trainer. `publish(directory, metrics)` hands a finished checkpoint on
    (in a Ray Train worker: `ray.train.report`, which gathers every rank's files into one checkpoint)."""

    def __init__(self, publish: Callable[[str, dict], None], run_id: str = ""):
        self.publish, self.run_id = publish, run_id

    def save(self, trainer, metrics: dict) -> None:
        """Every rank calls this together."""
        sd = trainer.state_dict()
        with tempfile.TemporaryDirectory() as d:
            trainer.engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": sd["step"]})
            Path(d, f"data_rank{trainer.rank}.json").write_text(json.dumps({"rank": trainer.rank, **sd["data"]}))
            if trainer.rank == 0:
                meta = {"format": 1, "step": sd["step"], "world_size": trainer.world, "run_id": self.run_id,
                        "tag": CKPT_TAG, "vocab": trainer.vocab.layout(),
                        "config": trainer.cfg.model_dump(mode="json"), "n_params": trainer.n_params,
                        "tokens": sd["tokens"]}
                Path(d, META).write_text(json.dumps(meta, indent=1))
            self.publish(d, {"step": sd["step"], **metrics})

    def load(self, trainer, d: str | Path) -> dict:
        """Restore model, optimizer and scheduler shards, then the Trainer's state (which replays its data
        position). Every rank calls this together."""
        meta = check_checkpoint(d, trainer.vocab, trainer.world)
        trainer.engine.load_checkpoint(str(d), tag=CKPT_TAG, load_module_strict=True)
        data = json.loads((Path(d) / f"data_rank{trainer.rank}.json").read_text())
        trainer.load_state_dict({"step": meta["step"], "tokens": meta.get("tokens", {}), "data": data})
        return meta
