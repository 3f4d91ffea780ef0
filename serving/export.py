"""A usable model out of a training checkpoint: consolidate ZeRO shards, write safetensors, generate.

A checkpoint holds DeepSpeed's per-rank files (model/*_model_states.pt, *_optim_states.pt).
`consolidate` rebuilds the full fp32 weights from any number of ranks; it reads the files with
`torch.load(weights_only=True)` (docs/architecture.md, security defaults), which is why it does not call
DeepSpeed's own zero_to_fp32 (that one unpickles arbitrary objects). The layout it relies on:

  ZeRO-0      model_states["module"] is the whole state dict
  ZeRO-1/2    each rank holds a slice of one flat fp32 buffer per param group; the slices concatenated
              are the group's parameters back to back (param_shapes gives order and shapes)
  ZeRO-3      each parameter is split on its own: rank r holds elements [r*p, (r+1)*p) of it,
              p = ceil(numel / world), and a rank's flat buffer is its pieces back to back

An exported model is a directory: model.safetensors, model.json (the GPT config), and the
tokenizer bundle (vocab.json + fitted state) under tokenizers/.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from omnistream.common import logs
from omnistream.common.checkpoint import (
    CKPT_TAG,
    META,
    load_weights_only,
    read_checkpoint_meta,
)
from omnistream.common.errors import UserError
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary, describe_mismatch

MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"


def _rank(p: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))


def _load(path: Path) -> dict:
    return load_weights_only(path, "cpu")


def consolidate(ckpt: str | Path) -> dict:
    """name -> full fp32 tensor, from the ZeRO shards of a checkpoint written by any number of ranks."""
    d = Path(ckpt) / CKPT_TAG
    # ZeRO-3 writes one model-states file per rank; stages 0-2 write one for the whole model (mp_rank_00)
    model_files = sorted(d.glob("zero_pp_rank_*_model_states.pt"), key=_rank) or sorted(
        d.glob("mp_rank_*_model_states.pt")
    )
    if not model_files:
        raise UserError(
            f"{ckpt} holds no DeepSpeed model states under {CKPT_TAG}/ (neither zero_pp_rank_*_model_states.pt "
            f"nor mp_rank_*_model_states.pt)"
        )
    first = _load(model_files[0])
    stage = int(first["ds_config"].get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        # the module's state dict: buffers are not weights, and a tied weight (the head shares the
        # embedding) appears under both names, on one storage; keep its first name, as named_parameters() does
        buffers, out, seen = set(first.get("buffer_names") or ()), {}, set()
        for k, v in first["module"].items():
            ptr = v.untyped_storage().data_ptr()
            if k in buffers or ptr in seen:
                continue
            seen.add(ptr)
            out[k] = v.float().clone()
        return out
    # each rank's slice of the fp32 master weights (bf16 runs name them bf16_zero_pp_rank_*)
    optim_files = sorted(d.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank)
    world = len(optim_files)
    ranks_with_model = world if stage == 3 else 1
    if world != int(first["dp_world_size"]) or len(model_files) != ranks_with_model:
        raise UserError(
            f"{ckpt} is incomplete: {len(model_files)} model and {world} optimizer shards "
            f"for {first['dp_world_size']} ranks (ZeRO-{stage})"
        )
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    from tqdm import tqdm

    # the optimizer shards hold the fp32 master weights: the large reads, one per rank
    flats = [
        _load(f)["optimizer_state_dict"][key]
        for f in tqdm(optim_files, desc=f"{logs.TAG} reading ZeRO shards", unit=" rank", disable=None)
    ]
    out = {}
    for g, shapes in enumerate(first["param_shapes"]):
        if stage < 3:
            flat = torch.cat([f[g] for f in flats])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if stage == 3:
                part = math.ceil(numel / world)
                full = torch.cat([f[g][offset : offset + part] for f in flats])[:numel]
                offset += part
            else:
                full = flat[offset : offset + numel]
                offset += numel
            out[name] = full.view(*shape).clone()
    return out


def checkpoint_vocab(ckpt: str | Path, meta: dict, bundle: str | None = None) -> Vocabulary:
    """The checkpoint's vocabulary, refusing one whose modalities are not installed or whose bundle differs."""
    layout = meta["vocab"]
    installed = registry.discover()
    missing = [m for m in layout["modalities"] if m["name"] not in installed]
    if missing:
        names = ", ".join(f"{m['name']!r} (plugin version {m.get('package_version', '?')})" for m in missing)
        raise UserError(
            f"checkpoint {ckpt} needs modality {names}, which is not installed: "
            f"install the plugin that provides it (`omnistream modalities list` shows what is)"
        )
    bundle = bundle or meta["config"]["data"]["bundle_dir"]
    if not Path(bundle, "vocab.json").exists():
        raise UserError(
            f"the tokenizer bundle {bundle} that checkpoint {ckpt} was trained with is not there: pass --bundle DIR"
        )
    vocab = Vocabulary.load(bundle, {m["name"]: m["options"] for m in layout["modalities"]})
    if vocab.fingerprint != layout["fingerprint"]:
        raise UserError(
            f"tokenizer bundle {bundle} is not the one checkpoint {ckpt} was trained with: "
            f"{describe_mismatch(layout, vocab.layout())}"
        )
    return vocab


