"""JupyterLab in headless Chromium (Debian's, driven by playwright through executable_path): 00_tour and 01
run to the end on tiny with no error output, and moving the 01 explorer's slider redraws its figure; the
07 studio is driven with the mouse (draw a region, Run, Save) and its case folder checked.
Screenshots land in .cache/browser/. Run with `make test-browser` (needs `apt-get install chromium`)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".cache" / "browser"
TOKEN = "labkit-browser-test"
SMALL = {
    "00_tour": dict(n_triplets=2),
    "01_attention_correspondence": dict(n_pairs=3, n_calib=2, timesteps=[1.0, 0.5], sample_steps=2, size=64),
    "07_studio": dict(steps=3, cases_dir=str(WORK / "studio_cases")),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    import papermill as pm

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for stem, params in SMALL.items():  # the notebooks with tiny parameters injected, not executed
        pm.execute_notebook(
            str(REPO / "notebooks" / f"{stem}.ipynb"),
            str(WORK / f"{stem}.ipynb"),
            prepare_only=True,
            parameters=dict(preset="tiny", out_dir=str(WORK / "out" / stem), **params),
        )
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.token={TOKEN}",
        f"--ServerApp.root_dir={WORK}",
        "--LabApp.expose_app_in_browser=True",
        "--allow-root",
    ]
    log = open(WORK / "lab.log", "w")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=1)
            break
        except Exception:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"JupyterLab did not start: {(WORK / 'lab.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _run_all(page, url: str, name: str, timeout_s: float = 300) -> None:
    page.goto(f"{url}/lab/tree/{name}?token={TOKEN}")
    page.wait_for_function(
        "(name) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " return w && w.context && w.context.path === name && w.sessionContext && w.sessionContext.session &&"
        " w.sessionContext.session.kernel; }",
        arg=name,
        timeout=120_000,
    )
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'", timeout=120_000
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    done = """() => { const nb = window.jupyterapp.shell.currentWidget;
        const cells = nb.content.widgets.filter(c => c.model.type === 'code');
        return cells.every(c => c.model.executionCount !== null)
          && nb.sessionContext.session.kernel.status === 'idle'; }"""
    page.wait_for_function(done, timeout=timeout_s * 1000, polling=1000)


def _errors(page) -> list[str]:
    return page.evaluate("""() => { const nb = window.jupyterapp.shell.currentWidget; const out = [];
        for (const c of nb.content.widgets) { if (c.model.type !== 'code') continue;
          for (let i = 0; i < c.model.outputs.length; i++) { const o = c.model.outputs.get(i);
            if (o.type === 'error') out.push(o.toJSON().ename + ': ' + o.toJSON().evalue); } }
        return out; }""")


def test_tour_and_attention_notebooks_run_and_the_explorer_responds(lab, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _run_all(page, lab, "00_tour.ipynb")
    page.screenshot(path=str(WORK / "00_tour.png"), full_page=True)
    assert _errors(page) == []
    assert json.loads((WORK / "out" / "00_tour" / "results.json").read_text())["claims"]

    _run_all(page, lab, "01_attention_correspondence.ipynb")
    assert _errors(page) == []
    slider = page.locator(".widget-interact .widget-slider").first
    slider.scroll_into_view_if_needed()
    img = page.locator(".widget-interact .jp-OutputArea-output img").last
    img.wait_for(timeout=60_000)
    before = img.get_attribute("src")
    assert page.locator(".widget-interact select").count() >= 2  # block, queries (and path) dropdowns render
    page.screenshot(path=str(WORK / "01_explorer_before.png"), full_page=True)
    handle = slider.locator(".noUi-handle, [role=slider]").first
    handle.focus()
    handle.press("ArrowRight")  # case 0 -> 1
    page.wait_for_function(
        "(b) => { const i = [...document.querySelectorAll('.widget-interact .jp-OutputArea-output img')].pop();"
        " return i && i.getAttribute('src') !== b; }",
        arg=before,
        timeout=60_000,
    )
    page.screenshot(path=str(WORK / "01_explorer_after.png"), full_page=True)
    assert img.get_attribute("src") != before  # the figure was redrawn for the other case
    page.close()


def test_studio_draws_runs_and_saves_with_the_mouse(lab, browser):
    import numpy as np
    from PIL import Image

    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    _run_all(page, lab, "07_studio.ipynb")
    assert _errors(page) == []
    cases = WORK / "studio_cases"
    n_before = len((cases / "metadata.jsonl").read_text().splitlines())  # the headless part saved the examples
    canvas = page.locator("canvas.studio-canvas, .studio-canvas canvas").first
    canvas.scroll_into_view_if_needed()
    page.locator(".studio-clear").first.click()
    box = canvas.bounding_box()
    x0, y0 = box["x"] + 0.30 * box["width"], box["y"] + 0.35 * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 13):  # a stroke to the lower right, one mouse-move event per step
        page.mouse.move(x0 + 8 * k, y0 + 5 * k)
    page.mouse.up()
    out_img = page.locator("img.studio-panel-output").first
    before = out_img.get_attribute("src")
    page.wait_for_timeout(500)
    page.locator(".studio-run").first.click()
    page.wait_for_function(
        "(b) => { const i = document.querySelector('img.studio-panel-output');"
        " return i && i.getAttribute('src') !== b; }",
        arg=before,
        timeout=120_000,
    )
    assert page.locator(".studio-error").count() == 0
    page.locator(".studio-save").first.click()
    page.wait_for_function("() => (document.querySelector('.studio-saved') || {}).textContent", timeout=60_000)
    page.screenshot(path=str(WORK / "07_studio.png"), full_page=True)
    rows = [json.loads(x) for x in (cases / "metadata.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == n_before + 1
    row = rows[-1]
    read = lambda k: np.asarray(Image.open(cases / row[k]).convert("RGB"), np.float32) / 255  # noqa: E731
    draft, out, mask = read("draft"), read("output"), read("mask")[..., 0]
    ys, xs = np.nonzero(mask)
    assert len(xs) > 20 and xs.min() > 20 and ys.min() > 20  # the stroke drawn with the mouse, where it was drawn
    change = np.abs(out - draft).max(-1)
    bx0, by0, bx1, by1 = row["studio"]["box"]
    assert bx0 <= xs.min() and by0 <= ys.min() and bx1 > xs.max() and by1 > ys.max()  # the box holds the region
    outside = change.copy()
    outside[by0:by1, bx0:bx1] = 0
    assert outside.max() == 0 and change[by0:by1, bx0:bx1].max() > 0  # the change map is non-zero only inside the box
    page.close()
