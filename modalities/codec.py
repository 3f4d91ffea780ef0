"""A learned speech codec: convolutions at the frame rate, finite scalar quantisation, an inverse STFT.

    wave (B, N) at the codec's rate, N = T·hop
      analysis: log |STFT|, n_fft = 2·hop, frames hop/2 apart                     (B, hop+1, 2T)
      encoder:  1x1 conv -> ResBlocks -> stride-2 conv -> ResBlocks -> 1x1 conv   (B, groups·len(levels), T)
      FSQ:      each of `groups` channel groups to one code per frame            (B, groups, T) codes
      decoder:  conv -> ResBlocks (T) -> x2 upsample, conv -> ResBlocks (2T)
                -> conv to log-magnitude and phase of each STFT bin               (B, 2·(hop+1), 2T)
      synthesis: inverse STFT, frames hop/2 apart                                (B, N)

Why this shape, on 2 CPU cores:
- Every convolution runs at the frame rate (100 or 50 per second), never at the sample rate: the STFT does the
  first 160x of the downsampling and the inverse STFT the last 160x of the upsampling (Vocos, Siuzdak 2023).
  A waveform decoder of EnCodec's kind runs its last layers at 16,000 positions a second and costs about
  100x more per second of audio; here a second of speech costs ~0.1 GFLOP to decode, so a fit of minutes
  sees hours of speech and decoding runs hundreds of times faster than real time on one core.
- The decoder predicts each bin's phase itself, so no Griffin-Lim: one inverse FFT per frame, and none of
  Griffin-Lim's phase smearing.
- FSQ (Mentzer et al. 2023, as in fsq.py) in groups: a frame is `groups` codes of prod(levels) each, every
  code of every codebook usable by construction, no codebook or commitment loss.
- Nothing normalises across time (a LayerNorm over each frame's channels, not GroupNorm), so a frame's
  code depends only on the audio within the receptive field around it: a long clip is cut into windows
  with MARGIN frames of context on each side and comes out as if coded whole, no seams.

Losses (no adversary: a GAN's discriminators would cost more than the codec, and intelligibility, which STOI
measures, lives in the band envelopes these losses fit): L1 of log-mel spectrograms at five scales (DAC's),
spectral convergence at four STFT resolutions, and the envelope term: 1 - the correlation of each
one-third-octave band's envelope with the original's over 375 ms, STOI's own comparison (Taal et al. 2011)
made differentiable, as Fu et al. (2018) trained speech enhancement on it. The log-mel L1 spends itself on
every band and level alike, quiet ones included; the envelope term on how the speech band's loudness moves,
which is what a listener follows. The phase is only learnt through these: a wrong phase makes overlapping
frames cancel, which the other resolutions see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .fsq import FSQ, update, warmup_cosine

# Frames of context each side of a window when coding a long clip in windows. The encoder sees ±(2+1+13)
# frames around a frame, the decoder ±(1+13+3), plus half an STFT window: 32 is more than either.
MARGIN = 32
LOG_EPS = 1e-3  # floor of the log mel magnitudes in the loss: ~60 dB below speech at the codec's level
LEVEL = 0.05  # RMS the codec's input is scaled to (-26 dBFS): a quiet and a loud take share codes


class FrameNorm(nn.Module):
    """LayerNorm over the channels of each frame (not across time: see the module's docstring)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ResBlock(nn.Module):
    """norm -> SiLU -> dilated 3-tap conv -> SiLU -> 1x1 conv, plus the input. Dilations 1, 3, 9 reach ±13
    frames in three blocks."""

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            FrameNorm(ch),
            nn.SiLU(),
            nn.Conv1d(ch, ch, 3, dilation=dilation, padding=dilation),
            nn.SiLU(),
            nn.Conv1d(ch, ch, 1),
        )

    def forward(self, x):
        return x + self.body(x)


