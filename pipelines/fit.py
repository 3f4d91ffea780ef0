"""Fitting the tokenizers on a sample of the training shards, with the work spread by Ray.

The sample is read the way training reads: each shard by a RecordProcessor actor (the guarded reader,
data.limits, the quality filters, bounded restarts and retries, a shard whose actor keeps dying counted
as a shard error), and each kept record's modalities turned into fit features (image patches, log-mel
frames, strings), refused where they are not finite. The final fit (k-means, BPE merges) runs once,
here, on the gathered features of the first data.fit_records records, in shard order. A fit that trains a
model (a modality whose `fit_resources` asks for resources: the learned `fsq` image tokenizer) runs as a Ray
task with what it asks for, on a GPU when the cluster has one, with a progress bar the driver draws; its
`fit_report` (loss curves, reconstructions) comes back with it for the tracker.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter
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
from .documents import RecordProcessor, guarded
from .formats import reader
from .shards import list_shards, shard_order
from .stream import ACTOR_DIED, RETRIES, processor_options, shards_may_die

log = logging.getLogger(__name__)
FIT_WAIT_S = 120.0  # how long a trained fit waits for the CPUs it asks for (see _cpus_given_back)
END = "__end__"  # the row that says a shard's call finished (a shard without one: its actor died)


class FitFeatures(RecordProcessor):
    """One shard per call -> a row per record (its fit features per modality, or why it was not kept),
    then one END row; at most `max_records` records of a shard are read."""

    def __init__(
        self, modalities: dict[str, dict], cfg: DataConfig, seed: int, max_records: int, formats: list | None = None
    ):
        super().__init__(modalities, None, cfg, seed)
        self.max_records = max_records
        self.readers = [reader(f, o) for f, o in formats or [(cfg.format, cfg.format_options)]]

    def _parts(self, objs: list, batched: bool = False) -> list:
        """Each part's fit features, [field, modality, features] (every part of a document is a sample)."""
        feats = []
        for field_name, n, o in objs:
            f = guarded(self.mods[n].fit_features, n, "fit_features", o, field=field_name)
            if isinstance(f, np.ndarray) and np.issubdtype(f.dtype, np.floating) and not np.isfinite(f).all():
                raise BadSample("features_not_finite", f"{n}: NaN or inf in its fit features")
            feats.append([field_name, n, f])
        return feats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch, shard = int(batch["epoch"][0]), str(batch["shard"][0])
        self.reader = self.readers[int(batch["fmt"][0]) if "fmt" in batch else 0]
        tally, keys, feats, why = Tally(), [], [], []
        for _, r, o in self.process([(epoch, shard)], tally):
            keys.append(r.key)
            feats.append(pickle.dumps(o.parts) if o.status == "kept" else b"")
            why.append("" if o.status == "kept" else f"{o.status}/{o.reason}")
            if len(keys) >= self.max_records:
                break
        for e in tally.shard_errors:  # the shard itself (unreadable, cut short, damaged): no record row
            keys.append("")
            feats.append(b"")
            why.append(f"shard_errors/{e['reason']}")
        keys.append(END)
        feats.append(b"")
        why.append("")
        return {
            k: np.array(v, dtype=object)
            for k, v in {"shard": [shard] * len(keys), "key": keys, "feature": feats, "why": why}.items()
        }


def fit_bundle(
    cfg: DataConfig, modalities: dict[str, dict], seed: int, out_dir: str | Path | None = None
) -> tuple[Vocabulary, dict]:
    """Fit every configured modality and write the bundle (vocab.json + states) to out_dir or cfg.bundle_dir."""
    mods = {name: registry.build(name, opts) for name, opts in modalities.items()}
    formats, fmt_of = [], {}  # each source's shards are read in its own format
    for specs, fmt, opts in cfg.shard_formats():
        formats.append((fmt, opts))
        for s in list_shards(specs):
            fmt_of.setdefault(s, len(formats) - 1)
    plan = shard_order(list(fmt_of), seed, 1)
    # the same records, in the same order, every time: the codebooks (k-means) depend on both
    data_context()
    ds = ray.data.from_items(
        [{"epoch": e, "shard": s, "fmt": fmt_of[s]} for e, s in plan], override_num_blocks=len(plan)
    )
    ds = shards_may_die(
        ds.map_batches(
            FitFeatures,
            fn_constructor_kwargs={
                "modalities": modalities,
                "cfg": cfg,
                "seed": seed,
                "max_records": cfg.fit_records,
                "formats": formats,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(2, len(plan))),
            batch_format="numpy",
            **RETRIES,
            **processor_options(cfg, modalities),
        )
    )
    from tqdm import tqdm

    gathered: dict[str, list] = {name: [] for name in mods}
    bad, finished, order = Counter(), set(), [s for _, s in plan]
    records, cut = 0, False
    with tqdm(
        desc=f"{logs.TAG} reading samples to fit the tokenizers", total=cfg.fit_records, unit=" records", disable=None
    ) as bar:
        for row in ds.iter_rows():
            if row["key"] == END:
                finished.add(row["shard"])
                continue
            if not row["key"]:
                bad[row["why"]] += 1
                continue
            if records >= cfg.fit_records:
                cut = True
                break
            records += 1
            bar.update()
            if row["why"]:
                bad[row["why"]] += 1
                continue
            for name, f in pickle.loads(row["feature"]):  # our own actor's output, never input bytes
                gathered[name].append(f)
    # a shard with no END row, of those the sample reached, is one whose actor died each time it was tried
    reached = order[: max((order.index(s) for s in finished), default=-1)] if cut else order
    lost = sum(s not in finished for s in reached)
    if lost:
        bad[f"shard_errors/{ACTOR_DIED}"] += lost
    del ds  # its reading actors give their CPUs back before a training fit asks for them
    summary = {"records_sampled": records, "bad_samples": dict(sorted(bad.items())), "samples": {}, "reports": {}}
    for name, m in tqdm(list(mods.items()), desc=f"{logs.TAG} fitting", unit=" modality", disable=None):
        feats = gathered[name]
        if not feats:
            raise UserError(
                f"no samples of modality {name!r} in the first {cfg.fit_records} records of "
                f"{cfg.all_shards()}: cannot fit its tokenizer"
            )
        try:
            mods[name], summary["reports"][name] = fit_one(m, feats, cfg.fit_cpus)
        except ValueError as e:
            raise UserError(f"fitting modality {name!r} failed: {e}") from None
        summary["samples"][name] = len(feats)
    vocab = Vocabulary(list(mods.values()))
    vocab.save(out_dir or cfg.bundle_dir)
    return vocab, summary


