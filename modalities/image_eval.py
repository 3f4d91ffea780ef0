"""How well an image tokenizer keeps a picture: PSNR and SSIM of decode(encode(x)) beside two baselines.

- k-means: omnistream's k-means tokenizer at the same ids per image (RGB patches of size/side px), fitted
  on the same training images;
- thumbnail: the image shrunk to side×side px and blown back up, bicubic; 24 bits per "token", where a
  1,000-code tokenizer spends 10, so beating it is the real test.
Used by `omnistream tokenizers eval` and benchmarks/image_tokenizer.py, so both measure alike.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from . import fsq
from .image import ImageModality


def thumbnail(images: np.ndarray, side: int) -> np.ndarray:
    """(B, S, S, 3) uint8 -> the same, through a side×side bicubic thumbnail."""
    S = images.shape[1]
    return np.stack(
        [
            np.asarray(
                Image.fromarray(x)
                .resize((side, side), Image.Resampling.BICUBIC)
                .resize((S, S), Image.Resampling.BICUBIC)
            )
            for x in images
        ]
    )


def roundtrip(mod: ImageModality, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(B, S, S, 3) uint8 -> decode(encode(x)) of each, as the tokenizer's size×size pixels."""
    ims = [Image.fromarray(x) for x in images]
    out = []
    for i in range(0, len(ims), batch):
        out += [mod.pixels(mod.decode(ids)) for ids in mod.encode_batch(ims[i : i + batch])]
    return np.stack(out)


def kmeans_baseline(learned: ImageModality, train: np.ndarray, codes: int = 1024) -> ImageModality:
    """omnistream's k-means tokenizer with the learned one's ids per image, fitted on `train` (B, S, S, 3)."""
    size = learned.options.size
    km = ImageModality(
        {"tokenizer": "kmeans", "size": size, "patch": size // learned.side, "grayscale": False, "codebook_size": codes}
    )
    km.fit([km.fit_features(Image.fromarray(x)) for x in train])
    return km


def encode_rate(mod: ImageModality, images: np.ndarray, batch: int = 256) -> float:
    """Images per second of batched encoding, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ims = [Image.fromarray(x) for x in images]
        mod.encode_batch(ims[:16])  # first-call set-up is not timed
        t0 = time.perf_counter()
        for i in range(0, len(ims), batch):
            mod.encode_batch(ims[i : i + batch])
        return len(ims) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def gpu_encode_rate(mod: ImageModality, images: np.ndarray, batch: int = 2048, rounds: int = 20) -> float:
    """Images per second through a learned tokenizer's encoder on the GPU: uint8 pixels from pinned host
    memory in, codes back in host memory, batches of `batch` (the resize to size px, which `prepare` does on
    a CPU, is not in it). Measured 311,000 64 px images/s on one H200."""
    enc = mod._autoencoder().to("cuda")
    try:
        # the images, repeated to one full batch; sent as uint8 and scaled on the GPU
        x = torch.from_numpy(np.resize(images, (batch, *images.shape[1:]))).pin_memory()

        def once():
            return enc.encode(fsq.to_tensor(x.cuda(non_blocking=True))).cpu()

        for _ in range(3):  # warm-up: cuDNN's choice of kernels and the allocator
            once()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(rounds):
            once()
        torch.cuda.synchronize()
        return rounds * batch / (time.perf_counter() - t0)
    finally:
        enc.to("cpu")


def compare(learned: ImageModality, km: ImageModality, held_out: np.ndarray) -> tuple[dict, np.ndarray]:
    """Figures of the learned tokenizer, k-means and the thumbnail on `held_out` (B, S, S, 3) uint8, and a
    picture of 8 of them: rows of original | k-means | thumbnail | learned."""
    side = learned.side
    rec = {
        learned.options.tokenizer if learned.options.tokenizer != "kmeans" else "learned": roundtrip(learned, held_out),
        "kmeans": roundtrip(km, held_out),
        "thumbnail": thumbnail(held_out, side),
    }
    name = next(iter(rec))
    res: dict = {
        "images": len(held_out),
        "size": learned.options.size,
        "tokens_per_image": side * side,
        "codes": learned.vocab_size,
        "bits_per_token": round(float(np.log2(learned.vocab_size)), 2),
        f"{name}_encode_images_per_s_1core": round(encode_rate(learned, held_out[:512]), 1),
    }
    if learned.options.tokenizer == "fsq" and torch.cuda.is_available():
        res[f"{name}_encode_images_per_s_gpu"] = round(gpu_encode_rate(learned, held_out), 1)
        res["gpu"] = torch.cuda.get_device_name()
    for k, r in rec.items():
        res[f"psnr_db_{k}"] = round(float(fsq.psnr(held_out, r).mean()), 2)
        res[f"ssim_{k}"] = round(float(fsq.ssim(held_out, r).mean()), 4)
    res[f"{name}_minus_thumbnail_db"] = round(res[f"psnr_db_{name}"] - res["psnr_db_thumbnail"], 2)
    res[f"{name}_minus_kmeans_db"] = round(res[f"psnr_db_{name}"] - res["psnr_db_kmeans"], 2)
    pick = np.linspace(0, len(held_out) - 1, min(8, len(held_out))).astype(int)
    grid = np.concatenate(
        [np.concatenate([held_out[i], rec["kmeans"][i], rec["thumbnail"][i], rec[name][i]], 1) for i in pick], 0
    )
    return res, grid
