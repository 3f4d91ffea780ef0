"""Sampling and spans that always decode (issue 37, first part): model.pick's temperature / top-k / top-p, a
seed that reproduces a draw, top-k 1 equal to greedy, the per-place rule a modality's `span` gives, and
sampled spans of every built-in modality decoding, through the KV cache, from a model that knows nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import SMALL_OPTIONS
from omnistream.modalities.vocab import Vocabulary
from omnistream.model.config import GPTConfig
from omnistream.model.model import GPT, generate, pick
from omnistream.serving.generate import Sampling, generate_ids, generate_many


def _model(vocab_size=50, seq=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layers=2, n_heads=2, d_model=32, max_seq_len=seq)).eval()


def test_a_seed_reproduces_a_sample_and_top_k_1_is_greedy():
    m = _model()
    prompts = [[1, 2, 3], [1, 4, 5, 6, 7]]

    def draw(seed, **kw):
        return generate(m, prompts, 12, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = draw(7, temperature=1.0), draw(7, temperature=1.0)
    assert a == b  # the same seed, the same samples
    assert any(draw(s, temperature=1.0) != a for s in (8, 9, 10))  # and the seed matters
    greedy = generate(m, prompts, 12)
    assert draw(7, temperature=1.5, top_k=1) == greedy == draw(3, temperature=0.0)
    assert a != greedy  # at temperature 1 a random model's draw is not its argmax


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(pick(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax: 0.64, 0.24, 0.09, ...: the nucleus reaching 0.8 is the first two tokens
    assert set(pick(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(pick(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    full = pick(logits, 1.0, generator=g)
    assert len(set(full.tolist())) >= 5
    freq = np.bincount(full.numpy(), minlength=6) / len(full)
    assert abs(freq[0] - 0.636) < 0.04  # sampled at its softmax probability


def test_the_rule_holds_every_place_of_the_span():
    """A rule of three places in [10, 14), then [20, 22) where the stop may come, then only the stop."""
    m = _model()

    def rule(i):
        return (10, 14, False) if i < 3 else (20, 22, True) if i < 5 else (0, 0, True)

    for seed in range(20):
        (out,) = generate(
            m, [[1, 2]], 20, stop_token=7, rule=rule, temperature=2.0, generator=torch.Generator().manual_seed(seed)
        )
        assert all(10 <= t < 14 for t in out[:3]) and out[-1] == 7 and 4 <= len(out) <= 6
        assert all(20 <= t < 22 for t in out[3:-1])


@pytest.mark.parametrize("dst", ["text", "image", "audio"])
def test_sampled_spans_of_every_modality_decode(bundle, dst):
    """A model that knows nothing, sampled at temperature 2 (any id the rule allows): 60 spans of each
    modality, 20 prompts x 3 samples in one batch, all decode; an image span is exactly its ids per image."""
    vocab = Vocabulary.load(bundle, SMALL_OPTIONS)
    m = _model(vocab.size, 256)
    items = [("text", f"a picture of {w}") for w in ("one", "two", "three", "four", "five")] * 4
    sampling = Sampling(temperature=2.0, seed=1)
    outs = generate_many(m, vocab, items, dst, 80, sampling, samples=3)
    assert len(outs) == 20 and all(len(o) == 3 for o in outs)
    prompts = [vocab.prompt("text", vocab.by_name["text"].encode(t), dst) for _, t in items]
    spans = generate_ids(m, vocab, prompts, dst, 80, sampling)
    lo, hi = vocab.block(dst)
    assert all(lo <= t < hi for s in spans for t in s if t != vocab.end(dst))
    if dst == "image":
        side = vocab.by_name["image"].side
        assert all(len(s) == side * side + 1 and s[-1] == vocab.end("image") for s in spans)


def test_guidance_at_scale_1_is_the_prompt_and_at_0_the_unconditional_prompt():
    """u + s·(c − u): s = 1 gives the prompt's own continuation, s = 0 the unconditional prompt's; both halves
    run in one batch and go on with the same tokens."""
    m = _model()
    prompts, uncond = [[1, 2, 3, 4], [1, 5, 6]], [[1, 9], [1, 9]]
    assert generate(m, prompts, 10, uncond=uncond, cfg_scale=1.0) == generate(m, prompts, 10)
    assert generate(m, prompts, 10, uncond=uncond, cfg_scale=0.0) == generate(m, uncond, 10)
    # with a stop token: each row ends at its own
    stop = generate(m, prompts, 10)[0][2]
    assert generate(m, prompts, 10, stop_token=stop, uncond=uncond, cfg_scale=1.0) == generate(
        m, prompts, 10, stop_token=stop
    )
    # between and beyond: the first token is the argmax of u + s·(c − u) of the two prompts' own logits
    for s in (0.5, 3.0, -2.0):
        for p, q in zip(prompts, uncond):
            c = m(torch.tensor([p]), torch.arange(len(p))[None], torch.ones(1, len(p), dtype=torch.long))[0, -1]
            u = m(torch.tensor([q]), torch.arange(len(q))[None], torch.ones(1, len(q), dtype=torch.long))[0, -1]
            got = generate(m, [p], 1, uncond=[q], cfg_scale=s)[0][0]
            assert got == int((u + s * (c - u)).argmax()), (s, p)


def test_condition_dropout_keeps_the_last_part_at_its_rate_and_draws_nothing_at_0(bundle):
    """data.cfg_dropout = 0.3: about 3 in 10 documents of several parts are their last part alone, the one the
    whole document ends with; one-part documents stay; at 0 every document is what it was, and the record's
    random draws are untouched (the stream is bit-identical to one without the setting)."""
    import random

    from omnistream.pipelines.config import DataConfig
    from omnistream.pipelines.documents import make_document
    from omnistream.pipelines.plan import stream_settings

    vocab = Vocabulary.load(bundle, SMALL_OPTIONS)
    parts = [("text", np.array([1, 2, 3])), ("image", np.arange(vocab.by_name["image"].side ** 2) % 8)]
    dropped, n = 0, 2000
    for i in range(n):
        full, _, _ = make_document(vocab, parts, False, "random", random.Random(i))
        a = random.Random(i)
        zero, _, _ = make_document(vocab, parts, False, "random", a, 0.0)
        assert np.array_equal(zero, full) and a.random() == (lambda r: (r.shuffle(list(parts)), r.random())[1])(
            random.Random(i)
        )
        some, _, _ = make_document(vocab, parts, False, "random", random.Random(i), 0.3)
        if len(some) < len(full):
            dropped += 1
            last = full[-(len(some) - 1) :]  # its last part, markers included, and <eos>
            assert some[0] == full[0] and np.array_equal(some[1:], last)
        one, _, _ = make_document(vocab, parts[:1], False, "random", random.Random(i), 0.3)
        assert len(one) == 2 + 3 + 2
    assert abs(dropped / n - 0.3) < 0.04
    base = DataConfig()
    assert "cfg_dropout" not in stream_settings(base, 0, 8, "d", 128)  # checkpoints made before resume as they did
    assert stream_settings(base.model_copy(update={"cfg_dropout": 0.1}), 0, 8, "d", 128)["cfg_dropout"] == 0.1


def test_a_runs_generate_defaults_are_the_starting_point_and_what_is_asked_wins():
    """[generate.<modality>] is validated against the run's modalities, and sampling_for starts from the
    target's defaults, each option asked for (not None) replacing its default; other targets stay greedy."""
    from omnistream.common.errors import UserError
    from omnistream.configs import load_config
    from omnistream.serving.generate import sampling_for

    cfg = load_config(
        None, ["generate.image.cfg_scale=3", "generate.image.temperature=0.7", "generate.text.max_new_tokens=20"]
    )
    defaults = cfg.model_dump()["generate"]
    s, n = sampling_for(defaults, "image")
    assert (s.cfg_scale, s.temperature, s.top_k, n) == (3.0, 0.7, 0, None)
    s, n = sampling_for(defaults, "image", temperature=None, top_k=5, cfg_scale=1.0, max_new_tokens=16)
    assert (s.cfg_scale, s.temperature, s.top_k, n) == (1.0, 0.7, 5, 16)
    assert sampling_for(defaults, "text") == (Sampling(), 20)
    assert sampling_for(defaults, "audio") == (Sampling(), None)
    with pytest.raises(UserError, match="generate names"):
        load_config(None, ["generate.video.temperature=1"])
    with pytest.raises(UserError, match="top_p"):
        load_config(None, ["generate.text.top_p=0"])
