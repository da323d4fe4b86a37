"""The demo app driven as a person would: headless Debian Chromium (selenium + chromedriver from apt,
no browser download) fills the form, generates, and reads the page, in a laptop's 1280 x 800 window."""

import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest

from helpers import missing, require_module

gr = require_module("gradio")
require_module("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    missing("needs Debian's chromium and chromium-driver (bash setup.sh installs them)")

CHROME_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--window-size=1280,800")
CONFIG = app.AppConfig(model="tiny:sd", max_steps=10, max_batch=2, max_side=128, default_steps=3, queue_size=4)
WAIT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny models on a small shared CPU: one thread is fastest
    config = app.AppConfig(**{**CONFIG.__dict__, "port": _free_port()})
    demo = app.build_app(config)
    _, local_url, _ = app.launch_app(demo, config, prevent_thread_lock=True, quiet=True)
    assert local_url.startswith("http://127.0.0.1:")     # loopback only by default
    yield local_url
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROME_ARGS:
        options.add_argument(argument)
    os.environ.setdefault("SE_OFFLINE", "true")            # selenium-manager must never download anything
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, url):
    browser.get(url)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))


def _type(browser, selector: str, text) -> None:
    field = browser.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(text))
    field.send_keys(Keys.TAB)                               # blur: gradio commits the value


def _text(browser, elem_id: str) -> str:
    return browser.find_element(By.ID, elem_id).text


def _wait_text(browser, elem_id: str, needle: str) -> str:
    WebDriverWait(browser, WAIT_S).until(lambda d: needle in _text(d, elem_id))
    return _text(browser, elem_id)


def _generate(browser):
    browser.find_element(By.CSS_SELECTOR, "#generate").click()


def _choose(browser, elem_id: str, value: str) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    box.send_keys(Keys.ENTER)


def _expand(browser, elem_id: str, inside: str) -> None:
    """Open the accordion `elem_id` (collapsed by default) until the field `inside` shows."""
    if not any(e.is_displayed() for e in browser.find_elements(By.ID, inside)):
        browser.find_element(By.CSS_SELECTOR, f"#{elem_id} > button").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, inside).is_displayed())


def _shown(browser, elem_id: str) -> bool:
    return any(e.is_displayed() for e in browser.find_elements(By.ID, elem_id))


def _error_toasts(browser) -> list[str]:
    return [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".toast-body.error [data-testid='toast-text']")]


ETA = re.compile(r"/\s*\d+(\.\d+)?\s*s")     # gradio's "elapsed/estimate s"


@pytest.mark.browser
def test_generate_side_by_side(browser, url):
    _open(browser, url)
    # the action where the eye is: the button in the first viewport, the settings and options collapsed
    bottom = browser.execute_script("return document.querySelector('#generate').getBoundingClientRect().bottom")
    assert bottom <= browser.execute_script("return window.innerHeight"), bottom
    assert not _shown(browser, "steps") and not _shown(browser, "opt-agent-merge_ratio")
    assert _shown(browser, "prompt") and not _shown(browser, "class_label")        # tiny:sd takes a prompt

    # the method list and its options come from the registry
    _choose(browser, "method", "todo")
    WebDriverWait(browser, 30).until(lambda d: "todo options" in _text(d, "method-options"))
    _expand(browser, "method-options", "opt-todo-factor")
    assert not _shown(browser, "opt-agent-merge_ratio")
    _type(browser, "#opt-todo-factor input", 4)
    _type(browser, "#prompt textarea", "a red cube")
    _expand(browser, "settings", "steps")
    _type(browser, "#steps input", 3)
    _type(browser, "#batch input", 2)
    _generate(browser)

    timings = _wait_text(browser, "timings", "speed ratio")
    assert "time per step" in timings and "ms" in timings and "todo" in timings
    assert "factor=4" in timings                                   # the option reached the patch
    assert _text(browser, "status") == "Done."
    for gallery in ("stock-images", "patched-images", "difference-images"):
        images = browser.find_elements(By.CSS_SELECTOR, f"#{gallery} img")
        assert len(images) >= 2, gallery                           # batch of 2 on each side
        assert all(browser.execute_script("return arguments[0].naturalWidth", img) >= 64 for img in images)
        assert all(".png" in img.get_attribute("src") for img in images), gallery   # lossless
    assert "x 4 (white: 0.25 or more)" in _text(browser, "difference-images")   # the scale is stated
    assert not _shown(browser, "chart")                                          # one run: no chart yet

    # a second method at the same settings: real progress without gradio's averaged ETA, then the chart
    _choose(browser, "method", "agent")
    _generate(browser)
    seen = []                                   # every state of the progress line up to the first step
    WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
        lambda d: seen.append(_text(d, "status")) or "denoiser call" in seen[-1])
    assert not [text for text in seen if ETA.search(text)], seen      # was "processing | 0.1/5.1s"
    assert re.search(r"denoiser call \d+ of 8", seen[-1]), seen[-1]   # 2 warm-up + 2 x 3 steps
    _wait_text(browser, "status", "Done.")
    WebDriverWait(browser, 30).until(lambda d: _shown(d, "chart"))
    assert "2 runs at model tiny:sd" in _text(browser, "chart-note")

    # a class-conditional model: the class label replaces the prompt
    _choose(browser, "model", "tiny:dit")
    WebDriverWait(browser, 30).until(lambda d: _shown(d, "class_label") and not _shown(d, "prompt"))


