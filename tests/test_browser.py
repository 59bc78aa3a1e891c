"""The page at / in a real headless browser (Debian's chromium + chromedriver, driven by Selenium):
type a dialogue, click, see a non-empty summary stream in with the time and tokens/s; pick the
long bundled sample and see its windows' partial summaries and progress; with a token, a browser
gets the Basic-auth challenge and the page works with the token; a summary that invents a name
shows it highlighted with a tooltip (a scripted backend makes it deterministic). Screenshots are saved under the
test's tmp dir. Skipped where chromium, chromedriver or selenium is missing.

Install (Debian/Ubuntu): apt-get install -y chromium chromium-driver && pip install selenium
"""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from conftest import SAMPLES
from serving_helpers import start_server
from tests.adapters import make_adapter

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed")

TOKEN = "page-token"
ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    adapter = make_adapter(tiny_models["llama"], root / "lora", max_input_length=512)
    running = start_server(adapter, root, "--max_new_tokens=12", env={"FTF_API_TOKEN": TOKEN})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1000", "--no-proxy-server"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(browser, server):
    """Open / with the token as HTTP Basic credentials (what a browser sends after its prompt)."""
    host = server.url.split("//", 1)[1]
    browser.get(f"http://user:{TOKEN}@{host}/")     # what the browser's prompt does; it keeps the credentials
    browser.get(f"http://{host}/")                  # for the origin (fetch refuses URLs that carry them)
    wait_for(browser, lambda b: "model " in b.find_element("id", "model").text)


def wait_for(browser, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(condition)


def test_type_a_dialogue_and_see_the_summary_stream_in(server, browser, tmp_path):
    assert httpx.get(f"{server.url}/").headers["www-authenticate"].startswith("Basic")     # the browser's prompt
    open_page(browser, server)
    assert "tiny" in browser.find_element("id", "model").text or "lora" in browser.find_element("id", "model").text
    box = browser.find_element("id", "dialogue")
    box.clear()
    box.send_keys("Anna: Are we still on for lunch tomorrow?\nTom: Yes, 12:30 at the usual place.\n"
                  "Anna: Great, I will book a table.")
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: b.find_element("id", "status").text in ("done", "error"))
    assert browser.find_element("id", "status").text == "done", browser.find_element("id", "error").text
    summary = browser.find_element("id", "summary").text
    assert summary.strip()
    stats = browser.find_element("id", "stats").text
    assert "tokens/s" in stats and " s " in stats
    expected = httpx.post(f"{server.url}/summarize", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                          json={"dialogue": browser.find_element("id", "dialogue").get_attribute("value")}).json()
    assert summary == expected["summary"].strip()
    shot = tmp_path / "page-summary.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_a_long_sample_shows_its_parts(server, browser, tmp_path):
    open_page(browser, server)
    from selenium.webdriver.support.ui import Select
    wait_for(browser, lambda b: len(b.find_elements("css selector", "#sample option")) > len(ROWS) // 2)
    Select(browser.find_element("id", "sample")).select_by_visible_text(
        next(f"{r['id']} ({len(r['dialogue'])} characters)" for r in ROWS if r["id"] == "sample-long-meeting"))
    assert len(browser.find_element("id", "dialogue").get_attribute("value")) > 5000
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: b.find_element("id", "status").text in ("done", "error"))
    assert browser.find_element("id", "status").text == "done", browser.find_element("id", "error").text
    parts = browser.find_elements("css selector", "#parts li")
    assert len(parts) > 4 and parts[0].text.startswith(("part ", "combining "))
    assert "/" in browser.find_element("id", "progress-text").text or browser.find_element("id", "progress-text").text
    assert browser.find_element("id", "summary").text.strip()
    browser.save_screenshot(str(tmp_path / "page-long.png"))


def test_errors_show_on_the_page(server, browser):
    open_page(browser, server)
    browser.find_element("id", "dialogue").clear()
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: b.find_element("id", "error").is_displayed())
    assert "dialogue first" in browser.find_element("id", "error").text
    browser.find_element("id", "dialogue").send_keys("x" * 50)
    browser.find_element("id", "max_new_tokens").send_keys("100000")
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: "MAX_NEW_TOKENS_LIMIT" in b.find_element("id", "error").text)


@pytest.fixture(scope="module")
def scripted_server(tiny_models):
    """The app in this process (uvicorn in a thread) over the scripted backend: every summary is
    tests/scripted.py's INVENTED ("Tom and Ben ..."; no Ben in its dialogue), streamed token by token."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn

    from finetuneflow.serve.http_api import create_app
    from finetuneflow.serve.options import ServerOptions
    from tests.scripted import scripted_model
    app = create_app(scripted_model(tiny_models["llama"]), ServerOptions(max_new_tokens=32, checks_encoder=""))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield SimpleNamespace(url=url)
    server.should_exit = True
    thread.join(30)


def test_an_invented_name_is_highlighted_with_a_tooltip(scripted_server, browser, tmp_path):
    from tests.scripted import DIALOGUE, INVENTED
    browser.get(f"{scripted_server.url}/")
    wait_for(browser, lambda b: "model " in b.find_element("id", "model").text)
    box = browser.find_element("id", "dialogue")
    box.clear()
    box.send_keys(DIALOGUE)
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: b.find_element("id", "status").text in ("done", "error"))
    assert browser.find_element("id", "status").text == "done", browser.find_element("id", "error").text
    assert browser.find_element("id", "summary").text == INVENTED
    marks = browser.find_elements("css selector", "#summary mark.flag")
    assert [m.text for m in marks] == ["Ben"]
    assert marks[0].get_attribute("title").startswith("not in the dialogue")
    assert "“Ben” not in the dialogue" in browser.find_element("id", "checks").text
    shot = tmp_path / "page-flagged.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    box.clear()
    box.send_keys("x" * 50)
    browser.find_element("id", "max_new_tokens").send_keys("100000")
    browser.find_element("id", "go").click()
    wait_for(browser, lambda b: "MAX_NEW_TOKENS_LIMIT" in b.find_element("id", "error").text)
