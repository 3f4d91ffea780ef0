"""`python benchmarks/generation.py [MODEL]`: what the trained demo model draws and dials, judged by something
it does not grade itself, and what generation costs.

(1) Judges fitted here on the demo corpus's own media (never on the model's output):
    - digits: three small CNNs (logits averaged) on grey pixels of the training split's images (4 shards),
      read at the resolution the model draws at (the image tokenizer's size: 16×16 in the demo; a judge
      reading sharper pictures than a model can draw measures the resolution, not the digit), its accuracy on
      the held-out split's images, and on the same images through the demo's image tokenizer (encoded and
      decoded: the best a model drawing through it could score), printed beside it;
    - DTMF: the Goertzel power of the keypad's 8 tones (697-941 Hz rows, 1209-1633 Hz columns) over the
      clip, the strongest row and column naming the key; its accuracy on the held-out clips, and on the
      same clips through the demo's audio tokenizer, printed too.
(2) The model is asked for text->image and text->audio for every digit, PROMPTS captions each (the corpus's
    own caption phrases), greedy and sampled (temperature 0.7), each without and with classifier-free
    guidance (scale 3, the unconditional prompt [<bos>, <begin:image>]), and with the model's own
    [generate.<modality>] defaults (what `omnistream generate` does unasked); accuracy = share of outputs the
    judge names as the asked digit (chance 0.1). Targets: >= 0.9 text->image with guidance, >= 0.9 text->audio.
(3) Every sampled span decodes: SPANS spans per modality at temperature 1.5, counted.
(4) Speed: a 1,024-token span with the KV cache against recomputing the whole sequence each step (a model of
    the demo's width, 1,100 positions), and a batch of 16 prompts against 16 single prompts.

MODEL: an exported model folder (default: the newest runs/ray/demo-*-export, which `make demo` writes).
Figures go to stdout and generation.json. No timing is asserted.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from figures import report  # benchmarks/figures.py (the script's folder is on sys.path)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPTS = int(os.environ.get("BENCH_GEN_PROMPTS", "30"))  # captions per digit, per setting (300 prompts: ±0.02)
SPANS = int(os.environ.get("BENCH_GEN_SPANS", "1000"))
JUDGES = 3  # CNNs in the digit judge, their logits averaged
KEYS = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
        7: (852, 1209), 8: (852, 1336), 9: (852, 1477), 0: (941, 1336)}  # fmt: skip
ROWS, COLS = (697, 770, 852, 941), (1209, 1336, 1477, 1633)


def pixels(im, side: int) -> np.ndarray:
    """side×side grey (the resolution the model draws at: the image tokenizer's `size`), standardised per image
    (the judge sees shape, not the background's colour). Every image the judge sees, the corpus's and the
    model's, is read the same way, so a digit is judged by what a side×side picture can show."""
    a = np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32)
    return (a - a.mean()) / (a.std() + 1e-6)


def fit_digit_judge(train: list[tuple[np.ndarray, int]], epochs: int = 30, seeds: int = JUDGES):
    """`seeds` small CNNs (two conv layers, 16 and 32 channels, each its own seed and shifts of a pixel drawn per
    batch) fitted on the corpus's own images; their averaged logits name the digit (one network's verdict on
    an ambiguous drawing moved by 0.08 between seeds; the average by less)."""
    x = torch.tensor(np.stack([p for p, _ in train]))[:, None]
    y = torch.tensor([d for _, d in train])
    side = x.shape[-1]
    nets = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * (side // 4) ** 2, 10),
        )  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        shifts = np.random.default_rng(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(128):
                xb = torch.roll(x[idx], shifts=tuple(int(v) for v in shifts.integers(-1, 2, 2)), dims=(2, 3))
                loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        nets.append(net.eval())

    @torch.no_grad()
    def judge(p: np.ndarray) -> int:
        t = torch.tensor(p)[None, None]
        return int(sum(net(t) for net in nets).argmax())

    return judge


def goertzel(wave: np.ndarray, rate: int, f: float) -> float:
    """Power of frequency f in the wave (Goertzel's recurrence: one DFT bin, no FFT)."""
    w = 2 * np.pi * f / rate
    c, s1, s2 = 2 * np.cos(w), 0.0, 0.0
    for x in wave.astype(np.float64):
        s1, s2 = x + c * s1 - s2, s1
    return s1 * s1 + s2 * s2 - c * s1 * s2


def dial(wave: np.ndarray, rate: int) -> int | None:
    lo = max(ROWS, key=lambda f: goertzel(wave, rate, f))
    hi = max(COLS, key=lambda f: goertzel(wave, rate, f))
    return next((d for d, k in KEYS.items() if k == (lo, hi)), None)


def media(shard: str) -> tuple[list, list]:
    """(image, digit) and (wave, rate, digit) of a demo shard's single-digit records."""
    import soundfile as sf

    from omnistream.pipelines.records import read_shard

    images, clips = [], []
    for r in read_shard(shard, 1 << 26):
        labels = json.loads(r.fields.get("json", b"{}") or b"{}")
        if "digit" not in labels:
            continue
        for ext, data in r.fields.items():
            if ext in ("jpg", "png"):
                images.append((Image.open(io.BytesIO(data)), labels["digit"]))
            elif ext in ("wav", "flac"):
                w, sr = sf.read(io.BytesIO(data), dtype="float32")
                clips.append((w, sr, labels["digit"]))
    return images, clips


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _roundtrip(aud, wave: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV")
    back = aud.decode(aud.encode(aud.decode_bytes("wav", buf.getvalue())))
    return back.wave, back.sample_rate


def quality(model, vocab, data_dir: str, defaults: dict) -> dict:
    from omnistream.pipelines.democorpus import PHRASES, WORDS
    from omnistream.serving.generate import Sampling, generate_many, sampling_for

    train_imgs = [x for s in sorted(glob.glob(f"{data_dir}/train-*.tar"))[:4] for x in media(s)[0]]
    held_imgs, held_clips = media(f"{data_dir}/eval-000.tar")
    img, aud = vocab.by_name["image"], vocab.by_name["audio"]
    side = img.options.size
    judge = fit_digit_judge([(pixels(im, side), d) for im, d in train_imgs])

    def share(hits) -> float:
        return round(float(np.mean(list(hits))), 3)

    out = {
        "judge_digit_accuracy_on_held_out_images": share(judge(pixels(im, side)) == d for im, d in held_imgs),
        # the best a model drawing through this tokenizer could do: the held-out images encoded and decoded
        "judge_digit_accuracy_on_their_tokenizer_roundtrip": share(
            judge(pixels(img.decode(img.encode(img.decode_bytes("png", _png(im)))), side)) == d for im, d in held_imgs
        ),
        "judge_dtmf_accuracy_on_held_out_clips": share(dial(w, sr) == d for w, sr, d in held_clips),
        "judge_dtmf_accuracy_on_their_tokenizer_roundtrip": share(
            dial(*_roundtrip(aud, w, sr)) == d for w, sr, d in held_clips[:100]
        ),
    }
    rng = random.Random(0)
    asks = [
        (d, rng.choice(PHRASES).format(w=WORDS[d], W=WORDS[d].capitalize(), d=d))
        for d in range(10)
        for _ in range(PROMPTS)
    ]
    settings = {
        "greedy": Sampling(),
        "greedy_guided": Sampling(cfg_scale=3.0),
        "sampled": Sampling(temperature=0.7, seed=1),
        "sampled_guided": Sampling(temperature=0.7, seed=1, cfg_scale=3.0),
    }
    for dst in ("image", "audio"):
        # and what `omnistream generate` does unasked: the model's own [generate.<dst>] defaults
        model_defaults, _ = sampling_for(defaults, dst, seed=1)
        for name, s in {**settings, "model_defaults": model_defaults}.items():
            t0 = time.perf_counter()
            outs = generate_many(model, vocab, [("text", t) for _, t in asks], dst, 200, s)
            secs = time.perf_counter() - t0
            if dst == "image":
                named = [judge(pixels(o[0], side)) for o in outs]
            else:
                named = [dial(o[0].wave, o[0].sample_rate) for o in outs]
            out[f"text_to_{dst}_accuracy_{name}"] = round(float(np.mean([n == d for n, (d, _) in zip(named, asks)])), 3)
            out[f"text_to_{dst}_seconds_{name}"] = round(secs, 2)
    return out


def spans_decode(model, vocab) -> dict:
    from omnistream.serving.generate import Sampling, generate_many

    out = {}
    items = [("text", f"digit {d % 10}") for d in range(SPANS)]
    for dst in ("text", "image", "audio"):
        ok = 0
        for a in range(0, SPANS, 100):
            try:
                got = generate_many(model, vocab, items[a : a + 100], dst, 120, Sampling(temperature=1.5, seed=a))
                ok += sum(1 for (o,) in got if o is not None)
            except Exception as e:  # noqa: BLE001 - counted: a span that does not decode is the figure
                print(f"{dst} spans {a}..{a + 100}: {type(e).__name__}: {e}", file=sys.stderr)
        out[f"spans_decoded_{dst}"] = f"{ok}/{SPANS}"
    return out


def speed(model_width: int) -> dict:
    from omnistream.model.config import GPTConfig
    from omnistream.model.model import GPT, generate

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1024, n_layers=4, n_heads=4, d_model=model_width, max_seq_len=1100)).eval()
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]

    def timed(**kw):
        t0 = time.perf_counter()
        generate(m, **kw)
        return time.perf_counter() - t0

    cached = timed(prompts=prompt, max_new_tokens=1024)
    plain = timed(prompts=prompt, max_new_tokens=1024, use_cache=False)
    prompts = [[1, 2, 3 + i, 4, 5] for i in range(16)]
    batch = timed(prompts=prompts, max_new_tokens=128)
    singles = sum(timed(prompts=[p], max_new_tokens=128) for p in prompts)
    return {
        "span_1024_seconds_kv_cache": round(cached, 2),
        "span_1024_seconds_recomputed": round(plain, 2),
        "kv_cache_speedup_1024": round(plain / cached, 1),
        "batch16_seconds": round(batch, 2),
        "singles16_seconds": round(singles, 2),
        "batch16_vs_16_singles": round(batch / singles, 3),
    }


def main() -> int:
    from omnistream.common import logs
    from omnistream.serving.export import generation_defaults, load_model

    logs.setup()
    torch.set_num_threads(2)
    model_dir = (
        sys.argv[1]
        if len(sys.argv) > 1
        else max(glob.glob(str(REPO / "runs/ray/demo-*-export")), default="", key=os.path.getmtime)
    )
    if not model_dir:
        print("no trained demo model: run `make demo` first, or name an exported model", file=sys.stderr)
        return 2
    model, vocab = load_model(model_dir)
    figures = {"model": model_dir}
    data = str(REPO / "runs/demo/data") if len(sys.argv) < 3 else sys.argv[2]
    figures.update(quality(model, vocab, data, generation_defaults(model_dir)))
    figures.update(spans_decode(model, vocab))
    figures.update(speed(model.cfg.d_model))
    report(figures, "generation.json", "omnistream generation bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
