"""End to end: `erasure ui` on the toy model, driven by headless Chromium (Debian's `chromium` package) through
Playwright given its executable path; no browser is downloaded, and the page may reach only the app itself.

Trains a patch with a few steps, waits for the progress to reach the end and the before/after image to appear,
checks the patch file, and saves a screenshot (ERASURE_SCREENSHOT=path.png keeps a copy, as docs/images does);
then cancels a long run from the page and checks that nothing was written."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

STEPS = 4


def _missing(what: str):
    if os.environ.get("CI"):  # .ci/run installs both; a CI run without them must not pass quietly
        pytest.fail(f"{what} is required for the browser test in CI")
    pytest.skip(f"{what} is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _missing("chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        _missing("playwright (pip install playwright)")
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory, chromium):
    folder = tmp_path_factory.mktemp("ui")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(folder / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erasure_core", "ui", "--port", str(port), "--patch-dir",
                             str(folder / "patches")], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("erasure ui did not come up:\n" + (folder / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url, folder / "patches", folder / "server.log"
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_train_a_patch_in_the_browser(app, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from erasure_core.patch import load_patch

    url, patches, server_log = app
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            # the app only: fonts, analytics or anything else from outside would hang an offline run
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((url, "data:", "blob:"))
                       else route.abort())
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#erasure_concept textarea, #erasure_concept input").first.fill("circle")
            page.locator("#erasure_steps input").fill(str(STEPS))
            page.get_by_text("Advanced").first.click()
            advanced = (("tokens", 2), ("cache_seeds", 1), ("cache_steps", 4), ("preview_images", 2),
                        ("preview_steps", 10))
            for _ in range(3):  # on a loaded machine the accordion may render its fields again after the first fill
                for field, value in advanced:
                    page.locator(f"#erasure_{field} input").fill(str(value))
                page.wait_for_timeout(300)
                if all(page.locator(f"#erasure_{f} input").input_value() == str(v) for f, v in advanced):
                    break
            page.locator("#erasure_train").click()
            text = page.locator("#erasure_progress .erasure-progress-text")
            expect(text).to_contain_text(f"done: step {STEPS}/{STEPS}", timeout=120_000)
            bar = page.locator("#erasure_progress .erasure-progress")
            assert bar.get_attribute("data-done") == bar.get_attribute("data-total") == str(STEPS)
            image = page.locator("#erasure_preview img")
            expect(image).to_be_visible(timeout=30_000)
            page.wait_for_function("() => { const i = document.querySelector('#erasure_preview img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            expect(page.locator("#erasure_status").first).to_contain_text("circle-memory.safetensors")
            shot = tmp_path / "erasure_tab.png"
            page.screenshot(path=str(shot), full_page=True)
            # a long run, cancelled once it is training: it stops and writes nothing
            page.locator("#erasure_steps input").fill("5000")
            page.locator("#erasure_output textarea, #erasure_output input").first.fill("cancelled")
            page.locator("#erasure_train").click()
            expect(text).to_contain_text("training: step", timeout=60_000)
            page.locator("#erasure_cancel").click()
            expect(page.locator("#erasure_status").first).to_contain_text("cancelled", timeout=60_000)
            expect(text).to_contain_text("cancelled")
            # a page opened afterwards (or reloaded) shows the last run, not an empty tab
            page.reload(wait_until="domcontentloaded")
            expect(page.locator("#erasure_status").first).to_contain_text("cancelled", timeout=60_000)
            expect(text).to_contain_text("cancelled")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("ERASURE_SCREENSHOT"):
        shutil.copy(shot, os.environ["ERASURE_SCREENSHOT"])
    assert not (patches / "cancelled.safetensors").exists()
    patch = load_patch(patches / "circle-memory.safetensors")
    assert patch.concepts == ["circle"] and patch.method == "memory" and patch.tokens == 2
    assert "Traceback" not in server_log.read_text()
