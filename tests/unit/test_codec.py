"""The learned audio codec (`audio` with tokenizer = "codec"), unfitted: the stream layout, long clips in windows,
the options. Fitted: tests/integration/test_codec_fit.py."""

import json

import numpy as np
import pytest
import torch

from common import speechlike
from omnistream.modalities import codec, registry

AudioModality = registry.get("audio")


def test_several_codebooks_flatten_frame_by_frame_each_in_its_own_range_and_back_exactly():
    rng = np.random.default_rng(0)
    for groups, C in ((1, 7), (3, 1000), (8, 125)):
        codes = rng.integers(0, C, size=(50, groups))
        ids = codec.flatten(codes, C)
        assert ids.shape == (50 * groups,)
        # position g of every frame lies in codebook g's range
        assert np.all(ids.reshape(-1, groups) // C == np.arange(groups))
        assert np.array_equal(codec.unflatten(ids, groups, C), codes)
        # a generation cut mid-frame drops the part-frame; a slip into another range keeps its own code
        assert np.array_equal(codec.unflatten(ids[:-1], groups, C), codes[:-1])
        slipped = ids.copy()
        slipped[0] = (groups - 1) * C + int(codes[0, 0])
        assert np.array_equal(codec.unflatten(slipped, groups, C), codes)


def test_a_long_clip_in_windows_codes_and_decodes_as_if_whole():
    """The codec's convolutions see a bounded context and nothing normalises across time, so windows with
    MARGIN frames of context each side give the codes (and the waveform) of the clip coded whole, for any
    weights: here untrained ones."""
    torch.manual_seed(0)
    net = codec.Codec(160, [5, 5, 5], 2, 32).eval()
    wave = speechlike(9.0, 8000)
    whole = codec.encode_waves(net, [wave], window=10_000)[0]
    windowed = codec.encode_waves(net, [wave], window=40)[0]
    assert whole.shape == windowed.shape == (450, 2)
    assert (whole == windowed).mean() > 0.999  # float sums in another order may tip a rare rounding
    a = codec.decode_codes(net, [whole], window=10_000)[0]
    b = codec.decode_codes(net, [whole], window=37)[0]
    assert a.shape == b.shape == (450 * 160,)
    assert np.abs(a - b).max() < 1e-4 * max(np.abs(a).max(), 1e-6)


def test_codec_options_default_to_150_ids_a_second_and_say_what_is_wrong():
    d = AudioModality({"tokenizer": "codec"})
    assert (d.options.sample_rate, d.options.hop, d.options.groups, d.vocab_size) == (16000, 320, 3, 3000)
    assert d.options.sample_rate / d.options.hop * d.options.groups == 150
    assert AudioModality({"tokenizer": "codec", "sample_rate": 24000}).options.sample_rate == 24000
    assert AudioModality().options.sample_rate == 8000  # k-means keeps its own defaults
    with pytest.raises(ValueError, match="even"):
        AudioModality({"tokenizer": "codec", "hop": 321})
    with pytest.raises(ValueError, match="65,536"):
        AudioModality({"tokenizer": "codec", "levels": [16, 16, 16, 16, 2]})
    # the codec's options stay out of a k-means tokenizer's fingerprint, and k-means' out of the codec's
    assert "groups" not in AudioModality()._fingerprint_options()
    assert "n_mels" not in d._fingerprint_options() and d._fingerprint_options()["tokenizer"] == "codec"
    json.dumps(d._fingerprint_options())


def test_the_audio_eval_scores_a_clip_against_itself_and_against_a_damaged_copy():
    from omnistream.modalities import audio_eval
    from omnistream.modalities.audio import Audio

    clean = Audio(speechlike(3.0, 16000, seed=3), 16000)
    rng = np.random.default_rng(0)
    noisy = Audio(clean.wave + rng.normal(0, 0.1, len(clean.wave)).astype(np.float32), 16000)
    # the same clip at another rate and level is the same speech: STOI 1, mel distance near 0
    same = audio_eval.scores([clean], [Audio(clean.wave[::2] * 3, 8000)])
    worse = audio_eval.scores([clean], [noisy])
    assert same["stoi"] > 0.9 and worse["stoi"] < same["stoi"] - 0.1
    assert worse["mel_distance_db"] > same["mel_distance_db"] + 1
    # k-means at the same ids per second as the default codec: 150 a second
    assert audio_eval.ids_per_second(AudioModality({"tokenizer": "codec"})) == 150


def test_the_envelope_term_follows_each_bands_loudness_over_time_not_its_level():
    """The loss's envelope term (STOI's comparison): nothing for the clip itself or the clip louder, where
    the log-mel term sees the level; a clip whose loudness moves otherwise costs it."""
    loss = codec.Loss(16000, envelope_weight=60.0)
    x = torch.from_numpy(speechlike(2.0, 16000, seed=1))[None]
    shifted = torch.roll(x, 4000, -1)  # the same sounds a quarter second later: other envelopes

    def envelope_term(y):
        return float(loss.envelope_loss(x, y))

    assert envelope_term(x) < 1e-4 and envelope_term(2 * x) < 1e-4 and envelope_term(shifted) > 0.3
    assert float(loss(x, 2 * x)[1]) > 0.3  # the log-mel L1 at 80 bands: up to log 2 = 0.69 a band, less at the floor
