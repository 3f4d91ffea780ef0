"""`python benchmarks/scaling.py [TOKEN_CACHE] [CHECKPOINT]`: the per-core and per-byte figures docs/scaling.md
plans a thousand GPUs from, measured on this machine, one core (torch, tokenizers and Pillow held to one
thread), medians of 3.

(a) text: tokens/s of the text modality (byte-level BPE, Hugging Face `tokenizers`) at a 32,768-id
    vocabulary fitted here, encoding real text: the Python and Markdown files of this venv's packages;
(b) images: a 1024×768 JPEG (quality 90, a photograph's size; decoding cost follows the pixel count) decoded
    and resized as the image modality does before its encoder, to 64 px and to 256 px: images/s;
(c) audio: a 10-second 44.1 kHz FLAC decoded and resampled to the codec's 16 kHz: seconds of audio per second;
(d) token cache: bytes per token of a built cache (the newest under runs/demo/token_cache unless named; its
    completion records count tokens and bytes), and of uniformly random ids of a 65,536-code tokenizer stored
    the same way (int32 lists, zstd): what incompressible image or codec codes cost;
(f) dealing: rows/s through the one actor that puts the rows of named sources in their global order
    (pipelines/sources.Interleave), fed the demo corpus's real rows packed at 2,048 tokens (pipelines/rows.
    WindowRows over its token cache, 20 epochs), two sources at 0.7 / 0.3: the stream's one serial stage;
(e) checkpoint: bytes per parameter of a ZeRO-3 checkpoint (the newest demo run's unless named; fp32 training
    with AdamW) and this disk's write rate for a 512 MB shard (torch.save, then fsync).

The encoders' own rates (fsq, codec; CPU and GPU) were measured by benchmarks/image_tokenizer.py and
benchmarks/audio_codec.py and are quoted from benchmarks/README.md in docs/scaling.md. Figures go to stdout
and scaling.json. No timing is asserted.
"""

from __future__ import annotations

import glob
import io
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' encode_batch: one core
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from figures import report  # benchmarks/figures.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 20  # epochs of the demo corpus dealt in (f)


