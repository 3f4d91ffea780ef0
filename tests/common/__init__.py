"""Helpers every test tier shares: the small corpus spec, the small bundle's options, direct fitting."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omnistream.modalities import registry
from omnistream.pipelines.democorpus import PARQUET_OPTIONS, CorpusSpec
from omnistream.pipelines.democorpus import as_folder as folder_of
from omnistream.pipelines.democorpus import as_jsonl as jsonl_of
from omnistream.pipelines.democorpus import as_parquet as parquet_of
from omnistream.pipelines.records import part_ext, read_shard

REPO = Path(__file__).resolve().parents[2]
EXE = [sys.executable, "-m", "omnistream.cli"]  # the CLI as a subprocess, with this venv's Python

# the modality options of the session's fitted bundle (`bundle`), as a config's TOML
SMALL_MODALITIES = """[modalities.text]
vocab_size = 300
[modalities.image]
codebook_size = 64
[modalities.audio]
codebook_size = 32
"""
SMALL_OPTIONS = {"text": {"vocab_size": 300}, "image": {"codebook_size": 64}, "audio": {"codebook_size": 32}}

SMALL = CorpusSpec(train_records=480, eval_records=40, records_per_shard=120, seed=1, eval_interleaved=40)

# the demo's eval tasks, as a config's TOML (the digit question of configs/demo.toml)
DIGIT_TASKS = """[eval.tasks.image_to_text]
prompt = "image"
label_field = "digit"
match = "number"
[eval.tasks.audio_to_text]
prompt = "audio"
label_field = "digit"
match = "number"
"""


def fit_modalities(shards, options=None, names=("text", "image", "audio")):
    """Fit modalities directly (no Ray) on every record of `shards`; the Ray path has its own test."""
    options = options or {}
    mods = [registry.build(n, options.get(n, {})) for n in names]
    feats = {m.name: [] for m in mods}
    exts = {e: m for m in mods for e in m.keys}
    for s in shards:
        for r in read_shard(s, 1 << 26):
            for f, data in r.fields.items():
                ext = part_ext(f)[1]  # a document's part: KEY.<i>.<ext>
                if ext in exts:
                    m = exts[ext]
                    feats[m.name].append(m.fit_features(m.decode_bytes(ext, data)))
    for m in mods:
        m.fit(feats[m.name])
    return mods


def tar_bytes(members: list[tuple[bytes | str, bytes]]) -> bytes:
    """A real tar (GNU format, so raw byte names survive) of (name, data) members."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as t:
        for name, data in members:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wav_header(rate: int, frames: int = 64) -> bytes:
    """A real 16-bit mono PCM WAV at any rate (written by hand: encoders refuse absurd rates)."""
    import struct

    import numpy as np

    # a 440 Hz tone at a tenth of full scale: heard, so it passes the silence filter and gets resampled
    data = (np.sin(np.arange(frames) * 2 * np.pi * 440 / rate) * 3000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


# a small run's --set overrides (the integration tier's model and stream); paths are added per test
OVERRIDES = [
    "data.seq_len=128",
    "data.epochs=2",
    "data.fit_records=400",
    "modalities.text.vocab_size=300",
    "modalities.image.codebook_size=64",
    "modalities.audio.codebook_size=32",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=2",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.zero_stage=3",
    "cluster.num_workers=2",
    "cluster.cpus_per_worker=0.5",
    "eval.examples=20",
    "eval.loss_rows=8",
    "eval.samples=1",
    "eval.max_new_tokens=3",
    # the demo's two tasks, as --set overrides (configs/demo.toml declares them as tables)
    *[
        f"eval.tasks.{m}_to_text.{k}={v}"
        for m in ("image", "audio")
        for k, v in (("prompt", f'"{m}"'), ("label_field", '"digit"'), ("match", '"number"'))
    ],
]


# the uninterrupted run every end-to-end test reads (`trained`), and the runs compared with it
UNINTERRUPTED = ("train.steps=10", "train.checkpoint_every=3", "train.keep_checkpoints=4")


def tcp_listeners(tables: dict[str, str] | None = None) -> list[tuple[int, str, int]]:
    """(socket inode, address, port) of every TCP socket in LISTEN in this network namespace, read from its
    socket tables (/proc/net/tcp and tcp6, or `tables`: {"tcp": text, "tcp6": text}). Two small files per
    call, where asking psutil per process reads every table and every descriptor of each of ~40 processes
    (that cost the shared run's sampler, once a second, about 13 s of a core)."""
    import ipaddress

    out = []
    for name in ("tcp", "tcp6"):
        try:
            text = tables[name] if tables is not None else Path(f"/proc/net/{name}").read_text()
        except (KeyError, OSError):
            continue
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) < 10 or f[3] != "0A":  # 0A: TCP_LISTEN
                continue
            host, port = f[1].split(":")
            raw = bytes.fromhex(host)
            # each 32-bit word of the address is written in the host's (little-endian) order
            addr = ipaddress.ip_address(b"".join(raw[k : k + 4][::-1] for k in range(0, len(raw), 4)))
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            out.append((int(f[9]), str(addr), int(port, 16)))
    return out


