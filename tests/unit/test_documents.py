"""Documents of ordered parts (KEY.<i>.<ext>): read, decoded, encoded and laid out in their order; bad parts
named (or dropped and counted); documents longer than a row split only where a part begins; each eval task
reading its own examples; per-modality loss weights."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import webdataset as wds

from common import SMALL_OPTIONS, tar_bytes
from omnistream.modalities.vocab import BOS, EOS
from omnistream.pipelines.accounting import Tally
from omnistream.pipelines.config import DataConfig
from omnistream.pipelines.democorpus import draw_digit, dtmf, encode_audio
from omnistream.pipelines.documents import RecordProcessor, make_document, record_rng
from omnistream.pipelines.packing import pack_documents, split_points
from omnistream.pipelines.records import part_ext


def _media(seed: int = 0) -> dict[str, bytes]:
    """Real encoder output: a JPEG and a PNG of digits (Pillow), a WAV of a DTMF tone (soundfile)."""
    rng = random.Random(seed)
    jpg, png = draw_digit(3, rng), draw_digit(7, rng)
    out = {}
    for im, fmt in ((jpg, "JPEG"), (png, "PNG")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    while True:  # encode_audio picks WAV or FLAC by its rng: draw until it writes a WAV
        ext, data = encode_audio(*dtmf(5, rng), rng)
        if ext == "wav":
            out["wav"] = data
            return out


def _shard(path, records: list[tuple[str, dict[str, bytes]]]) -> str:
    with wds.TarWriter(str(path)) as w:
        for key, fields in records:
            w.write({"__key__": key, **fields})
    return str(path)


def _run(path, bundle, **data) -> tuple[RecordProcessor, Tally, list]:
    proc = RecordProcessor(SMALL_OPTIONS, bundle, DataConfig(**data), seed=0)
    tally = Tally()
    got = list(proc.process([(0, str(path))], tally))
    assert tally.balanced(), tally.report()
    return proc, tally, got


def test_a_record_of_parts_is_the_document_they_make_in_their_order(bundle, tmp_path):
    """doc7.0.txt 1.jpg 2.txt 3.wav 4.png (written by webdataset's TarWriter) becomes exactly
    [<bos>, <begin:text> ids <end:text>, <begin:image> ids <end:image>, ..., <eos>] in that order, each
    part's ids its modality's own encode of its bytes, whatever the seed and data.modality_order."""
    m = _media()
    fields = {"0.txt": b"a three", "1.jpg": m["jpeg"], "2.txt": b"then a five", "3.wav": m["wav"], "4.png": m["png"]}
    path = _shard(tmp_path / "doc.tar", [("doc7", {**fields, "json": b'{"digits": "3 5 7"}'})])
    proc, tally, got = _run(path, bundle, seq_len=1024)
    ((_, r, o),) = got
    assert o.status == "kept" and o.ordered and [n for n, _ in o.parts] == ["text", "image", "text", "audio", "image"]
    vocab = proc.vocab
    want = [BOS]
    for f in ("0.txt", "1.jpg", "2.txt", "3.wav", "4.png"):
        name = proc.exts[part_ext(f)[1]]
        mod = vocab.by_name[name]
        ids = mod.encode(mod.decode_bytes(part_ext(f)[1], fields[f]))
        want += [vocab.begin(name), *vocab.to_global(name, ids).tolist(), vocab.end(name)]
    want.append(EOS)
    for seed in (0, 1, 2):
        toks, mods, cuts = make_document(vocab, o.parts, o.ordered, "random", record_rng(seed, 0, r.key))
        assert toks.tolist() == want
        assert [int(toks[c]) for c in cuts] == [vocab.begin(n) for n in ("image", "text", "audio", "image")]
    assert tally.report()["parts"]["per_document"] == {"5": 1}
    assert tally.report()["parts"]["per_modality"]["text"] == {"kept": 2, "dropped": 0}


def test_one_value_per_modality_still_reads_with_its_order_drawn(bundle, tmp_path):
    """KEY.txt + KEY.jpg + KEY.wav: one part each, not ordered; the seeded order is drawn per epoch, and
    data.modality_order = config lays them out in the vocabulary's order."""
    m = _media()
    path = _shard(tmp_path / "one.tar", [("rec", {"txt": b"a three", "jpg": m["jpeg"], "wav": m["wav"]})])
    proc, _, ((_, r, o),) = _run(path, bundle)
    assert o.status == "kept" and not o.ordered
    vocab = proc.vocab
    orders = set()
    for epoch in range(12):
        toks, _, cuts = make_document(vocab, o.parts, False, "random", record_rng(0, epoch, r.key))
        firsts = [int(toks[1]), *(int(toks[c]) for c in cuts)]
        orders.add(tuple(firsts))
    assert len({o for o in orders if len(o) == 3}) > 1, "the order is drawn"
    toks, _, cuts = make_document(vocab, o.parts, False, "config", None)
    assert [int(toks[1]), *(int(toks[c]) for c in cuts)] == [vocab.begin(n) for n in vocab.names]


def test_a_bad_part_errors_its_record_by_name_or_is_dropped_and_counted(bundle, tmp_path):
    m = _media()
    recs = [
        ("doc1", {"0.jpg": m["jpeg"], "1.wav": b"RIFF not a wave", "2.txt": b"then a word"}),  # undecodable clip
        ("doc2", {"0.jpg": m["jpeg"], "1.txt": b"x" * 400, "2.txt": b"fine"}),  # over text max_chars (below)
        ("doc3", {"0.txt": b"fine", "1.png": m["png"]}),
    ]
    path = _shard(tmp_path / "bad.tar", recs)
    quality = {"text": {"max_chars": 100}}
    _, tally, got = _run(path, bundle, quality=quality)
    out = {r.key: o for _, r, o in got}
    assert out["doc1"].status == "errored" and out["doc1"].field == "1.wav"
    assert out["doc1"].detail.startswith("doc1.1.wav: "), out["doc1"].detail
    assert (out["doc2"].status, out["doc2"].reason, out["doc2"].detail) == (
        "filtered",
        "text_too_long",
        "doc2.1.txt: text_too_long",
    )
    assert out["doc3"].status == "kept" and tally.kept == 1
    letters = {d["key"]: d for d in tally.dead_letter}
    assert letters["doc1"]["field"] == "1.wav" and letters["doc2"]["field"] == "1.txt"

    # data.drop_bad_parts: the bad part goes, counted under its reason; the rest of the document stays
    _, tally, got = _run(path, bundle, quality=quality, drop_bad_parts=True)
    out = {r.key: o for _, r, o in got}
    assert [o.status for o in out.values()] == ["kept"] * 3
    assert [n for n, _ in out["doc1"].parts] == ["image", "text"] and [n for n, _ in out["doc2"].parts] == [
        "image",
        "text",
    ]
    rep = tally.report()["parts"]
    assert sum(rep["dropped"].values()) == 2 and rep["dropped"]["text_too_long"] == 1, rep
    assert rep["per_modality"]["audio"] == {"kept": 0, "dropped": 1} and rep["per_modality"]["text"]["dropped"] == 1
    assert tally.metrics()["data/parts_dropped/text_too_long"] == 1


def test_record_layouts_that_cannot_be_read_as_one_document(bundle, tmp_path):
    """Numbered parts beside a plain value, two parts numbered alike, more parts than data.limits.parts:
    each errors its record under its own reason; the records around it are kept."""
    raw = [
        ("a.0.txt", b"one"),
        ("a.txt", b"two"),
        ("b.1.txt", b"one"),
        ("b.01.txt", b"two"),
        *((f"c.{i}.txt", b"word %d" % i) for i in range(5)),
        ("d.0.txt", b"fine"),
    ]
    p = tmp_path / "odd.tar"
    p.write_bytes(tar_bytes(raw))
    proc = RecordProcessor(SMALL_OPTIONS, bundle, DataConfig(limits={"parts": 4}), seed=0)
    tally = Tally()
    out = {r.key: (o.status, o.reason) for _, r, o in proc.process([(0, str(p))], tally)}
    assert out == {
        "a": ("errored", "mixed_layout"),
        "b": ("errored", "duplicate_part"),
        "c": ("errored", "too_many_parts"),
        "d": ("kept", ""),
    }, out


def test_a_long_document_is_split_only_where_a_part_begins(bundle, tmp_path):
    """A document longer than a row is packed in pieces that each begin with <bos> or a part's begin marker
    and end with <eos> or a part's end marker, no token lost; data.long_documents = "drop" filters it
    instead, and a single part longer than a row is filtered (or, under drop_bad_parts, dropped)."""
    m = _media()
    fields = {f"{i}.{e}": v for i, (e, v) in enumerate([("jpg", m["jpeg"]), ("txt", b"three"), ("wav", m["wav"])] * 3)}
    path = _shard(tmp_path / "long.tar", [("long", fields)])
    proc, tally, ((_, r, o),) = _run(path, bundle, seq_len=128)
    full = o
    toks, mods, cuts = make_document(proc.vocab, o.parts, o.ordered, "random", None)
    assert o.status == "kept" and len(toks) > 128 and tally.documents_split == 1
    starts = {0, *cuts.tolist()}
    vocab = proc.vocab
    begins = {BOS, *(vocab.begin(n) for n in vocab.names)}
    ends = {EOS, *(vocab.end(n) for n in vocab.names)}
    # every row length below holds the longest part with <eos> beside it: none of the three is skipped
    assert max(np.diff([0, *cuts.tolist(), len(toks)])) + 1 <= 64
    for seq_len in (64, 100, 128):
        rows = pack_documents([toks], [mods], ["long"], seq_len, [cuts])
        got = []
        for row, ids in zip(rows["input_ids"], rows["doc_ids"]):
            for d in sorted(set(ids[ids > 0])):
                got.append(row[ids == d])
        assert sorted(np.concatenate(got).tolist()) == sorted(toks.tolist())  # every token once
        assert len(got) > 1 and all(int(g[0]) in begins and int(g[-1]) in ends for g in got), seq_len
    assert split_points(len(toks), cuts, 128)[1:] and set(split_points(len(toks), cuts, 128)) <= starts

    _, tally, ((_, _, o),) = _run(path, bundle, seq_len=128, long_documents="drop")
    assert (o.status, o.reason) == ("filtered", "document_longer_than_row")
    sizes = {n: len(ids) for n, ids in full.parts}  # the image's ids do not fit a row of 24, the rest do
    assert sizes["image"] + 4 > 24 >= max(sizes["text"], sizes["audio"]) + 4, sizes
    _, _, ((_, _, o),) = _run(path, bundle, seq_len=24)
    assert (o.status, o.reason, o.field) == ("filtered", "part_longer_than_row", "0.jpg")
    _, tally, ((_, _, o),) = _run(path, bundle, seq_len=24, drop_bad_parts=True)
    assert o.status == "kept" and [n for n, _ in o.parts] == ["text", "audio"] * 3
    assert tally.parts_dropped == {"part_longer_than_row": 3} and tally.parts["image"]["dropped"] == 3


def test_each_eval_task_reads_its_own_examples(bundle, tmp_path):
    """Held-out images first, clips after: with eval.examples = 3 both digit tasks get 3 records (the first
    3 records alone hold no clip), the two-digit task gets the interleaved ones, and a task the shard cannot
    serve is a warning with its count."""
    from common import run_config
    from omnistream.modalities.vocab import Vocabulary
    from omnistream.pipelines.documents import held_out
    from omnistream.training.evaluate import Evaluator

    m = _media()
    recs = [(f"img{i}", {"png": m["png"], "json": b'{"digit": 7}'}) for i in range(5)]
    recs += [(f"clip{i}", {"wav": m["wav"], "json": b'{"digit": 5}'}) for i in range(4)]
    recs += [
        (f"pair{i}", {"0.png": m["png"], "1.wav": m["wav"], "2.txt": b"seven then five", "json": b'{"digits": "7 5"}'})
        for i in range(3)
    ]
    path = _shard(tmp_path / "eval.tar", recs)
    tasks = {
        "image_to_text": '{prompt = "image", label_field = "digit", match = "number"}',
        "audio_to_text": '{prompt = "audio", label_field = "digit", match = "number"}',
        "pair": '{kind = "parts", prompt = ["image", "audio"], label_field = "digits", match = "numbers"}',
        "never": '{prompt = "image", label_field = "colour"}',
    }
    cfg = run_config(
        {"dir": str(tmp_path)},
        tmp_path,
        f'data.bundle_dir="{bundle}"',
        f'data.eval_shards=["{path}"]',
        "eval.examples=3",
        *(f"eval.tasks.{k}={v}" for k, v in tasks.items()),
    )
    vocab = Vocabulary.load(bundle, SMALL_OPTIONS)
    ev = Evaluator(cfg.resolved_paths(), vocab, held_out)
    counts = {name: len(ev.task_records(name)) for name in cfg.eval.tasks}
    assert counts == {"image_to_text": 3, "audio_to_text": 3, "pair": 3, "never": 0}, counts
    assert [r.key for r in ev.task_records("audio_to_text")] == ["clip0", "clip1", "clip2"]
    assert ev.data.counts["never"] == 0
    pair = ev.task_records("pair")[0]
    prompt = vocab.prompt_parts(pair.parts[:2], "text")
    assert prompt[-1] == vocab.begin("text") and prompt[:-1] == vocab.document(pair.parts[:2])[0][:-1].tolist()


def test_the_numbers_rule_and_loss_weights():
    import torch

    from omnistream.common.errors import UserError
    from omnistream.configs import load_config
    from omnistream.training.evaluate import matches, numbers
    from omnistream.training.trainer import weighted_loss

    assert numbers("first three, then 7") == [3.0, 7.0] and numbers("twenty one and 4") == [21.0, 4.0]
    assert matches("three then seven", "3 7", "numbers") and not matches("seven then three", "3 7", "numbers")
    assert not matches("three", "3 7", "numbers") and not matches("three seven one", "3 7", "numbers")

    loss = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    labels = torch.tensor([[5, 6, 7, -100]])
    assert weighted_loss(loss, labels, torch.ones(1, 4)).item() == pytest.approx(7 / 3)
    assert weighted_loss(loss, labels, torch.tensor([[1.0, 0.5, 0.0, 9.0]])).item() == pytest.approx(2 / 1.5)
    assert load_config(None, ["train.loss_weights={text = 1.0, image = 0.5}"]).train.loss_weights["image"] == 0.5
    with pytest.raises(UserError, match="loss_weights names"):
        load_config(None, ["train.loss_weights={video = 1.0}"])
    with pytest.raises(UserError, match="not all 0"):
        load_config(None, ["train.loss_weights={text = 0, image = 0, audio = 0}"])