class Codec(nn.Module):
    def __init__(self, hop: int, levels: Sequence[int], groups: int, width: int):
        super().__init__()
        if hop % 2:
            raise ValueError(f"the codec's hop must be even (the STFT runs at half of it), got {hop}")
        self.hop, self.groups = hop, groups
        self.stft_hop, self.n_fft = hop // 2, 2 * hop
        bins = self.n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        n = len(levels) * groups
        ew = width // 2  # the encoder only has to sort; the decoder invents what the codes leave out (fsq.py)
        self.encoder = nn.Sequential(
            nn.Conv1d(bins, ew, 1),
            ResBlock(ew, 1),
            ResBlock(ew, 3),
            nn.Conv1d(ew, ew, 4, stride=2, padding=1),  # 2T -> T
            ResBlock(ew, 1),
            ResBlock(ew, 3),
            ResBlock(ew, 9),
            FrameNorm(ew),
            nn.SiLU(),
            nn.Conv1d(ew, n, 1),
        )
        self.fsq = FSQ(levels)
        self.decoder = nn.Sequential(
            nn.Conv1d(n, width, 3, padding=1),
            ResBlock(width, 1),
            ResBlock(width, 3),
            ResBlock(width, 9),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv1d(width, width, 3, padding=1),  # T -> 2T
            ResBlock(width, 1),
            ResBlock(width, 3),
            FrameNorm(width),
            nn.SiLU(),
            nn.Conv1d(width, 2 * bins, 1),
        )  # 1x1: a 3-tap head here cost a third of the decoder's time

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    # ---- the pieces ----------------------------------------------------------------------------------------
    def latents(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T·hop) -> unquantised (B, groups·len(levels), T)."""
        spec = torch.stft(wave, self.n_fft, self.stft_hop, window=self.window, return_complex=True)
        feats = torch.log(spec.abs() + 1e-5)[..., :-1]  # center=True gives 2T + 1 frames: the last is dropped
        return self.encoder(feats)

    def _grouped(self, z: torch.Tensor) -> torch.Tensor:
        """(B, groups·L, T) -> (B, L, groups, T): FSQ quantises along dim 1."""
        B, _, T = z.shape
        return z.view(B, self.groups, -1, T).transpose(1, 2)

    def quantise(self, z: torch.Tensor) -> torch.Tensor:
        B, _, T = z.shape
        return self.fsq(self._grouped(z)).transpose(1, 2).reshape(B, -1, T)

    def synthesise(self, q: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, groups·L, T) -> waveform (B, T·hop)."""
        out = self.decoder(q)
        bins = out.shape[1] // 2
        logmag, phase = out[:, :bins], out[:, bins:]
        spec = torch.polar(torch.exp(logmag.clamp(max=8.0)), phase)  # e^8 ≈ 3,000: past any real bin, no inf
        spec = torch.cat([spec, spec[..., -1:]], -1)  # the frame dropped at analysis, for istft's 2T + 1
        return torch.istft(spec, self.n_fft, self.stft_hop, window=self.window, length=q.shape[-1] * self.hop)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.synthesise(self.quantise(self.latents(wave)))

    @torch.no_grad()
    def codes(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T·hop) -> (B, T, groups) integer codes, each in [0, codebook_size)."""
        return self.fsq.codes(self._grouped(self.latents(wave))).transpose(1, 2)

    @torch.no_grad()
    def quiet_code(self) -> np.ndarray:
        """The codes (groups,) of a silent frame, what windows are padded with. Computed once per set of
        weights: `train` forgets it."""
        if getattr(self, "_quiet", None) is None:
            self._quiet = self.codes(torch.zeros(1, (2 * MARGIN + 1) * self.hop))[0, MARGIN].numpy()
        return self._quiet

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, groups) codes -> (B, T·hop) waveform."""
        B, T, _ = codes.shape
        q = self.fsq.latents(codes.transpose(1, 2))  # (B, L, groups, T)
        return self.synthesise(q.transpose(1, 2).reshape(B, -1, T))


# ---- several codebooks in one stream --------------------------------------------------------------------------


def flatten(codes: np.ndarray, codebook: int) -> np.ndarray:
    """(T, groups) codes -> T·groups ids, frame by frame, codebook g's in [g·codebook, (g+1)·codebook) (AnyGPT's
    layout: one id range per codebook, so a model always knows which codebook an id belongs to)."""
    codes = np.asarray(codes, dtype=np.int64)
    return (codes + np.arange(codes.shape[1], dtype=np.int64) * codebook).reshape(-1)


def unflatten(ids: np.ndarray, groups: int, codebook: int) -> np.ndarray:
    """The inverse of flatten: T·groups ids -> (T, groups) codes. A trailing part-frame is dropped (a generation
    cut off mid-frame), and an id outside its position's range (a model's slip) is read as the code it names in
    its own range."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return np.abs(ids[: len(ids) // groups * groups].reshape(-1, groups)) % codebook


# ---- long clips in windows ----------------------------------------------------------------------------------


def windows(frames: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of the windows of at most `size` frames that cover `frames`."""
    return [(s, min(s + size, frames)) for s in range(0, frames, size)]


