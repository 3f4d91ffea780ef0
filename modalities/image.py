"""Images: a fixed grid of p×p patches, each quantised to a k-means codebook.

An image becomes (size/patch)^2 ids, row-major: 36 ids at the default 24×24 pixels
and 4×4 patches; the demo (configs/demo.toml) uses 16×16 pixels, so 16 ids. Pixels are standardised per image
(zero mean, unit variance, clipped at ±3σ) before patching so that the codebook
spends its codes on shape, not on each image's brightness and colour cast; the
decoder maps back with a fixed mid-grey mean and contrast.
"""
from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np
from omnistream.common.errors import BadSample
from PIL import Image, ImageOps
from pydantic import Field, model_validator

from .base import (
    BaseModality,
    FilterOptions,
    ModalityOptions,
    kmeans,
    nearest,
    sample_rows,
)


class ImageOptions(ModalityOptions):
    size: int = Field(24, ge=4, le=1024, description="images are resized to size×size pixels")
    patch: int = Field(4, ge=1, le=64, description="patch side in pixels; size must be a multiple of it")
    codebook_size: int = Field(256, ge=2, le=65536, description="number of patch codes (this modality's vocabulary size)")
    grayscale: bool = Field(True, description="quantise luminance only (3× smaller patches, colour is dropped)")
    max_pixels: int = Field(16_000_000, ge=1, description="images whose header claims more pixels are refused before decoding (decompression bombs)")
    fit_patches: int = Field(200_000, ge=1000, description="at most this many patches are used to fit the codebook")
    seed: int = Field(0, description="seed of the k-means initialisation")

    @model_validator(mode="after")
    def _grid(self):
        if self.size % self.patch:
            raise ValueError(f"size={self.size} is not a multiple of patch={self.patch}")
        return self


class ImageFilters(FilterOptions):
    min_side: int = Field(8, ge=1, description="images with a smaller side are filtered: image_too_small")
    max_aspect: float = Field(4.0, ge=1, description="width/height (or height/width) above this: image_bad_aspect")
    min_std: float = Field(3.0, ge=0, description="grey-level standard deviation (0-255) below this: image_near_uniform")
    near_max_hamming: int = Field(4, ge=0, le=16, description="dHash bits two images may differ in and still be near-duplicates")


def dhash(im: Image.Image) -> int:
    """64-bit difference hash: grey 9×8, one bit per horizontal gradient sign (robust to re-encoding and resizing)."""
    g = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    return int.from_bytes(np.packbits((g[:, 1:] > g[:, :-1]).flatten()).tobytes(), "big")


def dhash_bands(h: int, max_hamming: int) -> list[str]:
    """max_hamming+1 disjoint bit bands of a 64-bit hash: two hashes within max_hamming share one
    (multi-index hashing)."""
    k = max_hamming + 1
    edges = [round(i * 64 / k) for i in range(k + 1)]
    return [f"i{i}:{(h >> edges[i]) & ((1 << (edges[i + 1] - edges[i])) - 1):x}" for i in range(k)]


