"""Real browser: notebook 02's FreezePanel cell runs in JupyterLab; headless Chromium presses a block toggle (the
trainable count grows by that block), checks that no LR box cuts its value (also the longest one a box can hold)
and presses Reset (the count goes back).

The notebook is not run whole (it trains for minutes): its parameters cell, the cells that import
tlkit and load the data (with the model whose blocks it lists), and the ``tlkit.FreezePanel(...)`` cell are copied
from the .ipynb, so the test follows the notebook when it changes. Nothing is trained.
Chromium is Debian's (``.ci/run`` installs it); without it, or without playwright, the test skips.
The test saves a screenshot of the panel (cropped to it) to ``outputs/browser/freeze_panel_crop.png``; with
``TLKIT_UPDATE_SCREENSHOT=1`` it writes ``docs/freeze_panel.png``, the one the README shows, instead (commit it when
the panel's look changed), so that a test run leaves the checkout as it was.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_02 = REPO / "notebooks" / "02_partial_unfreezing.ipynb"
SCREENSHOT = REPO / "outputs" / "browser" / "freeze_panel.png"  # the whole page, also when the panel does not render
# the panel alone; the README shows the docs/ copy, written only when asked for
PANEL_SCREENSHOT = (REPO / "docs" / "freeze_panel.png" if os.environ.get("TLKIT_UPDATE_SCREENSHOT") == "1"
                    else REPO / "outputs" / "browser" / "freeze_panel_crop.png")
PANEL = ".tlkit-freeze-panel"  # the class FreezePanel gives its outer box
LONGEST_MULTIPLIER = "0.000001234"  # the longest value a multiplier box holds (4 significant digits, down to 1e-6)
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which a closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
# What notebook 02's widget cell needs, found by content so that moved or renumbered cells still match.
WIDGET_CELL_MARKERS = ("import tlkit", "splits = lesson.splits()", "tlkit.FreezePanel(")
SERVER_START_S = 60
WIDGET_RENDER_S = 120  # kernel start, torch import, data and a pretrained model on a busy 2-core machine
CLICK_EFFECT_S = 30


def chromium_path() -> Path:
    """The Chromium binary to drive: $TLKIT_CHROMIUM, else Debian's /usr/bin/chromium."""
    return Path(os.environ.get("TLKIT_CHROMIUM", DEFAULT_CHROMIUM))


def missing_chromium_reason(chromium: Path) -> str | None:
    """Why the browser test cannot run with ``chromium`` (None when the binary is there)."""
    if chromium.is_file() and os.access(chromium, os.X_OK):
        return None
    return (f"no Chromium at {chromium}: install Debian's package (`apt-get install -y chromium`, as .ci/run does) "
            "or point TLKIT_CHROMIUM at a Chromium binary")


def widget_notebook(source: Path, overrides: dict[str, object]) -> nbformat.NotebookNode:
    """A notebook of ``source``'s parameters cell, ``overrides`` (as papermill injects them) and the FreezePanel cells."""
    original = nbformat.read(source, as_version=4)
    code = [c for c in original.cells if c.cell_type == "code"]
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    needed = [c for c in code if any(marker in c.source for marker in WIDGET_CELL_MARKERS)]
    found = {m for m in WIDGET_CELL_MARKERS if any(m in c.source for c in needed)}
    if len(parameters) != 1 or found != set(WIDGET_CELL_MARKERS):
        raise ValueError(f"{source.name} should have one 'parameters' cell and cells containing {WIDGET_CELL_MARKERS}; "
                         f"found {len(parameters)} parameters cell(s) and {sorted(found)}: update WIDGET_CELL_MARKERS")
    injected = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    cells = [parameters[0].source, injected, *(c.source for c in needed if c not in parameters)]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells],
                                    metadata={"kernelspec": original.metadata["kernelspec"]})


def write_lab_settings(config_dir: Path) -> None:
    """JupyterLab settings under ``config_dir`` that keep dialogs and toasts out of an unattended run."""
    labconfig = config_dir / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    # The "get notified about Jupyter news?" toast would cover part of the screenshot.
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    tracker = config_dir / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True, exist_ok=True)
    # Otherwise "Run All" on a fresh notebook can open a "Select Kernel" dialog and wait for a click.
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server log if it exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer {url} within {timeout}s:\n{log.read_text()[-3000:]}")


