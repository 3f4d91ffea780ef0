"""Hostile input, round three, where it needs no Ray: a remote read's pauses and deadline against a real
HTTP server on 127.0.0.1 that trickles its bytes, images whose bytes say more than their name, members no
modality reads, a brace range with a member missing, and checkpoint keys or links that would escape."""

import http.server
import threading
import time

import pytest
from test_hostile_records import tar_bytes


class Trickle(http.server.BaseHTTPRequestHandler):
    """Answers every request for a 10 KiB shard, then sends it a byte every 0.2 s."""

    size = 10240

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        try:
            for _ in range(self.size):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the reader gave up and closed the connection
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/shard.tar"
    srv.shutdown()
    srv.server_close()


def test_a_store_that_trickles_bytes_is_cut_at_the_read_deadline(trickling):
    """It held a reading actor forever: each byte resets the client's socket timeout. Now the shard is
    errored as shard_read_failed when data.read_deadline_s runs out."""
    from omnistream.pipelines.records import read_shard

    t0 = time.monotonic()
    out = list(read_shard(trickling, 1 << 20, retries=0, deadline_s=1.5))
    took = time.monotonic() - t0
    assert [r.error for r in out] == ["shard_read_failed"], [(r.error, r.detail) for r in out]
    assert "read_deadline_s" in out[0].detail
    assert took < 10, took


def test_the_pause_between_retries_is_capped():
    """Doubling from 0.5 s without a cap, the 20th retry (data.remote_retries allows 20) waited 72 hours."""
    from omnistream.pipelines.records import MAX_PAUSE_S, retry_pause

    pauses = [retry_pause(a) for a in range(1, 21)]
    assert pauses[:3] == [0.5, 1.0, 2.0] and max(pauses) == MAX_PAUSE_S == 30.0
    assert sum(pauses) < 20 * 30


def _png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("tokenizer", ["kmeans", "fsq"])
def test_16_bit_images_are_scaled_and_transparent_pixels_show_one_background(tokenizer):
    """A 0-65535 grey gradient came out 99.6% at 255 (converted, i.e. clipped); a transparent pixel kept
    whatever colour lay under it. Every image tokenizer decodes through the same door."""
    import numpy as np
    from PIL import Image

    from omnistream.modalities.image import BACKGROUND, ImageModality

    mod = ImageModality({"tokenizer": tokenizer})
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    got = np.asarray(mod.decode_bytes("png", _png(Image.fromarray(ramp))))
    assert got.shape == (8, 256, 3) and (got[..., 0] == 255).mean() < 0.01
    assert abs(got[0, :, 0].astype(int) - np.arange(256)).max() <= 1, got[0, ::32, 0]

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red under ...
    rgba[:2, :, 3] = 0  # ... a transparent top half
    rgba[2:, :, 3] = 255
    got = np.asarray(mod.decode_bytes("png", _png(Image.fromarray(rgba, "RGBA"))))
    assert (got[:2] == BACKGROUND).all() and (got[2:] == (255, 0, 0)).all()
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 255, 0, 0, 0, 255])
    pal.info["transparency"] = 0  # green is the transparent entry
    got = np.asarray(mod.decode_bytes("png", _png(pal)))
    assert (got[0, 0] == BACKGROUND).all() and (got[0, 1] == (0, 0, 255)).all()


def test_an_image_is_read_by_its_bytes_whatever_its_extension_and_only_as_jpeg_png_or_webp():
    import io

    import numpy as np
    from PIL import Image

    from omnistream.common.errors import BadSample
    from omnistream.modalities.image import ImageModality

    mod = ImageModality({})
    im = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    for fmt, ext in (("PNG", "jpg"), ("JPEG", "png"), ("WEBP", "jpeg")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        assert mod.decode_bytes(ext, buf.getvalue()).size == (8, 8), (fmt, ext)
    for fmt in ("TIFF", "BMP", "GIF"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        with pytest.raises(BadSample) as e:
            mod.decode_bytes("jpg", buf.getvalue())
        assert e.value.reason == "image_wrong_format", fmt


def test_members_no_modality_reads_are_counted_per_extension(bundle, tmp_path):
    """A .gif beside a caption was dropped without a word and its record kept as text only: now each such
    member is counted under its extension (data/unconsumed/gif), in the report and in one log line."""
    from omnistream.pipelines.accounting import Tally
    from omnistream.pipelines.config import DataConfig
    from omnistream.pipelines.documents import RecordProcessor

    shard = tmp_path / "mixed.tar"
    shard.write_bytes(
        tar_bytes(
            [
                ("a.txt", b"a cat on a mat"),
                ("a.gif", b"GIF89a" + bytes(20)),
                ("a.json", b'{"label": 1}'),
                ("b.txt", b"a dog"),
                ("b.GIF", b"GIF89a"),
                ("c.txt", b"plain"),
                ("c.\xe2\x80\xae.x", b"odd"),
            ]
        )
    )
    tally = Tally()
    kept = [
        r.key
        for _, r, o in RecordProcessor(None, bundle, DataConfig(), seed=0).process([(0, str(shard))], tally)
        if o.status == "kept"
    ]
    assert kept == ["a", "b", "c"]
    assert tally.unconsumed == {"gif": 2, "other": 1}, tally.unconsumed
    assert tally.metrics()["data/unconsumed/gif"] == 2 and tally.report()["unconsumed"] == {"gif": 2, "other": 1}
    assert ".gif (2)" in tally.unconsumed_line()
    again = Tally.from_json(tally.to_json())
    assert again.unconsumed == tally.unconsumed


def test_audio_eval_holds_clips_at_the_rate_they_are_measured_at(tmp_path):
    """`tokenizers eval --modality audio` held up to 2,064 clips at their native rate (10 s at 192 kHz is
    7.7 MB each): each clip is resampled as it is read."""
    import io

    import numpy as np
    import soundfile as sf

    from omnistream.cli.tokenizers import _decoded, clip_reader
    from omnistream.modalities.audio import AudioModality
    from omnistream.pipelines.config import DataConfig

    buf = io.BytesIO()
    t = np.arange(2 * 192000) / 192000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), 192000, format="WAV")
    shard = tmp_path / "hi.tar"
    shard.write_bytes(tar_bytes([(f"c{i}.wav", buf.getvalue()) for i in range(3)]))
    mod = AudioModality({"sample_rate": 8000})
    clips = _decoded(DataConfig(), [str(shard)], mod, 3, convert=clip_reader(mod))
    assert [(c.sample_rate, len(c.wave)) for c in clips] == [(16000, 32000)] * 3
