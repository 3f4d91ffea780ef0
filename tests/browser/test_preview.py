"""`omnistream data preview`'s page as a person sees it: written from a JSONL manifest of real records (the
session corpus's images, clips and captions, a document of several parts, and a caption that is markup),
opened in the headless Chromium the MLflow test drives. The screenshot is saved in test-artifacts/."""

from __future__ import annotations

import json
import subprocess

import pytest

from common import EXE, FLAGS, artifacts_dir, chromium, tar_records

pytestmark = pytest.mark.slow
HOSTILE = "<script>document.title='owned'</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def page_file(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preview")
    rows, n = [], 0
    for key, fields in tar_records(corpus["train"][0])[:12]:
        row = {"key": key}
        for name, v in fields.items():
            if name.endswith(("jpg", "png", "wav", "flac")):
                (tmp / f"{key}.{name}").write_bytes(v)
                row[name] = f"{key}.{name}"
            else:
                row[name] = v.decode()
        rows.append(row)
    rows[0]["txt"] = HOSTILE + " a photo of a digit"
    (tmp / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        n += sum(1 for k in r if k.endswith(("jpg", "png")))
    r = subprocess.run(
        [*EXE, "data", "preview", str(tmp / "m.jsonl"), "-n", "12", "--out", str(tmp / "p.html")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"12 records: {tmp / 'p.html'}"
    return tmp / "p.html", rows, n


def test_the_preview_page_shows_every_record_its_images_clips_and_text_and_runs_nothing(page_file):
    from playwright.sync_api import sync_playwright

    path, rows, images = page_file
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        pg = b.new_page(viewport={"width": 1200, "height": 1600})
        dialogs = []
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.goto(path.as_uri(), wait_until="load")
        assert pg.locator(".rec").count() == len(rows)
        keys = pg.locator(".rec .head b").all_inner_texts()
        assert keys == [r["key"] for r in rows]
        # every image decoded by the browser (a thumbnail Pillow made), every clip a player with a duration
        loaded = pg.evaluate("[...document.querySelectorAll('.rec img')].map(i => i.complete && i.naturalWidth)")
        assert len(loaded) == images and all(w and w > 0 for w in loaded), loaded
        clips = sum(1 for r in rows for k in r if k.endswith(("wav", "flac")))
        durations = pg.evaluate(
            """async () => Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(ok => {
                   a.preload = 'metadata'; a.onloadedmetadata = () => ok(a.duration); a.onerror = () => ok(-1);
                   a.load(); })))"""
        )
        assert len(durations) == clips and all(0 < d < 10 for d in durations), durations
        # the caption that was markup is shown as text: no script ran, no element came from it
        assert HOSTILE in pg.locator(".rec .txt").first.inner_text()
        assert pg.title().startswith("omnistream data preview") and not dialogs
        assert pg.locator("script").count() == 0 and pg.locator(".rec img[src='x']").count() == 0
        assert all(
            o in ("kept",) or o.startswith(("filtered", "errored"))
            for o in pg.locator(".rec .head span").all_inner_texts()
        )
        pg.screenshot(path=str(artifacts_dir() / "data-preview.png"), full_page=False)
        b.close()