def node_resources() -> dict[str, float]:
    """What one node can give one task: the most CPUs and GPUs of any alive node. A fit is a single task on a
    single node, so the cluster's totals (two 8-core nodes: 16) would ask for more than any node has."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {k: max((float(n.get(k, 0)) for n in nodes), default=0.0) for k in ("CPU", "GPU")}


def fit_one(mod, features: list, cpus: int = 0, wait_s: float = FIT_WAIT_S) -> tuple:
    """Fit one modality: here when its fit is light, else as a Ray task with the resources it asks for
    (`cpus`, when set, in place of the CPUs it asks for on a node without a GPU). Returns the fitted
    modality and its fit report; a trained fit's report says the threads, steps and seconds it took."""
    # both hooks are optional: a plugin that does not subclass BaseModality may have neither
    node = node_resources()
    wants = getattr(mod, "fit_resources", lambda node: None)(node)
    if wants is None:
        mod.fit(features)
        return mod, getattr(mod, "fit_report", dict)()
    if "num_gpus" not in wants:
        # one task runs on one node: more CPUs than the largest node has would wait forever
        want = max(1, min(int(cpus or wants.get("num_cpus", 1)), int(node["CPU"]) or 1))
        wants = {**wants, "num_cpus": _cpus_given_back(want, wait_s)}
    log.info("training the %s tokenizer as a Ray task with %s", mod.name, wants)
    mod, report, took = ray.get(_train_fit.options(**wants).remote(mod, features))
    rate = took["steps"] / max(took["seconds"], 1e-9)
    log.info(
        "trained the %s tokenizer with %d threads: %d steps in %.0f s (%.2f steps/s)",
        mod.name,
        took["threads"],
        took["steps"],
        took["seconds"],
        rate,
    )
    report = dict(report or {})
    report["summary"] = {
        **report.get("summary", {}),
        "threads": took["threads"],
        "fit_seconds": took["seconds"],
        "steps_per_s": rate,
    }
    return mod, report


def _cpus_given_back(want: int, wait_s: float) -> int:
    """`want` CPUs once Ray has them free: the sample's reading actors give theirs back a moment after the
    read ends (2 of 2 cores were still held the instant after on a 2-core machine, and a fit sized then
    ran on one thread at half speed). After `wait_s` with fewer free (held by another job), what is free,
    with a warning: a task that asks for more than will ever be free waits forever."""
    deadline = time.monotonic() + wait_s
    while True:
        free = int(ray.available_resources().get("CPU", 0))
        if free >= want:
            return want
        if time.monotonic() > deadline:
            log.warning(
                "only %d of the %d CPUs a tokenizer fit asks for came free within %.0f s (another job "
                "holds them?): fitting on %d; data.fit_cpus sets the number",
                free,
                want,
                wait_s,
                max(1, free),
            )
            return max(1, free)
        time.sleep(0.2)


@ray.remote
def _train_fit(mod, features: list) -> tuple:
    import torch
    from ray.experimental.tqdm_ray import tqdm

    # Ray sets OMP_NUM_THREADS to the task's CPUs (1 where it asks for none); the fit's convolutions use
    # every CPU the task was given, one intra-op thread each
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    bar = tqdm(desc=f"training the {mod.name} tokenizer on {threads} threads", total=None, unit=" steps")
    steps, shown = [0], [0, time.monotonic()]  # steps done; steps and time last shown

    def progress(step: int, total: int, metrics: dict) -> None:
        # the bar is redrawn twice a second, not per step: each update is a line Ray's log monitor parses
        # and the driver redraws, at 60 steps/s for fsq on 2 cores, beside a fit that wants both cores
        steps[0] = step
        if time.monotonic() - shown[1] < 0.5 and step != total:
            return
        if bar.total != total:
            bar.total = total
        bar.update(step - shown[0])
        shown[:] = [step, time.monotonic()]
        bar.set_description(
            f"training the {mod.name} tokenizer on {threads} threads (loss {metrics.get('loss', float('nan')):.4f})"
        )

    t0 = time.perf_counter()
    mod.fit(features, progress=progress)
    took = {"threads": torch.get_num_threads(), "steps": steps[0], "seconds": time.perf_counter() - t0}
    bar.close()
    return mod, mod.fit_report(), took
