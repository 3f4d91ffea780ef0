"""How well an audio tokenizer keeps speech: STOI and mel distance of decode(encode(x)) beside k-means.

- STOI (Taal et al. 2011, the `pystoi` package): short-time objective intelligibility, 0-1, of the decoded
  clip against the original, both at 16 kHz. 0.6 is speech a listener strains to follow; 0.85 and up, clear.
- mel distance: mean absolute difference of the two clips' log-mel spectrograms (80 bands, 16 kHz), in dB.
- the baseline: omnistream's k-means tokenizer at the same ids per second (16 kHz, 80 mels, one id a
  frame, 1,024 codes), fitted on the same clips, decoded with Griffin-Lim.
Used by `omnistream tokenizers eval` and benchmarks/audio_codec.py, so both measure alike.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .audio import Audio, AudioModality

RATE = 16000  # both clips are compared at this rate
MIN_SECONDS = 1.0  # STOI needs about 30 of its 25.6 ms frames with speech in them; shorter clips are skipped


def at_rate(a: Audio, rate: int = RATE) -> np.ndarray:
    import torchaudio.functional as AF

    w = torch.as_tensor(a.wave, dtype=torch.float32)
    return (AF.resample(w, a.sample_rate, rate) if a.sample_rate != rate else w).numpy()


def ids_per_second(mod: AudioModality) -> float:
    o = mod.options
    return o.sample_rate / o.hop * (o.groups if o.tokenizer == "codec" else 1)


def roundtrip(mod: AudioModality, clips: list[Audio]) -> list[Audio]:
    """decode(encode(x)) of each clip, the codec's in one batch."""
    ids = mod.encode_many([mod.prepare(c) for c in clips])
    if mod.options.tokenizer == "codec":
        return [Audio(w, mod.options.sample_rate) for w in mod.decode_waves(ids)]
    return [mod.decode(i) for i in ids]


def _mel_db(mel, w: np.ndarray) -> np.ndarray:
    return 10 * np.log10(mel(torch.from_numpy(w)).clamp(min=1e-8).numpy())


def scores(originals: list[Audio], decoded: list[Audio]) -> dict[str, float]:
    """Mean STOI and mel distance (dB) over the clips. Each decoded clip is scaled to its original's level first
    (the codec works at one level; k-means decodes to a fixed peak): STOI ignores level, mel distance would not."""
    import torchaudio.transforms as T
    from pystoi import stoi

    mel = T.MelSpectrogram(sample_rate=RATE, n_fft=1024, hop_length=160, n_mels=80)  # built once: its filter bank
    s, d = [], []
    for a, b in zip(originals, decoded):
        x, y = at_rate(a), at_rate(b)
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        y = y * (np.sqrt((x**2).mean()) / max(np.sqrt((y**2).mean()), 1e-8))
        s.append(stoi(x, y, RATE, extended=False))
        d.append(float(np.abs(_mel_db(mel, x) - _mel_db(mel, y)).mean()))
    return {"stoi": float(np.mean(s)), "mel_distance_db": float(np.mean(d))}


def kmeans_baseline(learned: AudioModality, train: list[Audio], codes: int = 1024) -> AudioModality:
    """omnistream's k-means tokenizer at the learned one's ids per second, fitted on `train`."""
    hop = round(RATE / ids_per_second(learned))
    km = AudioModality(
        {
            "tokenizer": "kmeans",
            "sample_rate": RATE,
            "hop": hop,
            "n_fft": max(1024, 2 * hop),
            "n_mels": 80,
            "codebook_size": codes,
        }
    )
    km.fit([km.fit_features(a) for a in train])
    return km


def rates(mod: AudioModality, clips: list[Audio]) -> dict[str, float]:
    """Encode and decode speed on one thread, as multiples of real time (batched where the tokenizer batches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = sum(c.seconds for c in clips)
        prepared = [mod.prepare(c) for c in clips]
        mod.encode_many(prepared[:2])  # first-call set-up is not timed
        t0 = time.perf_counter()
        ids = mod.encode_many(prepared)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        if mod.options.tokenizer == "codec":
            mod.decode_waves(ids)
        else:
            for i in ids:
                mod.decode(i)
        dec = time.perf_counter() - t0
        return {"encode_x_realtime": seconds / enc, "decode_x_realtime": seconds / dec}
    finally:
        torch.set_num_threads(threads)


def compare(learned: AudioModality, train: list[Audio], held: list[Audio]) -> dict:
    """The learned tokenizer and k-means at the same ids per second on `held`, side by side; k-means fitted on
    `train`. Clips shorter than MIN_SECONDS are left out (counted)."""
    kept = [a for a in held if a.seconds >= MIN_SECONDS]
    km = kmeans_baseline(learned, train)
    out = {
        "clips": len(kept),
        "clips_too_short": len(held) - len(kept),
        "seconds": round(sum(a.seconds for a in kept), 1),
        "ids_per_second": ids_per_second(learned),
    }
    for name, mod in (("learned", learned), ("kmeans", km)):
        out[name] = {**scores(kept, roundtrip(mod, kept)), **rates(mod, kept), "ids_per_second": ids_per_second(mod)}
    return out