def _median_rate(fn, units: float, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return units / statistics.median(times)


def text_rate() -> dict:
    from omnistream.modalities.text import TextModality

    files = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/**/*.py", recursive=True))
    files += sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/**/*.md", recursive=True))
    docs, size = [], 0
    for f in files:
        try:
            t = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for para in t.split("\n\n"):
            if para.strip():
                docs.append(para[:4000])
                size += len(para[:4000].encode())
        if size > 12_000_000:
            break
    fit, test = docs[: len(docs) // 3], docs[len(docs) // 3 :]
    m = TextModality({"vocab_size": 32768})
    m.fit([m.fit_features(d) for d in fit])
    n_tokens = sum(len(m.encode(d)) for d in test)  # (also the warm-up of the timed passes)
    rate = _median_rate(lambda: [m.encode(d) for d in test], n_tokens)
    n_bytes = sum(len(d.encode()) for d in test)
    return {
        "text_bpe_tokens_per_s_per_core": round(rate),
        "text_bytes_per_token": round(n_bytes / n_tokens, 2),
        "text_encoded_mb": round(n_bytes / 1e6, 1),
    }


def _photo() -> bytes:
    """A 1024×768 JPEG of smooth colour fields and grain (no photograph ships with the repository)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024] / 256.0
    img = np.stack([np.sin(x * (1 + c) + y * (2 - c) + c) for c in range(3)], -1) * 90 + 128
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_rate() -> dict:
    from omnistream.modalities.image import ImageModality

    data, out = _photo(), {}
    for size in (64, 256):
        m = ImageModality({"size": size, "tokenizer": "fsq"})
        n = 40 if size == 256 else 60
        out[f"image_decode_resize_{size}px_per_s_per_core"] = round(
            _median_rate(lambda m=m, n=n: [m.prepare(m.decode_bytes("jpg", data)) for _ in range(n)], n), 1
        )
    out["image_jpeg_kb"] = round(len(data) / 1024, 1)
    return out


def audio_rate() -> dict:
    import soundfile as sf

    from omnistream.modalities.audio import AudioModality

    rng = np.random.default_rng(0)
    t = np.arange(441000) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(t))) + rng.normal(0, 0.02, len(t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 44100, format="FLAC")
    data = buf.getvalue()
    m = AudioModality({"tokenizer": "codec"})
    n = 5
    rate = _median_rate(lambda: [m.prepare(m.decode_bytes("flac", data)) for _ in range(n)], n * 10.0)
    return {"audio_flac_44k_to_16k_seconds_per_s_per_core": round(rate, 1)}


def cache_bytes(cache: str | None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    if cache is None:
        found = sorted(glob.glob(str(REPO / "runs/demo/token_cache/*/index-*.parquet")), key=os.path.getmtime)
        cache = str(Path(found[-1]).parent) if found else None
    if cache:
        metas = [
            json.loads(m) for p in glob.glob(f"{cache}/index-*.parquet") for m in pq.read_table(p)["meta"].to_pylist()
        ]
        tokens, size = sum(m["tokens"] for m in metas), sum(m["bytes"] for m in metas)
        out["cache"] = cache
        out["cache_bytes_per_token_measured"] = round(size / tokens, 3)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 65536, int(n), dtype=np.int32) for n in rng.integers(64, 1024, 2000)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"ids": pa.array(docs, pa.list_(pa.int32()))}), buf, compression="zstd")
    out["cache_bytes_per_token_random_16bit_codes"] = round(len(buf.getvalue()) / sum(map(len, docs)), 3)
    return out


def dealing_rate(seq_len: int = 2048) -> dict:
    from omnistream.cli.demo import demo_config
    from omnistream.configs import load_config
    from omnistream.modalities.vocab import Vocabulary
    from omnistream.pipelines.cache import open_cache
    from omnistream.pipelines.plan import plan_windows, window_size
    from omnistream.pipelines.rows import WindowRows
    from omnistream.pipelines.shards import list_shards, shard_order
    from omnistream.pipelines.sources import Interleave

    cfg = load_config(demo_config()).resolved_paths()
    vocab = Vocabulary.load(cfg.data.bundle_dir, cfg.modalities)
    shards = list_shards(cfg.data.train_shards)
    cache = open_cache(cfg.data, vocab.fingerprint, cfg.seed, shards)  # the demo's, keyed at its own settings
    data = cfg.data.model_copy(update={"seq_len": seq_len})  # the same documents, packed at seq_len
    done, _ = cache.status(shards)
    if len(done) < len(shards):
        return {"dealing": "no complete demo token cache: run `make demo` first"}
    plan = shard_order(shards, cfg.seed, EPOCHS)  # the demo's 22 shards fill 233 rows of 2,048 an epoch
    windows = plan_windows(plan, {s: m["rows"] for s, m in done.items()}, window_size(data, done))
    rows = WindowRows(cache.url, cfg.data.bundle_dir, cfg.modalities, data, cfg.seed, plan, 8)
    blocks = []
    for k, w in enumerate(windows):
        out = rows({"window": np.array([k]), "ranges": np.array([json.dumps(w)], dtype=object)})
        blocks.append(
            {
                **out,
                "src": np.full(len(out["keys"]), k % 2, dtype=np.int64),
                "win": np.full(len(out["keys"]), k // 2, dtype=np.int64),
            }
        )
    per_src = [sum(1 for k in range(len(blocks)) if k % 2 == s) for s in (0, 1)]
    sources = [{"shards": ["x"], "weight": 0.7}, {"shards": ["y"], "weight": 0.3}]
    n = sum(len(b["keys"]) for b in blocks)

    def deal():
        stage = Interleave(sources, per_src, 64, 8)
        dealt = sum(len(stage(b).get("keys", ())) for b in blocks)
        return dealt

    t0 = time.perf_counter()
    dealt = deal()
    once = time.perf_counter() - t0
    rate = _median_rate(deal, dealt) if dealt else 0.0
    return {
        "dealing_rows_per_s": round(rate),
        "dealing_rows_packed": n,
        "dealing_rows_dealt": dealt,
        "dealing_row_tokens": seq_len,
        "dealing_first_pass_s": round(once, 2),
    }


def checkpoint_figures(ckpt: str | None) -> dict:
    import torch

    out = {}
    if ckpt is None:
        found = sorted(glob.glob(str(REPO / "runs/ray/demo-*/checkpoint_*/model")), key=os.path.getmtime)
        ckpt = str(Path(found[-1]).parent) if found else None
    if ckpt:
        from safetensors import safe_open

        exports = sorted(glob.glob(str(REPO / "runs/ray/demo-*-export/model.safetensors")), key=os.path.getmtime)
        with safe_open(exports[-1], "pt") as f:
            params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        size = sum(p.stat().st_size for p in Path(ckpt, "model").rglob("*") if p.is_file())
        out["checkpoint"] = ckpt
        out["checkpoint_params"] = params
        out["checkpoint_bytes_per_param_fp32_adamw"] = round(size / params, 2)
    torch.set_num_threads(1)
    blob = {"w": torch.zeros(128 * 1024 * 1024, dtype=torch.float32)}  # 512 MB
    rates = []
    with tempfile.TemporaryDirectory(dir=str(REPO)) as d:
        for i in range(3):
            path = Path(d, f"shard{i}.pt")
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(blob, f)
                f.flush()
                os.fsync(f.fileno())
            rates.append(512 / (time.perf_counter() - t0))
            path.unlink()
    out["checkpoint_write_mb_per_s_local_disk"] = round(statistics.median(rates))
    return out


def main() -> int:
    import torch

    torch.set_num_threads(1)
    figures = {}
    for part in (text_rate, image_rate, audio_rate):
        figures.update(part())
        print(json.dumps(figures), file=sys.stderr)
    figures.update(dealing_rate())
    figures.update(cache_bytes(sys.argv[1] if len(sys.argv) > 1 else None))
    figures.update(checkpoint_figures(sys.argv[2] if len(sys.argv) > 2 else None))
    report(figures, "scaling.json", "omnistream scaling figures (one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
