import io
import pickle

import numpy as np
import pytest
from PIL import Image

from omnistream.common.errors import BadSample, UserError
from omnistream.modalities import registry
from omnistream.modalities.vocab import Vocabulary
from omnistream.pipelines.democorpus import draw_digit, dtmf, encode_audio
from omnistream.pipelines.records import read_shard


def _objects(mod, shards, n=30):
    out = []
    for s in shards:
        for r in read_shard(s, 1 << 26):
            for ext, data in r.fields.items():
                if ext in mod.keys:
                    out.append(mod.decode_bytes(ext, data))
            if len(out) >= n:
                return out
    return out


@pytest.mark.parametrize("name", ["text", "image", "audio"])
def test_roundtrip_within_declared_bound(fitted, corpus, name):
    mod = next(m for m in fitted if m.name == name)
    objs = _objects(mod, corpus["eval"])
    assert objs
    errs = []
    for o in objs:
        ids = mod.encode(o)
        assert ids.dtype == np.int64 and len(ids) > 0
        assert ids.min() >= 0 and ids.max() < mod.vocab_size
        assert np.array_equal(ids, mod.encode(o)), "encode must be deterministic"
        errs.append(mod.roundtrip_error(o, mod.decode(ids)))
    assert max(errs) <= mod.error_bound, (name, max(errs))


@pytest.mark.parametrize("name", ["text", "image", "audio"])
def test_decode_takes_any_sequence_of_its_block(fitted, name):
    """What a model generates reaches decode as it is: empty, one or two ids (a generation stopped early),
    any id of the block. Each is drawn, and written as the modality's file."""
    mod = next(m for m in fitted if m.name == name)
    rng = np.random.default_rng(0)
    seqs = [[], [0], [mod.vocab_size - 1], [0, mod.vocab_size - 1], list(range(mod.vocab_size))]
    seqs += [rng.integers(0, mod.vocab_size, n).tolist() for n in (1, 2, 3, 7, 40)]
    for ids in seqs:
        ext, data = mod.to_bytes(mod.decode(np.asarray(ids, dtype=np.int64)))
        assert ext in mod.keys and isinstance(data, bytes) and (data or name == "text"), (name, len(ids))


def test_text_roundtrip_is_exact_even_for_unseen_characters(fitted):
    text = next(m for m in fitted if m.name == "text")
    s = "naïve Zürich ✓ 数字 seven"
    assert text.decode(text.encode(s)) == s


def test_roundtrip_error_detects_a_wrong_reconstruction(fitted):
    """The bound is not vacuous: a different digit's reconstruction is far outside it."""
    import random

    image = next(m for m in fitted if m.name == "image")
    a, b = draw_digit(1, random.Random(0)), draw_digit(8, random.Random(1))
    assert image.roundtrip_error(a, image.decode(image.encode(b))) > image.error_bound
    audio = next(m for m in fitted if m.name == "audio")
    from omnistream.modalities.audio import Audio

    w1, sr1 = dtmf(1, random.Random(0))
    w9, sr9 = dtmf(9, random.Random(0))
    assert audio.roundtrip_error(Audio(w1, sr1), audio.decode(audio.encode(Audio(w9, sr9)))) > 0.05


def test_save_load_pickle_keep_the_fingerprint(fitted, tmp_path):
    for m in fitted:
        m.save(tmp_path / m.name)
        fresh = registry.build(m.name)
        fresh.load(tmp_path / m.name)
        assert fresh.fingerprint() == m.fingerprint()
        clone = pickle.loads(pickle.dumps(m))
        assert clone.fingerprint() == m.fingerprint()


def test_fingerprint_changes_with_fitted_state(fitted, corpus):
    from common import fit_modalities

    other = fit_modalities(corpus["train"][:1], {"image": {"codebook_size": 64, "seed": 5}}, names=("image",))[0]
    mine = next(m for m in fitted if m.name == "image")
    assert other.fingerprint() != mine.fingerprint()


