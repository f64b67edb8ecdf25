"""The chat page at ``/`` in a real headless Chromium (selenium, Debian's chromium and
chromium-driver) against a real `llamaforge serve`: it lists the models, streams answers equal
to the API's greedy ones for the same messages, keeps the conversation, shows what the model
writes as text (never HTML), stops a request (the server cancels it and returns its KV
blocks), and asks for the API key when the server has one. Skipped without a browser."""

from __future__ import annotations

import re
import shutil

import httpx
import openai
import pytest

import llamaforge
from llamaforge.chat_templates import ALPACA
from llamaforge.tokenizer import Tokenizer

from .conftest import tiny_model
from .test_serve import ServerProcess, idle

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no headless browser: install Debian's chromium and chromium-driver",
)

SYSTEM = "Answer <b>in bold</b> & <i>briefly</i>."
KEY = "page-sekret"
WAIT = 120  # seconds: the page's answers on a loaded machine


@pytest.fixture(scope="module")
def page_ckpt(meta_tokenizer_path, tmp_path_factory):
    """Random weights with Meta's tokenizer (any text, '<' and '&' included) and a context
    long enough that an answer is still streaming when the test presses stop."""
    tok = Tokenizer(meta_tokenizer_path)
    model = tiny_model(tok.vocab_size, max_seq_len=1024, output_scale=25)
    return llamaforge.save(model, tok, tmp_path_factory.mktemp("page") / "page",
                           chat_template=ALPACA)  # fmt: skip


@pytest.fixture(scope="module")
def server(page_ckpt):
    srv = ServerProcess("--ckpt", str(page_ckpt), "--max-batch", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, WAIT).until(lambda d: state(d) in ("idle", "loading"))


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def status(driver) -> str:
    return driver.find_element(By.ID, "status").get_property("textContent")


def answered(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")


def fill(driver, element_id: str, text: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(text)


def ask(driver, text: str) -> dict:
    """Type ``text`` and press Enter; the answer once it has finished: its text (exactly, as
    textContent), how many chunks it came in and its finish reason."""
    before = len(answered(driver))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)

    def done(d) -> bool:
        assert not status(d), status(d)
        return len(answered(d)) > before

    WebDriverWait(driver, WAIT).until(done)
    bubble = answered(driver)[-1]
    return {
        "text": bubble.get_property("textContent"),
        "chunks": int(bubble.get_attribute("data-chunks") or 0),
        "finish": bubble.get_attribute("data-finish"),
    }


def api_answer(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    r = client.chat.completions.create(
        model="page", messages=messages, temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].message.content, r.choices[0].finish_reason


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_page_streams_the_greedy_answer_and_keeps_the_conversation(server, browser):
    page = httpx.get(server.url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    open_page(browser, server.url)
    WebDriverWait(browser, WAIT).until(lambda d: state(d) == "idle")
    options = browser.find_elements(By.CSS_SELECTOR, "#model option")
    assert [o.get_attribute("value") for o in options] == ["page"]
    fill(browser, "max-tokens", "24")
    fill(browser, "system", SYSTEM)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

    fill(browser, "temperature", "5")  # refused in the page: nothing sent, the text kept
    browser.find_element(By.ID, "input").send_keys("x", Keys.ENTER)
    assert "temperature" in status(browser) and not browser.find_elements(By.CLASS_NAME, "msg")
    assert browser.find_element(By.ID, "input").get_property("value") == "x"
    fill(browser, "input", "")
    fill(browser, "temperature", "0")

    first = "Hello <script>alert(1)</script> & <b>you</b>"
    got = ask(browser, first)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    want, finish = api_answer(client, messages, 24)
    assert got["text"] == want and got["finish"] == finish == "length"
    assert got["chunks"] > 1  # streamed, not sent whole
    # the user's text and the model's are text, never markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#log b, #log script, #log i")
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.get_property("textContent") for u in users] == [first]

    second = "And then?"
    got = ask(browser, second)
    messages += [{"role": "assistant", "content": want}, {"role": "user", "content": second}]
    want2, _ = api_answer(client, messages, 24)
    assert got["text"] == want2  # the whole conversation went back with the second message
    assert want2 != api_answer(client, [messages[0], messages[-1]], 24)[0]
    idle(server)


def test_stop_cancels_the_request_on_the_server(server, browser):
    open_page(browser, server.url)
    WebDriverWait(browser, WAIT).until(lambda d: state(d) == "idle")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "")  # blank: to the end of the context
    finished = metric(server, 'llamaforge_request_latency_seconds_count{endpoint="chat"}')
    cached = metric(server, "llamaforge_kv_cache_blocks_cached")
    browser.find_element(By.ID, "input").send_keys("Tell me a long story", Keys.ENTER)

    def streaming(d) -> bool:
        assert not status(d), status(d)
        bubble = d.find_element(By.CSS_SELECTOR, ".msg.assistant")
        return int(bubble.get_attribute("data-chunks") or 0) >= 3

    WebDriverWait(browser, WAIT).until(streaming)
    assert httpx.get(f"{server.url}/health").json()["running"] == 1
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, WAIT).until(lambda d: state(d) == "idle")
    assert answered(browser)[-1].get_attribute("data-finish") == "stopped"
    assert not status(browser)
    # the server saw the stream end early, cancelled the request and took its blocks back
    assert idle(server, timeout=30)["running"] == 0
    assert metric(server, "llamaforge_kv_cache_blocks_used") == 0
    assert metric(server, 'llamaforge_request_latency_seconds_count{endpoint="chat"}') == finished
    # its full blocks stay cached by their tokens: an answer to the end of the context (over
    # 900 tokens) would have filled at least 899 // 16 - 1 = 55 blocks of its own
    assert 0 < metric(server, "llamaforge_kv_cache_blocks_cached") - cached < 55
    # the stopped answer stays in the conversation, and the page goes on
    fill(browser, "max-tokens", "4")
    assert ask(browser, "Shorter, please.")["finish"] == "length"


@pytest.fixture(scope="module")
def keyed(page_ckpt):
    srv = ServerProcess("--ckpt", str(page_ckpt), "--api-key", KEY, "--max-batch", "1")
    yield srv
    srv.stop()


def test_page_asks_for_the_api_key(keyed, browser):
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    open_page(browser, keyed.url)
    form = browser.find_element(By.ID, "key-form")
    WebDriverWait(browser, WAIT).until(lambda d: form.is_displayed())
    assert not browser.find_elements(By.CSS_SELECTOR, "#model option")

    fill(browser, "key", "wrong")
    browser.find_element(By.ID, "key-save").click()
    WebDriverWait(browser, WAIT).until(lambda d: "API key" in status(d) and form.is_displayed())

    fill(browser, "key", KEY)
    browser.find_element(By.ID, "key-save").click()
    WebDriverWait(browser, WAIT).until(lambda d: state(d) == "idle")
    assert not form.is_displayed() and not status(browser)
    assert [o.get_attribute("value") for o in browser.find_elements(By.TAG_NAME, "option")] == [
        "page"
    ]
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "8")
    got = ask(browser, "Hi")
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert got["text"] == api_answer(client, [{"role": "user", "content": "Hi"}], 8)[0]

    browser.refresh()  # the key stays for the tab's session
    WebDriverWait(browser, WAIT).until(lambda d: state(d) == "idle")
    assert not browser.find_element(By.ID, "key-form").is_displayed()
