"""The learned image tokenizer (`image` with tokenizer = "fsq"): the quantiser, the kit, persistence."""

import json

import numpy as np
import pytest
import torch

from omnistream.common.errors import UserError
from omnistream.modalities import fsq, registry
from omnistream.modalities.conformance import check_modality
from omnistream.pipelines.records import read_shard

ImageModality = registry.get("image")
TINY = {"tokenizer": "fsq", "size": 16, "down": 4, "width": 32, "levels": [8, 5, 5], "fit_steps": 700, "fit_batch": 16}


def test_fsq_quantisation_is_exact_and_its_codes_cover_the_codebook():
    q = fsq.FSQ([8, 5, 5, 5])
    K = q.codebook_size
    assert K == 1000
    # every latent, however large, gets a code in [0, K), and the decoder's input follows from the code alone
    z = torch.randn(64, 4, 6, 6) * 5
    codes = q.codes(z)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) < K
    assert torch.equal(q(z), q.latents(codes))
    # per channel, one latent for each of its levels (a sweep finds them); their product reaches every code
    sweep = torch.linspace(-8, 8, 4001)
    reps = []
    for c, L in enumerate(q.levels):
        z1 = torch.zeros(len(sweep), len(q.levels), 1, 1)
        z1[:, c, 0, 0] = sweep
        digit = (q.codes(z1).flatten() // int(q._basis.flatten()[c])) % L
        assert sorted(set(digit.tolist())) == list(range(L)), f"channel {c} reaches only {set(digit.tolist())}"
        reps.append(torch.stack([sweep[(digit == d).nonzero()[0, 0]] for d in range(L)]))
    grid = torch.stack(torch.meshgrid(*reps, indexing="ij"), 0).reshape(len(q.levels), -1).T.reshape(-1, 4, 1, 1)
    all_codes = q.codes(grid)
    assert sorted(all_codes.flatten().tolist()) == list(range(K))
    assert torch.equal(q(grid), q.latents(all_codes))
    # the straight-through rounding passes gradients
    z.requires_grad_(True)
    q(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def _images(corpus, n):
    out = []
    for s in corpus["train"]:
        for r in read_shard(s, 1 << 26):
            out += [(e, d) for e, d in r.fields.items() if e in ImageModality.keys]
            if len(out) >= n:
                return out
    return out


@pytest.fixture(scope="module")
def learned(corpus):
    """The learned tokenizer through the conformance kit, on the demo's digits (a few seconds)."""
    mod = check_modality(ImageModality, _images(corpus, 48), options=TINY)
    assert mod.vocab_size == 200 and mod.tokens_per_image == 16
    return mod


def test_the_learned_tokenizer_passes_the_kit_in_colour(learned, corpus):
    rep = learned.fit_report()
    assert len(rep["metrics"]["loss"]) == len(rep["steps"]) > 10
    assert rep["metrics"]["loss"][-1] < rep["metrics"]["loss"][0]
    assert rep["images"]["reconstructions"][:4] == b"\x89PNG"
    # colour survives: a red and a blue image come back red and blue (k-means' default is grey)
    from PIL import Image

    for rgb in ((220, 30, 30), (30, 30, 220)):
        back = np.asarray(learned.decode(learned.encode(Image.new("RGB", (16, 16), rgb))), dtype=float).mean((0, 1))
        assert np.argmax(back) == np.argmax(rgb), (rgb, back)


def test_the_fingerprint_follows_the_weights(learned):
    fp = learned.fingerprint()
    st = learned._state()
    k = next(iter(st))
    st[k] = st[k].copy()
    st[k].flat[0] += 1e-3
    other = ImageModality(learned.options)
    other._set_state(st)
    other._mark_fitted()
    assert other.fingerprint() != fp
    same = ImageModality(learned.options)
    same._set_state(learned._state())
    same._mark_fitted()
    assert same.fingerprint() == fp


def test_saved_weights_are_safetensors_and_a_tampered_file_is_refused(learned, tmp_path):
    learned.save(tmp_path)
    from safetensors.numpy import load_file

    weights = load_file(str(tmp_path / "state.safetensors"))
    assert any(k.startswith("ae.encoder") for k in weights) and any(k.startswith("ae.decoder") for k in weights)
    assert "weights_sha256" in json.loads((tmp_path / "state.json").read_text())
    back = ImageModality()
    back.load(tmp_path)
    assert back.fingerprint() == learned.fingerprint()
    data = bytearray((tmp_path / "state.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (tmp_path / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        ImageModality().load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "state.safetensors" in msg and "sha256" in msg


def test_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="down"):
        ImageModality({"tokenizer": "fsq", "size": 64, "down": 2})
    with pytest.raises(ValueError, match="65,536"):
        ImageModality({"tokenizer": "fsq", "size": 64, "levels": [16, 16, 16, 16, 2]})
    with pytest.raises(ValueError, match="multiple of down"):
        ImageModality({"tokenizer": "fsq", "size": 60, "down": 8})
    d = ImageModality({"tokenizer": "fsq", "size": 64})  # the defaults: 64 ids per image, 1,000 codes
    assert (d.tokens_per_image, d.vocab_size) == (64, 1000)


def test_the_chroma_weight_scales_colour_error_and_leaves_brightness_error_alone():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    luma_only = torch.full((1, 3, 1, 1), 0.1)  # a grey shift: all luma, no colour
    colour_only = torch.tensor([0.1, -0.1, 0.1 * 0.288 / 0.114]).view(1, 3, 1, 1)  # 0.299 - 0.587 + 0.288 = 0
    assert abs(float((colour_only.flatten() * torch.tensor(fsq.LUMA)).sum())) < 1e-6
    for g in (0.0, 0.3):
        plain = fsq.loss_fn(x, x + colour_only, g)
        assert torch.isclose(fsq.loss_fn(x, x + colour_only, g, chroma_weight=0.1), 0.1 * plain)
        assert float(fsq.loss_fn(x, x + luma_only, g, chroma_weight=0.1)) == pytest.approx(0.01, rel=1e-5)
    # options at their defaults stay out of the fingerprint (fsq bundles saved before them keep theirs)
    opts = ImageModality({"tokenizer": "fsq", "size": 16, "down": 4})._fingerprint_options()
    assert "fit_chroma_weight" not in opts and "fit_grad_weight" not in opts
    assert (
        ImageModality({"tokenizer": "fsq", "size": 16, "down": 4, "fit_chroma_weight": 0.1})._fingerprint_options()[
            "fit_chroma_weight"
        ]
        == 0.1
    )


def test_psnr_and_ssim_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.all(fsq.psnr(a, a) > 99) and np.allclose(fsq.ssim(a, a), 1.0)
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(fsq.psnr(a, b), 10 * np.log10(255**2 / mse))
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert np.all(fsq.ssim(a, noisy) < fsq.ssim(a, b))


def test_a_kmeans_bundle_fitted_before_the_fsq_options_still_loads(corpus, tmp_path):
    """A bundle's vocab.json records each tokenizer's options and fingerprint. The fsq fields added to the
    image options must neither change a k-means tokenizer's fingerprint nor count as a config mismatch,
    or every bundle (and token cache, and checkpoint) fitted before them would stop loading."""
    import hashlib

    import numpy as np
    from safetensors.numpy import load_file

    from omnistream.modalities.vocab import Vocabulary, layout_fingerprint

    opts = {"size": 16, "codebook_size": 32}
    km = ImageModality(opts)
    km.fit([km.fit_features(km.decode_bytes(e, d)) for e, d in _images(corpus, 40)])
    Vocabulary([km]).save(tmp_path)
    # rewrite it as the code before this change wrote it: no fsq options, numpy's .npz, no sha256
    d = tmp_path / "image"
    meta = json.loads((d / "state.json").read_text())
    meta["options"] = {k: v for k, v in meta["options"].items() if k not in ImageModality.FSQ_ONLY}
    meta.pop("weights_sha256")
    (d / "state.json").write_text(json.dumps(meta))
    np.savez(d / "state.npz", **load_file(str(d / "state.safetensors")))
    (d / "state.safetensors").unlink()
    # the fingerprint as that code computed it: sha256 over name, version, its options and the codebook
    h = hashlib.sha256(b"image\x001\x00")
    h.update(json.dumps(meta["options"], sort_keys=True).encode())
    h.update(b"{}")
    cb = np.ascontiguousarray(km._codebook)
    h.update(f"codebook:{cb.dtype.str}:{cb.shape}".encode())
    h.update(cb.tobytes())
    old_fp = h.hexdigest()[:16]
    layout = json.loads((tmp_path / "vocab.json").read_text())
    for m in layout["modalities"]:
        m["options"] = {k: v for k, v in m["options"].items() if k not in ImageModality.FSQ_ONLY}
        m["fingerprint"] = old_fp
    layout["fingerprint"] = layout_fingerprint(layout)
    (tmp_path / "vocab.json").write_text(json.dumps(layout))

    back = Vocabulary.load(tmp_path, {"image": opts})
    assert back.by_name["image"].fingerprint() == km.fingerprint() == old_fp
    assert back.fingerprint == layout["fingerprint"]