@torch.no_grad()
def encode_waves(model: Codec, waves: Sequence[np.ndarray], window: int = 500) -> list[np.ndarray]:
    """Codes (T, groups) of each wave (float32 at the codec's rate, padded with silence to whole frames).
    Each wave is zero-padded by MARGIN frames at both ends and cut into windows of `window` frames plus MARGIN
    of context each side, all of them encoded in one batch: the same codes as the wave encoded whole, in
    memory bounded by the window, whatever the clip's length."""
    hop, m = model.hop, MARGIN * model.hop
    # short clips (a spoken digit) get windows of their own length, not `window`: the frames past a clip's end
    # are silence either way, so its codes do not depend on the window or on the other clips of the batch
    window = max(1, min(window, max(math.ceil(len(w) / hop) for w in waves))) if len(waves) else window
    pieces, where = [], []
    for i, w in enumerate(waves):
        T = max(1, math.ceil(len(w) / hop))
        padded = np.zeros(T * hop + 2 * m, np.float32)
        padded[m : m + len(w)] = w
        for s, e in windows(T, window):
            chunk = padded[s * hop : (e * hop) + 2 * m]
            pieces.append(np.pad(chunk, (0, (window - (e - s)) * hop)))  # the last window of a clip, filled
            where.append((i, e - s))
    out: list[list[np.ndarray]] = [[] for _ in waves]
    for b in range(0, len(pieces), 64):
        codes = model.codes(torch.from_numpy(np.stack(pieces[b : b + 64])))
        for (i, n), c in zip(where[b : b + 64], codes):
            out[i].append(c[MARGIN : MARGIN + n].numpy())
    return [np.concatenate(o).astype(np.int64) for o in out]


@torch.no_grad()
def decode_codes(model: Codec, codes: Sequence[np.ndarray], window: int = 500) -> list[np.ndarray]:
    """Waveforms of (T, groups) code arrays, windowed like encode_waves: MARGIN frames of context each side,
    the decoded middle kept. The context is padded with the code of silence (the codes of a silent frame)."""
    hop = model.hop
    window = max(1, min(window, max((len(c) for c in codes), default=1)))
    quiet = model.quiet_code()
    pieces, where = [], []
    for i, c in enumerate(codes):
        T = len(c)
        padded = np.concatenate([np.tile(quiet, (MARGIN, 1)), c, np.tile(quiet, (MARGIN + window, 1))])
        for s, e in windows(T, window):
            pieces.append(padded[s : s + window + 2 * MARGIN])
            where.append((i, e - s))
    out: list[list[np.ndarray]] = [[] for _ in codes]
    for b in range(0, len(pieces), 64):
        waves = model.decode_codes(torch.from_numpy(np.stack(pieces[b : b + 64])))
        for (i, n), w in zip(where[b : b + 64], waves):
            out[i].append(w[MARGIN * hop : (MARGIN + n) * hop].numpy())
    return [np.concatenate(o).astype(np.float32) if o else np.zeros(0, np.float32) for o in out]


# ---- training -----------------------------------------------------------------------------------------------

RESOLUTIONS = (256, 512, 1024, 2048)  # n_fft of the spectral-convergence terms, hop n_fft/4
# (n_fft, mel bands) of the multi-scale log-mel L1 (DAC's loss, at 16 kHz's scales): mel bands put the
# weight where hearing (and intelligibility) is, where a log L1 over linear bins spends half of it above 4 kHz
MEL_SCALES = ((128, 10), (256, 20), (512, 40), (1024, 80), (2048, 160))
# The envelope term, STOI's analysis at the codec's rate: 15 one-third-octave bands centred from 150 Hz
# (to 4.3 kHz), frames of 25 ms every 12.5 ms, envelopes compared over spans of 30 frames (375 ms), a span
# every 10 frames. Measured at 1,000 steps on 40 held-out Dutch clips, by weight: 0 STOI 0.669 (mel distance
# 17.0 dB), 1: 0.695 (16.4), 3: 0.732 (15.8), 10: 0.759 (15.7), 30: 0.783 (15.5), 60: 0.791 (15.6), 120:
# 0.796 (16.1). Both measures gain up to 30, so it is not STOI alone being fitted; past 60 the mel distance
# pays for what STOI gains. At 9,000 steps, 60 against 30 at 6,000: held-out Dutch 0.854 against 0.838.
# The weight is the audio option `envelope_weight` (60 unless set): on tones (the demo's DTMF) the term at
# 60 also fits the envelopes of empty bands, and the log-mel error of a tiny fit is 0.21 against 0.16 at 30.
ENV_BANDS, ENV_SPAN, ENV_STRIDE = 15, 30, 10


def _mag(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    return torch.stft(x, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=x.device), return_complex=True).abs()


