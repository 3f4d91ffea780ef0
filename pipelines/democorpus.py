"""The demo corpus: spoken-by-telephone, drawn and written digits, made here, no download.

Each record is one digit 0-9 seen up to three ways:
- ``jpg``/``png``: the digit drawn with Pillow's built-in font at a varied size,
  place, rotation and colour, over a noisy background;
- ``wav``/``flac``: the digit as DTMF (the dual tones a telephone keypad sends;
  ITU-T Q.23), with varied duration, level, sample rate and background noise;
- ``txt``: a caption in one of several phrasings;
- ``json``: {"digit": d} — the label, used only by evaluation.
Some records carry all three modalities, some one or two.

A share of the records (``interleaved``) are documents of several digits, their
parts in order as members ``KEY.<i>.<ext>``: an image and a clip of two digits
followed by a sentence naming both in order ("three then seven"), sometimes after
an opening line that names neither; or images each followed by its caption. The
held-out split ends with ``eval_interleaved`` documents of the first kind, labelled
{"digits": "3 7"}: prompted with the parts before the sentence, a model must name
both digits in order. Everything is drawn from one seed, so the same command
writes the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydantic import BaseModel, ConfigDict, Field

FORMAT = 3  # bump when the drawing or the record layout changes: a demo corpus on disk is rewritten
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# DTMF keypad: digit -> (low group Hz, high group Hz)
DTMF = {
    1: (697, 1209),
    2: (697, 1336),
    3: (697, 1477),
    4: (770, 1209),
    5: (770, 1336),
    6: (770, 1477),
    7: (852, 1209),
    8: (852, 1336),
    9: (852, 1477),
    0: (941, 1336),
}
PHRASES = [
    "{w}",
    "the digit {w}",
    "a {w}",
    "number {w}",
    "this is a {w}.",
    "it shows {w}",
    "the number {d}",
    "{W}",
    "digit {d}, {w}",
    "a picture of {w}",
]
# which modalities a record carries, and how often (sums to 1)
MIXES = [
    (("image", "audio", "text"), 0.40),
    (("image", "text"), 0.20),
    (("audio", "text"), 0.20),
    (("image", "audio"), 0.05),
    (("text",), 0.05),
    (("image",), 0.05),
    (("audio",), 0.05),
]


# an interleaved document's last sentence: both digits, in order
# (each with letters: "3 7" alone is filtered as text_few_letters by the default text quality checks)
PAIR_PHRASES = ["{a} then {b}", "{a} and {b}", "first {a}, then {b}", "{a}, {b}", "{da} and {db}"]
OPENERS = ["two digits", "look and listen", "a picture and a sound", "what are they?", "here are two"]


def caption(d: int, rng: random.Random) -> str:
    return rng.choice(PHRASES).format(w=WORDS[d], W=WORDS[d].capitalize(), d=d)


def draw_digit(d: int, rng: random.Random) -> Image.Image:
    side = rng.randint(28, 64)
    bg = np.array([rng.randint(150, 255) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 18), (side, side, 3))
    canvas = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    # draw the glyph on its own layer so it can be rotated, then paste it at a jittered place
    size = int(side * rng.uniform(0.75, 1.0))
    font = ImageFont.load_default(size=size)
    glyph = Image.new("L", (side, side), 0)
    g = ImageDraw.Draw(glyph)
    left, t, r, b = g.textbbox((0, 0), str(d), font=font)
    jx, jy = rng.uniform(-0.1, 0.1) * side, rng.uniform(-0.1, 0.1) * side
    g.text(
        ((side - (r - left)) / 2 - left + jx, (side - (b - t)) / 2 - t + jy),
        str(d),
        fill=255,
        font=font,
        stroke_width=rng.choice([0, 0, 1]),
        stroke_fill=255,
    )
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    ink = Image.new("RGB", (side, side), tuple(rng.randint(0, 110) for _ in range(3)))
    canvas.paste(ink, (0, 0), glyph)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return canvas


def dtmf(d: int, rng: random.Random) -> tuple[np.ndarray, int]:
    sr = rng.choice([8000, 8000, 16000])
    dur = rng.uniform(0.15, 0.4)
    t = np.arange(int(sr * dur)) / sr
    lo, hi = DTMF[d]
    tone = np.sin(2 * np.pi * lo * t + rng.uniform(0, 6.28)) + np.sin(2 * np.pi * hi * t + rng.uniform(0, 6.28))
    ramp = np.minimum(1, np.minimum(t, t[::-1]) / 0.005)  # 5 ms fade: no clicks at the edges
    level = rng.uniform(0.15, 0.45)
    pad = lambda: np.zeros(int(sr * rng.uniform(0.0, 0.05)))  # noqa: E731
    wave = np.concatenate([pad(), level * tone * ramp, pad()])
    snr_db = rng.uniform(15, 35)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, len(wave))
    wave = wave + noise * (level / np.sqrt(2)) * 10 ** (-snr_db / 20)
    return np.clip(wave, -1, 1).astype(np.float32), sr


def encode_image(im: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if rng.random() < 0.5:
        im.save(buf, format="JPEG", quality=rng.randint(60, 95))
        return "jpg", buf.getvalue()
    im.save(buf, format="PNG")
    return "png", buf.getvalue()


def encode_audio(wave: np.ndarray, sr: int, rng: random.Random) -> tuple[str, bytes]:
    import soundfile as sf

    buf = io.BytesIO()
    if rng.random() < 0.5:
        sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
        return "wav", buf.getvalue()
    sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
    return "flac", buf.getvalue()


def make_record(index: int, seed: int, split: str, mix: tuple[str, ...] | None = None) -> dict:
    rng = random.Random(f"{seed}:{split}:{index}")
    d = rng.randrange(10)
    if mix is None:
        mix = rng.choices([m for m, _ in MIXES], weights=[w for _, w in MIXES])[0]
    rec: dict = {"__key__": f"{split}-{index:06d}", "json": json.dumps({"digit": d}).encode()}
    if "image" in mix:
        ext, data = encode_image(draw_digit(d, rng), rng)
        rec[ext] = data
    if "audio" in mix:
        ext, data = encode_audio(*dtmf(d, rng), rng)
        rec[ext] = data
    if "text" in mix:
        rec["txt"] = caption(d, rng).encode()
    return rec


def pair_sentence(a: int, b: int, rng: random.Random) -> str:
    return rng.choice(PAIR_PHRASES).format(a=WORDS[a], b=WORDS[b], da=a, db=b)


def make_document(index: int, seed: int, split: str, kind: str | None = None) -> dict:
    """An interleaved record: parts `<i>.<ext>` in order. `kind` "pair" (what the held-out split holds):
    [an opening line naming neither digit,] an image of one digit, a clip of another, the sentence naming
    both in order; "swap": the clip first; "captions": two or three images, each followed by its caption."""
    rng = random.Random(f"{seed}:{split}:doc:{index}")
    kind = kind or rng.choices(["pair", "swap", "captions"], weights=[0.6, 0.25, 0.15])[0]
    parts: list[tuple[str, bytes]] = []
    digits = [rng.randrange(10) for _ in range(3)]
    if kind == "captions":
        for d in digits[: rng.choice([2, 3])]:
            parts.append(encode_image(draw_digit(d, rng), rng))
            parts.append(("txt", caption(d, rng).encode()))
        labels = {"digits": " ".join(str(d) for d in digits[: len(parts) // 2])}
    else:
        a, b = digits[:2]
        if kind == "pair" and rng.random() < 0.5:
            parts.append(("txt", rng.choice(OPENERS).encode()))
        first = [encode_image(draw_digit(a, rng), rng), encode_audio(*dtmf(b, rng), rng)]
        if kind == "swap":  # the clip first: the sentence names the digits in the order they are shown
            first, (a, b) = first[::-1], (b, a)
        parts += first
        parts.append(("txt", pair_sentence(a, b, rng).encode()))
        labels = {"digits": f"{a} {b}"}
    rec: dict = {"__key__": f"{split}-{index:06d}", "json": json.dumps(labels).encode()}
    for i, (ext, data) in enumerate(parts):
        rec[f"{i}.{ext}"] = data
    return rec


class CorpusSpec(BaseModel):
    """The `[demo]` section: what `omnistream demo` writes before it trains."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = Field("runs/demo/data", description="where the demo shards are written")
    train_records: int = Field(6000, ge=1, description="records in the training split")
    eval_records: int = Field(300, ge=1, description="records in the held-out split (every modality in each)")
    records_per_shard: int = Field(750, ge=1, description="records per .tar shard")
    interleaved: float = Field(
        0.35, ge=0, le=1, description="share of the training records that are interleaved documents of several digits"
    )
    eval_interleaved: int = Field(
        300, ge=0, description="interleaved documents (image, clip, sentence) at the end of the held-out split"
    )
    seed: int = Field(0, description="seed of every drawn digit, glyph, tone and caption")


