"""The token cache (no Ray: shards tokenized in this process by the same actor class Ray runs), the
packing windows and the data position's digest."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from common import SMALL_OPTIONS
from omnistream.common.errors import UserError
from omnistream.common.stream import DataPosition
from omnistream.pipelines.cache import TokenCache, open_cache
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.plan import plan_windows, window_size
from omnistream.pipelines.rows import StreamStart, WindowRows
from omnistream.pipelines.shards import shard_order


def _cfg(corpus, bundle, tmp, **kw):
    return DataConfig(
        train_shards=corpus["train"][:2], bundle_dir=str(bundle), seq_len=128, token_cache=str(tmp / "cache"), **kw
    )


def _tokenize(cfg, cache, shards):
    """What `build_cache` does on Ray, here in-process (no dedup actors: dedup off)."""
    from omnistream.pipelines.tokenize import ShardTokenizer

    tok = ShardTokenizer(SMALL_OPTIONS, cfg.bundle_dir, cfg, 0, cache.url, [], None)
    return tok({"shard": np.array(shards, dtype=object)})


@pytest.fixture(scope="module")
def built(corpus, bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cfg = _cfg(corpus, bundle, tmp)
    from omnistream.modalities.vocab import Vocabulary

    vocab = Vocabulary.load(bundle, SMALL_OPTIONS)
    cache = open_cache(cfg, vocab.fingerprint, 0, cfg.train_shards)
    out = _tokenize(cfg, cache, cfg.train_shards)
    return {"cfg": cfg, "cache": cache, "vocab": vocab, "out": out, "tmp": tmp}


def test_every_shard_is_complete_and_accounted(built):
    cache, shards = built["cache"], built["cfg"].train_shards
    done, todo = cache.status(shards)
    assert todo == [] and set(done) == set(shards)
    t = cache.tally(shards)
    assert t.balanced() and t.seen == 240 and t.kept == sum(m["rows"] for m in done.values())
    table = cache.read_shard(shards[0])
    assert table.num_rows == done[shards[0]]["rows"]
    assert set(table.column_names) == {"key", "ordered", "part_mods", "part_lens", "ids"}
    # the corpus's interleaved documents keep their own order; single captions have theirs drawn per epoch
    ordered = table.column("ordered").to_pylist()
    assert any(ordered) and not all(ordered)
    docs = cache.documents(shards[0])
    for i in range(len(docs)):
        parts = docs.parts(i, built["vocab"].names)
        assert sum(len(ids) for _, ids in parts) == docs.i_off[i + 1] - docs.i_off[i]
        assert docs.ordered[i] or len({n for n, _ in parts}) == len(parts)  # one value per modality


def test_a_cache_written_in_layout_1_is_rebuilt_saying_why(built, tmp_path, caplog):
    """A cache made before documents had ordered parts (one column per modality, format 1) is recognised:
    one line says why, and it is rebuilt in the new layout, at a named path and under "auto"."""
    import logging

    from omnistream.pipelines.cache import FORMAT, cache_key, key_digest

    vocab, cfg = built["vocab"], built["cfg"]
    old = cache_key(cfg, vocab.fingerprint, 0, cfg.train_shards) | {"format": 1}
    named = tmp_path / "named"
    auto_cfg = cfg.model_copy(update={"token_cache": "auto", "bundle_dir": str(tmp_path / "auto" / "bundle")})
    auto = tmp_path / "auto" / "token_cache" / key_digest(old)
    for d in (named, auto):
        (d / "shards").mkdir(parents=True)
        (d / "cache.json").write_text(json.dumps({"key": old, "digest": key_digest(old)}))
        (d / "shards" / ("0" * 20 + ".parquet")).write_bytes(b"layout 1")
    with caplog.at_level(logging.WARNING, logger="omnistream.pipelines.cache"):
        a = open_cache(cfg.model_copy(update={"token_cache": str(named)}), vocab.fingerprint, 0, cfg.train_shards)
        b = open_cache(auto_cfg, vocab.fingerprint, 0, cfg.train_shards)
    said = [r.getMessage() for r in caplog.records if "layout 1" in r.getMessage()]
    assert len(said) == 2 and all("rebuilding it in layout 2" in m for m in said), said
    assert a.manifest()["key"]["format"] == FORMAT and not (named / "shards" / ("0" * 20 + ".parquet")).exists()
    assert not auto.exists() and b.manifest()["key"]["format"] == FORMAT
    done, todo = a.status(cfg.train_shards)
    assert not done and todo == list(cfg.train_shards)  # every shard is tokenized again


def test_a_cache_made_with_other_settings_is_refused_naming_the_difference(built):
    cfg = built["cfg"].model_copy(update={"quality": {"text": {"min_chars": 5}}})
    with pytest.raises(UserError, match=r"other settings: quality: \{\} -> .*min_chars"):
        open_cache(cfg, built["vocab"].fingerprint, 0, cfg.train_shards)
    with pytest.raises(UserError, match="vocabulary fingerprint"):
        open_cache(built["cfg"], "0" * 64, 0, built["cfg"].train_shards)
    with pytest.raises(UserError, match="shards: 1 removed"):
        open_cache(built["cfg"], built["vocab"].fingerprint, 0, built["cfg"].train_shards[:1])
    with pytest.raises(UserError, match="seed: 0 -> 1"):
        open_cache(built["cfg"], built["vocab"].fingerprint, 1, built["cfg"].train_shards)


def test_auto_caches_live_side_by_side_one_per_key(built, tmp_path):
    cfg = built["cfg"].model_copy(update={"token_cache": "auto", "bundle_dir": str(tmp_path / "bundle")})
    a = open_cache(cfg, built["vocab"].fingerprint, 0, cfg.train_shards)
    b = open_cache(cfg, built["vocab"].fingerprint, 1, cfg.train_shards)
    assert a.url != b.url and Path(a.url).parent == Path(b.url).parent == tmp_path / "token_cache"


def test_a_shard_cut_off_mid_write_is_detected_and_rebuilt(built, tmp_path):
    """A crash or a full disk leaves a shard's parquet short or its completion record missing: the shard
    counts as not cached (never read half), and tokenizing again finishes it with the same tokens."""
    import shutil

    src = built["cache"]
    shutil.copytree(src.url, tmp_path / "c")
    assert list((tmp_path / "c").glob("index-*.parquet"))  # the index lists the shard: on disk, it is checked
    cache = TokenCache(str(tmp_path / "c"))
    shards = built["cfg"].train_shards
    sid = cache.shard_id(shards[0])
    pq = tmp_path / "c" / "shards" / f"{sid}.parquet"
    whole = pq.read_bytes()
    pq.write_bytes(whole[: len(whole) // 2])  # cut mid-write
    done, todo = cache.status(shards)
    assert todo == [shards[0]] and list(done) == [shards[1]]
    with pytest.raises(UserError, match="missing or incomplete"):
        cache.read_shard(shards[0])
    (tmp_path / "c" / "shards" / f"{sid}.json").unlink()  # and the crash came before the completion record
    assert cache.status(shards)[1] == [shards[0]]
    _tokenize(built["cfg"], cache, [shards[0]])
    assert cache.status(shards)[1] == []
    assert cache.read_shard(shards[0]).equals(src.read_shard(shards[0]))


def test_a_shard_changed_after_it_was_written_is_refused_when_read(built, tmp_path):
    import shutil

    shutil.copytree(built["cache"].url, tmp_path / "c")
    cache = TokenCache(str(tmp_path / "c"))
    shard = built["cfg"].train_shards[0]
    pq = tmp_path / "c" / "shards" / f"{cache.shard_id(shard)}.parquet"
    data = bytearray(pq.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    pq.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        cache.read_shard(shard)


def test_windows_cut_the_plan_in_order_without_loss():
    plan = shard_order(["a", "b", "c"], 0, 2)
    docs = {"a": 5, "b": 0, "c": 7}
    wins = plan_windows(plan, docs, 4)
    flat = [(plan[pi][0], plan[pi][1], i) for w in wins for pi, a, b in w for i in range(a, b)]
    want = [(e, s, i) for e, s in plan for i in range(docs[s])]
    assert flat == want
    assert all(sum(b - a for _, a, b in w) == 4 for w in wins[:-1])


def test_a_resumed_window_drops_the_consumed_rows_after_checking_the_last(built):
    """WindowRows packs a window again on resume: the rows up to the checkpoint's last one are dropped,
    and a last row whose hash differs (the stream changed) stops the run instead of skipping data."""
    from omnistream.common.errors import DataResumeMismatch
    from omnistream.common.stream import row_hash

    cfg, cache = built["cfg"], built["cache"]
    plan = shard_order(cfg.train_shards, 0, 1)
    done, _ = cache.status(cfg.train_shards)
    wins = plan_windows(plan, {s: m["rows"] for s, m in done.items()}, window_size(cfg, done))
    batch = {"window": np.array([0]), "ranges": np.array([json.dumps(wins[0])], dtype=object)}
    args = (cache.url, cfg.bundle_dir, SMALL_OPTIONS, cfg, 0, plan, 4)
    full = WindowRows(*args)(batch)
    assert list(full["row"]) == list(range(len(full["keys"])))
    start = StreamStart(0, 5, row_hash(full["keys"][5]), 6)
    rest = WindowRows(*args, start=start.to_json())(batch)
    assert list(rest["keys"]) == list(full["keys"][6:]) and list(rest["row"]) == list(range(6, len(full["keys"])))
    with pytest.raises(DataResumeMismatch, match="differs"):
        WindowRows(*args, start=StreamStart(0, 5, "0" * 32, 6).to_json())(batch)


def test_the_digest_depends_on_rows_and_places_not_on_who_consumed_them():
    rows = [(p, f"0:s:{p}\n0:s:{p + 100}") for p in range(40)]
    one = DataPosition()
    for p, k in rows:
        one.add_row(p, k, 0, p)
    # three ranks, blocks of 4 rows in turn, merged from a checkpoint taken after 12 rows
    first = DataPosition()
    for p, k in rows[:12]:
        first.add_row(p, k, 0, p)
    ranks = [DataPosition() for _ in range(3)]
    for p, k in rows[12:]:
        ranks[((p - 12) // 4) % 3].add_row(p, k, 0, p)
    start = DataPosition.from_json(first.to_json())
    merged = start.merged(random.Random(0).sample(ranks, 3))
    assert merged.ledger_digest() == one.ledger_digest() and merged.rows == 40 and merged.records == 80
    assert merged.to_json()["last"] == one.to_json()["last"]
    swapped = DataPosition()
    for p, k in rows[:10] + [(10, rows[11][1]), (11, rows[10][1])] + rows[12:]:
        swapped.add_row(p, k, 0, p)
    assert swapped.ledger_digest() != one.ledger_digest()  # two rows consumed in each other's place
    repeated = DataPosition()
    for p, k in rows + rows[-1:]:
        repeated.add_row(p, k, 0, p)
    assert repeated.ledger_digest() != one.ledger_digest()


def test_a_failed_write_leaves_no_part_file_and_old_ones_are_swept(built, tmp_path):
    """A write that fails (here: its data is not bytes) removes its part-file; part-files a killed writer
    left (older than an hour) are removed when a build next writes to the cache; a young one, maybe another
    actor's write in progress, is left."""
    import os
    import shutil
    import time

    shutil.copytree(built["cache"].url, tmp_path / "c")
    cache = TokenCache(str(tmp_path / "c"))
    with pytest.raises(TypeError):
        cache._write_atomic("shards/x.json", "not bytes")
    assert not list((tmp_path / "c").rglob("*.tmp-*"))
    shards = tmp_path / "c" / "shards"
    old, young = shards / f"{cache.shard_id('a')}.parquet.tmp-1", shards / f"{cache.shard_id('b')}.json.tmp-2"
    # what the cache did not write is not its to delete, however old and whatever its name: a user's file
    # in the folder data.token_cache names, or in one below it
    (tmp_path / "c" / "theirs").mkdir()
    foreign = [tmp_path / "c" / "notes.tmp-3", shards / "draft.tmp-4", tmp_path / "c" / "theirs" / "cache.json.tmp-5"]
    for f in (old, young, *foreign):
        f.write_bytes(b"half")
    for f in (old, *foreign):
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    cache.sweep()  # what build_cache does first when it has shards to write
    assert not old.exists() and young.exists()
    assert all(f.exists() for f in foreign), [str(f) for f in foreign if not f.exists()]


def test_a_folder_that_is_no_cache_is_not_swept(tmp_path):
    """Pointed at a folder holding other things (the parent of a cache, say, as a source named `..` once
    made it), the cache deletes none of them when it makes itself there."""
    import os
    import time

    (tmp_path / "shards").mkdir()
    theirs = [tmp_path / "cache.json.tmp-1", tmp_path / "shards" / f"{'0' * 20}.json.tmp-2"]
    for f in theirs:
        f.write_bytes(b"x")
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    TokenCache(str(tmp_path)).claim({"format": 1})
    assert all(f.exists() for f in theirs)