class Loss(nn.Module):
    """Multi-scale log-mel L1 + multi-resolution spectral convergence (the loud bins, where a wrong phase shows
    as frames that cancel) + the envelope term (the module's docstring). One STFT per scale and clip serves
    the first two (torchaudio's MelSpectrogram would take its own, and the spectral convergence took the
    input's twice: the loss cost more than the network)."""

    def __init__(self, sample_rate: int, envelope_weight: float):
        super().__init__()
        self.envelope_weight = envelope_weight
        import torchaudio.functional as AF

        self.scales = sorted({n for n, _ in MEL_SCALES} | set(RESOLUTIONS))
        for n, m in MEL_SCALES:  # torchaudio's filter banks, as its MelSpectrogram(power=1) applies them
            self.register_buffer(
                f"fb{n}", AF.melscale_fbanks(n // 2 + 1, 0.0, sample_rate / 2, m, sample_rate), persistent=False
            )
        self.env_fft = round(0.025 * sample_rate)
        freqs = np.fft.rfftfreq(self.env_fft, 1 / sample_rate)
        centres = 150 * 2 ** (np.arange(ENV_BANDS) / 3)
        lo, hi = centres * 2 ** (-1 / 6), centres * 2 ** (1 / 6)
        bands = (freqs >= lo[:, None]) & (freqs < hi[:, None])  # (bands, bins): which bins each band sums
        bands = bands[bands.any(1)]  # at a low rate the top bands lie past Nyquist
        self.register_buffer("bands", torch.from_numpy(bands.astype(np.float32)), persistent=False)

    def envelopes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> each band's envelope (root of its power) in spans, mean removed: (B, bands, spans, ENV_SPAN)."""
        n = self.env_fft
        power = torch.stft(x, n, n // 2, window=torch.hann_window(n, device=x.device), return_complex=True).abs() ** 2
        env = torch.sqrt(self.bands @ power + 1e-8)
        env = env.unfold(-1, min(ENV_SPAN, env.shape[-1]), ENV_STRIDE)  # a segment under 375 ms: one span
        return env - env.mean(-1, keepdim=True)

    def envelope_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """1 - the mean correlation of y's band envelopes with x's, span by span (0 when they move alike)."""
        with torch.no_grad():
            ex = self.envelopes(x)
        ey = self.envelopes(y)
        return (1 - (ex * ey).sum(-1) / (ex.norm(dim=-1) * ey.norm(dim=-1) + 1e-6)).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the log-mel L1 at 80 bands) of output y against input x."""
        mel, sc = {}, []
        for n in self.scales:
            with torch.no_grad():
                mx = _mag(x, n)
            my = _mag(y, n)
            if hasattr(self, f"fb{n}"):
                fb = getattr(self, f"fb{n}")
                mel[n] = (
                    (torch.log(my.transpose(-1, -2) @ fb + LOG_EPS) - torch.log(mx.transpose(-1, -2) @ fb + LOG_EPS))
                    .abs()
                    .mean()
                )
            if n in RESOLUTIONS:
                sc.append(torch.linalg.norm(mx - my) / torch.linalg.norm(mx).clamp(min=1e-6))
        return sum(mel.values()) + sum(sc) / len(sc) + self.envelope_weight * self.envelope_loss(x, y), mel[1024]


def train(
    model: Codec,
    waves: Sequence[np.ndarray],
    *,
    sample_rate: int,
    steps: int,
    batch: int,
    seconds: float,
    lr: float,
    envelope_weight: float,
    seed: int,
    device: str = "cpu",
    on_step: Callable[[int, dict], None] | None = None,
) -> list[float]:
    """Train on random `seconds`-long segments of `waves` (float32 at the codec's rate, at LEVEL), laid end to
    end. `on_step(step, {"loss", "mel_l1"})` every step. Returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    model._quiet = None  # the silence code of the old weights
    loss_fn = Loss(sample_rate, envelope_weight).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    data = torch.from_numpy(np.concatenate(list(waves)).astype(np.float32)).to(device)
    seg = max(1, round(seconds * sample_rate / model.hop)) * model.hop
    if len(data) < seg:
        data = torch.nn.functional.pad(data, (0, seg - len(data)))
    offsets = torch.arange(seg, device=device)
    losses = []
    for step in range(steps):
        start = torch.randint(len(data) - seg + 1, (batch,), generator=g).to(device)
        x = data[start[:, None] + offsets]
        # a random gain of ±6 dB: the level is normalised per clip, not per segment
        x = x * torch.exp(torch.empty(batch, 1).uniform_(-0.7, 0.7, generator=g)).to(device)
        y = model(x)
        loss, mel = loss_fn(x, y)
        losses.append(update(model, opt, sched, loss))
        if on_step is not None:
            on_step(step, {"loss": losses[-1], "mel_l1": float(mel.detach())})
    model.eval()
    return losses