def wait_for_kernel(base_url: str, token: str, timeout: float) -> None:
    """Wait until the notebook's kernel is idle with the browser connected: "Run All" before that can be dropped."""
    request = urllib.request.Request(f"{base_url}/api/sessions", headers={"Authorization": f"token {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=5) as response:
            kernels = [session["kernel"] for session in json.load(response)]
        if any(k["execution_state"] == "idle" and k.get("connections", 0) > 0 for k in kernels):
            return
        time.sleep(0.5)
    pytest.fail(f"the notebook's kernel was not idle and connected within {timeout}s (kernels: {kernels})")


def stop_server(server: subprocess.Popen, base_url: str, token: str) -> None:
    """Shut JupyterLab down through its API (which also stops the kernel); terminate it if that fails."""
    try:
        request = urllib.request.Request(f"{base_url}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=5).close()
        server.wait(timeout=20)
    except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def cut_text_boxes(page, selector: str) -> list[str]:
    """The values of the text boxes under ``selector`` that are wider than their box (the browser shows them cut)."""
    return page.locator(f"{selector} input").evaluate_all(
        "boxes => boxes.filter(b => b.scrollWidth > b.clientWidth).map(b => `${b.value} (${b.scrollWidth} > ${b.clientWidth} px)`)")


def panel_area(page, selector: str, margin: int = 6) -> dict[str, float]:
    """The page area the element at ``selector`` draws in, as Playwright's ``clip``: up to its rightmost text or control,
    not the whole width of the output area that its box (and its text lines) stretch to."""
    return page.locator(selector).evaluate(
        """(panel, margin) => {
            const box = panel.getBoundingClientRect();
            const rights = [...panel.querySelectorAll("input, button, .slider-container")].map(e => e.getBoundingClientRect().right);
            const texts = document.createTreeWalker(panel, NodeFilter.SHOW_TEXT);
            for (let node = texts.nextNode(); node; node = texts.nextNode()) {
                if (!node.textContent.trim()) continue;
                const range = document.createRange();
                range.selectNodeContents(node);
                rights.push(range.getBoundingClientRect().right);
            }
            return {x: box.left - margin, y: box.top - margin, width: Math.max(...rights) - box.left + 2 * margin,
                    height: box.height + 2 * margin};
        }""", margin)


def trainable_count(summary: str) -> int:
    """The trainable-parameter count in the panel's summary line ("trainable 3,843 (0.1%) · frozen ...")."""
    match = re.search(r"trainable\s+([\d,]+)", summary)
    if match is None:
        raise ValueError(f"no 'trainable <count>' in the panel's summary line {summary!r}")
    return int(match.group(1).replace(",", ""))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, str]]:
    """JupyterLab serving a small copy of notebook 02's widget cells on a free loopback port: its URLs, token and log."""
    reason = missing_chromium_reason(chromium_path())
    if reason:
        pytest.skip(reason)
    pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: pip install -r requirements.txt")
    root = tmp_path / "lab"
    root.mkdir()
    # lr: the notebook's LR-finder cell (which fills lr = None) is not part of the widget's cells
    overrides = {"device": "cpu", "samples_per_class": 2, "progress": False, "lr": 1e-3, "data_root": str(tmp_path / "data"),
                 "output_dir": str(tmp_path / "outputs"), "results_path": str(tmp_path / "outputs" / "02.json")}
    nbformat.write(widget_notebook(NOTEBOOK_02, overrides), root / "freeze_panel.ipynb")
    token, port = secrets.token_hex(16), free_port()
    base_url = f"http://127.0.0.1:{port}"
    jupyter_home = tmp_path / "jupyter"  # no user settings, workspaces or kernels from the machine's profile
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"), "JUPYTER_DATA_DIR": str(jupyter_home / "data"),
           "JUPYTER_RUNTIME_DIR": str(jupyter_home / "runtime"), "IPYTHONDIR": str(jupyter_home / "ipython")}
    write_lab_settings(jupyter_home / "config")
    log = tmp_path / "jupyter.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
             f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root,
        )
    try:
        wait_for_server(f"{base_url}/api/status?token={token}", server, log, SERVER_START_S)
        # /doc/: the single-document view, without the file browser, leaves more room for the panel.
        yield {"notebook": f"{base_url}/doc/tree/freeze_panel.ipynb?token={token}", "base": base_url, "token": token,
               "log": str(log)}
    finally:
        stop_server(server, base_url, token)


