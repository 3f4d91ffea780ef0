"""A checkpoint's files as training writes them and serving reads them (training/checkpoint.py has the
writer and the resume logic; serving/export.py the reader of a model out of it):

    model/...          DeepSpeed's per-rank ZeRO files (tag "model")
    data.json          the global data position and the settings of the row stream it is a position in
    omnistream.json    step, world size, token totals, vocabulary layout + fingerprint, config

Here so that both rooms read one format without one importing the other. Standard library at import
time; torch and DeepSpeed only inside `load_weights_only`, for whoever loads the tensors.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

CKPT_TAG = "model"
META = "omnistream.json"
DATA = "data.json"


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
    if not missing:  # what a resume and an export read of the run's config
        cfg = meta["config"] if isinstance(meta["config"], dict) else {}
        for part, keys in (
            ("train", ("micro_batch_size", "grad_accum", "zero_stage", "precision")),
            ("model", ()),
            ("data", ("bundle_dir",)),
        ):
            sub = cfg.get(part)
            missing += (
                [f"config.{part}"]
                if not isinstance(sub, dict)
                else [f"config.{part}.{k}" for k in keys if k not in sub]
            )
    if missing:
        raise UserError(
            f"checkpoint {path}: {p.name} lacks {', '.join(missing)} (damaged, or not written by omnistream)"
        )
    return meta


def name_cpu_accelerator() -> None:
    """Before DeepSpeed is first imported: where torch sees no CUDA device, name DeepSpeed's accelerator, CPU
    (DS_ACCELERATOR). Left to detect it, DeepSpeed picks the same and says so on every rank and every export
    ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def load_weights_only(path, map_location=None):
    """torch.load of a DeepSpeed checkpoint file with weights_only=True (docs/architecture.md, security
    defaults): tensors and plain containers, never code. DeepSpeed's files need only its ZeRO stage enum,
    loss scalers and (ZeRO-1/2's optimizer files) the (start, numel) record of each parameter's slice
    beside those; every reader of a checkpoint (the engine, `export`) loads through this."""
    import torch

    name_cpu_accelerator()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        try:
            # torch.serialization.load, not torch.load: weights_only_loads() below replaces torch.load
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"checkpoint file {path} needs a pickle to load, refused: omnistream loads "
                f"checkpoints as weights only ({first})"
            ) from None


@contextmanager
def weights_only_loads():
    """Every torch.load inside goes through load_weights_only. DeepSpeed's universal-checkpoint conversion
    (ds_to_universal) and its loader call torch.load(weights_only=False) themselves, and whether a
    resume takes that path is decided by the checkpoint's own omnistream.json: without this a planted
    optimizer file would run its pickle there. Used around the conversion and the universal load."""
    import torch

    real = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return load_weights_only(f, map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
