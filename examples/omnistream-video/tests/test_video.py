"""The example plugin's own tests: one call to omnistream's conformance kit."""

import io
import random

from omnistream_video import VideoModality
from PIL import Image, ImageDraw

from omnistream.modalities import check_modality


def clip(seed: int, frames: int = 6) -> bytes:
    """A digit sliding across a noisy background, as an animated GIF."""
    rng = random.Random(seed)
    d = str(rng.randrange(10))
    imgs = []
    for t in range(frames):
        im = Image.new("RGB", (32, 32), tuple(rng.randint(150, 255) for _ in range(3)))
        ImageDraw.Draw(im).text((4 + 3 * t, 8 + rng.randint(-2, 2)), d, fill=(20, 20, 20))
        imgs.append(im)
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=80, loop=0)
    return buf.getvalue()


def test_video_plugin_conforms():
    samples = [("gif", clip(i)) for i in range(24)]
    mod = check_modality(VideoModality, samples, options={"codebook_size": 32})
    ids = mod.encode(mod.decode_bytes("gif", samples[0][1]))
    assert (ids == 0).sum() == 4, "one separator before each of the 4 kept frames"
