"""Shared fixtures: a small real demo corpus, a fitted tokenizer bundle, a local Ray cluster."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

from modalities import registry
from modalities.vocab import Vocabulary
from pipelines.democorpus import CorpusSpec, write_demo_corpus
from pipelines.records import read_shard

# the modality options of the session's fitted bundle (`bundle`), as a config's TOML
SMALL_MODALITIES = """[modalities.text]
vocab_size = 300
[modalities.image]
codebook_size = 64
[modalities.audio]
codebook_size = 32
"""

SMALL = CorpusSpec(train_records=480, eval_records=40, records_per_shard=120, seed=1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_demo_corpus(d, SMALL) | {"dir": str(d)}


def fit_modalities(shards, options=None, names=("text", "image", "audio")):
    """Fit the built-ins directly (no Ray) on every record of `shards`; the Ray path has its own test."""
    options = options or {}
    mods = [registry.build(n, options.get(n, {})) for n in names]
    feats = {m.name: [] for m in mods}
    exts = {e: m for m in mods for e in m.keys}
    for s in shards:
        for r in read_shard(s, 1 << 26):
            for ext, data in r.fields.items():
                if ext in exts:
                    m = exts[ext]
                    feats[m.name].append(m.fit_features(m.decode_bytes(ext, data)))
    for m in mods:
        m.fit(feats[m.name])
    return mods


@pytest.fixture(scope="session")
def fitted(corpus):
    return fit_modalities(corpus["train"], {"text": {"vocab_size": 300}, "image": {"codebook_size": 64},
                                            "audio": {"codebook_size": 32}})


@pytest.fixture(scope="session")
def bundle(fitted, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    Vocabulary(fitted).save(d)
    return str(d)


@pytest.fixture(scope="session")
def ray_local():
    from cluster.ray_local import connect

    ray = connect("", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray_only():
    """For tests that start Ray processes of their own (a head, a simulated cluster, CLI runs): end this
    process's local Ray first, so two Rays do not share the machine's 2 cores. `connect()` starts it
    again for a later test that needs it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
