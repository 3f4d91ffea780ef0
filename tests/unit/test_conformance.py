"""The built-in modalities pass the conformance kit a plugin author would use."""

import pytest

from omnistream.common.errors import ConformanceError
from omnistream.modalities import registry
from omnistream.modalities.conformance import check_modality
from omnistream.pipelines.records import read_shard


def _samples(corpus, keys, n=24):
    out = []
    for s in corpus["train"]:
        for r in read_shard(s, 1 << 26):
            out += [(e, d) for e, d in r.fields.items() if e in keys]
            if len(out) >= n:
                return out
    return out


@pytest.mark.parametrize(
    "name,options",
    [
        ("text", {"vocab_size": 300}),
        ("image", {"size": 16, "codebook_size": 32}),
        ("audio", {"codebook_size": 16}),
    ],
)
def test_builtin_passes_the_kit(corpus, name, options):
    cls = registry.get(name)
    mod = check_modality(cls, _samples(corpus, cls.keys), options=options)
    assert mod.is_fitted


ImageModality = registry.get("image")


class OutOfRange(ImageModality):
    name = "outofrange"

    def encode(self, obj):
        return super().encode(obj) + self.vocab_size


class Crashes(ImageModality):
    name = "crashes"

    def decode_bytes(self, ext, data):
        if len(data) < 100:
            raise ValueError("boom")
        return super().decode_bytes(ext, data)


class ShortDecodeFails(ImageModality):
    name = "shortdecode"

    def decode(self, ids):
        if len(ids) < 3:  # as a decoder that needs a whole frame would
            raise IndexError("too few ids")
        return super().decode(ids)


class OneTooSmall(ImageModality):
    name = "onetoosmall"

    @property
    def vocab_size(self) -> int:  # the last code is never in the samples' encodings, but it is a code
        return super().vocab_size - 1


class SpanPastItsBlock(ImageModality):
    name = "spanpast"

    def span(self, position):  # allows ids the model's block for it does not hold
        return 0, self.vocab_size + 3, position > 0


class SpanWithoutEnd(ImageModality):
    name = "spanwithoutend"

    def span(self, position):  # a span the model could never close
        return 0, self.vocab_size, False


def test_the_kit_holds_a_plugins_spans_to_what_it_can_decode(corpus):
    """The built-ins' spans (an image exactly its ids then its end; a codec frame's ids in their codebooks)
    decode when drawn at random (test_builtin_passes_the_kit); a span past the block, or one that never lets
    a span end, fails the kit."""
    samples = _samples(corpus, ImageModality.keys, 12)
    opts = {"size": 16, "codebook_size": 16}
    with pytest.raises(ConformanceError, match=r"'spanpast' fails 'span': span\(0\) = \(0, 19, False\)"):
        check_modality(SpanPastItsBlock, samples, options=opts, subprocess=False)
    with pytest.raises(ConformanceError, match="'spanwithoutend' fails 'span': span.. lets no span end"):
        check_modality(SpanWithoutEnd, samples, options=opts, subprocess=False)


def test_the_kit_catches_a_broken_plugin(corpus):
    """A plugin whose ids leave its range, one that crashes on bad bytes, one whose decode refuses short
    sequences, one whose vocab_size is one too small, one that cannot be pickled."""
    samples = _samples(corpus, ImageModality.keys, 12)
    opts = {"size": 16, "codebook_size": 16}
    with pytest.raises(ConformanceError, match="'outofrange' fails 'encode': ids outside"):
        check_modality(OutOfRange, samples, options=opts, subprocess=False)
    with pytest.raises(ConformanceError, match="'crashes' fails 'bad bytes'.*ValueError"):
        check_modality(Crashes, samples, options=opts, subprocess=False)
    with pytest.raises(ConformanceError, match="'shortdecode' fails 'decode any ids'.* of 0 ids raised IndexError"):
        check_modality(ShortDecodeFails, samples, options=opts, subprocess=False)
    with pytest.raises(ConformanceError, match="'onetoosmall' fails 'encode': ids outside"):
        check_modality(OneTooSmall, samples, options=opts, subprocess=False)

    class Local(ImageModality):  # defined in a function: Ray could not ship it to an actor
        name = "local"

    with pytest.raises(ConformanceError, match="'local' fails 'pickle'"):
        check_modality(Local, samples, options=opts, subprocess=False)


def test_the_guides_minimal_plugin_passes_the_kit():
    """docs/plugins.md shows examples/minimal/sensor.py whole; it must stay a working plugin."""
    import sys
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(0)
    samples = [
        ("csv", ",".join(f"{v:.4f}" for v in np.sin(np.linspace(0, rng.uniform(1, 9), 50)) * 3).encode())
        for _ in range(20)
    ]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "minimal"))
    try:  # on the path while the kit pickles it into a fresh process
        from sensor import SensorModality

        mod = check_modality(
            SensorModality,
            samples,
            options={"levels": 128},
            bad_samples=[("csv", b"1,2,x"), ("csv", b""), ("csv", b"nan,1")],
        )
    finally:
        sys.path.pop(0)
    assert mod.vocab_size == 128