@pytest.mark.browser
def test_the_panel_in_jupyterlab_counts_a_pressed_block_shows_whole_lrs_and_resets(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path()), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(lab["notebook"], timeout=SERVER_START_S * 1000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=SERVER_START_S * 1000)
            wait_for_kernel(lab["base"], lab["token"], SERVER_START_S)
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()

            summary = page.locator(".widget-html-content", has_text=re.compile(r"trainable\s+[\d,]+"))
            try:
                summary.wait_for(timeout=WIDGET_RENDER_S * 1000)
            except PlaywrightTimeout as error:  # say what the kernel printed instead of a bare timeout
                page.screenshot(path=str(SCREENSHOT))
                errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
                pytest.fail(f"the FreezePanel did not render within {WIDGET_RENDER_S}s ({error.__class__.__name__}); "
                            f"cell errors: {errors[-3:]}; screenshot {SCREENSHOT}; server log {lab['log']}")
            before = summary.inner_text()

            frozen_toggles = page.locator(".widget-toggle-button:not(.mod-active)")
            assert frozen_toggles.count() > 0, "every block already trains: no frozen block's toggle to press"
            toggle = frozen_toggles.last  # the frozen block closest to the head
            block = toggle.inner_text().strip()
            block_toggle = re.compile(f"^{re.escape(block)}$")
            row = page.locator(".widget-hbox", has=page.locator(".widget-toggle-button", has_text=block_toggle))
            block_params = row.locator(".widget-label").first.inner_text()  # "412,160 params"
            toggle.click()
            expect(summary).not_to_have_text(before, timeout=CLICK_EFFECT_S * 1000)
            expect(page.locator(".widget-toggle-button.mod-active", has_text=block_toggle)).to_have_count(1)
            after = summary.inner_text()
            cut_at_start = cut_text_boxes(page, PANEL)
            page.locator(PANEL).scroll_into_view_if_needed()
            page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the screenshot
            page.mouse.move(0, 0)  # nor a hover shade
            page.screenshot(path=str(SCREENSHOT))
            PANEL_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(PANEL_SCREENSHOT), clip=panel_area(page, PANEL))

            first_box = page.locator(f"{PANEL} .widget-text input").first  # the input block's multiplier, the smallest one
            first_box.fill(LONGEST_MULTIPLIER)
            first_box.press("Enter")
            expect(first_box).to_have_value(LONGEST_MULTIPLIER)
            cut_longest = cut_text_boxes(page, PANEL)

            page.locator(f"{PANEL} .widget-button", has_text="Reset").click()
            expect(summary).to_have_text(before, timeout=CLICK_EFFECT_S * 1000)
            expect(page.locator(".widget-toggle-button.mod-active", has_text=block_toggle)).to_have_count(0)
        finally:
            browser.close()
    added = int(block_params.split()[0].replace(",", ""))
    assert trainable_count(after) == trainable_count(before) + added, (
        f"pressing {block!r} ({block_params}) should add its parameters to the trainable count: {before!r} -> {after!r}")
    assert not cut_at_start and not cut_longest, f"LR boxes too narrow for their values: {cut_at_start + cut_longest}"


def test_a_missing_chromium_gives_a_skip_reason_that_says_how_to_install_it(tmp_path):
    assert "apt-get install -y chromium" in missing_chromium_reason(tmp_path / "no-chromium")
    executable = tmp_path / "chromium"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    assert missing_chromium_reason(executable) is None


def test_trainable_count_reads_the_panels_summary_line():
    assert trainable_count("trainable 3,843 (0.1%) · frozen 3,371,008 (99.9%)") == 3843
    with pytest.raises(ValueError, match="no 'trainable <count>'"):
        trainable_count("frozen 12")
