"""The chat page at `/` in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
type a question, see the streamed answer appear, continue the conversation, all behind an API key.

Skipped with the reason when Chromium, chromedriver or selenium are missing, except under CI (the
environment variable CI is set), where that is a failure: CI installs them."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_harness import ServerProcess, metric_value  # noqa: E402

KEY = "browser-key"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test, but {reason}")
    pytest.skip(reason)


def _chromium_paths() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _unavailable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install selenium)")
    binary, driver_path = _chromium_paths()
    profile = tempfile.mkdtemp(prefix="allmos-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    proc = ServerProcess("--max-model-len", "512", "--num-kvcache-blocks", "16", api_key=KEY,
                         log_path=tmp_path_factory.mktemp("browser_server") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _prompt_tokens(server) -> float:
    return metric_value(httpx.get(server.url + "/metrics").text, "allmos:prompt_tokens_total")


def _ask(driver, text: str, num_answers: int, timeout: float = 180):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    finished = '.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]'
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, finished)) >= num_answers)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[num_answers - 1]


def test_chat_page_streams_an_answer(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    # without the key the server refuses, and the page says so
    denied = _ask(browser, "Hello?", 1)
    assert denied.get_attribute("data-state") == "error"
    assert "API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    # with the key: the streamed answer appears, with its speed
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    key.send_keys(Keys.TAB)  # 'change' stores the key and reloads the model list
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value"))
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("24")
    before = _prompt_tokens(server)
    answer = _ask(browser, "What is the capital of France?", 2)
    assert answer.get_attribute("data-state") == "done" and answer.text.strip()
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens" in stats and "tok/s" in stats, stats
    first_prompt = _prompt_tokens(server) - before
    # the page keeps the conversation: the second request carries the first question and answer
    second = _ask(browser, "And of Germany?", 3)
    assert second.get_attribute("data-state") == "done" and second.text.strip()
    second_prompt = _prompt_tokens(server) - before - first_prompt
    assert second_prompt > first_prompt + 5
