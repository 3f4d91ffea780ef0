"""Data you can trust: a corpus with every defect planted (built here from bytes), run through
`omnistream data inspect`, the filters, dedup, the error-rate stop, and training."""

import io
import json
import random
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from common import EXE, REPO, SMALL_MODALITIES, run_config, wav_header
from omnistream.pipelines.democorpus import draw_digit, dtmf, make_record


def png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def jpg(im, q=90) -> bytes:
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=q)
    return b.getvalue()


def wav(x, sr=8000, subtype="PCM_16") -> bytes:
    b = io.BytesIO()
    sf.write(b, np.asarray(x, np.float32), sr, format="WAV", subtype=subtype)
    return b.getvalue()


def bomb_png() -> bytes:
    """A real 8×8 PNG whose header claims 100000×100000 pixels (CRC fixed so the header parses)."""
    data = bytearray(png(Image.new("L", (8, 8), 128)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def lying_wav() -> bytes:
    """A WAV whose header claims ~10 hours of audio it does not have."""
    data = bytearray(wav(np.zeros(800)))
    i = data.index(b"data")
    data[i + 4 : i + 8] = struct.pack("<I", 0x7FFF0000)
    return bytes(data)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def good(i: int) -> dict:
    return make_record(i, 3, "good")


# key -> expected reason (the planted defects); every other record is good
PLANTED = {
    "bad-zero": "image_empty",
    "bad-truncpng": "image_undecodable",
    "bad-garbagejpg": "image_undecodable",
    "bad-liar": "audio_undecodable",
    "bad-bomb": "image_too_large",
    "bad-lyingwav": "audio_header_mismatch",
    "bad-emptywav": "audio_empty",
    "bad-nanwav": "audio_not_finite",
    "bad-longwav": "audio_too_long",
    "bad-latin1": "text_not_utf8",
    "bad-hugetext": "text_too_long",
    "bad-nofield": "no_readable_field",
    "../escape": "member_name_unsafe",
    "/abs/path": "member_name_unsafe",
    "dup-key": "duplicate_key",
    "q-uniform": "image_near_uniform",
    "q-silent": "audio_silent",
    "q-clipped": "audio_clipped",
    "q-repeated": "text_repeated_lines",
    "q-noletters": "text_few_letters",
    # hostile.tar: the bounds of data.limits and the audio rate
    "many-0": "too_many_members",
    "rate-0": "audio_sample_rate",
    "hdr-0": "header_too_large",  # the record being read when the next member's header came
}
# dedup keeps whichever of a pair the actors met first; exactly one of each pair is filtered
DUP_PAIRS = {
    ("good-000", "d-exact"): "duplicate",
    ("orig-image", "d-nearimage"): "near_duplicate",
    ("orig-text", "d-neartext"): "near_duplicate",
}
LONG_TEXT = " ".join(f"word{i % 37} item{i % 11} thing{i}" for i in range(40))


def write_planted(d: Path) -> tuple[list[str], int]:
    """Shards with every defect of issue 5 item 2 and the filter/dedup cases; returns (shards, records)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    base_img = draw_digit(4, rng)
    a = d / "a.tar"
    n = 0
    with tarfile.open(a, "w") as t:
        for i in range(6):
            for ext, data in good(i).items():
                if ext != "__key__":
                    add(t, f"good-{i:03d}.{ext}", data)
            n += 1
        add(t, "bad-zero.png", b"")
        add(t, "bad-truncpng.png", png(base_img)[:200])
        add(t, "bad-garbagejpg.jpg", b"\xff\xd8\xff\xe0" + bytes(rng.getrandbits(8) for _ in range(300)))
        add(t, "bad-liar.wav", png(base_img))  # extension lies
        add(t, "bad-bomb.png", bomb_png())
        add(t, "bad-lyingwav.wav", lying_wav())
        add(t, "bad-emptywav.wav", wav(np.zeros(0)))
        add(t, "bad-nanwav.wav", wav(np.full(800, np.nan), subtype="FLOAT"))
        add(t, "bad-longwav.wav", wav(np.zeros(8000 * 12)))  # 12 s > max_seconds 10
        add(t, "bad-latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
        add(t, "bad-hugetext.txt", b"a" * 2_000_000)
        add(t, "bad-nofield.json", b'{"digit": 1}')
        add(t, "bad-nofield.xyz", b"???")
        add(t, "../escape.txt", b"escape")
        add(t, "/abs/path.txt", b"absolute")
        add(t, "dup-key.txt", b"first of the key")
        add(t, "other-000.txt", b"seven")
        add(t, "dup-key.txt", b"second time the key appears")
        add(t, "q-uniform.png", png(Image.new("RGB", (32, 32), (90, 140, 200))))
        add(t, "q-silent.wav", wav(np.zeros(4000)))
        add(t, "q-clipped.wav", wav(np.sign(np.sin(np.arange(4000) / 3.0))))
        add(t, "q-repeated.txt", ("the same line\n" * 10).encode())
        add(t, "q-noletters.txt", b"12345 67890 !!! ### 2468")
        add(t, "orig-text.txt", LONG_TEXT.encode())
        n += 23  # 22 planted records above (dup-key counts twice) + other-000
        n += 1  # orig-text
    b = d / "b.tar"
    w, sr = dtmf(3, rng)
    with tarfile.open(b, "w") as t:
        g = good(0)  # the exact bytes of a record in a.tar, under another key
        for ext, data in g.items():
            if ext != "__key__":
                add(t, f"d-exact.{ext}", data)
        add(t, "orig-image.png", png(base_img))
        add(t, "orig-image.wav", wav(w, sr))
        add(t, "d-nearimage.jpg", jpg(base_img.resize((60, 60)), 70))  # the same picture, re-encoded and resized
        add(t, "d-neartext.txt", LONG_TEXT.replace("thing5 ", "thing5x ").encode())
        n += 4
    cut = d / "c.tar"  # a tar cut off in the middle of a member
    with tarfile.open(cut, "w") as t:
        for i in range(6, 9):
            for ext, data in good(i).items():
                if ext != "__key__":
                    add(t, f"good-{i:03d}.{ext}", data)
    raw = cut.read_bytes()
    cut.write_bytes(raw[: int(len(raw) * 0.6)])
    hostile = d / "hostile.tar"  # odd bytes in a name, a record of 100 members, an absurd rate, a 200 KB pax header
    text = good(9)["txt"]
    with tarfile.open(hostile, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as t:
        add(t, b"odd\xff\xfe-0.txt".decode("utf-8", "surrogateescape"), text)
        for i in range(100):  # over data.limits.members (80)
            add(t, f"many-0.f{i}", b"x")
        add(t, "rate-0.wav", wav_header(1_000_003))
        add(t, "hdr-0.txt", b"the record before the long header arrives")
        info = tarfile.TarInfo("hdr-1.txt")
        info.size, info.pax_headers = len(text), {"comment": "x" * 200_000}
        t.addfile(info, io.BytesIO(text))
    n += 4  # hdr-1's header ends the shard: the record before it is errored, hdr-1 is never seen
    kills = d / "kills.tar"  # whole records, then one whose bytes crash the audio decoder (tests/hooks)
    with tarfile.open(kills, "w") as t:
        for i in range(10, 12):
            for ext, data in good(i).items():
                if ext != "__key__":
                    add(t, f"good-{i:03d}.{ext}", data)
        add(t, "crash-0.wav", CRASH_WAV)
    return [str(a), str(b), str(cut), str(hostile), str(kills)], n


# a real WAV carrying the hook's marker (tests/hooks/sitecustomize.py): reading it kills the reader
CRASH_WAV = wav(np.zeros(800))[:44] + b"OMNISTREAM-TEST-KILLS-ITS-READER" + bytes(1568)


def inspect(*args):
    r = subprocess.run(
        [*EXE, "data", "inspect", *args, "--json"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return r


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def report(ray_local, planted):
    """`data inspect`'s report on the session's Ray, 2 tokenizer actors (the command itself, its --json on
    stdout, runs in test_cli.py's two-commands test)."""
    from omnistream.configs import load_config
    from omnistream.pipelines.inspect import inspect_shards

    shards, _ = planted
    cfg = load_config(None, ["data.tokenizer_actors=2"])
    return json.loads(json.dumps(inspect_shards(shards, cfg.data, cfg.modalities, cfg.seed)))  # as --json has it


def test_inspect_accounts_for_every_record(report, planted):
    _, n_written = planted
    assert report["balanced"]
    assert report["seen"] == report["kept"] + sum(report["filtered"].values()) + sum(report["errored"].values())
    # every record written to a.tar, b.tar and hostile.tar, plus the whole records of the cut shard, plus
    # the one it cut; none of kills.tar, which killed its actor each time (a shard error, not records)
    assert n_written <= report["seen"] <= n_written + 3
    assert not any(c.get("seen") for s, c in report["per_shard"].items() if s.endswith("kills.tar"))
    died = [e for e in report["shard_errors"] if e["reason"] == "actor_died"]
    assert [Path(e["shard"]).name for e in died] == ["kills.tar"], report["shard_errors"]
    assert report["per_shard"][next(s for s in report["per_shard"] if s.endswith("hostile.tar"))]["kept"] == 1
    assert (
        report["errored"].get("shard_truncated", 0)
        + sum(1 for e in report["shard_errors"] if e["reason"] == "shard_truncated")
        == 1
    )


def test_every_planted_defect_appears_under_its_reason(report):
    by_key = {}
    for d in report["dead_letter"]:
        by_key.setdefault(d["key"], []).append(d["reason"])
    for key, reason in PLANTED.items():
        assert reason in by_key.get(key, []), (key, reason, by_key.get(key))
    for pair, reason in DUP_PAIRS.items():
        assert sum(reason in by_key.get(k, []) for k in pair) == 1, (pair, reason)


def test_unreadable_shard_is_listed_and_the_rest_goes_on(ray_local, planted, tmp_path):
    from omnistream.configs import load_config
    from omnistream.pipelines.inspect import inspect_shards

    shards, _ = planted
    missing = tmp_path / "gone.tar"
    missing.write_bytes(b"")
    cfg = load_config()
    rep = inspect_shards([shards[0], str(missing)], cfg.data, cfg.modalities, cfg.seed)
    assert rep["seen"] > 0 and rep["balanced"]
    assert [e["shard"] for e in rep["shard_errors"]] == [str(missing)], rep["shard_errors"]


def test_no_shards_is_a_user_mistake():
    r = inspect("/nonexistent/shard-{0..3}.tar")
    assert r.returncode == 2 and "no shards found" in r.stderr and "Traceback" not in r.stderr


# ---- filters and dedup fail when switched off -------------------------------------------------------


def _caught(shards: list[str], *sets: str) -> set[str]:
    """The keys the stages `data inspect` runs on Ray (read, decode, filters, dedup on real DedupShard
    actors) catch, run in this process under `--set` overrides `sets`."""
    from omnistream.configs import load_config
    from omnistream.pipelines.accounting import Tally
    from omnistream.pipelines.dedup import start_dedup
    from omnistream.pipelines.documents import RecordProcessor

    cfg = load_config(None, list(sets))
    proc = RecordProcessor(cfg.modalities, None, cfg.data, cfg.seed, start_dedup(cfg.data.dedup))
    tally = Tally()
    for _ in proc.process([(0, s) for s in shards], tally):
        pass
    assert tally.balanced()
    return {d["key"] for d in tally.dead_letter}


@pytest.fixture(scope="module")
def caught_by_default(ray_local, planted):
    return _caught(planted[0][:2])


@pytest.mark.parametrize(
    "switch,keys",
    [
        ("data.quality.image.enabled=false", ["q-uniform"]),
        ("data.quality.audio.enabled=false", ["q-silent", "q-clipped"]),
        ("data.quality.text.enabled=false", ["q-repeated", "q-noletters"]),
        ("data.dedup.exact=false", ["good-000", "d-exact"]),
        ("data.quality.image.near_duplicates=false", ["orig-image", "d-nearimage"]),
        ("data.quality.text.near_duplicates=false", ["orig-text", "d-neartext"]),
    ],
)
def test_switching_a_filter_off_keeps_what_it_caught(report, planted, caught_by_default, switch, keys):
    """Caught with the filter on (on Ray, the report; in this process, the same stages), kept with it off.
    What a switch changes is the processor's; the Ray path is the report's own test."""
    on = {d["key"] for d in report["dead_letter"]}
    assert on & set(keys) and caught_by_default & set(keys), (switch, "the filter caught nothing with it on")
    assert not _caught(planted[0][:2], switch) & set(keys), (switch, "still caught with the filter off")


def test_dedup_holds_across_actors_and_epochs(ray_local, planted):
    """Two actors, shards in two epochs: the same record met again is not its own duplicate."""
    from omnistream.pipelines.config import DataConfig
    from omnistream.pipelines.ledger import DataLedger
    from omnistream.pipelines.stream import record_stream

    shards, _ = planted
    cfg = DataConfig(tokenizer_actors=2)
    mods = {"text": {}, "image": {}, "audio": {}}
    ledger = DataLedger.remote()
    plan = [(e, s) for e in range(2) for s in shards[:2]]
    for _ in record_stream(cfg, mods, 0, plan, None, ledger).iter_batches():
        pass
    tally = ray_local.get(ledger.snapshot.remote())
    assert tally.balanced()
    # each duplicate is caught once per epoch, never the original it duplicates
    assert tally.filtered["duplicate"] == 2 and tally.filtered["near_duplicate"] == 4
    keys = {d["key"] for d in tally.dead_letter if d["reason"] in ("duplicate", "near_duplicate")}
    assert len(keys) == 3 and all(len(keys & set(pair)) == 1 for pair in DUP_PAIRS)


# ---- mostly-bad data stops a run (training on the planted corpus: test_hostile_run.py) ------------------


@pytest.mark.slow
def test_mostly_bad_data_stops_with_one_clear_line(ray_local, planted, bundle, corpus, tmp_path):
    from omnistream.cluster.driver import run_training
    from omnistream.common.errors import UserError

    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as t:
        for i in range(200):
            add(t, f"junk-{i:04d}.png", b"\x89PNG not really" + bytes([i % 256]) * 50)
        for i in range(5):
            for ext, data in good(i).items():
                if ext != "__key__":
                    add(t, f"ok-{i}.{ext}", data)
    cfg = run_config(
        corpus,
        tmp_path,
        "train.steps=50",
        "data.epochs=20",
        "cluster.num_workers=1",
        "data.error_rate_window=100",
        f'data.train_shards=["{junk}"]',
        f'data.bundle_dir="{bundle}"',
        "data.eval_shards=[]",
    )
    with pytest.raises(UserError, match="could not be read .*image_undecodable.*data.max_error_rate"):
        run_training(cfg)


# ---- tokenize once: `omnistream data tokenize` on Ray, a cut-off cache finished ----------------------


def test_tokenize_command_fills_finishes_and_reuses_the_cache(ray_local, corpus, bundle, tmp_path, capsys):
    """Through the CLI on the session's Ray, dedup actors included: the first call tokenizes every shard,
    the second reuses them all, and after one shard's file is cut mid-write the third tokenizes that
    shard alone, deduplicated against the others (their stored claims re-claimed first): the cache then
    holds exactly what one uninterrupted build held."""
    from omnistream.cli import main
    from omnistream.pipelines.cache import TokenCache

    cfg = tmp_path / "t.toml"
    cfg.write_text(
        SMALL_MODALITIES
        + f"""[data]
train_shards = {json.dumps(corpus["train"])}
bundle_dir = "{bundle}"
token_cache = "{tmp_path / "cache"}"
"""
    )
    assert main(["data", "tokenize", str(cfg)]) == 0
    assert "0 already cached, 4 tokenized" in capsys.readouterr().out
    cache = TokenCache(str(tmp_path / "cache"))
    before = {s: cache.read_shard(s) for s in corpus["train"]}
    assert main(["data", "tokenize", str(cfg)]) == 0
    assert "4 already cached, 0 tokenized" in capsys.readouterr().out
    last = corpus["train"][-1]
    pq = tmp_path / "cache" / "shards" / f"{cache.shard_id(last)}.parquet"
    pq.write_bytes(pq.read_bytes()[:100])
    assert main(["data", "tokenize", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "3 already cached, 1 tokenized" in out and "480 records" in out
    assert all(cache.read_shard(s).equals(t) for s, t in before.items())


def test_the_tokenizer_fit_reads_as_training_does(ray_local, planted, tmp_path):
    """`tokenizers fit` read its sample without data.limits, failed on any plugin exception and left its
    actors Ray's unbounded restarts: the planted shards' decoder-killing record hung it forever. Now
    the fit reads through the same processor as training: the killing shard is one shard error
    (actor_died) and the fit finishes; each record over a bound, and each one a quality filter
    catches, is counted under its reason; the codebooks are fitted on the rest."""
    from common import SMALL_OPTIONS
    from omnistream.configs import load_config
    from omnistream.pipelines.fit import fit_bundle

    shards, _ = planted
    cfg = load_config(None, ["data.fit_records=100000"])  # every planted record is in the sample
    vocab, summary = fit_bundle(
        cfg.data.model_copy(update={"train_shards": shards}), SMALL_OPTIONS, cfg.seed, tmp_path / "bundle"
    )
    bad = summary["bad_samples"]
    assert bad.get("shard_errors/actor_died") == 1, bad
    assert bad.get("errored/too_many_members", 0) >= 1 and bad.get("errored/audio_sample_rate", 0) >= 1, bad
    assert any(k.startswith("filtered/") for k in bad), bad
    assert set(summary["samples"]) == {"text", "image", "audio"} and vocab.size > 0
