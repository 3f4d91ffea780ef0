"""Shared fixtures: a small real demo corpus, a fitted tokenizer bundle, a local Ray cluster.

Tests live by kind: unit/ (no Ray, no subprocess), integration/ (a local Ray, the real Trainer),
system/ (the CLI, a Ray head, plugin install, placement). Helpers are in common/.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# tests/hooks/sitecustomize.py, in every process the tests start (Ray's workers too): a stand-in for a
# decoder library that crashes on crafted bytes, for the shard that kills its actor (test_data_quality)
_HOOKS = os.path.join(os.path.dirname(__file__), "hooks")
if _HOOKS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HOOKS, os.environ.get("PYTHONPATH")) if p)

import pytest
from common import SMALL, SMALL_OPTIONS, fit_modalities

from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.democorpus import write_demo_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_demo_corpus(d, SMALL) | {"dir": str(d)}


@pytest.fixture(scope="session")
def fitted(corpus):
    return fit_modalities(corpus["train"], SMALL_OPTIONS)


@pytest.fixture(scope="session")
def bundle(fitted, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    Vocabulary(fitted).save(d)
    return str(d)
@pytest.fixture(scope="session")
def ray_local():
    from omnistream.cluster.ray_local import connect

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