def off_loopback(listeners: list[tuple[int, str, int]]) -> dict[int, str]:
    """{inode: "address:port"} of the listeners (as tcp_listeners gives them) bound to a non-loopback address."""
    import ipaddress

    return {ino: f"{a}:{port}" for ino, a, port in listeners if not ipaddress.ip_address(a).is_loopback}


def sockets_of_this_tree(sockets: dict[int, str]) -> list[str]:
    """ "name[pid] address:port" for each socket (by inode) that this process or a descendant holds, traced
    through their descriptors; a socket of another program on the machine is not listed."""
    import os

    import psutil

    me = psutil.Process()
    held = []
    for p in [me] + me.children(recursive=True):
        try:
            fds = os.listdir(f"/proc/{p.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                held.append(f"{p.name()}[{p.pid}] {sockets[int(target[8:-1])]}")
    return held


def non_loopback_listeners() -> list[str]:
    """Listening TCP sockets of this process and its descendants (Ray's processes, a tracking server)
    not bound to loopback: the namespace's socket tables first (two small files), and only a socket found
    there off loopback traced to the process of ours holding it."""
    off = off_loopback(tcp_listeners())
    return sockets_of_this_tree(off) if off else []


def run_config(corpus: dict, tmp, *extra: str):
    """The small run's config on the session corpus: OVERRIDES, its shards, and everything it writes
    (bundle, Ray storage, SQLite tracking store) under `tmp`; `extra` overrides last."""
    from omnistream.configs import load_config

    d = corpus["dir"]
    return load_config(
        None,
        OVERRIDES
        + [
            f'data.train_shards=["{d}/train-*.tar"]',
            f'data.eval_shards=["{d}/eval-000.tar"]',
            f'data.bundle_dir="{tmp}/bundle"',
            f'cluster.storage_path="{tmp}/ray"',
            f'tracking.uri="sqlite:///{tmp}/mlflow.db"',
            *extra,
        ],
    )


def mlflow_client(uri: str):
    """An MlflowClient on a run's store (the tests read MLflow directly, beside the Tracker door)."""
    from omnistream.tracking.mlflow_backend import client

    return client(uri)


def mlflow_run(uri: str, run_id: str):
    """The MLflow run as a Tracker: metric_history(key), final_metrics(), tags(), url()."""
    from omnistream.tracking.mlflow_backend import MLflowTracker

    return MLflowTracker(uri, run_id)


class TrackingServer:
    """The MLflow tracking server `cluster up` starts (tracking.server.start_tracking_server) on 127.0.0.1,
    which a test can stop and start again on the same port and store."""

    def __init__(self, root: Path, artifacts: str = ""):
        from omnistream.cluster.connect import free_port

        self.root, self.port, self.srv, self.artifacts = root, free_port(), None, artifacts
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from omnistream.tracking.server import start_tracking_server

        self.srv = start_tracking_server(self.root, self.port, artifacts=self.artifacts)

    def stop(self) -> None:
        from omnistream.tracking.server import stop_tracking_server

        if self.srv is not None:
            stop_tracking_server(self.srv)
        self.srv = None


S3_BUCKET = "omnistream-test"  # the session's bucket on the session's S3 server (tests/conftest.py)


class S3Server:
    """An S3-compatible server (moto's `moto_server`) on 127.0.0.1, as a subprocess, which a test can stop
    mid-read and start again. `env` is the standard AWS environment that points a client at it."""

    SECRET = "omnistream-test-secret-7f3a9c"  # grepped for: it must never reach a log, param or checkpoint

    def __init__(self):
        from omnistream.cluster.connect import free_port

        self.port, self.proc = free_port(), None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "omnistream-test-key",
            "AWS_SECRET_ACCESS_KEY": self.SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        import shutil
        import socket
        import subprocess
        import time

        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def speechlike(seconds: float, rate: int, seed: int = 0):
    """A speech-like test signal (float32 in [-0.3, 0.3]): a voiced sound with a gliding pitch, a moving
    formant, syllable-rate loudness and noise bursts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formant = 700 + 400 * np.sin(2 * np.pi * 1.3 * t)
    voiced = sum(np.exp(-(((k * f0 - formant) / 300) ** 2)) * np.sin(k * phase) for k in range(1, 30))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = rng.normal(0, 0.3, len(t)) * (np.sin(2 * np.pi * 2.1 * t) > 0.8)
    w = (voiced * envelope + noise).astype(np.float32)
    return (0.3 * w / np.abs(w).max()).astype(np.float32)


# ---- the same records in the formats people keep them in (pipelines/tables.py) ----------------------------

MEDIA_OPTIONS = PARQUET_OPTIONS  # how parquet_of's files are read


def tar_records(shard) -> list[tuple[str, dict[str, bytes]]]:
    """(key, fields) of every record of a tar shard."""
    return [(r.key, dict(r.fields)) for r in read_shard(str(shard), 1 << 26)]


# ---- one shard's records in every format (tests/integration/test_own_data*.py) -------------------------------

MEDIA = ("jpg", "jpeg", "png", "wav", "flac")


def _tar(records, path) -> str:
    import webdataset as wds

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


def own_formats(shard: str, tmp: Path) -> dict:
    """The records of tar `shard` in every format omnistream reads: {name: (format, format options, the
    shard in that format, the same records as a tar)} (tests/integration/test_own_data*.py)."""
    records = tar_records(shard)
    image_recs = _imagefolder(records, tmp / "imagefolder")
    speech = _librispeech(records, tmp / "librispeech")
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_of(records, tmp / "own.parquet"))
    with ipc.new_stream(str(tmp / "own.arrow"), table.schema) as w:  # what datasets' save_to_disk writes
        w.write_table(table, max_chunksize=100)
    return {
        # name: (format, format options, shard, the same records as a tar)
        "parquet": ("parquet", MEDIA_OPTIONS, str(tmp / "own.parquet"), shard),
        "arrow": ("parquet", MEDIA_OPTIONS, str(tmp / "own.arrow"), shard),
        "jsonl": ("jsonl", {}, jsonl_of(records, tmp / "jsonl"), shard),
        "folder": ("folder", {}, folder_of(records, tmp / "folder"), shard),
        "imagefolder": ("folder", {}, str(tmp / "imagefolder"), _tar(image_recs, tmp / "imagefolder.tar")),
        "librispeech": ("folder", {}, str(tmp / "librispeech"), _tar(speech, tmp / "librispeech.tar")),
    }


# ---- the headless Chromium the browser tests drive (tests/browser) ------------------------------------------

# headless, and nothing that reaches past this machine: without the background-networking flags
# Chromium keeps trying Google's hosts, which this closed network refuses
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    import os
    import shutil

    import pytest

    path = os.environ.get("OMNISTREAM_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if not path:
        pytest.fail(
            "the browser test needs Chromium: `make test` installs Debian's chromium package where "
            "apt-get can; elsewhere install Chromium and set OMNISTREAM_CHROMIUM=/path/to/chromium"
        )
    return path


def artifacts_dir() -> Path:
    import os

    d = Path(os.environ.get("OMNISTREAM_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


class LogLines(logging.Handler):
    """The lines omnistream's loggers say while in the `with` block (at INFO and up), in `.lines`: what a
    test reads of a run's driver log (omnistream's loggers do not propagate to the root)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self._log = logging.getLogger("omnistream")

    def emit(self, record):
        self.lines.append(self.format(record))

    def __enter__(self):
        self._level = self._log.level
        self._log.setLevel(logging.INFO)
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._log.removeHandler(self)
        self._log.setLevel(self._level)
        return False


def cluster_script(script: str, config, timeout: int, *args: str):
    """Run tests/system/<script> CONFIG [ARGS] in a process of its own (a simulated Ray cluster is one per
    process), away from this process's Ray (no RAY_ADDRESS); its CompletedProcess, output as text."""
    import os
    import subprocess

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "system" / script), str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