# Only the format a member's extension names is decoded: Pillow's open() otherwise tries every format it
# knows (TIFF, BMP, PCX, SGI, TGA, ICO, DDS, QOI ... and EPS, which hands the bytes to Ghostscript where
# it is installed), so a .png could be any of them.
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_MAGIC = {"JPEG": lambda b: b[:3] == b"\xff\xd8\xff", "PNG": lambda b: b[:4] == b"\x89PNG",
          "WEBP": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"}


class ImageModality(BaseModality):
    name: ClassVar[str] = "image"
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ("jpg", "jpeg", "png", "webp")
    Options = ImageOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.5}
    # relative MSE (share of per-image pixel variance lost) of decode(encode(x)) in
    # standardised space; 256 codes on 4×4 grey patches measure ≈0.15-0.3 on the demo digits
    error_bound: ClassVar[float] = 0.5
    Filters = ImageFilters

    def __init__(self, options=None):
        super().__init__(options)
        self._codebook: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.options.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return (self.options.size // self.options.patch) ** 2

    # ---- bytes -> object -------------------------------------------------------
    def decode_bytes(self, ext: str, data: bytes) -> Image.Image:
        if not data:
            raise BadSample("image_empty")
        fmt = FORMATS.get(ext)
        if fmt is None:
            raise BadSample("image_wrong_format", f".{ext} is not one of the image extensions {sorted(FORMATS)}")
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
        except Image.DecompressionBombError as e:  # Pillow's own bound (2× its MAX_IMAGE_PIXELS) fired first
            raise BadSample("image_too_large", str(e)) from None
        except Image.UnidentifiedImageError as e:
            if _MAGIC[fmt](data):  # the format's own signature, then bytes its reader cannot make sense of
                raise BadSample("image_undecodable", f"{type(e).__name__}: {e}") from None
            raise BadSample("image_wrong_format", f"the bytes of this .{ext} are not {fmt} "
                                                  f"(they begin {data[:8]!r})") from None
        except Exception as e:
            raise BadSample("image_undecodable", f"{type(e).__name__}: {e}") from None
        w, h = im.size
        if w * h > self.options.max_pixels:
            raise BadSample("image_too_large", f"{w}x{h} > max_pixels={self.options.max_pixels}")
        try:
            im.load()
            # a phone's photo is stored as the sensor saw it, with the turn to show it in its EXIF tag
            im = ImageOps.exif_transpose(im)
        except Exception as e:
            raise BadSample("image_undecodable", f"{type(e).__name__}: {e}") from None
        return im.convert("RGB")

    # ---- object -> patches ---------------------------------------------------
    def _patches(self, im: Image.Image) -> np.ndarray:
        o = self.options
        im = im.convert("L" if o.grayscale else "RGB").resize((o.size, o.size), Image.Resampling.BILINEAR)
        x = np.asarray(im, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[:, :, None]
        x = np.clip((x - x.mean()) / (x.std() + 1e-3), -3, 3)
        g, p, c = o.size // o.patch, o.patch, x.shape[2]
        # (g*p, g*p, c) -> (g, g, p, p, c) -> (g*g, p*p*c): row-major patches
        return x.reshape(g, p, g, p, c).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * c)

    def fit_features(self, obj: Image.Image) -> np.ndarray:
        return self._patches(obj)

    def fit(self, features: list[np.ndarray]) -> None:
        rows = sample_rows(features, self.options.fit_patches, self.options.seed)
        self._codebook = kmeans(rows, self.options.codebook_size, seed=self.options.seed)
        self._mark_fitted()

    def encode(self, obj: Image.Image) -> np.ndarray:
        self._require_fitted()
        return nearest(self._patches(obj), self._codebook)

    def decode(self, ids) -> Image.Image:
        self._require_fitted()
        o = self.options
        g, p = o.size // o.patch, o.patch
        c = 1 if o.grayscale else 3
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) < g * g:  # a short generation: fill the rest with the flattest code
            ids = np.concatenate([ids, np.full(g * g - len(ids), np.abs(self._codebook).sum(1).argmin())])
        x = self._codebook[ids[: g * g]].reshape(g, g, p, p, c).transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, c)
        x = np.clip(0.5 + 0.2 * x, 0, 1)  # standardised -> mid grey ± 0.2 per σ
        arr = (x * 255).round().astype(np.uint8)
        return Image.fromarray(arr[:, :, 0] if c == 1 else arr, "L" if c == 1 else "RGB").convert("RGB")

    def roundtrip_error(self, obj: Image.Image, decoded: Image.Image) -> float:
        a, b = self._patches(obj), self._patches(decoded)
        return float(((a - b) ** 2).mean() / (a.var() + 1e-6))

    def to_bytes(self, obj: Image.Image) -> tuple[str, bytes]:
        buf = io.BytesIO()
        obj.save(buf, format="PNG")
        return "png", buf.getvalue()

    def _state(self) -> dict[str, Any]:
        return {"codebook": self._codebook}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._codebook = np.asarray(state["codebook"], dtype=np.float32)

    # ---- data quality ----------------------------------------------------------------
    def quality_reason(self, im: Image.Image, f: ImageFilters) -> str | None:
        w, h = im.size
        if min(w, h) < f.min_side:
            return "image_too_small"
        if max(w, h) / max(min(w, h), 1) > f.max_aspect:
            return "image_bad_aspect"
        grey = np.asarray(im.convert("L").resize((min(w, 64), min(h, 64))), dtype=np.float32)
        if grey.std() < f.min_std:
            return "image_near_uniform"
        return None

    def near_signatures(self, im: Image.Image, f: ImageFilters) -> list[tuple[str, int | None, int]]:
        h = dhash(im)
        return [(b, h, f.near_max_hamming) for b in dhash_bands(h, f.near_max_hamming)]
