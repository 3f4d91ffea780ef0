"""Video for omnistream: a short clip becomes frames of patch ids with a separator before each frame.

    <frame> p p p … p  <frame> p p p … p  …          (local ids; <frame> is id 0)

Frames are read with Pillow (animated GIF), at most `frames` of them, evenly spaced;
each is cut into patches and quantised with a k-means codebook exactly as omnistream's image
modality does (this plugin reuses it). Decoding gives the frames back, saved as an animated GIF.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageSequence
from pydantic import Field

from omnistream.modalities import BadSample, BaseModality, ModalityOptions
from omnistream.modalities.image import ImageModality

__version__ = "0.1.0"
SEP = 0  # local id of the frame separator


@dataclass
class Clip:
    frames: list  # PIL images
    ms_per_frame: int = 100


class VideoOptions(ModalityOptions):
    frames: int = Field(4, ge=1, le=64, description="frames kept per clip, evenly spaced")
    size: int = Field(16, ge=4, le=256, description="each frame is resized to size×size")
    patch: int = Field(4, ge=1, le=32, description="patch side in pixels")
    codebook_size: int = Field(64, ge=2, le=65536, description="patch codes shared by all frames")
    max_pixels: int = Field(
        4_000_000, ge=1, description="frames claiming more pixels are refused (decompression bombs)"
    )
    max_frames_read: int = Field(1000, ge=1, description="clips with more frames are refused (untrusted-input bound)")


class VideoModality(BaseModality):
    name: ClassVar[str] = "video"
    version: ClassVar[str] = "1"
    # .gif only: omnistream's image modality already reads .webp, and one key must mean one modality
    keys: ClassVar[tuple[str, ...]] = ("gif",)
    Options = VideoOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.5}
    error_bound: ClassVar[float] = 0.6  # mean per-frame relative MSE, as the image modality measures it

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        self._img = ImageModality(
            {"size": o.size, "patch": o.patch, "codebook_size": o.codebook_size, "max_pixels": o.max_pixels}
        )

    @property
    def vocab_size(self) -> int:
        return self.options.codebook_size + 1  # + the frame separator

    def decode_bytes(self, ext: str, data: bytes) -> Clip:
        if not data:
            raise BadSample("video_empty")
        try:
            im = Image.open(io.BytesIO(data))
            if im.size[0] * im.size[1] > self.options.max_pixels:
                raise BadSample("video_too_large", f"{im.size}")
            n = getattr(im, "n_frames", 1)
            if n > self.options.max_frames_read:
                raise BadSample("video_too_long", f"{n} frames")
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        except BadSample:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises is the record's
            raise BadSample("video_undecodable", f"{type(e).__name__}: {e}") from None
        keep = np.linspace(0, len(frames) - 1, min(self.options.frames, len(frames))).round().astype(int)
        return Clip([frames[i] for i in keep], int(im.info.get("duration", 100) or 100))

    def fit_features(self, obj: Clip) -> np.ndarray:
        return np.concatenate([self._img.fit_features(f) for f in obj.frames])

    def fit(self, features: list[np.ndarray]) -> None:
        self._img.fit(features)
        self._mark_fitted()

    def encode(self, obj: Clip) -> np.ndarray:
        self._require_fitted()
        return np.concatenate([np.concatenate([[SEP], self._img.encode(f) + 1]) for f in obj.frames]).astype(np.int64)

    def decode(self, ids) -> Clip:
        self._require_fitted()
        ids = np.asarray(ids, dtype=np.int64)
        cuts = np.flatnonzero(ids == SEP).tolist() + [len(ids)]
        frames = [self._img.decode(ids[a + 1 : b] - 1) for a, b in zip(cuts, cuts[1:]) if b > a + 1]
        return Clip(frames or [self._img.decode(np.zeros(0, np.int64))])

    def roundtrip_error(self, obj: Clip, decoded: Clip) -> float:
        pairs = list(zip(obj.frames, decoded.frames))
        if len(pairs) != len(obj.frames):
            return float("inf")
        return float(np.mean([self._img.roundtrip_error(a, b) for a, b in pairs]))

    def to_bytes(self, obj: Clip) -> tuple[str, bytes]:
        buf = io.BytesIO()
        obj.frames[0].save(
            buf, format="GIF", save_all=True, append_images=obj.frames[1:], duration=obj.ms_per_frame, loop=0
        )
        return "gif", buf.getvalue()

    def _state(self) -> dict[str, Any]:
        return self._img._state()

    def _set_state(self, state: dict[str, Any]) -> None:
        o = self.options  # load() may have replaced the options: rebuild the frame tokenizer from them
        self._img = ImageModality(
            {"size": o.size, "patch": o.patch, "codebook_size": o.codebook_size, "max_pixels": o.max_pixels}
        )
        self._img._set_state(state)
        self._img._mark_fitted()
