"""Bring your own data: the same real records (the session corpus's first shard: Pillow JPEGs and PNGs,
soundfile WAVs and FLACs, captions, documents of ordered parts) as Parquet (Hugging Face media structs,
OBELICS list columns), a JSONL manifest, a folder of files, an imagefolder with metadata.jsonl and a
LibriSpeech folder, each read as training reads it and checked against the same records in tar; paths
that leave their root refused and counted; `data prepare` byte-identical twice and after a kill; `data
info` and `data inspect` on them."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from common import EXE, SMALL_OPTIONS, mlflow_client, own_formats, tar_records
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.documents import RecordProcessor

MEDIA = ("jpg", "jpeg", "png", "wav", "flac")


@pytest.fixture(scope="module")
def formats(corpus, tmp_path_factory):
    """Every format of the same records, with the tar each is checked against (tests/common)."""
    return own_formats(corpus["train"][0], tmp_path_factory.mktemp("own"))


def _outcomes(bundle, shard, fmt="webdataset", options=None, **data):
    cfg = DataConfig(format=fmt, format_options=options or {}, seq_len=1024, **data)
    proc, tally = RecordProcessor(SMALL_OPTIONS, bundle, cfg, seed=0), Tally()
    out = []
    for _, r, o in proc.process([(0, shard)], tally):
        parts = [(m, list(map(int, ids))) for m, ids in (o.parts or [])]
        # one value per modality: the document's order is drawn per epoch from the modalities, whatever order
        # the fields came in (documents.make_document); a document's own parts keep theirs
        out.append((r.key, o.status, o.reason, parts if o.ordered else sorted(parts)))
    assert tally.balanced(), tally.report()
    return out, tally


@pytest.mark.parametrize("name", ["parquet", "arrow", "jsonl", "folder", "imagefolder", "librispeech"])
def test_each_format_keeps_the_ids_the_same_records_in_tar_give(formats, bundle, name):
    """Record for record: the same keys, the same outcome (kept, or filtered/errored for the same reason)
    and the same token ids, part by part, as the tar."""
    fmt, options, shard, tar = formats[name]
    got, tally = _outcomes(bundle, shard, fmt, options)
    want, _ = _outcomes(bundle, tar)
    assert len(got) == len(want) >= 10, (len(got), len(want))
    assert got == want
    assert tally.kept > 0 and sum(1 for g in got if g[1] == "kept" and g[3]) == tally.kept
    if name in ("parquet", "arrow", "jsonl", "folder"):  # the documents of several parts came through in order
        assert any(len(g[3]) >= 3 for g in got)


def test_a_path_that_leaves_its_root_is_refused_and_counted(bundle, corpus, tmp_path):
    """A manifest, a metadata file and a Parquet column naming `../x`, an absolute path, or a link inside
    the root pointing out: each such record is errored as path_outside_root (nothing outside is read), and
    the records beside it are kept."""
    jpg = next(f["jpg"] for _, f in tar_records(corpus["train"][0]) if "jpg" in f)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpg)
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(jpg)
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    bad = ["../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg", "sub/../../outside/secret.jpg"]
    rows = [{"key": "good-0", "jpg": "ok.jpg", "txt": "a photo of a digit"}]
    rows += [{"key": f"bad-{i}", "jpg": p, "txt": "a photo of a digit"} for i, p in enumerate(bad)]
    rows.append({"key": "good-1", "jpg": "ok.jpg", "txt": "a photo of a digit"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["jpg"], "text": r["txt"], "key": r["key"]}) + "\n" for r in rows)
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [{"key": r["key"], "image": {"bytes": None, "path": r["jpg"]}, "text": r["txt"]} for r in rows]
        ),
        root / "rows.parquet",
    )
    for fmt, shard in (("jsonl", root / "manifest.jsonl"), ("folder", root), ("parquet", root / "rows.parquet")):
        got, tally = _outcomes(bundle, str(shard), fmt)
        assert [(k, s, r) for k, s, r, _ in got] == [("good-0", "kept", "")] + [
            (f"bad-{i}", "errored", "path_outside_root") for i in range(len(bad))
        ] + [("good-1", "kept", "")], (fmt, got)
        assert tally.errored["path_outside_root"] == len(bad)
        assert {d["key"] for d in tally.dead_letter} == {f"bad-{i}" for i in range(len(bad))}


def test_a_row_is_bounded_as_a_tar_record_is_while_it_is_read(bundle, tmp_path):
    """A row of more fields than data.limits.members, or more bytes than data.limits.record_bytes, is errored
    (too_many_members, record_too_large) as its fields are read, and the rows beside it are kept; a
    manifest line longer than record_bytes is skipped unread, counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"key": "ok-0", "texts": ["a digit", "another digit"]},
        {"key": "many", "texts": [f"part {i}" for i in range(90)]},
        {"key": "big", "texts": ["x" * 3000, "y" * 3000]},
        {"key": "ok-1", "texts": ["a digit", "another digit"]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    got, tally = _outcomes(
        bundle, str(tmp_path / "r.parquet"), "parquet", {"parts": {"text": "texts"}}, limits={"record_bytes": 5000}
    )
    assert [(k, s, r) for k, s, r, _ in got] == [
        ("ok-0", "kept", ""),
        ("many", "errored", "too_many_members"),
        ("big", "errored", "record_too_large"),
        ("ok-1", "kept", ""),
    ]
    lines = [
        json.dumps({"key": "a", "txt": "a digit"}),
        json.dumps({"key": "b", "txt": "z" * 6000}),
        "{not json",
        "[1]",
    ]
    (tmp_path / "m.jsonl").write_text("\n".join([*lines, json.dumps({"key": "c", "txt": "a digit"})]) + "\n")
    got, tally = _outcomes(bundle, str(tmp_path / "m.jsonl"), "jsonl", limits={"record_bytes": 5000})
    assert [(s, r) for _, s, r, _ in got] == [
        ("kept", ""),
        ("errored", "record_too_large"),
        ("errored", "bad_manifest_line"),
        ("errored", "bad_manifest_line"),
        ("kept", ""),
    ]
    assert tally.seen == 5 and tally.kept == 2


def test_data_info_reads_a_parquet_source_from_the_command_line(formats, tmp_path):
    """`data info SHARD --options ... --json` on Parquet: the outcomes and the measures (image sizes, clip and
    text lengths, parts per document) of every record, and its histograms written."""
    _, options, shard, tar = formats["parquet"]
    r = subprocess.run(
        [*EXE, "data", "info", shard, "--options", json.dumps(options), "--json", "--plot", "h.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    n = len(tar_records(tar))
    assert rep["records"] == n and sum(rep["outcomes"].values()) == n
    m = rep["measures"]
    assert {"image width (px)", "clip length (s)", "text length (chars)", "parts per document"} <= set(m)
    assert 16 <= m["image width (px)"]["min"] <= m["image width (px)"]["max"] <= 512
    assert 0 < m["clip length (s)"]["min"] <= m["clip length (s)"]["max"] < 10
    assert m["parts per document"]["max"] >= 3
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # and the same picture in the tracker (the default: MLflow's embedded store in the working folder)
    c = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.get_run(rep["run_id"])
    assert run.data.tags["omnistream.kind"] == "data-info"
    logged = [a.path for a in c.list_artifacts(rep["run_id"], "images")]
    assert any("histograms" in p and p.endswith(".png") for p in logged), logged