@pytest.mark.browser
def test_bad_input_shows_an_error_and_the_queue_goes_on(browser, url):
    _open(browser, url)
    _expand(browser, "settings", "steps")
    _type(browser, "#steps input", 500)                             # above the server's bound (10)
    _generate(browser)
    WebDriverWait(browser, WAIT_S).until(lambda d: any("steps must be between 1 and 10" in t for t in _error_toasts(d)))
    assert any("--max-steps" in t for t in _error_toasts(browser))
    assert "Error" in _text(browser, "status")                      # marked by the button too
    assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.warning")

    _type(browser, "#steps input", 2)
    _expand(browser, "method-options", "opt-agent-merge_ratio")
    _type(browser, "#opt-agent-merge_ratio input", 7)               # out of the option's range
    _generate(browser)
    WebDriverWait(browser, WAIT_S).until(lambda d: any("merge_ratio" in t and "must be" in t for t in _error_toasts(d)))
    assert not browser.find_elements(By.CSS_SELECTOR, "#stock-images img")

    _type(browser, "#opt-agent-merge_ratio input", 0.5)             # fixed: the next request is served
    _generate(browser)
    _wait_text(browser, "status", "Done.")
    assert "speed ratio" in _text(browser, "timings")
    assert browser.find_elements(By.CSS_SELECTOR, "#patched-images img")


@pytest.mark.browser
@pytest.mark.skipif(not app.HAS_VIDEO, reason="the anchor-frame pipeline is not installed")
def test_anchor_frame_video_tab(browser, url):
    _open(browser, url)
    tab = [b for b in browser.find_elements(By.XPATH, "//button[contains(., 'Video')]") if b.is_displayed()]
    tab[0].click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "v_generate").is_displayed())
    _expand(browser, "v_settings", "v_frames")
    _type(browser, "#v_frames input", 4)
    _type(browser, "#v_steps input", 2)
    _expand(browser, "v_options", "opt-anchor_frame-anchor")
    _type(browser, "#opt-anchor_frame-anchor input", 9)              # no frame 9 among 4
    browser.find_element(By.ID, "v_generate").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: any("anchor" in t for t in _error_toasts(d)))

    _type(browser, "#opt-anchor_frame-anchor input", -1)
    browser.find_element(By.ID, "v_generate").click()
    _wait_text(browser, "v_status", "Done.")
    assert "speed ratio" in _text(browser, "v_timings")
    for elem_id, name in (("v_stock", "stock.gif"), ("v_anchor", "anchor_frame.gif")):
        sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]
        assert any(src.endswith(name) for src in sources), sources
