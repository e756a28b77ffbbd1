"""The dashboard in a real browser: headless Chromium opens the task stream and progress pages
during a real ``nic compress`` run and finds the pipeline's task names in the pages' Bokeh data
(the plots are canvases: names live in their ColumnDataSources, not in DOM text)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from nic_pipeline.runtime.cluster import connect
from tests.deploy.conftest import job_environment

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")

TASKS = ("detect-tissue", "encode-block", "finalize-slide")
# every string in every column of every Bokeh data source of the page's documents
BOKEH_STRINGS = """
const out = [];
for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
  for (const model of doc.all_models) {
    const data = model.data;
    if (!data) continue;
    const columns = data instanceof Map ? Array.from(data.values()) : Object.values(data);
    for (const column of columns) {
      for (const value of Array.from(column || [])) if (typeof value === "string") out.push(value);
    }
  }
}
return out;
"""


def _chromium(tmp_path):
    """Headless Chromium through chromedriver, a fresh profile, no background traffic."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Debian chromium and chromium-driver not installed (.ci/browser-deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _names_seen(browser) -> set[str]:
    """The pipeline task names present in the page's Bokeh data."""
    strings = browser.execute_script(BOKEH_STRINGS)
    return {task for task in TASKS if any(task in s for s in strings)}


@pytest.mark.slow
def test_dashboard_shows_pipeline_tasks_in_chromium(cohort, tmp_path):
    browser = _chromium(tmp_path)
    with browser, connect(workers=2, dashboard=False) as client:
        base = client.dashboard_link.replace("/status", "")
        browser.get(f"{base}/status")  # the task stream and the progress bars on one page
        run = subprocess.Popen([sys.executable, "-m", "nic_pipeline", "compress", str(cohort), "--out",
                                str(tmp_path / "cohort.zarr"), "--scheduler", client.scheduler.address,
                                "--block", "2"], env=job_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            seen: set[str] = set()
            shot_during_run = False
            while run.poll() is None:
                time.sleep(0.5)
                seen |= _names_seen(browser)
                if len(seen) >= 2 and not shot_during_run and run.poll() is None:
                    browser.save_screenshot(str(tmp_path / "status-during-run.png"))
                    shot_during_run = True
            output, _ = run.communicate(timeout=600)
            browser.get(f"{base}/individual-task-stream")
            time.sleep(2)
            stream = _names_seen(browser)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0 and "4/4 slides complete" in output, output
    assert seen == set(TASKS), f"the status page showed only {seen} during the run"
    assert shot_during_run and (tmp_path / "status-during-run.png").stat().st_size > 10_000
    assert {"encode-block", "finalize-slide"} <= stream, stream  # the stream keeps the run's recent tasks
