"""End to end in headless Debian Chromium: the manager's demo path on the embedded SmolLM2, screenshots of each page.

Run: .venv/bin/python -m pytest -q -m browser tests/test_browser.py     (about 5-8 minutes on 2 CPU cores)
Screenshots land in test-artifacts/screenshots/, the downloaded report in test-artifacts/.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SHOTS = ARTIFACTS / "screenshots"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
JOB_TIMEOUT_S = 12 * 60  # the demo's two evaluated jobs on a busy 2-core CPU (about 3-6 minutes)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                       "(apt-get update && apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(isolated_home):
    """`streamlit run app.py` on a free localhost port, with the test's SATEN_HOME; stopped afterwards."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "streamlit.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true"], cwd=ROOT, env=dict(os.environ), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"streamlit did not come up on {url}; see {log.name}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:  # a script thread busy in torch ignores SIGTERM for a while
        proc.kill()
        proc.wait(timeout=20)
    log.close()
    stop_workers()


def stop_workers() -> None:
    """The app started a detached job worker for this test's SATEN_HOME: stop it by its recorded pid."""
    import signal

    from saten_core.jobs import store

    for pid in store.live_workers():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        yield page
        browser.close()


def idle(page, timeout_s: float = 300) -> None:
    """Wait until the app stays done with its script runs (no 'Running...' widget for 3 checks, 0.7 s apart).

    Several key presses queue several reruns; one quiet check can fall between two of them.
    """
    quiet, deadline = 0, time.time() + timeout_s
    while quiet < 3:
        if time.time() > deadline:
            pytest.fail(f"the app kept running for more than {timeout_s} s")
        running = page.get_by_test_id("stStatusWidget").count() > 0
        quiet = 0 if running else quiet + 1
        page.wait_for_timeout(700)


def wait_until(page, check, what: str, timeout_s: float = 120) -> None:
    """Poll the page until `check()` holds: reruns queued by key presses land one after another."""
    deadline = time.time() + timeout_s
    while not check():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        page.wait_for_timeout(500)


def open_page(page, title: str, heading: str | None = None, timeout_s: float = 300) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    idle(page, timeout_s)
    page.get_by_role("heading", name=heading or title).first.wait_for(timeout=timeout_s * 1000)


