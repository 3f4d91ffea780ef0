"""Bring your own data on the session's Ray: `data inspect`'s pass over each format against the same records
in tar, and `data prepare` (Ray tasks) byte-identical twice and after a kill. The formats are the ones
tests/common's own_formats builds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common import EXE, REPO, SMALL_OPTIONS, own_formats, tar_records
from omnistream.pipelines.config import DataConfig


@pytest.fixture(scope="module")
def formats(corpus, tmp_path_factory):
    return own_formats(corpus["train"][0], tmp_path_factory.mktemp("own"))


def test_data_inspect_reports_each_format_as_it_reports_the_tar(formats, ray_local):
    """`data inspect`'s pass (the RecordProcessor actors on the session's Ray), once per format over its
    shards: each shard's seen / kept / filtered / errored as the same records' tar has them in one pass over
    the tars, and the totals per modality alike."""
    from omnistream.pipelines.inspect import inspect_shards

    def one_pass(fmt, options, shards):
        # dedup off: the imagefolder's and LibriSpeech's records are the first shard's again, and would be
        # counted as its duplicates in a pass over them all
        cfg = DataConfig(format=fmt, format_options=options, dedup={"exact": False, "near": False})
        return inspect_shards(shards, cfg, SMALL_OPTIONS, 0)

    tars = sorted({tar for *_, tar in formats.values()})
    want = one_pass("webdataset", {}, tars)["per_shard"]
    by_format: dict[tuple, list[str]] = {}
    for name, (fmt, options, *_) in formats.items():
        if name != "arrow":  # the parquet reader's, as parquet is (test_own_data.py checks its records)
            by_format.setdefault((fmt, json.dumps(options)), []).append(name)
    assert len(by_format) == 3  # parquet, jsonl, folder (three layouts of it)
    for (fmt, options), names in by_format.items():
        rep = one_pass(fmt, json.loads(options), [formats[n][2] for n in names])
        for n in names:
            got = rep["per_shard"][os.path.abspath(formats[n][2])]
            assert got == want[formats[n][3]], (n, got, want[formats[n][3]])
            assert got["seen"] >= 10 and got.get("kept", 0) > 0, (n, got)


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_prepare_gives_byte_identical_shards_twice_and_after_a_kill(formats, ray_local, tmp_path):
    """`data prepare` of eight folders in three layouts: the shards hold the records read, twice gives the
    same bytes (sha256) on 2 and on 1 Ray workers, and a prepare killed (SIGKILL) after its first input
    (`--in-process`), run again on Ray, gives them too."""
    from omnistream.pipelines.formats import ReadBounds
    from omnistream.pipelines.prepare import prepare

    # eight folders (one format): six copies of the unpacked shard, the imagefolder and the LibriSpeech one,
    # so that a kill after the first finished input comes before the last one (one worker takes them in turn)
    copies = [shutil.copytree(formats["folder"][2], tmp_path / f"in-{i}") for i in range(6)]
    inputs = [str(c) for c in copies] + [formats[n][2] for n in ("imagefolder", "librispeech")]
    bounds = ReadBounds.of(DataConfig())
    first = prepare(inputs, "folder", {}, bounds, str(tmp_path / "a"), ("records", 25), 2)
    again = prepare(inputs, "folder", {}, bounds, str(tmp_path / "b"), ("records", 25), 1)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b and len(a) >= 20 and first["written"] == again["written"] == first["seen"]
    assert [r for s in sorted((tmp_path / "a").glob("shard-00000-*.tar")) for r in tar_records(s)] == sorted(
        tar_records(formats["folder"][3])
    )
    # the same, killed after its first input is done: in one process (no second Ray beside the session's),
    # one input after another, so that the others are not yet
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen(
        [*EXE, "data", "prepare", *inputs, str(out), "--format", "folder", "--shard-size", "25", "--in-process"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill ends all of it
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any((out / ".prepare").glob("0*.json")) and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = sorted(p.name for p in (out / ".prepare").glob("0*.json"))
    assert 1 <= len(done) < len(inputs), (done, proc.stderr.read()[-2000:])
    resumed = prepare(inputs, "folder", {}, bounds, str(out), ("records", 25), 2)
    assert resumed["prepared_now"] == len(inputs) - len(done)
    assert _digests(out) == a
    assert not list(out.glob(".tmp-*"))
