"""Images, with one of two tokenizers (`tokenizer`):

- "kmeans" (the default): a fixed grid of p×p patches, each quantised to a k-means codebook. An image
  becomes (size/patch)^2 ids, row-major: 36 ids at the default 24×24 pixels and 4×4 patches; the demo
  (configs/demo.toml) uses 16×16 pixels, so 16 ids. Pixels are standardised per image (zero mean, unit
  variance, clipped at ±3σ) before patching so that the codebook spends its codes on shape, not on each
  image's brightness and colour cast; the decoder maps back with a fixed mid-grey mean and contrast.
- "fsq": a learned convolutional autoencoder with finite scalar quantisation (fsq.py), trained by
  `omnistream tokenizers fit` on the configured shards' images. RGB, (size/down)^2 ids per image,
  prod(levels) codes; it keeps brightness and colour, so what a model writes can be the photo it saw.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, ImageOps
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


class ImageOptions(ModalityOptions):
    tokenizer: Literal["kmeans", "fsq"] = Field(
        "kmeans",
        description="'kmeans': patch codebook (fast to fit, "
        "grey by default); 'fsq': a learned autoencoder (RGB, colour kept)",
    )
    size: int = Field(24, ge=4, le=1024, description="images are resized to size×size pixels")
    patch: int = Field(4, ge=1, le=64, description="patch side in pixels; size must be a multiple of it")
    codebook_size: int = Field(
        256, ge=2, le=65536, description="number of patch codes (this modality's vocabulary size)"
    )
    grayscale: bool = Field(
        True, description="kmeans: quantise luminance only (3× smaller patches, colour is dropped); fsq is always RGB"
    )
    max_pixels: int = Field(
        16_000_000,
        ge=1,
        description="images whose header claims more pixels are refused before decoding (decompression bombs)",
    )
    fit_patches: int = Field(200_000, ge=1000, description="at most this many patches are used to fit the codebook")
    seed: int = Field(0, description="seed of the k-means initialisation, and of the fsq fit")
    # ---- tokenizer = "fsq" -------------------------------------------------------------------------
    down: int = Field(8, description="fsq: downsampling, 4, 8 or 16; (size/down)^2 ids per image (64 at 64 px)")
    levels: list[int] = Field(
        [8, 5, 5, 5],
        min_length=1,
        max_length=8,
        description="fsq: levels per latent channel; their product is the codebook size "
        "(1,000 for [8,5,5,5]; at most 65,536)",
    )
    width: int = Field(
        64,
        ge=8,
        le=512,
        description="fsq: the decoder's channels after the stem (a multiple of "
        "16), 2x and 4x at coarser resolutions; the encoder has half",
    )
    fit_steps: int = Field(3000, ge=1, description="fsq: training steps of the fit")
    fit_batch: int = Field(32, ge=1, description="fsq: images per training step")
    fit_lr: float = Field(2e-3, gt=0, description="fsq: peak AdamW learning rate (warm-up, then cosine decay)")
    fit_grad_weight: float = Field(
        0.3, ge=0, description="fsq: weight of the L1 loss on image gradients (edges) beside the squared error"
    )
    fit_chroma_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fsq: weight of colour (chroma) error against "
        "brightness (luma) error; below 1 the codes spend their bits on shape first",
    )

    @model_validator(mode="after")
    def _grid(self):
        if self.tokenizer == "kmeans" and self.size % self.patch:
            raise ValueError(f"size={self.size} is not a multiple of patch={self.patch}")
        if self.tokenizer == "fsq":
            if self.down not in (4, 8, 16):
                raise ValueError(f"down={self.down}: fsq downsamples by 4, 8 or 16")
            if self.size % self.down:
                raise ValueError(f"size={self.size} is not a multiple of down={self.down}")
            if any(v < 2 for v in self.levels) or np.prod(self.levels) > 65536:
                raise ValueError(f"levels={self.levels}: each at least 2, their product at most 65,536")
            if self.width % 16:
                raise ValueError(f"width={self.width} is not a multiple of 16")
        return self


class ImageFilters(FilterOptions):
    min_side: int = Field(8, ge=1, description="images with a smaller side are filtered: image_too_small")
    max_aspect: float = Field(4.0, ge=1, description="width/height (or height/width) above this: image_bad_aspect")
    min_std: float = Field(
        3.0, ge=0, description="grey-level standard deviation (0-255) below this: image_near_uniform"
    )
    near_max_hamming: int = Field(
        4, ge=0, le=16, description="dHash bits two images may differ in and still be near-duplicates"
    )


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


# Only JPEG, PNG and WebP are decoded, told apart by their bytes' signature, whatever the member's extension
# says (a PNG saved as .jpg is common in photo folders): Pillow's open() would otherwise try every format it
# knows (TIFF, BMP, PCX, SGI, TGA, ICO, DDS, QOI ... and EPS, which hands the bytes to Ghostscript where
# it is installed), so anything else is refused by its content.
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_MAGIC = {
    "JPEG": lambda b: b[:3] == b"\xff\xd8\xff",
    "PNG": lambda b: b[:4] == b"\x89PNG",
    "WEBP": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
}
# what shows through a transparent pixel: one fixed colour (white, as a page or a browser shows it), never
# whatever colour the encoder left under an alpha of 0
BACKGROUND = (255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB: 16-bit greys scaled (converting clips them: a 0-65535 gradient came out
    99.6% white), transparency (an alpha channel, a palette's or a colour key) composited over BACKGROUND."""
    if im.mode.startswith("I") or im.mode == "F":  # a 16-bit PNG's greys arrive as I;16 or I, 0..65535
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), im).convert("RGB")
    return im.convert("RGB")


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
        self._weights: dict[str, np.ndarray] | None = None  # fsq: the autoencoder's state dict, as arrays
        self._ae = None  # fsq: the autoencoder built from _weights, on first use
        self._report: dict[str, Any] = {}

    @property
    def _fsq(self) -> bool:
        return self.options.tokenizer == "fsq"

    @property
    def vocab_size(self) -> int:
        return int(np.prod(self.options.levels)) if self._fsq else self.options.codebook_size

    @property
    def side(self) -> int:
        """Ids per image side: an image is side×side ids, row-major."""
        o = self.options
        return o.size // (o.down if self._fsq else o.patch)

    @property
    def tokens_per_image(self) -> int:
        return self.side**2

    # ---- bytes -> object -------------------------------------------------------
    def decode_bytes(self, ext: str, data: bytes) -> Image.Image:
        if not data:
            raise BadSample("image_empty")
        if ext not in FORMATS:
            raise BadSample("image_wrong_format", f".{ext} is not one of the image extensions {sorted(FORMATS)}")
        fmt = next((f for f, is_it in _MAGIC.items() if is_it(data)), None)
        if fmt is None:
            raise BadSample(
                "image_wrong_format", f"the bytes of this .{ext} are not JPEG, PNG or WebP (they begin {data[:8]!r})"
            )
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
        except Image.DecompressionBombError as e:  # Pillow's own bound (2× its MAX_IMAGE_PIXELS) fired first
            raise BadSample("image_too_large", str(e)) from None
        except Exception as e:  # noqa: BLE001 - the format's own signature, then bytes its reader cannot make sense of
            raise BadSample("image_undecodable", f"{type(e).__name__}: {e}") from None
        w, h = im.size
        if w * h > self.options.max_pixels:
            raise BadSample("image_too_large", f"{w}x{h} > max_pixels={self.options.max_pixels}")
        try:
            im.load()
            # a phone's photo is stored as the sensor saw it, with the turn to show it in its EXIF tag
            im = ImageOps.exif_transpose(im)
        except Exception as e:  # noqa: BLE001 - whatever EXIF handling raises is the record's
            raise BadSample("image_undecodable", f"{type(e).__name__}: {e}") from None
        return to_rgb(im)

    # ---- object -> pixels / patches ---------------------------------------------
    def pixels(self, im: Image.Image) -> np.ndarray:
        """The image as the fsq tokenizer sees it: size×size RGB, uint8."""
        o = self.options
        return np.asarray(im.convert("RGB").resize((o.size, o.size), Image.Resampling.BILINEAR), dtype=np.uint8)

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
        return self.prepare(obj)

    def fit(self, features: list[np.ndarray], progress: Callable[[int, int, dict], None] | None = None) -> None:
        if not self._fsq:
            rows = sample_rows(features, self.options.fit_patches, self.options.seed)
            self._codebook = kmeans(rows, self.options.codebook_size, seed=self.options.seed)
            self._mark_fitted()
            return
        import torch

        from . import fsq

        o = self.options
        images = np.stack([np.asarray(f, dtype=np.uint8) for f in features])
        if images.shape[1:] != (o.size, o.size, 3):
            raise ValueError(f"fsq fit features must be {o.size}×{o.size} RGB, got {images.shape[1:]}")
        torch.manual_seed(o.seed)  # the initial weights too: the same samples and options fit the same tokenizer
        ae = fsq.FSQAutoencoder(o.levels, o.down, o.width)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        on_step, steps, curves = self.fit_curves(o.fit_steps, ("loss", "psnr"), progress)
        fsq.train(
            ae,
            images,
            steps=o.fit_steps,
            batch=o.fit_batch,
            lr=o.fit_lr,
            seed=o.seed,
            grad_weight=o.fit_grad_weight,
            chroma_weight=o.fit_chroma_weight,
            device=device,
            on_step=on_step,
        )
        self._set_state({k: v.detach().cpu().numpy() for k, v in ae.state_dict().items()})
        self._mark_fitted()
        # reconstructions of the first 8 fit images, original above, decode(encode(x)) below
        first = images[:8]
        recon = np.stack(
            [self.pixels(self.decode(ids)) for ids in self.encode_batch([Image.fromarray(x) for x in first])]
        )
        grid = np.concatenate([np.concatenate(list(first), 1), np.concatenate(list(recon), 1)], 0)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        self._report = {
            "metrics": curves,
            "steps": steps,
            "images": {"reconstructions": buf.getvalue()},
            "summary": {"fit_psnr_db": float(np.mean(fsq.psnr(first, recon)))},
        }

    def fit_resources(self, cluster: dict[str, float]) -> dict[str, float] | None:
        return self.trained_fit_resources(cluster) if self._fsq else None

    def fit_report(self) -> dict[str, Any]:
        return self._report

    def _autoencoder(self):
        if self._ae is None:
            import torch

            from . import fsq

            o = self.options
            ae = fsq.FSQAutoencoder(o.levels, o.down, o.width)
            ae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self._weights.items()})
            self._ae = ae.eval()
        return self._ae

    def encode(self, obj: Image.Image) -> np.ndarray:
        return self.encode_many([self.prepare(obj)])[0]

    def prepare(self, obj: Image.Image) -> np.ndarray:
        """What encoding needs of an image: its size×size pixels (fsq) or standardised patches (kmeans),
        a few KB, so the tokenizer actor can hold a chunk's worth and encode them in one pass."""
        return self.pixels(obj) if self._fsq else self._patches(obj)

    def encode_many(self, prepared: list[np.ndarray]) -> list[np.ndarray]:
        """Ids of each prepared image; fsq runs them through the encoder as one batch."""
        self._require_fitted()
        if not self._fsq:
            return [nearest(p, self._codebook) for p in prepared]
        from . import fsq

        codes = self._autoencoder().encode(fsq.to_tensor(np.stack(prepared)))
        return [c.numpy().astype(np.int64) for c in codes]

    def encode_batch(self, objs: list[Image.Image]) -> list[np.ndarray]:
        """Several images through the encoder at once."""
        return self.encode_many([self.prepare(o) for o in objs])

    def span(self, position: int) -> tuple[int, int, bool]:
        """An image is exactly side×side ids (any of the block), then its end marker."""
        T = self.side * self.side
        return (0, self.vocab_size, False) if position < T else (0, 0, True)

    def decode(self, ids) -> Image.Image:
        self._require_fitted()
        o = self.options
        g = self.side
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._fsq:
            import torch

            from . import fsq

            if len(ids) < g * g:  # a short generation: fill the rest with the middle code (mid grey)
                ids = np.concatenate([ids, np.full(g * g - len(ids), self.vocab_size // 2)])
            x = self._autoencoder().decode(torch.from_numpy(ids[: g * g]).view(1, -1), g)
            return Image.fromarray(fsq.to_uint8(x)[0], "RGB")
        p = o.patch
        c = 1 if o.grayscale else 3
        if len(ids) < g * g:  # a short generation: fill the rest with the flattest code
            ids = np.concatenate([ids, np.full(g * g - len(ids), np.abs(self._codebook).sum(1).argmin())])
        x = self._codebook[ids[: g * g]].reshape(g, g, p, p, c).transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, c)
        x = np.clip(0.5 + 0.2 * x, 0, 1)  # standardised -> mid grey ± 0.2 per σ
        arr = (x * 255).round().astype(np.uint8)
        return Image.fromarray(arr[:, :, 0] if c == 1 else arr, "L" if c == 1 else "RGB").convert("RGB")

    def roundtrip_error(self, obj: Image.Image, decoded: Image.Image) -> float:
        if self._fsq:  # the share of the image's pixel variance lost, on the pixels it encodes; the variance
            # has a floor of 16² (grey levels): a nearly flat image's few levels of noise are not its content
            a = self.pixels(obj).astype(np.float32)
            b = self.pixels(decoded).astype(np.float32)
            return float(((a - b) ** 2).mean() / max(a.var(), 16.0**2))
        a, b = self._patches(obj), self._patches(decoded)
        return float(((a - b) ** 2).mean() / (a.var() + 1e-6))

    def to_bytes(self, obj: Image.Image) -> tuple[str, bytes]:
        buf = io.BytesIO()
        obj.save(buf, format="PNG")
        return "png", buf.getvalue()

    # the options only one of the two tokenizers reads: the other's are left out of the fingerprint, so a
    # k-means bundle fitted before the fsq options existed keeps its fingerprint (and still loads)
    KMEANS_ONLY = ("patch", "codebook_size", "grayscale", "fit_patches")
    FSQ_ONLY = (
        "tokenizer",
        "down",
        "levels",
        "width",
        "fit_steps",
        "fit_batch",
        "fit_lr",
        "fit_grad_weight",
        "fit_chroma_weight",
    )
    # options added after bundles were written: left out of the fingerprint at their default, so a bundle
    # fitted before them keeps the fingerprint it was saved with
    LATER = ("fit_grad_weight", "fit_chroma_weight")

    def _fingerprint_options(self) -> dict[str, Any]:
        drop = self.KMEANS_ONLY if self._fsq else self.FSQ_ONLY
        opts = {k: v for k, v in self.options.model_dump(mode="json").items() if k not in drop}
        for k in self.LATER:
            if k in opts and opts[k] == ImageOptions.model_fields[k].default:
                del opts[k]
        if self._fsq:
            opts["tokenizer"] = "fsq"
        return opts

    def _state(self) -> dict[str, Any]:
        if self._fsq:
            return {f"ae.{k}": v for k, v in self._weights.items()}
        return {"codebook": self._codebook}

    def _set_state(self, state: dict[str, Any]) -> None:
        if self._fsq:
            self._weights = {
                k.removeprefix("ae."): np.asarray(v, dtype=np.float32)
                for k, v in state.items()
                if isinstance(v, np.ndarray)
            }
            self._ae = None
            return
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
