"""Hostile records never end a stream: whatever one record makes a plugin raise, odd bytes in member
names, and a seeded fuzz of real shards. Each must finish with seen = kept + filtered + errored.

In-process (no Ray): the same RecordProcessor the Ray actors run, without dedup actors.
"""
import io
import random
import tarfile

import pytest
from omnistream.modalities import registry
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.documents import RecordProcessor, make_document, record_rng
from omnistream.pipelines.records import read_shard

from common import wav_header  # noqa: I001


def tar_bytes(members: list[tuple[bytes | str, bytes]]) -> bytes:
    """A real tar (GNU format, so raw byte names survive) of (name, data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as t:
        for name, data in members:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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
        make_document(proc.vocab, o.parts, "random", record_rng(0, 0, r.key))
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
        assert o.status != "kept" or "txt" not in r.fields, "a record the broken stage touched was kept"
        assert (o.reason == "plugin_error:ZeroDivisionError") <= ("txt" in r.fields)
    assert tally.kept > 0, "records without text go on"
    letter = next(d for d in tally.dead_letter if d["reason"] == "plugin_error:ZeroDivisionError")
    assert f"text.{stage}: a bug in the plugin" in letter["detail"]


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "swap_ext", "long_name", "zero_block"])
    b = bytearray(data)
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(1, len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "zero_block":
        at = rng.randrange(0, len(b) // 512) * 512
        b[at:at + 512] = bytes(512)
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
    else:  # a GNU long-name header far longer than any name the reader accepts
        members[i] = ("x" * rng.choice([2000, 20000]) + "." + name.split(".", 1)[1], payload)
    return kind, tar_bytes(members)


def test_fuzzed_shards_never_raise_and_always_balance(bundle, corpus, tmp_path):
    """Two hundred seeded mutations of a real shard (truncated, bits flipped, extensions swapped,
    oversized name headers, zeroed blocks): every pass completes and accounts for every record."""
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
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"seed {seed} ({kind}): {type(e).__name__} escaped: {e}")
        assert tally.balanced(), f"seed {seed} ({kind}): {tally.report()}"
    assert registry.discover()  # the built-ins stayed registered throughout


# ---- bounded memory per record ---------------------------------------------------------------------

def test_each_record_bound_errors_the_record_under_its_reason(bundle, corpus, tmp_path):
    from omnistream.pipelines.config import Limits

    good = next(r for r in read_shard(corpus["train"][0], 1 << 26) if {"txt", "png"} <= set(r.fields))
    members = [("ok-0.txt", good.fields["txt"])]
    members += [(f"many-0.f{i}", b"x") for i in range(40)]                  # 40 members in one record
    members += [("big-0.txt", b"a" * 3000), ("big-0.json", b"{}" * 1000)]    # 5000 bytes together
    members += [("img-0.png", good.fields["png"])]                           # over the image cap below
    members += [("rate-0.wav", wav_header(1_000_003)), ("ok-1.txt", good.fields["txt"])]
    p = tmp_path / "bounds.tar"
    p.write_bytes(tar_bytes(members))
    cfg = DataConfig(limits=Limits(members=32, record_bytes=4000, member_bytes={"image": 100}))
    _, tally, got = process(p, bundle, cfg)
    reasons = {r.key: o.reason for _, r, o in got}
    assert reasons == {"ok-0": "", "many-0": "too_many_members", "big-0": "record_too_large",
                       "img-0": "member_too_large", "rate-0": "audio_sample_rate", "ok-1": ""}, reasons
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

    def header(name: bytes, typeflag: bytes, size: int, extra: bytes = b"") -> bytes:
        h = bytearray(512)
        h[0:len(name)] = name
        h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
        h[124:136] = f"{size:011o}\0".encode()
        h[136:148] = b"00000000000\0"
        h[156:157] = typeflag
        h[257:265] = b"ustar  \0"
        h[386:386 + len(extra)] = extra
        h[148:156] = b" " * 8
        h[148:156] = f"{sum(h):06o}\0 ".encode()
        return bytes(h)

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
    assert data[at:at + 3] == b"r-2"
    data[at + 148:at + 156] = b"\0" * 8
    kept, errors = _shard_result(tmp_path, bytes(data))
    assert kept == ["r-0", "r-1"], kept
    assert [e for e, _ in errors] == ["shard_damaged"] and f"byte {at}" in errors[0][1], errors
    # an intact shard says nothing of the kind
    kept, errors = _shard_result(tmp_path, tar_bytes([(f"r-{i}.txt", b"x") for i in range(5)]), "intact.tar")
    assert len(kept) == 5 and errors == [], errors
