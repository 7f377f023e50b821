"""The live whiteboard driven as a person would, in headless Chromium through Playwright: type
a story, hover a word, move the slider, search a corpus, download. What the page draws is
checked against what the API returns for the same request."""

import csv
import io
import shutil
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from whiteboard.explorer.server import create_app  # noqa: E402

from explorer_helpers import served, story_corpus, unpack, write_runs  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TYPED = "Alice lives in Spain. She likes to swim. She speaks"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = served(write_runs(tmp_path_factory.mktemp("runs"), hidden=9, layers=2))
    app = create_app(runs, [story_corpus(30)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield url
    instance.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    """The system's Chromium (`make install` installs it with apt-get as root); Playwright's
    own browser download is not used."""
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.skip("no Chromium on this machine (`make install` installs it with apt-get as root)")
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=found, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready=yes]", timeout=WAIT_MS)
    page.wait_for_selector(".model-row .tok", timeout=WAIT_MS)
    page.problems = problems
    yield page
    context.close()


def api(server, path, body):
    response = httpx.post(server + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def type_story(page, text):
    box = page.locator("#text")
    box.fill("")
    box.type(text, delay=5)


def test_typing_a_story_shows_every_models_predictions(page, server):
    type_story(page, TYPED)
    expected = api(server, "/api/analyze", {"text": TYPED, "top_k": 5})["models"]
    count = len(expected["lstm"]["tokens"])
    for name in ("rnn", "lstm", "gru"):
        row = page.locator(f".model-row[data-model={name}] .tok")
        row.nth(count - 1).wait_for(timeout=WAIT_MS)
        page.wait_for_function(f"document.querySelectorAll('.model-row[data-model={name}] .tok').length === {count}",
                               timeout=WAIT_MS)
        assert row.all_inner_texts() == [t["shown"] for t in expected[name]["tokens"]]
        # after the last word: each model's top 5, side by side
        shown = page.locator(f".topk[data-model={name}] li").evaluate_all("items => items.map(i => i.dataset.token)")
        assert shown == [p["token"] for p in expected[name]["predictions"][-1]]
    assert page.problems == []


def test_hovering_a_word_redraws_the_board_with_the_api_values(page, server):
    text = page.locator("#text").input_value()
    expected = api(server, "/api/analyze", {"text": text, "top_k": 5})["models"]["lstm"]
    page.select_option("#board-model", "lstm")
    page.select_option("#board-layer", "1")
    for index in (2, 5):
        page.hover(f".model-row[data-model=lstm] .tok[data-index='{index}']")
        page.wait_for_selector(f"body[data-board='lstm:1:{index}']", timeout=WAIT_MS)
        for field in ("cell", "forget_gate", "input_gate", "output_gate"):
            shown = page.locator(f".board[data-field={field}] .cell").evaluate_all(
                "cells => cells.map(c => Number(c.dataset.value))")
            values = unpack(expected["layers"][1][field])[index]
            torch.testing.assert_close(torch.tensor(shown), values, rtol=0, atol=6e-5)
    titles = page.locator(".board .board-title").all_inner_texts()
    assert titles[:4] == ["the whiteboard", "selective forget", "selective read", "selective write"]
    assert page.problems == []


def test_an_rnn_shows_its_one_overwritten_state(page, server):
    page.select_option("#board-model", "rnn")
    page.wait_for_selector("body[data-board^='rnn:0:']", timeout=WAIT_MS)
    assert page.locator(".board .board-title").first.inner_text() == "the whiteboard, overwritten at every step"
    assert page.locator(".board").count() == 2  # the hidden state and what was about to be written


def test_the_distance_slider_updates_the_curve(page, server):
    for fillers in (3, 7):
        page.locator("#fillers").fill(str(fillers))
        page.wait_for_function(
            f"document.querySelector('polyline.curve[data-model=lstm]')?.dataset.values.split(',').length === {fillers + 1}",
            timeout=WAIT_MS)
        expected = api(server, "/api/distance", {"fillers": fillers})["models"]
        for name in ("rnn", "lstm", "gru"):
            values = page.locator(f"polyline.curve[data-model={name}]").get_attribute("data-values")
            assert [float(v) for v in values.split(",")] == expected[name]["probabilities"]
        assert page.locator("#fillers-label").inner_text() == str(fillers)
    assert page.problems == []


def test_a_corpus_search_lists_units_then_where_one_fires(page, server):
    page.select_option("#corpus-model", "gru")
    page.select_option("#corpus-field", "hidden")
    page.fill("#pattern", "regex:^speaks$")
    page.click("#find-units")
    page.wait_for_selector(".unit-row", timeout=WAIT_MS)
    shown = page.locator(".unit-row").evaluate_all("rows => rows.map(r => Number(r.dataset.unit))")
    job = httpx.post(server + "/api/corpus/select", json={"corpus": "stories.txt", "model": "gru", "layer": 0,
                                                          "field": "hidden", "pattern": "regex:^speaks$"}).json()
    while job["status"] in ("queued", "running"):
        job = httpx.get(f"{server}/api/jobs/{job['id']}").json()
    assert shown == [u["unit"] for u in job["result"]["units"]]
    assert page.locator("#corpus-progress").evaluate("p => p.value") == 1
    page.fill("#threshold", "-1")  # every token is at or above -1 for a tanh state: one span, the whole corpus
    page.locator(".unit-row .match-unit").first.click()
    page.wait_for_selector(".span-row", timeout=WAIT_MS)
    assert page.locator(".span-row").count() == 1
    assert page.locator(".span-row").get_attribute("data-length") == str(job["result"]["tokens"])
    assert page.problems == []


def test_downloads_hold_what_the_page_shows(page, server):
    text = page.locator("#text").input_value()
    expected = api(server, "/api/analyze", {"text": text, "top_k": 5})["models"]
    with page.expect_download() as download:
        page.click("#download-csv")
    rows = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
    assert len(rows) == sum(len(m["tokens"]) for m in expected.values())
    lstm = [r for r in rows if r["model"] == "lstm"]
    assert [r["token"] for r in lstm] == [t["shown"] for t in expected["lstm"]["tokens"]]
    assert float(lstm[1]["p_of_this_token"]) == expected["lstm"]["next_probability"][0]
    with page.expect_download() as download:
        page.click("#download-json")
    import json

    data = json.loads(open(download.value.path()).read())
    cell = torch.tensor(data["models"]["lstm"]["layers"][0]["cell"])
    torch.testing.assert_close(cell, unpack(expected["lstm"]["layers"][0]["cell"]))


def test_a_text_over_the_limit_shows_the_servers_message(page):
    page.locator("#text").fill("word " * 2_001)
    page.wait_for_function("document.querySelector('#error').textContent.startsWith('413')", timeout=WAIT_MS)
    assert "at most 2,000" in page.locator("#error").inner_text()


def test_the_page_renders_and_is_not_blank(page, tmp_path):
    import matplotlib.image

    page.wait_for_selector("#distance-chart polyline.curve", state="attached", timeout=WAIT_MS)
    page.wait_for_selector(".reach-row .reach-tok", timeout=WAIT_MS)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.std() > 0.05
    distinct = torch.unique(torch.from_numpy((pixels * 255).astype("uint8")).reshape(-1, 3), dim=0)
    assert len(distinct) > 100  # text, boards, curves: far from a blank page
    assert page.problems == []
