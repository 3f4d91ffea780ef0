"""The learned image tokenizer (`image` with tokenizer = "fsq") against k-means and a thumbnail, on real photos.

    python benchmarks/image_tokenizer.py                      # 64 px, 64 tokens per image
    python benchmarks/image_tokenizer.py --size 256 --down 16 --set fit_steps=1500

Photos: every file given with --photos (default: the photographs of Debian's lomiri-wallpapers-16.04,
lomiri-wallpapers-20.04 and mate-backgrounds packages, and the sample photos scikit-learn and
matplotlib ship, where installed; `apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
mate-backgrounds`). Every fourth photo, in name order, is held out: its crops are never fitted on. Each
photo gives random square crops (half to all of its short side, seeded: at 64 px that is about as much detail per
pixel as ImageNet 64x64), resized to --size px.

In one run, on the held-out crops:
- fsq: the configured autoencoder, fitted here with ImageModality.fit (the code `tokenizers fit` runs in
  its Ray task), its fit time;
- kmeans: omnistream's k-means tokenizer at the same ids per image (RGB patches of size/side px,
  1,024 codes), fitted on the same crops;
- thumbnail: the crop shrunk to side×side px and blown back up, bicubic (24 bits per "token");
PSNR and SSIM of each (mean over crops), and fsq's batched encode throughput on one core (and on the GPU,
where torch sees one: the fit runs there too). Writes
image_tokenizer.json and image_tokenizer.png (original | k-means | thumbnail | fsq, 8 crops).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omnistream.modalities import image_eval
from omnistream.modalities.image import ImageModality

DEBIAN = [
    "Bridge_by_Sander_Klootwijk",
    "Dragonfly_by_Bolly",
    "Kleiber_by_Lukas_Baubkus",
    "Picture_0B_by_freespace",
    "Picture_1A_by_freespace",
    "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi",
    "free_by_Peter_Nerlich",
    "friends_by_Aitzol_Berasategi",
    "greentock_by_Peter_Nerlich",
    "life_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi",
    "seeding_by_Clements_Engelhardt",
    "sunset_by_Aitzol_Berasategi",
]


def default_photos() -> list[str]:
    found = [f"/usr/share/backgrounds/{n}.jpg" for n in DEBIAN]
    found += glob.glob("/usr/share/backgrounds/mate/nature/*.jpg")
    for pkg, rel in (
        ("sklearn", "datasets/images/china.jpg"),
        ("sklearn", "datasets/images/flower.jpg"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ):
        try:
            mod = __import__(pkg)
            found.append(str(Path(mod.__file__).parent / rel))
        except ImportError:
            pass
    return sorted(f for f in found if os.path.exists(f))


def skimage_photos() -> list[str]:
    """The colour photographs in scikit-image's wheel (`pip install scikit-image`; read as files, never imported
    for anything else)."""
    import skimage

    d = Path(skimage.__file__).parent / "data"
    return [
        str(d / f)
        for f in (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "hubble_deep_field.jpg",
            "motorcycle_left.png",
            "rocket.jpg",
        )
    ]


def crops(path: str, n: int, size: int, seed: int) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    # shrink once so the short side is 4 crops' worth of pixels (a crop is at least half of it): every crop
    # is then still downsampled by 2x or more, and 400 crops of a 4K photo take seconds, not minutes
    im.thumbnail((8 * size * im.width // min(im.size), 8 * size * im.height // min(im.size)), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(seed)
    w, h = im.size
    out = []
    for _ in range(n):
        s = int(rng.uniform(1 / 2, 1) * min(w, h))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(np.asarray(im.crop((x, y, x + s, y + s)).resize((size, size), Image.Resampling.LANCZOS)))
    return np.stack(out)


def all_crops(paths: list[str], n: int, size: int, seed0: int) -> np.ndarray:
    """n crops of each photo (photo i seeded seed0 + i), one process per photo: 22,000 crops take a minute
    on one core."""
    with ProcessPoolExecutor(min(len(paths), os.cpu_count() or 1)) as ex:
        return np.concatenate(
            list(ex.map(crops, paths, [n] * len(paths), [size] * len(paths), range(seed0, seed0 + len(paths))))
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="*", help="photo files (default: see above)")
    ap.add_argument(
        "--fit-only",
        nargs="*",
        default=[],
        metavar="PHOTO",
        help="more photos to fit on, never held out (the held-out set stays that of --photos); "
        "'skimage' names the six colour photographs scikit-image ships",
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--down", type=int, default=8)
    ap.add_argument("--train-crops", type=int, default=400, help="crops per fitted photo")
    ap.add_argument("--eval-crops", type=int, default=100, help="crops per held-out photo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ImageOptions field of the fsq tokenizer, e.g. levels=[8,8,8,5,5,5] or width=96",
    )
    ap.add_argument("--out", default="image_tokenizer")
    a = ap.parse_args()
    photos = a.photos or default_photos()
    if len(photos) < 4:
        raise SystemExit(f"need at least 4 photos, found {len(photos)}: see --help")
    held = photos[3::4]
    extra = [q for p in a.fit_only for q in (skimage_photos() if p == "skimage" else [p])]
    fitted = [p for p in photos if p not in held] + [p for p in extra if p not in photos]
    torch.set_num_threads(a.threads)
    train, test = all_crops(fitted, a.train_crops, a.size, 0), all_crops(held, a.eval_crops, a.size, 1000)
    print(
        f"{len(fitted)} photos fitted ({len(train)} crops), {len(held)} held out ({len(test)} crops): "
        f"{', '.join(Path(p).stem for p in held)}",
        flush=True,
    )

    opts = {"tokenizer": "fsq", "size": a.size, "down": a.down}
    for kv in a.set:
        k, v = kv.split("=", 1)
        opts[k] = json.loads(v)
    mod = ImageModality(opts)
    t0, last = time.time(), [0.0]

    def progress(step, total, m):
        if time.time() - last[0] > 30 or step == total:
            last[0] = time.time()
            print(
                f"  fsq fit step {step}/{total}  loss {m['loss']:.4f}  batch psnr {m['psnr']:.2f} dB  "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )

    mod.fit(list(train), progress=progress)
    fit_s = time.time() - t0
    t0 = time.time()
    km = image_eval.kmeans_baseline(mod, train)
    km_s = time.time() - t0
    torch.set_num_threads(a.threads)
    res, grid = image_eval.compare(mod, km, test)
    o = mod.options
    res.update(
        {
            "fsq_levels": o.levels,
            "fsq_width": o.width,
            "fsq_fit_steps": o.fit_steps,
            "fsq_fit_batch": o.fit_batch,
            "fsq_fit_s": round(fit_s, 1),
            "fsq_params": int(sum(v.size for v in mod._weights.values())),
            "kmeans_fit_s": round(km_s, 1),
            "photos_fitted": len(fitted),
            "photos_held_out": len(held),
            "crops_fitted": len(train),
        }
    )
    Path(f"{a.out}.json").write_text(json.dumps(res, indent=1))
    Image.fromarray(grid).save(f"{a.out}.png")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