def shot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to its height first."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("""() => Math.max(window.innerHeight, ...[...document.querySelectorAll(
        '[data-testid=stMain], [data-testid=stMainBlockContainer]')].map(e => e.scrollHeight))""")
    page.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, 8000)})
    page.wait_for_timeout(1000)  # charts re-lay themselves out to the new size
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def no_traceback(page) -> None:
    assert page.get_by_test_id("stException").count() == 0, page.get_by_test_id("stException").first.inner_text()


def charts(page) -> int:
    """Plotly charts drawn on the page (waits for the first one to appear)."""
    page.get_by_test_id("stPlotlyChart").first.wait_for(timeout=60_000)
    return page.get_by_test_id("stPlotlyChart").count()


def metric_value(page, label: str) -> str:
    box = page.get_by_test_id("stMetric").filter(has_text=label).first
    return box.get_by_test_id("stMetricValue").inner_text()


NAV = ["Home", "Model", "Spectrum", "Plan", "Run", "Results", "ROI"]


def test_manager_demo_path_end_to_end(server, browser_page):
    page = browser_page
    page.goto(f"{server}/run")  # the fresh server's first request opens a page by URL, not the home page
    idle(page)
    page.get_by_role("heading", name="Run").first.wait_for()
    links = page.get_by_test_id("stSidebarNav").get_by_test_id("stSidebarNavLink")
    # st.navigation's pages only: no helper module, no folder-per-page list (each link is "icon\n\nTitle")
    assert [t.split("\n")[-1].strip() for t in links.all_inner_texts()] == NAV
    no_traceback(page)
    page.goto(server)
    idle(page)
    page.get_by_role("heading", name="Saten Studio").first.wait_for()
    shot(page, "01-home")

    open_page(page, "Model")
    page.get_by_text("Compressible layers").wait_for(timeout=300_000)
    assert metric_value(page, "Compressible layers") == "210"
    no_traceback(page)
    shot(page, "02-model")

    open_page(page, "Spectrum")
    page.get_by_text("Effective rank").first.wait_for(timeout=300_000)
    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(5):
        slider.press("ArrowRight")
    target = page.get_by_test_id("stSliderThumbValue").first.inner_text().strip()
    wait_until(page, lambda: page.get_by_text(f"rank {target}", exact=True).count() > 0, f"rank marker {target}")
    idle(page)
    shot(page, "03-spectrum")
    no_traceback(page)
    assert charts(page) >= 3

    open_page(page, "Plan")
    before = metric_value(page, "Predicted bytes")
    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(10):
        slider.press("ArrowLeft")
    assert page.get_by_test_id("stSliderThumbValue").first.inner_text().strip() == "0.70"
    wait_until(page, lambda: metric_value(page, "Kept").startswith(("69.", "70.")), "70% kept")
    assert metric_value(page, "Predicted bytes") != before
    no_traceback(page)
    shot(page, "04-plan")

    open_page(page, "Home", heading="Saten Studio")
    page.get_by_role("button", name="Start the demo run").click()
    idle(page)
    queued = page.get_by_test_id("stAlert").first.inner_text()
    ids = [int(i) for i in re.findall(r"(\d+) \((?:original|baseline|demo)", queued)]
    assert len(ids) == 3, queued

    open_page(page, "Run")
    wait_for_jobs(ids)
    page.wait_for_timeout(3000)  # one more poll of the queue fragment
    shot(page, "05-run")

    open_page(page, "Results")
    no_traceback(page)
    assert charts(page) >= 2
    page.get_by_role("button", name="Ask both models").click()
    page.get_by_text("Original", exact=True).wait_for(timeout=180_000)
    idle(page)
    no_traceback(page)
    assert page.get_by_test_id("stAlert").filter(has_text="Error").count() == 0
    shot(page, "06-results")

    open_page(page, "ROI")
    page.get_by_text("Monthly saving").first.wait_for()
    no_traceback(page)
    shot(page, "07-roi")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download report (HTML)").click()
    report = ARTIFACTS / "saten-roi-report.html"
    info.value.save_as(report)
    text = report.read_text()
    assert "Cost comparison" in text and "Assumptions" in text and "smollm2-135m" in text
    assert "Short term (measured today)" in text and "Mid term (projected" in text


def wait_for_jobs(ids: list[int]) -> None:
    """The demo's jobs run for real in the worker the page started; fail with the job's reason if one fails."""
    from saten_core import jobs

    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:
        states = [jobs.get_job(i) for i in ids]
        failed = [j for j in states if j.status in ("failed", "cancelled")]
        assert not failed, [(j.id, j.status, j.error) for j in failed]
        if all(j.status == "succeeded" for j in states):
            return
        time.sleep(5)
    pytest.fail(f"demo jobs {ids} did not finish in {JOB_TIMEOUT_S} s: {[jobs.get_job(i).status for i in ids]}")


def test_three_sessions_at_once_while_a_job_runs(server, browser_page, slow_llama_dir):
    """Load: three browser sessions walk every page together (a bounded loop) while the worker runs a job.

    Every page renders in every session, none shows an exception, and the worker still runs one job at a time.
    The sessions are new contexts (own cookies, own Streamlit session) of the module's browser: Playwright's sync
    API runs once per thread.
    """
    from saten_core import jobs
    from saten_core.plan import Plan

    plan = Plan(method="saten-aw", rank=4, density=0.05, heal_steps=60, heal_eval_every=30).to_json()
    ids = [jobs.submit(str(slow_llama_dir), plan, device="cpu") for _ in range(2)]
    jobs.ensure_worker(idle_exit_s=30)
    deadline = time.time() + 300
    while jobs.get_job(ids[0]).status == "queued" and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.get_job(ids[0]).status == "running", jobs.get_job(ids[0]).error
    running_seen: list[int] = []
    contexts = [browser_page.context.browser.new_context(viewport={"width": 1200, "height": 900})
                for _ in range(3)]
    try:
        pages = [c.new_page() for c in contexts]
        for page in pages:
            page.goto(f"{server}/run")
        for title in ["Run", "Home", "Model", "Plan", "Results", "ROI", "Run"]:
            for page in pages:  # all three ask at once; then each must finish
                page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            for page in pages:
                idle(page)
                page.get_by_role("heading", name="Saten Studio" if title == "Home" else title).first.wait_for(
                    timeout=300_000)
                no_traceback(page)
            running_seen.append(len(jobs.list_jobs(status="running")))
    finally:
        for c in contexts:
            c.close()
    assert max(running_seen) <= 1 and len(jobs.list_jobs()) >= 2
    assert len(jobs.store.live_workers()) <= 1  # one worker: one job per device
    for job_id in ids:
        if jobs.get_job(job_id).status in ("queued", "running"):
            jobs.request_cancel(job_id)
