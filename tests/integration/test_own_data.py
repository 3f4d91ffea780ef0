"""Bring your own data: the same real records (the session corpus's first shard: Pillow JPEGs and PNGs,
soundfile WAVs and FLACs, captions, documents of ordered parts) as Parquet (Hugging Face media structs,
OBELICS list columns), a JSONL manifest, a folder of files, an imagefolder with metadata.jsonl and a
LibriSpeech folder, each read as training reads it and checked against the same records in tar; paths
that leave their root refused and counted; `data prepare` byte-identical twice and after a kill; `data
info` and `data inspect` on them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import webdataset as wds

from common import EXE, MEDIA_OPTIONS, REPO, SMALL_OPTIONS, folder_of, jsonl_of, mlflow_client, parquet_of, tar_records
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.documents import RecordProcessor

MEDIA = ("jpg", "jpeg", "png", "wav", "flac")


def _tar(records, path) -> str:
    with wds.TarWriter(str(path)) as w:
        for key, fields in records:
            w.write({"__key__": key, **fields})
    return str(path)


def _imagefolder(records, folder: Path) -> list:
    """Hugging Face's imagefolder: the records of one image and a caption, `file_name` and `text` in
    metadata.jsonl, their labels as columns. Returns the records it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    with (folder / "metadata.jsonl").open("w") as f:
        for key, fields in records:
            img = [e for e in fields if e in ("jpg", "png")]
            if len(img) != 1 or set(fields) - {img[0], "txt", "json"}:
                continue
            (folder / f"{key}.{img[0]}").write_bytes(fields[img[0]])
            row = {"file_name": f"{key}.{img[0]}", **json.loads(fields.get("json", b"{}"))}
            if "txt" in fields:
                row["text"] = fields["txt"].decode()
            f.write(json.dumps(row) + "\n")
            held.append((key, fields))
    return held


def _librispeech(records, folder: Path) -> list:
    """The LibriSpeech layout: SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac (or .wav) beside
    SPEAKER-CHAPTER.trans.txt, a line `ID TEXT` per clip. Returns the same records, keyed as the reader keys
    them, as tar records (clip and text only)."""
    held = []
    for n, (_, fields) in enumerate(r for r in records if {"txt"} < set(r[1]) and set(r[1]) & {"wav", "flac"}):
        spk, chap = 19 + n % 2, 198
        d = folder / str(spk) / str(chap)
        d.mkdir(parents=True, exist_ok=True)
        utt = f"{spk}-{chap}-{n:04d}"
        ext = "wav" if "wav" in fields else "flac"
        (d / f"{utt}.{ext}").write_bytes(fields[ext])
        with (d / f"{spk}-{chap}.trans.txt").open("a") as f:
            f.write(f"{utt} {fields['txt'].decode()}\n")
        held.append((f"{spk}/{chap}/{utt}", {"txt": fields["txt"], ext: fields[ext]}))
    return sorted(held)  # the reader goes through the folders and their transcripts in sorted order


@pytest.fixture(scope="module")
def formats(corpus, tmp_path_factory):
    """Every format of the same records, with the tar each is checked against."""
    tmp = tmp_path_factory.mktemp("own")
    records = tar_records(corpus["train"][0])
    image_recs = _imagefolder(records, tmp / "imagefolder")
    speech = _librispeech(records, tmp / "librispeech")
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_of(records, tmp / "own.parquet"))
    with ipc.new_stream(str(tmp / "own.arrow"), table.schema) as w:  # what datasets' save_to_disk writes
        w.write_table(table, max_chunksize=100)
    return {
        # name: (format, format options, shard, the same records as a tar)
        "parquet": ("parquet", MEDIA_OPTIONS, str(tmp / "own.parquet"), corpus["train"][0]),
        "arrow": ("parquet", MEDIA_OPTIONS, str(tmp / "own.arrow"), corpus["train"][0]),
        "jsonl": ("jsonl", {}, jsonl_of(records, tmp / "jsonl"), corpus["train"][0]),
        "folder": ("folder", {}, folder_of(records, tmp / "folder"), corpus["train"][0]),
        "imagefolder": ("folder", {}, str(tmp / "imagefolder"), _tar(image_recs, tmp / "imagefolder.tar")),
        "librispeech": ("folder", {}, str(tmp / "librispeech"), _tar(speech, tmp / "librispeech.tar")),
    }


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


def test_data_inspect_reports_each_format_as_it_reports_the_tar(formats, ray_local):
    """`data inspect`'s pass (the RecordProcessor actors on the session's Ray) on each format: the same
    seen / kept / filtered / errored and per-modality counts as on the same records in tar."""
    from omnistream.pipelines.inspect import inspect_shards

    tars: dict[str, dict] = {}
    for name, (fmt, options, shard, tar) in formats.items():
        cfg = DataConfig(format=fmt, format_options=options, tokenizer_actors=1)
        got = inspect_shards([shard], cfg, SMALL_OPTIONS, 0)
        if tar not in tars:
            tars[tar] = inspect_shards([tar], DataConfig(tokenizer_actors=1), SMALL_OPTIONS, 0)
        want = tars[tar]
        for k in ("seen", "kept", "filtered", "errored", "per_modality"):
            assert got[k] == want[k], (name, k, got[k], want[k])


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


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_prepare_gives_byte_identical_shards_twice_and_after_a_kill(formats, ray_local, tmp_path):
    """`data prepare` of five inputs in three formats: the shards hold the records read, twice gives the same
    bytes (sha256), and a prepare killed (SIGKILL) after its first input, run again, gives them too."""
    from omnistream.pipelines.formats import ReadBounds
    from omnistream.pipelines.prepare import prepare

    inputs = [formats[n][2] for n in ("folder", "imagefolder", "librispeech")]  # folders, one format
    bounds = ReadBounds.of(DataConfig())
    first = prepare(inputs, "folder", {}, bounds, str(tmp_path / "a"), ("records", 25), 2)
    again = prepare(inputs, "folder", {}, bounds, str(tmp_path / "b"), ("records", 25), 1)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b and len(a) >= 6 and first["written"] == again["written"] == first["seen"]
    assert [r for s in sorted((tmp_path / "a").glob("shard-00000-*.tar")) for r in tar_records(s)] == sorted(
        tar_records(formats["folder"][3])
    )
    # the same, killed after its first input is done, on one worker so that the others are not yet
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen(
        [*EXE, "data", "prepare", *inputs, str(out), "--format", "folder", "--shard-size", "25", "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes its local Ray with it
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any((out / ".prepare").glob("0*.json")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = sorted(p.name for p in (out / ".prepare").glob("0*.json"))
    assert 1 <= len(done) < len(inputs), (done, proc.stderr.read()[-2000:])
    resumed = prepare(inputs, "folder", {}, bounds, str(out), ("records", 25), 2)
    assert resumed["prepared_now"] == len(inputs) - len(done)
    assert _digests(out) == a
    assert not list(out.glob(".tmp-*"))


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
