"""Hostile records never end a stream: whatever one record makes a plugin raise, odd bytes in member
names, and a seeded fuzz of real shards. Each must finish with seen = kept + filtered + errored.

In-process (no Ray): the same RecordProcessor the Ray actors run, without dedup actors.
"""

import io
import json
import random
import tarfile

import pytest

from common import tar_bytes, wav_header
from omnistream.modalities import registry
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.documents import RecordProcessor, make_document, record_rng
from omnistream.pipelines.records import part_ext, read_shard


def process(path, bundle, cfg=None):
    proc = RecordProcessor(None, bundle, cfg or DataConfig(), seed=0)
    tally = Tally()
    got = list(proc.process([(0, str(path))], tally))
    assert tally.balanced(), tally.report()
    return proc, tally, got


def test_member_names_with_bytes_that_are_not_utf8(bundle, corpus, tmp_path):
    good = next(r for r in read_shard(corpus["train"][0], 1 << 26) if "txt" in r.fields)
    p = tmp_path / "odd.tar"
    p.write_bytes(tar_bytes([(b"rec\xff\xfe01.txt", good.fields["txt"]), (b"ok-02.txt", good.fields["txt"])]))
    proc, tally, got = process(p, bundle)
    assert tally.seen == 2 and tally.kept == 2, tally.report()
    keys = [r.key for _, r, _ in got]
    assert keys[0] == "rec\\xff\\xfe01", keys
    for _, r, o in got:  # the document layout hashes the key: it must take any key
        make_document(proc.vocab, o.parts, o.ordered, "random", record_rng(0, 0, r.key))
    keys[0].encode("utf-8")  # valid Unicode: Arrow, JSON and MLflow take it


@pytest.mark.parametrize("stage", ["decode_bytes", "quality_reason", "encode"])
def test_a_plugin_exception_is_one_errored_record(bundle, corpus, tmp_path, monkeypatch, stage):
    """A bug in a plugin (here the text modality raising ZeroDivisionError) errors the records it
    touches under plugin_error:<Type>, with the detail in the dead letters; the rest are kept."""
    shard = corpus["train"][0]
    proc = RecordProcessor(None, bundle, DataConfig(), seed=0)
    text = proc.mods["text"]

    def boom(*a, **k):
        raise ZeroDivisionError("a bug in the plugin")

    monkeypatch.setattr(text, stage, boom)
    tally = Tally()
    out = list(proc.process([(0, shard)], tally))
    assert tally.balanced()
    assert tally.errored["plugin_error:ZeroDivisionError"] > 0
    for _, r, o in out:
        has_text = any(part_ext(f)[1] == "txt" for f in r.fields)  # one caption, or a document's text parts
        assert o.status != "kept" or not has_text, "a record the broken stage touched was kept"
        assert (o.reason == "plugin_error:ZeroDivisionError") <= has_text
    assert tally.kept > 0, "records without text go on"
    letter = next(d for d in tally.dead_letter if d["reason"] == "plugin_error:ZeroDivisionError")
    assert f"text.{stage}: a bug in the plugin" in letter["detail"]


