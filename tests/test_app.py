"""The demo app driven as a person would: headless Debian Chromium (selenium + chromedriver from apt,
no browser download) fills the form, generates, and reads the page."""

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("selenium")

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
    pytest.skip("needs Debian's chromium and chromium-driver (bash setup.sh installs them)", allow_module_level=True)

CHROME_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--window-size=1400,2000")
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


@pytest.mark.browser
def test_generate_side_by_side(browser, url):
    _open(browser, url)
    # the method list and its options come from the registry
    method_box = browser.find_element(By.CSS_SELECTOR, "#method input")
    method_box.click()
    method_box.send_keys(Keys.CONTROL, "a")
    method_box.send_keys("todo")
    method_box.send_keys(Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "opt-todo-factor").is_displayed())
    assert not browser.find_elements(By.ID, "opt-agent-merge_ratio") or \
        not browser.find_element(By.ID, "opt-agent-merge_ratio").is_displayed()

    _type(browser, "#prompt textarea", "a red cube")
    _type(browser, "#steps input", 3)
    _type(browser, "#batch input", 2)
    _type(browser, "#opt-todo-factor input", 4)
    _generate(browser)

    timings = _wait_text(browser, "timings", "speed ratio")
    assert "time per step" in timings and "ms" in timings and "todo" in timings
    assert "factor=4" in timings                                   # the option reached the patch
    assert _text(browser, "status") == "Done."
    for gallery in ("stock-images", "patched-images"):
        images = browser.find_elements(By.CSS_SELECTOR, f"#{gallery} img")
        assert len(images) >= 2, gallery                           # batch of 2 on each side
        assert all(browser.execute_script("return arguments[0].naturalWidth", img) >= 64 for img in images)


@pytest.mark.browser
def test_bad_input_shows_a_message_and_the_queue_goes_on(browser, url):
    _open(browser, url)
    _type(browser, "#steps input", 500)                             # above the server's bound (10)
    _generate(browser)
    message = _wait_text(browser, "status", "Error")
    assert "steps must be between 1 and 10" in message and "--max-steps" in message

    _type(browser, "#steps input", 2)
    _type(browser, "#opt-agent-merge_ratio input", 7)               # out of the option's range
    _generate(browser)
    message = _wait_text(browser, "status", "merge_ratio")
    assert "Error" in message and "must be" in message
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
    _type(browser, "#v_frames input", 4)
    _type(browser, "#v_steps input", 2)
    _type(browser, "#opt-anchor_frame-anchor input", 9)              # no frame 9 among 4
    browser.find_element(By.ID, "v_generate").click()
    assert "anchor" in _wait_text(browser, "v_status", "Error")

    _type(browser, "#opt-anchor_frame-anchor input", -1)
    browser.find_element(By.ID, "v_generate").click()
    _wait_text(browser, "v_status", "Done.")
    assert "speed ratio" in _text(browser, "v_timings")
    for elem_id, name in (("v_stock", "stock.gif"), ("v_anchor", "anchor_frame.gif")):
        sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]
        assert any(src.endswith(name) for src in sources), sources
