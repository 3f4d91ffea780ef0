"""MLflow where users look (issue 13), as a person sees it: the session's short real training run,
logged to the tracking server `cluster up` starts (jobs.start_tracking_server, 127.0.0.1), and a
headless Chromium, driven by Playwright, on the run page whose address omnistream prints.

Chromium is Debian's (`make test` installs the `chromium` package where it is missing; elsewhere set
OMNISTREAM_CHROMIUM): Playwright cannot download its own browsers here. The run page's screenshot is
saved in test-artifacts/ (OMNISTREAM_TEST_ARTIFACTS overrides), and the README shows it.
"""

import time
from pathlib import Path

import pytest

from common import FLAGS, artifacts_dir, chromium, mlflow_client, mlflow_run

pytestmark = pytest.mark.slow

STEPS = 10  # the shared run's (UNINTERRUPTED); it evaluates at steps 5 and 10
MODALITIES = ("text", "image", "audio")
# MLflow 3.x opens its assistant panel on a browser's first visit, over a third of the page: a person
# closes it once, and the browser remembers; this is that memory
NO_ASSISTANT = (
    "try { localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    " localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'); } catch (e) {}"
)
WAIT_MS = 60_000  # the UI's first load on 2 busy cores


@pytest.fixture(scope="module")
def run(trained):
    """The session's small run (tests/conftest.py `trained`): 2 workers, ZeRO-3, 10 steps, evaluations at
    steps 5 and 10 (generated images, WAVs, answer tables), system metrics at the default interval, all
    on the tracking server `cluster up` starts."""
    res = trained["res"]
    return {"uri": res.tracking_uri, "run_id": res.run_id, "url": mlflow_run(res.tracking_uri, res.run_id).url()}


@pytest.fixture(scope="module")
def browser(run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, run):
    """A fresh browser profile on the run's page, at the address omnistream prints for the run."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(WAIT_MS)
    ctx.add_init_script(NO_ASSISTANT)
    pg = ctx.new_page()
    pg.goto(run["url"], wait_until="load")
    yield pg
    ctx.close()


# the bytes behind an <img>'s address, whether an http: or a blob: one, read in the page
FETCH_BYTES = "async src => Array.from(new Uint8Array(await (await fetch(src)).arrayBuffer()))"


def logged_images(run, key: str, step: int) -> list[bytes]:
    """The files MLflow's log_image wrote for `key` at `step` (the PNG and its compressed WebP):
    images/<key, '/' as '~'>+step+<step>+timestamp+...; read back through the tracking server."""
    c = mlflow_client(run["uri"])
    stem = f"images/{key.replace('/', '~')}+step+{step}+"
    ours = [a.path for a in c.list_artifacts(run["run_id"], "images") if a.path.startswith(stem)]
    assert ours, stem
    return [Path(c.download_artifacts(run["run_id"], p)).read_bytes() for p in ours]


def cards(pg):
    return pg.get_by_test_id("experiment-view-compare-runs-card")


def card(pg, title: str):
    return cards(pg).filter(has=pg.locator(f'h4[title="{title}"]'))


def drawn(c, chart: str = ".js-plotly-plot"):
    """Wait until card `c` draws its chart, the card brought into view first as a person scrolls to it: MLflow's
    chart grid draws a chart only once its card is in the viewport (an IntersectionObserver); a fresh clone's
    run waited 60 s for a system-metrics chart that was never drawn."""
    c.scroll_into_view_if_needed()
    c.locator(chart).first.wait_for()


def test_the_run_page_opens_in_the_model_training_view(page, run):
    """Not MLflow 3's GenAI view (traces, judges, evaluation runs): the experiment's navigation is the
    model-training one, and the run page has its metrics tabs."""
    nav = page.locator("aside").first
    nav.get_by_text("Models", exact=True).wait_for()
    side = nav.inner_text().split("\n")
    assert "Runs" in side and "Models" in side, side
    assert not {"Judges", "Evaluation runs", "Prompts"} & set(side), side
    page.get_by_role("tab", name="Model metrics").wait_for()
    tabs = [t.inner_text() for t in page.get_by_role("tab").all()]
    assert {"Overview", "Model metrics", "System metrics", "Artifacts"} <= set(tabs), tabs
    # the run description names what ran
    page.get_by_text("one decoder over", exact=False).first.wait_for()


def test_each_modalitys_loss_is_drawn_with_every_logged_step(page, run):
    """Charts named train/loss/<modality>, each drawn with one point per step the run logged."""
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("train/loss/")
    for m in MODALITIES:
        c = card(page, f"train/loss/{m}")
        drawn(c, ".js-plotly-plot path.js-line")
        logged = mlflow_run(run["uri"], run["run_id"]).metric_history(f"train/loss/{m}")
        assert [s for s, _ in logged] == list(range(1, STEPS + 1)), logged
        points = c.locator(".js-plotly-plot .scatterlayer .point")
        assert points.count() == len(logged), (m, points.count(), logged)


def test_system_metrics_are_drawn(page, run):
    """The System metrics tab (issue 13: it was empty) draws this node's CPU and memory."""
    page.get_by_role("tab", name="System metrics").click()
    logged = [k for k in mlflow_run(run["uri"], run["run_id"]).final_metrics() if k.startswith("system/")]
    assert any(k.endswith("/cpu_utilization_percentage") for k in logged), logged
    cpu = next(k for k in logged if k.endswith("/cpu_utilization_percentage"))
    drawn(card(page, cpu))


def test_the_image_panel_shows_a_generated_sample_and_the_run_page_is_saved(page, run):
    """A text->image sample logged with its step: set the image card to the last evaluation as a person
    would (its Configure dialog: step, run parameters off), and the sample that step logged is drawn.
    Then the run page, loss charts and the image, is saved as a screenshot."""
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("train/loss/")
    images = cards(page).filter(has=page.locator('h4[title^="text_to_image/"]'))
    images.first.wait_for()
    for i in range(images.count()):
        c = images.nth(i)
        c.get_by_test_id("experiment-view-compare-runs-card-menu").click()
        page.get_by_role("menuitem", name="Configure").click()
        dlg = page.get_by_role("dialog")
        step = dlg.locator("input[type=number]")
        step.fill(str(STEPS))
        step.press("Tab")
        dlg.get_by_role("switch").click()  # "Show run parameters": 120 config values, over the image
        dlg.get_by_role("button", name="Save changes").click()
        dlg.wait_for(state="hidden")
        img = c.locator("img").first
        img.wait_for()
        page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(), timeout=WAIT_MS)
        # MLflow up to 3.17 points the <img> at the artifact's address; 3.18 fetches it and shows a blob:
        # URL. Either way the bytes drawn are what this card's key logged at the chosen step
        key = c.locator("h4").first.get_attribute("title")
        drawn = bytes(page.evaluate(FETCH_BYTES, img.get_attribute("src")))
        assert drawn in logged_images(run, key, STEPS), (key, len(drawn))
    page.mouse.move(0, 0)  # no hover toolbar over a chart
    time.sleep(1)  # the charts' last transition
    shot = artifacts_dir() / "mlflow-run-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
