"""Fitting the tokenizers on a sample of the training shards, with the work spread by Ray.

Ray Data reads and decodes the sample and each modality turns its objects into
fit features (image patches, log-mel frames, strings) in parallel actors; the
final fit (k-means, BPE merges) runs once, here, on the gathered features.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import ray
from omnistream.common import logs
from omnistream.common.errors import BadSample, UserError
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary

from .accounting import Tally
from .config import DataConfig
from .context import data_context
from .shards import list_shards, shard_order
from .stream import _read


class ExtractFeatures:
    def __init__(self, modalities):
        self.mods = {m.name: m for m in modalities}
        self.exts = {ext: m.name for m in modalities for ext in m.keys}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, feats, bad = [], [], []
        for i in range(len(batch["key"])):
            if batch["error"][i]:
                bad.append(str(batch["error"][i]))
                continue
            for ext, data in zip(list(batch["exts"][i]), list(batch["blobs"][i])):
                name = self.exts.get(ext)
                if name is None:
                    continue
                try:
                    obj = self.mods[name].decode_bytes(ext, data)
                except BadSample as e:
                    bad.append(e.reason)
                    continue
                names.append(name)
                feats.append(pickle.dumps(self.mods[name].fit_features(obj)))
        # bad samples ride along as rows of their own so the driver can count them
        names += ["__bad__"] * len(bad)
        feats += [pickle.dumps(r) for r in bad]
        return {"modality": np.array(names, dtype=object), "feature": np.array(feats, dtype=object)}


def fit_bundle(cfg: DataConfig, modalities: dict[str, dict], seed: int, out_dir: str | Path | None = None) -> tuple[Vocabulary, dict]:
    """Fit every configured modality and write the bundle (vocab.json + states) to out_dir or cfg.bundle_dir."""
    mods = [registry.build(name, opts) for name, opts in modalities.items()]
    shards = list_shards(cfg.train_shards)
    plan = shard_order(shards, seed, 1)
    # the same records, in the same order, every time: the codebooks (k-means) depend on both
    data_context()
    ds = ray.data.from_items([{"epoch": e, "shard": s} for e, s in plan], override_num_blocks=len(plan))
    ds = ds.flat_map(_read, fn_kwargs={"max_member_bytes": cfg.max_member_bytes}, num_cpus=cfg.read_cpus)
    ds = ds.limit(cfg.fit_records)
    ds = ds.map_batches(ExtractFeatures, fn_constructor_kwargs={"modalities": mods}, batch_size=64,
                        compute=ray.data.ActorPoolStrategy(size=2), batch_format="numpy", num_cpus=0.5)
    from tqdm import tqdm

    gathered: dict[str, list] = {m.name: [] for m in mods}
    bad = Tally()
    with tqdm(desc=f"{logs.TAG} reading samples to fit the tokenizers", unit=" samples", disable=None) as bar:
        for row in ds.iter_rows():
            obj = pickle.loads(row["feature"])
            if row["modality"] == "__bad__":
                bad.errored[obj] += 1
            else:
                gathered[row["modality"]].append(obj)
            bar.update()
    summary = {"records_sampled": cfg.fit_records, "bad_samples": dict(bad.errored), "samples": {}}
    for m in tqdm(mods, desc=f"{logs.TAG} fitting", unit=" modality", disable=None):
        feats = gathered[m.name]
        if not feats:
            raise UserError(f"no samples of modality {m.name!r} in the first {cfg.fit_records} records of "
                            f"{cfg.train_shards}: cannot fit its tokenizer")
        try:
            m.fit(feats)
        except ValueError as e:
            raise UserError(f"fitting modality {m.name!r} failed: {e}") from None
        summary["samples"][m.name] = len(feats)
    vocab = Vocabulary(mods)
    vocab.save(out_dir or cfg.bundle_dir)
    return vocab, summary