def write_split(
    out: Path, split: str, n: int, per_shard: int, seed: int, mix=None, interleaved: float = 0.0, docs_from: int = -1
) -> list[str]:
    """`interleaved`: the share of records that are interleaved documents (drawn per record); records from
    index `docs_from` on (when not -1) are all "pair" documents."""
    import webdataset as wds
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n_shards = max(1, -(-n // per_shard))
    with tqdm(total=n, desc=f"writing {split} shards", unit="rec", disable=None) as bar:
        for s in range(n_shards):
            path = out / f"{split}-{s:03d}.tar"
            tmp = path.with_suffix(".tar.tmp")
            # a fixed mtime makes the same seed write byte-identical tars
            with wds.TarWriter(str(tmp), mtime=0) as w:
                for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                    if 0 <= docs_from <= i:
                        w.write(make_document(i, seed, split, "pair"))
                    elif interleaved and random.Random(f"{seed}:{split}:{i}:doc").random() < interleaved:
                        w.write(make_document(i, seed, split))
                    else:
                        w.write(make_record(i, seed, split, mix))
                    bar.update(1)
            os.replace(tmp, path)  # a shard appears whole or not at all
            paths.append(str(path))
    return paths


def write_demo_corpus(out_dir: str | os.PathLike, spec: CorpusSpec | None = None) -> dict[str, list[str]]:
    """Write train-NNN.tar and eval-NNN.tar under out_dir; returns the shard paths per split.

    The eval split has every modality in every record, so each held-out record
    serves both cross-modal tasks, then eval_interleaved documents for the two-digit task.
    """
    spec = spec or CorpusSpec()
    out = Path(out_dir)
    train = write_split(
        out, "train", spec.train_records, spec.records_per_shard, spec.seed, interleaved=spec.interleaved
    )
    evals = write_split(
        out,
        "eval",
        spec.eval_records + spec.eval_interleaved,
        max(spec.records_per_shard, spec.eval_records + spec.eval_interleaved),  # one held-out shard
        spec.seed,
        mix=("image", "audio", "text"),
        docs_from=spec.eval_records,
    )
    (out / "corpus.json").write_text(
        json.dumps({**spec.model_dump(), "format": FORMAT, "train": train, "eval": evals}, indent=1)
    )
    return {"train": train, "eval": evals}


# ---- the demo corpus in the formats people keep data in (worked examples of pipelines/tables.py) ------------

# the format_options a Parquet file written by as_parquet is read with: plain columns for one value per
# modality, OBELICS-style list columns for documents of several parts
PARQUET_OPTIONS = {
    "columns": {"text": "text", "image": "image", "audio": "audio", "json": "json"},
    "parts": {"text": "texts", "image": "images", "audio": "audios"},
}
_KIND = {"txt": "text", "jpg": "image", "jpeg": "image", "png": "image", "wav": "audio", "flac": "audio"}


def as_parquet(records: list[tuple[str, dict[str, bytes]]], path) -> str:
    """Records (key, {field: bytes}) as one Parquet file the way a Hugging Face dataset stores media: an
    Image / Audio column of {bytes, path} structs (the path keeps the extension), captions as strings, a
    document's parts in list columns (texts / images / audios, one non-null per place). Read it with
    format "parquet" and PARQUET_OPTIONS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .records import part_ext

    media = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = []
    for key, fields in records:
        row = {"__key__": key, "text": None, "image": None, "audio": None, "json": None}
        lists: dict[str, list] = {"texts": [], "images": [], "audios": []}
        for _, ext, v in sorted(
            (part_ext(f)[0], part_ext(f)[1], v) for f, v in fields.items() if part_ext(f)[0] is not None
        ):
            for col in lists.values():
                col.append(None)
            lists[_KIND[ext] + "s"][-1] = v.decode() if ext == "txt" else {"bytes": v, "path": f"{key}.{ext}"}
        for f, v in fields.items():
            if part_ext(f)[0] is None:
                if f in ("txt", "json"):
                    row["text" if f == "txt" else "json"] = v.decode()
                else:
                    row[_KIND[f]] = {"bytes": v, "path": f"{key}.{f}"}
        rows.append({**row, **{k: (v or None) for k, v in lists.items()}})
    schema = pa.schema(
        [("__key__", pa.string()), ("text", pa.string()), ("image", media), ("audio", media), ("json", pa.string())]
        + [(c, pa.list_(pa.string() if c == "texts" else media)) for c in ("texts", "images", "audios")]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path), row_group_size=256)
    return str(path)


def as_folder(records: list[tuple[str, dict[str, bytes]]], root) -> str:
    """Records as a folder of files, `KEY.<field>` each (a WebDataset shard unpacked): format "folder"."""
    root = Path(root)
    for key, fields in records:
        for f, v in fields.items():
            p = root / f"{key}.{f}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v)
    return str(root)


def as_jsonl(records: list[tuple[str, dict[str, bytes]]], folder) -> str:
    """Records as folder/manifest.jsonl: a line each, text and labels inline, media as paths under
    folder/media/, a document's parts as `0.txt`, `1.jpg`... keys: format "jsonl"."""
    from .records import part_ext

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.jsonl").open("w") as f:
        for key, fields in records:
            row = {"key": key}
            for name, v in fields.items():
                if _KIND.get(part_ext(name)[1], "text") != "text":
                    p = folder / "media" / f"{key}.{name}"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(v)
                    row[name] = f"media/{key}.{name}"
                else:
                    row[name] = v.decode()
            f.write(json.dumps(row) + "\n")
    return str(folder / "manifest.jsonl")


def shard_records(shard: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, fields) of every record of a tar shard (the records the converters above write)."""
    from .records import read_shard

    return [(r.key, dict(r.fields)) for r in read_shard(shard, 1 << 26) if r.key and not r.error]


def write_demo_as(out_dir: str | os.PathLike, fmt: str, spec: CorpusSpec | None = None) -> dict[str, list[str]]:
    """The demo corpus in `fmt` (parquet, jsonl or folder): its tar shards written under out_dir/tar, then
    each converted; returns the converted shards per split."""
    convert = {"parquet": (as_parquet, ".parquet"), "jsonl": (as_jsonl, ""), "folder": (as_folder, "")}
    if fmt not in convert:
        raise ValueError(f"the demo corpus is written as parquet, jsonl or folder, not {fmt!r}")
    out = Path(out_dir)
    tars = write_demo_corpus(out / "tar", spec)
    fn, suffix = convert[fmt]
    return {
        split: [fn(shard_records(s), out / f"{Path(s).name.removesuffix('.tar')}{suffix}") for s in shards]
        for split, shards in tars.items()
    }
