"""The MLflow UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright from pip;
no browser download): a tiny grid's parent expands to its children, a child's ``selection.png``
renders, and its ``loss/train`` has one point per epoch, in time order. Skips, saying why, where
Chromium or Playwright is missing (.ci/run installs both)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient
from services import free_port

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture(scope="module")
def ui(tmp_path_factory, data_dir):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ALTRACK_DATA_DIR": str(data_dir)}
    env.pop("MLFLOW_RUN_ID", None)
    grid = [sys.executable, "-m", "altrack", "run", "--methods", "coreset,random", "--budget", "100", "--epochs",
            str(EPOCHS), "--no-log-models", "--quiet", "--experiment", "ui", "--out", "out"]  # fmt: skip
    subprocess.run(grid, cwd=folder, env=env, check=True, capture_output=True, timeout=300)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow ui did not start")
                time.sleep(0.5)
        yield {"base": base, "client": MlflowClient(uri), "chromium": chromium}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_ui_shows_the_grid_its_children_a_selection_plot_and_epoch_losses(ui):
    from playwright.sync_api import sync_playwright  # lazy: only this test needs a browser

    client = ui["client"]
    experiment = client.get_experiment_by_name("ui").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    child = runs["mnist-coreset-k100-s0"]
    base = ui["base"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=ui["chromium"], headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # "load", then wait for the rows themselves: Playwright discourages "networkidle", which timed
        # out after 30 s in a CI run whose two cores were busy (the page's scripts load slowly there)
        page.goto(f"{base}/#/experiments/{experiment}/runs?viewMode=TRAINING", wait_until="load", timeout=90000)
        parent_row = page.get_by_role("row").filter(has_text="grid").first
        parent_row.wait_for(timeout=60000)
        parent_row.locator("button, [role=button]").first.click()  # expand the parent
        for name in ("mnist-coreset-k100-s0", "mnist-random-k100-s0"):
            page.get_by_text(name).first.wait_for(timeout=30000)

        page.goto(f"{base}/#/experiments/{experiment}/runs/{child}/artifacts", wait_until="load", timeout=90000)
        page.get_by_text("selection.png").first.click()
        image = page.locator("img[src^='blob:']").first
        image.wait_for(timeout=30000)
        assert page.evaluate("(img) => img.complete && img.naturalWidth", image.element_handle()) > 500

        answer = page.request.get(f"{base}/ajax-api/2.0/mlflow/metrics/get-history",
                                  params={"run_id": child, "metric_key": "loss/train"})  # fmt: skip
        history = sorted(answer.json()["metrics"], key=lambda m: m["step"])
        assert [m["step"] for m in history] == list(range(EPOCHS))
        stamps = [int(m["timestamp"]) for m in history]
        assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), stamps
        browser.close()