def _gnu_header(name: bytes, typeflag: bytes, size: int, extra: bytes = b"") -> bytes:
    """One tar header block written by hand, for headers tarfile's writer never makes."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136] = f"{size:011o}\0".encode()
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar  \0"
    h[386 : 386 + len(extra)] = extra
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def _header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [m.offset for m in t.getmembers()]


def _image_as(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _audio_as(fmt: str, channels: int = 1) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((1600, channels), dtype="float32"), 16000, format=fmt)
    return buf.getvalue()


def _other_format(ext: str, rng: random.Random) -> bytes:
    """Real bytes of a format other than the one `ext` names (made by Pillow and soundfile)."""
    if ext in ("png", "jpg", "jpeg", "webp"):
        fmt = rng.choice(
            [
                f
                for f in ("TIFF", "BMP", "GIF", "ICO", "PPM", "PCX", "TGA", "PNG", "JPEG")
                if f != {"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper())
            ]
        )
        return _image_as(fmt)
    if ext in ("wav", "flac"):
        fmt = rng.choice([f for f in ("WAV", "FLAC", "OGG", "AIFF", "AU") if f.lower() != ext])
        return _audio_as(fmt, rng.choice([1, 2] if fmt == "FLAC" else [1, 2, 64]))  # FLAC: 8 channels at most
    return _image_as("BMP")  # a text or JSON member holding an image


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(
        [
            "truncate",
            "flip",
            "swap_ext",
            "long_name",
            "zero_block",
            "header_chain",
            "sparse",
            "checksum",
            "compressed",
            "format_swap",
        ]
    )
    b = bytearray(data)
    if kind == "header_chain":  # chained GNU long-name headers before a member (tarfile recurses per header)
        at = rng.choice(_header_offsets(data))
        chain = b"".join(_gnu_header(b"././@LongLink", b"L", 512) + b"x" * 512 for _ in range(rng.choice([5, 3000])))
        return kind, bytes(b[:at]) + chain + bytes(b[at:])
    if kind == "sparse":  # a GNU sparse header promising an extension block, then the file goes on or ends
        at = rng.choice(_header_offsets(data))
        sparse = _gnu_header(b"s-0.txt", b"S", 10, extra=b"\0" * 96 + b"\1")
        return kind, bytes(b[:at]) + sparse + (bytes(b[at:]) if rng.random() < 0.5 else b"")
    if kind == "checksum":  # one member's header checksum zeroed, mid-shard
        at = rng.choice(_header_offsets(data))
        b[at + 148 : at + 156] = bytes(8)
        return kind, bytes(b)
    if kind == "compressed":  # the shard compressed, then maybe cut or flipped in its compressed bytes
        _, inner = _mutate(data, rng) if rng.random() < 0.5 else ("", data)
        c = bytearray(_compress(rng.choice(["gz", "bz2", "xz", "zst"]), inner))
        if rng.random() < 0.3:
            c = c[: rng.randrange(1, len(c))]
        elif rng.random() < 0.3:
            c[rng.randrange(len(c))] ^= 1 << rng.randrange(8)
        return kind, bytes(c)
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(1, len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "zero_block":
        at = rng.randrange(0, len(b) // 512) * 512
        b[at : at + 512] = bytes(512)
        return kind, bytes(b)
    members = []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            members.append((m.name, t.extractfile(m).read()))
    i = rng.randrange(len(members))
    name, payload = members[i]
    if kind == "swap_ext":
        stem, _ = name.split(".", 1)
        members[i] = (stem + "." + rng.choice(["png", "jpg", "wav", "flac", "txt", "json", "webp"]), payload)
    elif kind == "format_swap":  # a member's bytes in another format than its extension names
        members[i] = (name, _other_format(name.split(".", 1)[1], rng))
    else:  # a GNU long-name header far longer than any name the reader accepts
        members[i] = ("x" * rng.choice([2000, 20000]) + "." + name.split(".", 1)[1], payload)
    return kind, tar_bytes(members)


def test_fuzzed_shards_never_raise_and_always_balance(bundle, corpus, tmp_path):
    """Two hundred seeded mutations of a real shard (truncated, bits flipped, extensions swapped,
    oversized name headers, zeroed blocks, chained long-name headers, sparse headers, a checksum
    zeroed mid-shard, the shard compressed (and cut or flipped), a member's bytes in another format than
    its extension): every pass completes and accounts for every record."""
    src = tmp_path / "small.tar"
    with tarfile.open(corpus["train"][0]) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()[:30]]
    src.write_bytes(tar_bytes(members))
    base = src.read_bytes()
    cfg = DataConfig()
    proc = RecordProcessor(None, bundle, cfg, seed=0)
    proc.cache = None  # every mutation is decoded afresh
    for seed in range(200):
        kind, data = _mutate(base, random.Random(seed))
        p = tmp_path / "m.tar"
        p.write_bytes(data)
        tally = Tally()
        try:
            list(proc.process([(0, str(p))], tally))
        except Exception as e:  # noqa: BLE001 - the message is the point
            pytest.fail(f"seed {seed} ({kind}): {type(e).__name__} escaped: {e}")
        assert tally.balanced(), f"seed {seed} ({kind}): {tally.report()}"
    assert registry.discover()  # the built-ins stayed registered throughout


# ---- bounded memory per record ---------------------------------------------------------------------


def test_each_record_bound_errors_the_record_under_its_reason(bundle, corpus, tmp_path):
    from omnistream.pipelines.config import Limits

    good = next(r for r in read_shard(corpus["train"][0], 1 << 26) if {"txt", "png"} <= set(r.fields))
    members = [("ok-0.txt", good.fields["txt"])]
    members += [(f"many-0.f{i}", b"x") for i in range(100)]  # 100 members in one record (data.limits.members: 80)
    members += [("big-0.txt", b"a" * 3000), ("big-0.json", b"{}" * 1000)]  # 5000 bytes together
    members += [("img-0.png", good.fields["png"])]  # over the image cap below
    members += [("rate-0.wav", wav_header(1_000_003)), ("ok-1.txt", good.fields["txt"])]
    p = tmp_path / "bounds.tar"
    p.write_bytes(tar_bytes(members))
    cfg = DataConfig(limits=Limits(members=32, record_bytes=4000, member_bytes={"image": 100}))
    _, tally, got = process(p, bundle, cfg)
    reasons = {r.key: o.reason for _, r, o in got}
    assert reasons == {
        "ok-0": "",
        "many-0": "too_many_members",
        "big-0": "record_too_large",
        "img-0": "member_too_large",
        "rate-0": "audio_sample_rate",
        "ok-1": "",
    }, reasons
    assert tally.kept == 2 and tally.seen == 6


def test_an_oversized_tar_header_ends_the_shard_not_the_actor(bundle, corpus, tmp_path):
    """A pax header is read whole by tar before any name check: one over data.limits.header_bytes ends
    the shard as header_too_large (the records before it are kept), instead of being read into memory."""
    good = next(r for r in read_shard(corpus["train"][0], 1 << 26) if "txt" in r.fields)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, pax in (("a-0.txt", {}), ("b-0.txt", {}), ("c-0.txt", {"comment": "x" * 200_000})):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(good.fields["txt"]), pax
            t.addfile(info, io.BytesIO(good.fields["txt"]))
    p = tmp_path / "pax.tar"
    p.write_bytes(buf.getvalue())
    _, tally, got = process(p, bundle)
    assert [r.key for _, r, o in got if o.status == "kept"] == ["a-0"]
    assert tally.errored["header_too_large"] == 1  # b-0, the record being read when the header came
    assert tally.balanced()


def test_the_resampler_cache_is_bounded(fitted):
    import numpy as np

    from omnistream.modalities.audio import RESAMPLERS, Audio

    audio = next(m for m in fitted if m.name == "audio")
    for rate in range(8100, 8100 + 30 * 100, 100):  # 30 distinct rates (multiples of 100: small kernels)
        audio._features(Audio(np.zeros(400, np.float32), rate))
    assert len(audio._resamplers) == RESAMPLERS


def _shard_result(tmp_path, data: bytes, name="crafted.tar"):
    from omnistream.pipelines.records import read_shard

    p = tmp_path / name
    p.write_bytes(data)
    recs = list(read_shard(str(p), 1 << 20))  # must not raise, whatever the bytes
    return [r.key for r in recs if r.key and not r.error], [(r.error, r.detail) for r in recs if not r.key]


def test_a_crafted_header_chain_is_a_damaged_shard_not_an_exception(tmp_path):
    """3,000 chained GNU long-name headers (tarfile recurses once per header: RecursionError), and a GNU
    sparse header promising an extension block the file does not have (IndexError): each is one shard
    error, and the record before it is kept."""
    good = tar_bytes([("ok-0.txt", b"a caption")])[:1024]  # one record (header and data block), no end yet
    header = _gnu_header

    chain = b"".join(header(b"././@LongLink", b"L", 512) + b"x" * 512 for _ in range(3000))
    kept, errors = _shard_result(tmp_path, good + chain + bytes(1024), "chain.tar")
    assert kept == ["ok-0"] and [e for e, _ in errors] == ["shard_damaged"], errors
    assert "RecursionError" in errors[0][1]
    # GNU sparse ('S') with the "is extended" flag set: the parser reads an extension block that is not there
    sparse = header(b"s-0.txt", b"S", 10, extra=b"\0" * 96 + b"\1")
    kept, errors = _shard_result(tmp_path, good + sparse, "sparse.tar")
    assert kept == ["ok-0"] and errors and errors[0][0] in ("shard_damaged", "shard_truncated"), errors


def test_a_damaged_header_mid_shard_is_said_not_the_end_of_the_shard(tmp_path):
    """Record 2 of 5 with its header's checksum zeroed: tarfile takes it for the end of the archive and
    stops quietly. Records 0-1 are kept, and the shard says it was damaged and how much went unread."""
    data = bytearray(tar_bytes([(f"r-{i}.txt", f"record {i}".encode()) for i in range(5)]))
    at = 2 * 1024  # each record: one header block and one data block
    assert data[at : at + 3] == b"r-2"
    data[at + 148 : at + 156] = b"\0" * 8
    kept, errors = _shard_result(tmp_path, bytes(data))
    assert kept == ["r-0", "r-1"], kept
    assert [e for e, _ in errors] == ["shard_damaged"] and f"byte {at}" in errors[0][1], errors
    # an intact shard says nothing of the kind
    kept, errors = _shard_result(tmp_path, tar_bytes([(f"r-{i}.txt", b"x") for i in range(5)]), "intact.tar")
    assert len(kept) == 5 and errors == [], errors


# ---- compressed shards -----------------------------------------------------------------------------


def _compress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    import zstandard

    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}[
        kind
    ](data)


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zst"])
def test_compressed_shards_are_read_as_what_they_are(tmp_path, kind):
    """.tar.gz, .tar.bz2, .tar.xz and .tar.zst (known by their first bytes, not their names): every record
    read; cut short, a damaged header inside, or cut between members, each said; an oversized member
    skipped by decompressing through it, and the shard's decompressed bytes bounded
    (data.limits.shard_bytes), so a bomb ends the shard as shard_too_large, what came before kept."""
    from omnistream.pipelines.config import Limits

    plain = tar_bytes([(f"r-{i}.txt", f"record {i}".encode()) for i in range(5)])
    kept, errors = _shard_result(tmp_path, _compress(kind, plain), f"s.tar.{kind}")
    assert kept == [f"r-{i}" for i in range(5)] and errors == [], errors
    # named .tar, compressed all the same: read by its bytes
    kept, errors = _shard_result(tmp_path, _compress(kind, plain), "named-plain.tar")
    assert len(kept) == 5 and errors == [], errors

    whole = _compress(kind, plain)
    kept, errors = _shard_result(tmp_path, whole[: len(whole) // 2], f"cut.tar.{kind}")
    assert [e for e, _ in errors] == ["shard_truncated"], errors

    damaged = bytearray(plain)
    damaged[2 * 1024 + 148 : 2 * 1024 + 156] = b"\0" * 8  # record 2's header checksum
    kept, errors = _shard_result(tmp_path, _compress(kind, bytes(damaged)), f"dmg.tar.{kind}")
    assert kept == ["r-0", "r-1"] and [e for e, _ in errors] == ["shard_damaged"], errors
    assert "byte 2048" in errors[0][1]

    kept, errors = _shard_result(tmp_path, _compress(kind, plain[: 2 * 1024]), f"between.tar.{kind}")
    assert kept == ["r-0", "r-1"] and [e for e, _ in errors] == ["shard_truncated"], errors

    # 64 MiB of one byte: a few KB compressed (bzip2: a few hundred bytes)
    bomb = _compress(kind, tar_bytes([("a-0.txt", b"first"), ("b-0.txt", bytes(64 << 20)), ("c-0.txt", b"after")]))
    assert len(bomb) < 1 << 20
    p = tmp_path / f"bomb.tar.{kind}"
    p.write_bytes(bomb)
    recs = list(read_shard(str(p), 1 << 20))  # the member is over the cap: skipped, the record after read
    assert [(r.key, r.error) for r in recs] == [("a-0", None), ("b-0", "member_too_large"), ("c-0", None)]
    recs = list(read_shard(str(p), 1 << 20, Limits(shard_bytes=16 << 20)))
    assert [(r.key, r.error) for r in recs] == [("a-0", None), ("b-0", "shard_too_large")], recs


def test_an_eval_records_json_never_fails_the_evaluation(bundle, corpus, tmp_path):
    """Held-out records whose KEY.json nests past the parser's recursion limit (`"[" * 100000`: a
    RecursionError, which every worker hit at its first evaluation, at every retry), is not an object,
    or nests its label: each record is evaluated with the labels it has (none), beside a good one."""
    from common import run_config
    from omnistream.pipelines.documents import held_out

    good = next(r for r in read_shard(f"{corpus['dir']}/eval-000.tar", 1 << 26) if {"png", "json"} <= set(r.fields))
    odd = [b"[" * 100000, b'"just a string"', b'{"label": [[[[3]]]], "digit": 3}', good.fields["json"]]
    p = tmp_path / "eval.tar"
    p.write_bytes(
        tar_bytes([m for i, j in enumerate(odd) for m in ((f"e-{i}.png", good.fields["png"]), (f"e-{i}.json", j))])
    )
    cfg = run_config(corpus, tmp_path, f'data.bundle_dir="{bundle}"', f'data.eval_shards=["{p}"]').resolved_paths()
    got = held_out(cfg)
    metas = [r["labels"] for r in got["records"]]
    assert len(metas) == 4 and metas[:2] == [{}, {}], metas
    assert metas[2] == {"digit": 3} and metas[3] == json.loads(good.fields["json"]), metas


def _outcomes(path, bundle) -> dict[str, tuple[str, str]]:
    _, _, got = process(path, bundle)
    return {r.key: (o.status, o.reason) for _, r, o in got}


def test_only_the_format_the_extension_names_is_decoded(bundle, corpus, tmp_path):
    """Pillow and libsndfile pick a format by the bytes: a TIFF named .png was kept, an EPS named .png went
    to Ghostscript where it is installed, an Ogg of 64 channels named .wav decoded. Now an image member is
    decoded only as JPEG, PNG or WebP, known by its bytes whatever its extension (a PNG named .jpg, common in
    photo folders, is kept), and an audio member only as what its extension names, with at most 8 channels;
    real images and sounds in their own formats are kept."""
    import numpy as np

    real = next(r for r in read_shard(corpus["train"][0], 1 << 26) if {"png", "wav"} <= set(r.fields))
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (16000, 64)).astype("float32")
    import soundfile as sf

    def audio(fmt, channels):
        buf = io.BytesIO()
        sf.write(buf, noise[:, :channels], 16000, format=fmt)
        return buf.getvalue()

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n"
    want = {
        "tiff-0.png": (_image_as("TIFF"), "image_wrong_format"),
        "bmp-0.png": (_image_as("BMP"), "image_wrong_format"),
        "png-0.jpg": (real.fields["png"], ""),
        "eps-0.png": (eps, "image_wrong_format"),
        "ogg-0.wav": (audio("OGG", 64), "audio_wrong_format"),
        "flac-0.wav": (audio("FLAC", 2), "audio_wrong_format"),
        "wav-0.flac": (audio("WAV", 2), "audio_wrong_format"),
        "many-0.wav": (audio("WAV", 64), "audio_too_many_channels"),
        "ok-0.png": (real.fields["png"], ""),
        "ok-1.wav": (real.fields["wav"], ""),
        "ok-2.flac": (audio("FLAC", 2), ""),
    }
    p = tmp_path / "formats.tar"
    p.write_bytes(tar_bytes([(name, data) for name, (data, _) in want.items()]))
    got = _outcomes(p, bundle)
    for name, (_, reason) in want.items():
        key = name.split(".")[0]
        assert got[key] == (("errored", reason) if reason else ("kept", "")), (name, got[key])


def test_one_clip_past_full_scale_never_reaches_the_codebook(bundle, corpus, tmp_path):
    """A float WAV with 1% of its samples at 1e30 (finite) decoded, passed the filters, and gave all-NaN
    log-mel features: k-means put a NaN row in the audio codebook, to which every frame then encoded.
    The clip is now errored (audio_out_of_range), the fit's reader refuses features that are not
    finite, and a codebook with NaN in it is never saved."""
    import numpy as np
    import soundfile as sf

    from omnistream.common.errors import UserError
    from omnistream.modalities.audio import AudioModality
    from omnistream.pipelines.fit import FitFeatures

    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 16000).astype("float32")
    wave[::100] = 1e30
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    p = tmp_path / "loud.tar"
    p.write_bytes(tar_bytes([("loud-0.wav", buf.getvalue())]))
    assert _outcomes(p, bundle) == {"loud-0": ("errored", "audio_out_of_range")}
    fit = FitFeatures({"audio": {}}, DataConfig(), 0, 10)
    out = fit({"epoch": np.array([0]), "shard": np.array([str(p)], dtype=object)})
    assert list(out["why"][:1]) == ["errored/audio_out_of_range"], out["why"]

    m = AudioModality()
    good = m.fit_features(
        m.decode_bytes(
            "wav", next(r for r in read_shard(corpus["train"][0], 1 << 26) if "wav" in r.fields).fields["wav"]
        )
    )
    m.fit([good] * 8 + [np.full_like(good, np.nan)])  # k-means needs as many frames as codes
    with pytest.raises(UserError, match="NaN or inf"):
        m.save(tmp_path / "state")


def test_a_phone_photo_is_turned_as_its_exif_says(fitted):
    """A camera stores pixels as the sensor saw them and the turn to show them in EXIF (Orientation 6: 90°
    clockwise); the image is decoded as it is shown, not sideways."""
    import numpy as np
    from PIL import Image

    img = next(m for m in fitted if m.name == "image")
    sensor = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high, its left half white
    sensor[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(sensor).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    shown = img.decode_bytes("jpg", buf.getvalue())
    assert shown.size == (20, 40)  # upright: 20 wide, 40 high
    px = np.asarray(shown.convert("L"), dtype=float)
    assert px[:20].mean() > 200 and px[20:].mean() < 50  # the sensor's left half is now on top
