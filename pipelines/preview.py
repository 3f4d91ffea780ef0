"""`omnistream data preview`: one self-contained HTML page of sampled records, to look at before training.

Each record shows its key, its outcome (kept, or filtered / errored and why, as training would decide),
its token count (with a fitted bundle), its labels, and its parts in order: images inline, clips as audio
players, text as text. Nothing from the data reaches the page as markup: text and labels are escaped
(html.escape), and media are re-encoded here (Pillow thumbnails as PNG, clips as 16-bit WAV of at most
MAX_CLIP_S) before they are inlined as data: URLs, so the page holds no bytes a hostile file brought and
opens with no network (no script, no remote resource).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random

from .documents import document_length
from .records import RawRecord, part_ext

THUMB = 192  # pixels on the longer side of an image's thumbnail
MAX_CLIP_S = 10.0  # seconds of a clip kept in the page (and never more than 10 s at 192 kHz, whatever a header says)
MAX_PIXELS = 40_000_000  # an image with more, by its header, is not decoded for the page (said instead)

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.rec{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em;margin:.8em 0}
.head{font-size:.85em;color:#555;margin-bottom:.4em}.kept{color:#176b2c}.filtered{color:#a66200}
.errored{color:#b0172b}.parts{display:flex;flex-wrap:wrap;gap:.6em;align-items:center}
.part{border:1px dashed #ccc;padding:.3em;border-radius:4px}.txt{max-width:40em;white-space:pre-wrap}
.labels{font-family:monospace;font-size:.8em;color:#444}
"""


def _img(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_PIXELS:  # the header says; nothing is decoded yet
            raise ValueError(f"{im.width}x{im.height} pixels")
        im.draft("RGB", (THUMB, THUMB))  # a JPEG decodes at a reduced size
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return f'<img alt="image" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _clip(data: bytes) -> str:
    import soundfile as sf

    info = sf.info(io.BytesIO(data))
    frames = min(int(min(info.duration, MAX_CLIP_S) * info.samplerate), int(MAX_CLIP_S * 192_000))
    wave, rate = sf.read(io.BytesIO(data), frames=frames, dtype="float32", always_2d=True)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    src = base64.b64encode(buf.getvalue()).decode()
    player = f'<audio controls preload="none" src="data:audio/wav;base64,{src}"></audio>'
    return f"{player} <small>{info.duration:.2f} s</small>"


def _part(field: str, data: bytes) -> str:
    ext = part_ext(field)[1]
    try:
        if ext in ("jpg", "jpeg", "png", "webp"):
            body = _img(data)
        elif ext in ("wav", "flac"):
            body = _clip(data)
        elif ext in ("txt", "text"):
            body = f'<div class="txt">{html.escape(data.decode("utf-8", "replace")[:2000])}</div>'
        else:
            body = f"<small>{len(data)} bytes</small>"
    except Exception as e:  # noqa: BLE001 - a part that cannot be shown says so; the page goes on
        body = f"<small>cannot show: {html.escape(type(e).__name__)}</small>"
    return f'<div class="part" title="{html.escape(field)}">{body}</div>'


def record_html(r: RawRecord, o, tokens: int | None) -> str:
    status = o.status if o.status == "kept" else f"{o.status}: {o.reason}"
    detail = f" ({html.escape(o.detail[:200])})" if o.detail and o.status != "kept" else ""
    head = (
        f'<div class="head"><b>{html.escape(r.key)}</b> &middot; <span class="{html.escape(o.status)}">'
        f"{html.escape(status)}</span>{detail}"
        + (f" &middot; {tokens} tokens" if tokens is not None else "")
        + f" &middot; <small>{html.escape(r.shard)}</small></div>"
    )
    fields = sorted((f for f in r.fields if f != "json"), key=lambda f: (part_ext(f)[0] or 0, f))
    parts = "".join(_part(f, r.fields[f]) for f in fields)
    labels = ""
    if "json" in r.fields:
        try:
            labels = json.dumps(json.loads(r.fields["json"]), ensure_ascii=False)[:500]
        except ValueError:
            labels = "(labels are not JSON)"
        labels = f'<div class="labels">{html.escape(labels)}</div>'
    return f'<div class="rec">{head}<div class="parts">{parts}</div>{labels}</div>'


def page(items, n: int, seed: int, title: str) -> tuple[str, int]:
    """(the HTML, records shown): `n` of the (record, Outcome) pairs, drawn evenly (reservoir sampling,
    seeded), shown in their order."""
    rng = random.Random(seed)
    pick: list[tuple[int, RawRecord, object]] = []
    for i, (r, o) in enumerate(items):
        if len(pick) < n:
            pick.append((i, r, o))
        else:
            j = rng.randrange(i + 1)
            if j < n:
                pick[j] = (i, r, o)
    pick.sort(key=lambda t: t[0])
    body = []
    for _, r, o in pick:
        tokens = document_length(o.parts) if o.status == "kept" and o.parts else None
        body.append(record_html(r, o, tokens))
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        # no script, and nothing fetched from anywhere: what the data holds cannot run or call out
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "media-src data:; style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(pick)} records</p>{''.join(body)}</body></html>"
    )
    return doc, len(pick)