def test_bad_bytes_raise_bad_sample(fitted):
    img, aud, txt = (next(m for m in fitted if m.name == n) for n in ("image", "audio", "text"))
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), "white").save(buf, format="PNG")
    good_png = buf.getvalue()
    cases = [
        (img, "png", b"", "image_empty"),
        (img, "png", good_png[: len(good_png) // 2], "image_undecodable"),
        (img, "jpg", b"\xff\xd8\xff" + b"garbage" * 20, "image_undecodable"),
        (aud, "wav", b"RIFF\x00\x00\x00\x00WAVEjunk", "audio_header_mismatch"),  # a WAVE with no data chunk
        (aud, "flac", b"fLaC" + bytes(40), "audio_undecodable"),
        (aud, "wav", b"", "audio_empty"),
        (txt, "txt", b"\xff\xfe\x00bad", "text_not_utf8"),
        (txt, "txt", b"x" * (txt.options.max_bytes + 1), "text_too_long"),
    ]
    for mod, ext, data, reason in cases:
        with pytest.raises(BadSample) as e:
            mod.decode_bytes(ext, data)
        assert e.value.reason == reason, (ext, e.value.reason)


def test_decompression_bomb_refused_before_decoding():
    img = registry.build("image", {"max_pixels": 10_000})
    buf = io.BytesIO()
    Image.new("L", (200, 200)).save(buf, format="PNG")
    with pytest.raises(BadSample) as e:
        img.decode_bytes("png", buf.getvalue())
    assert e.value.reason == "image_too_large"


def test_audio_too_long_and_nan_are_refused():
    import random

    aud = registry.build("audio", {"max_seconds": 0.1})
    w, sr = dtmf(3, random.Random(0))
    _, data = encode_audio(w, sr, random.Random(1))
    with pytest.raises(BadSample, match="audio_too_long"):
        aud.decode_bytes("wav", data)
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.full(800, np.nan, np.float32), 8000, format="WAV", subtype="FLOAT")
    with pytest.raises(BadSample, match="audio_not_finite"):
        registry.build("audio").decode_bytes("wav", buf.getvalue())


def test_vocabulary_layout_and_mismatch(fitted, bundle, tmp_path):
    v = Vocabulary.load(bundle, ["text", "image", "audio"])
    assert [v.begin(n) for n in v.names] == [3, 5, 7]
    lo_t, hi_t = v.block("text")
    lo_i, hi_i = v.block("image")
    assert lo_t == 9 and hi_t == lo_i and v.block("audio")[1] == v.size
    toks, mods = v.document([("image", np.arange(4)), ("text", np.arange(2))])
    assert toks[0] == 1 and toks[-1] == 2
    assert list(toks[1:7]) == [v.begin("image"), lo_i, lo_i + 1, lo_i + 2, lo_i + 3, v.end("image")]
    assert set(mods[1:7]) == {2} and set(mods[7:11]) == {1}
    with pytest.raises(UserError, match="config asks for"):
        Vocabulary.load(bundle, ["image", "text", "audio"])
    with pytest.raises(ValueError):
        v.to_global("image", np.array([v.by_name["image"].vocab_size]))
    from omnistream.modalities.vocab import describe_mismatch

    other = v.layout()
    other["modalities"] = other["modalities"][:2]
    assert "'audio' is missing now" in describe_mismatch(v.layout(), other)


def test_kmeans_audio_with_more_mels_than_its_fft_resolves_still_decodes():
    """80 mels on a 512-point FFT at 16 kHz leave the lowest mel filters without a bin: the inverse mel
    system is rank-deficient, which torch's default least-squares driver refused (a crash in decode)."""
    from common import speechlike
    from omnistream.modalities.audio import Audio, AudioModality

    km = AudioModality({"sample_rate": 16000, "hop": 107, "n_fft": 512, "n_mels": 80, "codebook_size": 32})
    clips = [Audio(speechlike(1.5, 16000, seed=i), 16000) for i in range(3)]
    km.fit([km.fit_features(a) for a in clips])
    out = km.decode(km.encode(clips[0]))
    # features are whole frames (no centring): the decoded clip is the input less at most one FFT and one hop
    assert len(out.wave) >= len(clips[0].wave) - 512 - 107 and np.isfinite(out.wave).all()
