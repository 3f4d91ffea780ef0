"""Audio: log-mel frames quantised to a k-means codebook; decoded with Griffin-Lim.

Bytes are decoded with `soundfile` (torchaudio.load needs torchcodec, which this
stack does not ship), mixed to mono, resampled with torchaudio to one rate, and
turned into log-mel frames. Levels are taken relative to the clip's loudest
frame (0 dB) and floored at -`dynamic_range_db`, so a quiet and a loud take of
the same sound share codes. One frame is one id: at 8 kHz with a 128-sample hop
that is 62.5 ids per second.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from omnistream.common.errors import BadSample

from .base import (
    BaseModality,
    FilterOptions,
    ModalityOptions,
    kmeans,
    nearest,
    sample_rows,
)

# Input bounds, not options (options key the fingerprint): rates outside are errored as audio_sample_rate;
# 1 kHz to 192 kHz covers telephone speech to studio masters. RESAMPLERS bounds the per-rate kernel cache.
MIN_RATE, MAX_RATE = 1000, 192000
RESAMPLERS = 8
# A resampler from rate r to target t builds a kernel bank of about (t/g)·(r/g) taps, g = gcd(r, t):
# 44.1 kHz -> 8 kHz is 80·441 = 35k, but 44.101 kHz -> 8 kHz would be 353M (1.4 GB). Rates sharing too
# small a factor with the target are errored as audio_sample_rate instead of built.
MAX_RESAMPLE_TAPS = 1 << 22
# libsndfile picks the format by the bytes, whatever the name: a 69 KiB Ogg Vorbis of 255 channels named
# .wav decodes to 464 MiB. Only the format the extension names is decoded, with at most MAX_CHANNELS
# channels (7.1 surround), read in blocks of BLOCK frames, each mixed down to mono as it is read.
CONTAINERS = {"wav": ("WAV", "WAVEX", "RF64"), "flac": ("FLAC",)}
MAX_CHANNELS = 8
BLOCK = 1 << 16
# Float WAV's full scale is 1.0 (integer formats decode into [-1, 1]): a sample far past it is no sound,
# and squaring it for the spectrum overflows float32 (1e30² = inf) into NaN features.
MAX_AMPLITUDE = 1000.0


@dataclass
class Audio:
    """A mono waveform in [-1, 1] and its sample rate."""

    wave: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.sample_rate


def _wav_size_lie(data: bytes) -> str | None:
    """A WAV whose chunk sizes claim more bytes than the file has. libsndfile quietly reads what is
    there, so a file cut short or a forged header would pass as shorter audio; we call it what it is."""
    import struct

    if len(data) < 12 or data[8:12] != b"WAVE":
        return None
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        if cid == b"data":
            have = len(data) - at - 8
            return f"data chunk claims {size} bytes, the file holds {have}" if size > have else None
        at += 8 + size + (size & 1)
    return "no data chunk"


# What `tokenizer = "codec"` changes when the user leaves these unset: 16 kHz (telephone band is not enough
# for clear speech) and a frame of 20 ms, 3 codes of 1,000 each: 150 ids a second.
CODEC_DEFAULTS = {"sample_rate": 16000, "hop": 320}


class AudioOptions(ModalityOptions):
    tokenizer: Literal["kmeans", "codec"] = Field(
        "kmeans",
        description="'kmeans': log-mel frames to a k-means "
        "codebook, decoded with Griffin-Lim (fast to fit); 'codec': a "
        "learned neural codec (clear speech; fits in minutes)",
    )
    sample_rate: int = Field(
        8000,
        ge=1000,
        le=192000,
        description="audio is resampled to this rate (Hz) before features (codec: 16000 unless set)",
    )
    n_fft: int = Field(256, ge=16, description="kmeans: FFT size of the mel spectrogram")
    hop: int = Field(
        128,
        ge=1,
        description="hop between frames in samples; kmeans: one frame is one token; "
        "codec: one frame is `groups` tokens (320 unless set: 50 frames/s)",
    )
    n_mels: int = Field(32, ge=4, description="mel bands per frame")
    dynamic_range_db: float = Field(
        80.0, gt=0, description="levels below the clip's peak by more than this are floored"
    )
    codebook_size: int = Field(
        128, ge=2, le=65536, description="number of frame codes (this modality's vocabulary size)"
    )
    max_seconds: float = Field(
        10.0, gt=0, description="longer audio is refused as a bad sample (untrusted-input bound)"
    )
    fit_frames: int = Field(100_000, ge=1000, description="at most this many frames are used to fit the codebook")
    griffin_lim_iters: int = Field(32, ge=1, description="Griffin-Lim iterations when decoding ids to a waveform")
    seed: int = Field(0, description="seed of the k-means initialisation, and of the codec's fit")
    # ---- tokenizer = "codec" -----------------------------------------------------------------------
    levels: list[int] = Field(
        [8, 5, 5, 5],
        min_length=1,
        max_length=8,
        description="codec: FSQ levels per latent channel of a group; their product is each "
        "codebook's size (1,000 for [8,5,5,5])",
    )
    groups: int = Field(
        3,
        ge=1,
        le=8,
        description="codec: codebooks per frame; a frame's ids go into the stream "
        "one after another, each codebook in its own id range",
    )
    width: int = Field(128, ge=16, le=1024, description="codec: the decoder's channels (the encoder has half)")
    fit_steps: int = Field(9000, ge=1, description="codec: training steps of the fit (about 23 minutes on 2 CPU cores)")
    fit_batch: int = Field(16, ge=1, description="codec: segments per training step")
    fit_seconds: float = Field(1.0, gt=0, le=30, description="codec: length of each training segment")
    fit_lr: float = Field(2e-3, gt=0, description="codec: peak AdamW learning rate (warm-up, then cosine decay)")
    envelope_weight: float = Field(
        60.0,
        ge=0,
        description="codec: weight of the fit's envelope term (STOI's band-"
        "envelope correlation, modalities/codec.py): 60 for speech; lower keeps the "
        "log-mel spectrum of tones or music closer",
    )

    @model_validator(mode="after")
    def _codec(self):
        if self.tokenizer == "codec":
            for k, v in CODEC_DEFAULTS.items():
                if k not in self.model_fields_set:
                    setattr(self, k, v)
            if self.hop % 2:
                raise ValueError(f"the codec's hop must be even (its STFT runs at half of it), got {self.hop}")
            if math.prod(self.levels) > 65536:
                raise ValueError(f"codec levels {self.levels} make {math.prod(self.levels)} codes, more than 65,536")
        return self


class AudioFilters(FilterOptions):
    min_seconds: float = Field(0.05, ge=0, description="shorter clips are filtered: audio_too_short")
    max_seconds: float = Field(600.0, gt=0, description="longer clips are filtered: audio_too_long_for_filter")
    silence_db: float = Field(-50.0, description="a 20 ms frame quieter than this (dBFS) counts as silent")
    max_silence_frac: float = Field(0.9, ge=0, le=1, description="share of silent frames above this: audio_silent")
    max_clipping_frac: float = Field(
        0.05, ge=0, le=1, description="share of samples at full scale above this: audio_clipped"
    )


class AudioModality(BaseModality):
    name: ClassVar[str] = "audio"
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ("wav", "flac")
    Options = AudioOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.5}
    # mean |Δ| of normalised log-mel frames (1.0 = the whole dynamic range) between x
    # and decode(encode(x)); quantisation + Griffin-Lim measure ≈0.05-0.1 on the demo tones
    error_bound: ClassVar[float] = 0.2
    Filters = AudioFilters

    def __init__(self, options=None):
        super().__init__(options)
        self._codebook: np.ndarray | None = None
        self._weights: dict[str, np.ndarray] | None = None  # codec: the network's state dict, as arrays
        self._net = None  # codec: the network built from _weights, on first use
        self._report: dict[str, Any] = {}
        self._mel = None
        self._inv = None
        self._resamplers: OrderedDict[int, Any] = OrderedDict()  # the last RESAMPLERS rates, least recent out

    @property
    def _codec(self) -> bool:
        return self.options.tokenizer == "codec"

    @property
    def codebook(self) -> int:
        """Codes per codebook: the codec's FSQ product, or the k-means codebook."""
        return math.prod(self.options.levels) if self._codec else self.options.codebook_size

    @property
    def vocab_size(self) -> int:
        # codec: one id range per codebook, frame by frame (AnyGPT's layout): a frame is `groups` ids, the
        # g-th of them in [g·codebook, (g+1)·codebook)
        return self.codebook * (self.options.groups if self._codec else 1)

    # ---- bytes -> object -------------------------------------------------------
    def decode_bytes(self, ext: str, data: bytes) -> Audio:
        import soundfile as sf

        if not data:
            raise BadSample("audio_empty", "zero bytes")
        lie = _wav_size_lie(data) if data[:4] == b"RIFF" else None
        if lie:
            raise BadSample("audio_header_mismatch", lie)
        want = CONTAINERS.get(ext)
        if want is None:
            raise BadSample("audio_wrong_format", f".{ext} is not one of the audio extensions {sorted(CONTAINERS)}")
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                if f.format not in want:
                    raise BadSample(
                        "audio_wrong_format", f"the bytes of this .{ext} are {f.format_info}, not {'/'.join(want)}"
                    )
                if f.channels > MAX_CHANNELS:
                    raise BadSample("audio_too_many_channels", f"{f.channels} channels > {MAX_CHANNELS}")
                sr, frames = f.samplerate, f.frames
                if not MIN_RATE <= sr <= MAX_RATE:
                    raise BadSample("audio_sample_rate", f"sample rate {sr} Hz outside {MIN_RATE}..{MAX_RATE}")
                t = self.options.sample_rate
                g = math.gcd(sr, t)
                if (t // g) * (sr // g) > MAX_RESAMPLE_TAPS:
                    raise BadSample(
                        "audio_sample_rate",
                        f"{sr} Hz shares only a factor {g} with {t} Hz: resampling "
                        f"would need {(t // g) * (sr // g)} kernel taps",
                    )
                # the header's length is checked before reading, then the real length after
                if frames / sr > self.options.max_seconds:
                    raise BadSample("audio_too_long", f"{frames / sr:.1f}s > max_seconds={self.options.max_seconds}")
                # mono as it is read, BLOCK frames at a time: never the channels of the whole clip at once
                limit = int(self.options.max_seconds * sr) + 1
                wave = np.concatenate(
                    [b.mean(axis=1) for b in f.blocks(BLOCK, frames=limit, dtype="float32", always_2d=True)]
                    or [np.zeros(0, np.float32)]
                )
        except BadSample:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises is the record's
            raise BadSample("audio_undecodable", f"{type(e).__name__}: {e}") from None
        if len(wave) / sr > self.options.max_seconds:
            raise BadSample("audio_too_long", f"more than max_seconds={self.options.max_seconds}")
        if len(wave) == 0:
            raise BadSample("audio_empty", "no samples")
        if not np.isfinite(wave).all():
            raise BadSample("audio_not_finite", "NaN or inf samples")
        if np.abs(wave).max() > MAX_AMPLITUDE:
            raise BadSample(
                "audio_out_of_range",
                f"samples up to {np.abs(wave).max():.3g}, full scale is 1.0 (more than {MAX_AMPLITUDE:g} is refused)",
            )
        return Audio(wave=wave.astype(np.float32), sample_rate=int(sr))

    # ---- object -> frames ------------------------------------------------------
    def _resampled(self, a: Audio):
        """The waveform at the configured rate, as a float32 tensor."""
        import torch
        import torchaudio.transforms as T

        o = self.options
        w = torch.as_tensor(a.wave, dtype=torch.float32)
        if a.sample_rate != o.sample_rate:
            if a.sample_rate not in self._resamplers:  # the module keeps its sinc kernel: built once per rate
                self._resamplers[a.sample_rate] = T.Resample(a.sample_rate, o.sample_rate)
                while len(self._resamplers) > RESAMPLERS:  # a corpus of many odd rates: bounded, not one per rate
                    self._resamplers.popitem(last=False)
            self._resamplers.move_to_end(a.sample_rate)
            w = self._resamplers[a.sample_rate](w)
        return w

    def _features(self, a: Audio) -> np.ndarray:
        """(frames, n_mels) log-mel in [0, 1]: 1 = the clip's peak, 0 = dynamic_range_db below it."""
        import torch
        import torchaudio.transforms as T

        o = self.options
        w = self._resampled(a)
        if len(w) < o.n_fft:
            w = torch.nn.functional.pad(w, (0, o.n_fft - len(w)))
        if self._mel is None:
            self._mel = T.MelSpectrogram(
                sample_rate=o.sample_rate,
                n_fft=o.n_fft,
                hop_length=o.hop,
                n_mels=o.n_mels,
                f_min=0.0,
                f_max=o.sample_rate / 2,
                power=2.0,
                center=False,
            )
        db = 10 * torch.log10(self._mel(w).clamp(min=1e-10)).T  # (frames, n_mels)
        db = (db - db.max()).clamp(min=-o.dynamic_range_db)
        out = (1 + db / o.dynamic_range_db).numpy().astype(np.float32)
        if not np.isfinite(out).all():  # one such clip in a fit would put a NaN row in the codebook
            raise BadSample("audio_not_finite", "its log-mel features are not finite")
        return out

    def prepare(self, obj: Audio) -> np.ndarray:
        """What encoding needs of a clip, so the tokenizer actor can hold a chunk's worth and encode them in one
        pass: k-means its log-mel frames; the codec its waveform at the codec's rate and level (float16: 32
        KB a second, and 66 dB of headroom, past what 150 ids a second keep)."""
        if not self._codec:
            return self._features(obj)
        from . import codec

        w = self._resampled(obj).numpy()
        rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) if len(w) else 0.0
        # levelled to codec.LEVEL, with at most 40 dB of gain: near-silence is not blown up into noise
        return np.clip(w * (codec.LEVEL / max(rms, codec.LEVEL / 100)), -1, 1).astype(np.float16)

    def fit_features(self, obj: Audio) -> np.ndarray:
        return self.prepare(obj)

    def fit(self, features: list[np.ndarray], progress: Callable[[int, int, dict], None] | None = None) -> None:
        if not self._codec:
            rows = sample_rows(features, self.options.fit_frames, self.options.seed)
            self._codebook = kmeans(rows, self.options.codebook_size, seed=self.options.seed)
            self._mark_fitted()
            return
        import torch

        from . import codec

        o = self.options
        waves = [np.asarray(f, dtype=np.float32).reshape(-1) for f in features]
        torch.manual_seed(o.seed)  # the initial weights too: the same samples and options fit the same codec
        net = codec.Codec(o.hop, o.levels, o.groups, o.width)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        on_step, steps, curves = self.fit_curves(o.fit_steps, ("loss", "mel_l1"), progress)
        codec.train(
            net,
            waves,
            sample_rate=o.sample_rate,
            steps=o.fit_steps,
            batch=o.fit_batch,
            seconds=o.fit_seconds,
            lr=o.fit_lr,
            envelope_weight=o.envelope_weight,
            seed=o.seed,
            device=device,
            on_step=on_step,
        )
        self._set_state({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
        self._mark_fitted()
        # the first 3 fit clips, and what the fitted codec makes of them, for the tracker
        first = [w[: int(5 * o.sample_rate)] for w in waves[:3]]
        recon = self.decode_waves(self.encode_many(first))
        sounds = {}
        for i, (a, b) in enumerate(zip(first, recon)):
            sounds[f"original_{i}"] = self.to_bytes(Audio(a, o.sample_rate))[1]
            sounds[f"reconstruction_{i}"] = self.to_bytes(Audio(b, o.sample_rate))[1]
        self._report = {
            "metrics": curves,
            "steps": steps,
            "audio": sounds,
            "summary": {"fit_mel_l1": curves["mel_l1"][-1]},
        }

    def fit_resources(self, cluster: dict[str, float]) -> dict[str, float] | None:
        return self.trained_fit_resources(cluster) if self._codec else None

    def fit_report(self) -> dict[str, Any]:
        return self._report

    def _network(self):
        if self._net is None:
            import torch

            from . import codec

            o = self.options
            net = codec.Codec(o.hop, o.levels, o.groups, o.width)
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self._weights.items()})
            self._net = net.eval()
        return self._net

    def encode(self, obj: Audio) -> np.ndarray:
        return self.encode_many([self.prepare(obj)])[0]

    def encode_many(self, prepared: list[np.ndarray]) -> list[np.ndarray]:
        """Ids of each prepared clip; the codec runs them through its encoder in one batch of windows."""
        self._require_fitted()
        if not self._codec:
            return [nearest(p, self._codebook) for p in prepared]
        from . import codec

        codes = codec.encode_waves(self._network(), [np.asarray(p, dtype=np.float32) for p in prepared])
        return [codec.flatten(c, self.codebook) for c in codes]

    def span(self, position: int) -> tuple[int, int, bool]:
        """codec: a frame is `groups` ids, the g-th in codebook g's range [g·C, (g+1)·C) (codec.flatten), and a
        clip ends only after a whole frame. k-means: any id, an end after the first."""
        if not self._codec:
            return 0, self.vocab_size, position > 0
        g = position % self.options.groups
        return g * self.codebook, (g + 1) * self.codebook, position > 0 and g == 0

    def decode_waves(self, ids_list: list) -> list[np.ndarray]:
        """codec: the waveform of each id sequence (codec.unflatten reads them), in one batch."""
        from . import codec

        frames = [codec.unflatten(ids, self.options.groups, self.codebook) for ids in ids_list]
        waves = codec.decode_codes(self._network(), frames)
        return [np.clip(w, -1, 1) for w in waves]

    def decode(self, ids) -> Audio:
        """codec: ids -> codes -> the decoder's waveform (no Griffin-Lim). k-means: ids -> mel power (peak at
        0 dB) -> linear spectrogram (torchaudio InverseMelScale) -> Griffin-Lim."""
        import torch
        import torchaudio.transforms as T

        self._require_fitted()
        o = self.options
        if self._codec:
            wave = self.decode_waves([ids])[0]
            if len(wave) < o.hop:  # under one frame: a frame of silence, so the clip is never empty
                wave = np.zeros(o.hop, np.float32)
            return Audio(wave, o.sample_rate)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return Audio(np.zeros(o.n_fft, np.float32), o.sample_rate)
        frames = len(ids)
        # Griffin-Lim's STFT reflect-pads n_fft/2 samples at each end, so it cannot invert fewer than about
        # n_fft/hop + 2 frames (1 or 2 frames raise inside torch): a short generation is padded with the
        # quietest code and cut back to its own length after inversion
        need = o.n_fft // o.hop + 2
        if frames < need:
            ids = np.concatenate([ids, np.full(need - frames, int(self._codebook.mean(1).argmin()))])
        if self._inv is None:
            self._inv = (
                T.InverseMelScale(
                    n_stft=o.n_fft // 2 + 1,
                    n_mels=o.n_mels,
                    sample_rate=o.sample_rate,
                    f_min=0.0,
                    f_max=o.sample_rate / 2,
                    # gelsd, not the default gels: with many mels on a short FFT the
                    # lowest mel filters hold no bin (80 mels on 512 at 16 kHz), and gels
                    # refuses such a rank-deficient system
                    driver="gelsd",
                ),
                T.GriffinLim(n_fft=o.n_fft, hop_length=o.hop, power=2.0, n_iter=o.griffin_lim_iters, rand_init=False),
            )
        inv_mel, gl = self._inv
        db = (torch.as_tensor(self._codebook[ids]) - 1) * o.dynamic_range_db
        mel_power = (10 ** (db / 10)).T  # (n_mels, frames)
        spec = inv_mel(mel_power).clamp(min=0)
        wave = gl(spec)[: max(frames * o.hop, o.n_fft)]
        peak = wave.abs().max()
        wave = (wave / peak * 0.5) if peak > 0 else wave
        return Audio(wave.numpy().astype(np.float32), o.sample_rate)

    def roundtrip_error(self, obj: Audio, decoded: Audio) -> float:
        a, b = self._features(obj), self._features(decoded)
        n = min(len(a), len(b))
        return float(np.abs(a[:n] - b[:n]).mean()) if n else 1.0

    def to_bytes(self, obj: Audio) -> tuple[str, bytes]:
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, obj.wave, obj.sample_rate, format="WAV", subtype="PCM_16")
        return "wav", buf.getvalue()

    # the options only one of the two tokenizers reads: the other's are left out of the fingerprint, so a
    # k-means bundle fitted before the codec existed keeps its fingerprint (and still loads)
    KMEANS_ONLY = ("n_fft", "n_mels", "dynamic_range_db", "codebook_size", "fit_frames", "griffin_lim_iters")
    CODEC_ONLY = ("tokenizer", "levels", "groups", "width", "fit_steps", "fit_batch", "fit_seconds", "fit_lr")

    def _fingerprint_options(self) -> dict[str, Any]:
        drop = self.KMEANS_ONLY if self._codec else self.CODEC_ONLY
        opts = {k: v for k, v in self.options.model_dump(mode="json").items() if k not in drop}
        if self._codec:
            opts["tokenizer"] = "codec"
        return opts

    def _state(self) -> dict[str, Any]:
        if self._codec:
            return {f"codec.{k}": v for k, v in self._weights.items()}
        return {"codebook": self._codebook}

    def _set_state(self, state: dict[str, Any]) -> None:
        if self._codec:
            self._weights = {
                k.removeprefix("codec."): np.asarray(v, dtype=np.float32)
                for k, v in state.items()
                if isinstance(v, np.ndarray)
            }
            self._net = None
            return
        self._codebook = np.asarray(state["codebook"], dtype=np.float32)

    # ---- data quality ----------------------------------------------------------------
    def quality_reason(self, a: Audio, f: AudioFilters) -> str | None:
        secs = len(a.wave) / a.sample_rate
        if secs < f.min_seconds:
            return "audio_too_short"
        if secs > f.max_seconds:
            return "audio_too_long_for_filter"
        if np.mean(np.abs(a.wave) >= 0.999) > f.max_clipping_frac:
            return "audio_clipped"
        hop = max(1, int(0.02 * a.sample_rate))
        n = len(a.wave) // hop
        if n:
            rms = np.sqrt(np.mean(a.wave[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
            if np.mean(20 * np.log10(rms) < f.silence_db) > f.max_silence_frac:
                return "audio_silent"
        return None