def export(ckpt: str | Path, out_dir: str | Path, bundle: str | None = None) -> Path:
    """Checkpoint -> OUT_DIR/{model.safetensors, model.json, tokenizers/}."""
    meta = read_checkpoint_meta(ckpt)
    vocab = checkpoint_vocab(ckpt, meta, bundle)
    return write_export(
        out_dir,
        consolidate(ckpt),
        dict(meta["config"]["model"]),
        vocab,
        meta["step"],
        meta.get("run_id", ""),
        meta["config"].get("generate") or {},
    )


def write_export(
    out_dir: str | Path,
    weights: dict,
    model_cfg: dict,
    vocab: Vocabulary,
    step: int,
    run_id: str = "",
    generate: dict | None = None,
) -> Path:
    """The exported folder from whole weights (parameter name -> tensor): what `load_model` reads. `generate`:
    the run's [generate.<modality>] defaults, kept in model.json for `generation_defaults`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / MODEL_FILE))
    (out / MODEL_META).write_text(
        json.dumps(
            {
                "model": model_cfg,
                "step": step,
                "run_id": run_id,
                "vocab_fingerprint": vocab.fingerprint,
                "generate": generate or {},
            },
            indent=1,
        )
    )
    if (out / "tokenizers").exists():
        shutil.rmtree(out / "tokenizers")
    vocab.save(out / "tokenizers")
    return out


def generation_defaults(path: str | Path) -> dict[str, dict]:
    """The [generate.<modality>] defaults of the run that trained an exported model or a checkpoint ({} for
    one exported before they were kept)."""
    p = Path(path)
    if (p / MODEL_META).exists():
        return json.loads((p / MODEL_META).read_text()).get("generate") or {}
    if (p / META).exists():
        return read_checkpoint_meta(p)["config"].get("generate") or {}
    return {}


def load_model(path: str | Path, bundle: str | None = None):
    """(GPT in eval mode, Vocabulary) from an exported directory or straight from a checkpoint."""
    from omnistream.model.config import GPTConfig
    from omnistream.model.model import GPT

    p = Path(path)
    if (p / MODEL_FILE).exists():
        from safetensors.torch import load_file

        info = json.loads((p / MODEL_META).read_text())
        vocab = Vocabulary.load(p / "tokenizers")
        if vocab.fingerprint != info["vocab_fingerprint"]:
            raise UserError(f"{p}/tokenizers is not the vocabulary {p}/{MODEL_FILE} was trained with")
        weights = load_file(str(p / MODEL_FILE))
        model_cfg = info["model"]
    elif (p / META).exists():
        meta = read_checkpoint_meta(p)
        vocab = checkpoint_vocab(p, meta, bundle)
        weights = consolidate(p)
        model_cfg = meta["config"]["model"]
    else:
        raise UserError(f"{path} is neither an exported model ({MODEL_FILE}) nor a checkpoint ({META})")
    model = GPT(GPTConfig(**model_cfg))
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise UserError(f"{path}: weights {sorted(set(weights) ^ set(params))[:4]} do not match the model config")
    for name, prm in params.items():
        prm.data.copy_(weights[name])
    return model.eval(), vocab
