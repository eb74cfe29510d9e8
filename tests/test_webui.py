"""The steering playground in a real browser (Debian's headless Chromium, driven by Playwright)
against `tiller serve` on the built-in model.

Each check compares what the page shows with an independent answer: the same request sent
straight to the API with urllib (the page's streamed text equals the server's own answer for
the same seed; a vector made in the page has the id the API gives the same prompts), and the
readout and heatmap values recomputed with numpy from /v1/features and the vector's .npy.
Screenshots of each state go to $TILLER_WEBUI_ARTIFACTS (tests/browser.py).
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.browser import artifacts_dir, chromium_path, launched
from tests.live_server import ServerProcess, start_server
from tiller import BUILTIN_MODEL

SEED = 7
PROMPT = "Tell me a story about a dog named Max."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    chromium_path()  # skip (or fail in CI) before starting anything
    url, process = start_server(tmp_path_factory.mktemp("webui"), "--parallel", "6",
                                model=BUILTIN_MODEL, tokenizer=BUILTIN_MODEL)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(server: ServerProcess) -> Iterator:
    with launched(chromium_path()) as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)


@pytest.fixture
def page(browser, server: ServerProcess, shots: Path, request: pytest.FixtureRequest):
    """A fresh page at the server's /, ready (model and vectors loaded); fails the test on any
    script error or console error, and leaves a screenshot of its last state."""
    context = browser.new_context(viewport={"width": 1366, "height": 820})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}")
            if m.type == "error" and "status of 4" not in m.text else None)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30000)
    yield page
    page.screenshot(path=str(shots / f"{request.node.name}-end.png"), full_page=True)
    context.close()
    assert not problems, problems


def api(server: ServerProcess, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={
        "Content-Type": "application/octet-stream" if isinstance(body, bytes)
        else "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def api_json(server: ServerProcess, path: str, body: dict | bytes | None = None) -> dict:
    status, raw = api(server, path, body)
    assert status == 200, raw
    return json.loads(raw)


def words(text: str) -> str:
    return " ".join(text.split())


def completion_reference(server: ServerProcess, ids: list[int], steering: list, seed: int,
                         n: int = 80) -> tuple[str, list[int]]:
    """What /completion answers, unstreamed, for the page's token-level request."""
    out = api_json(server, "/completion", {
        "prompt": ids, "n_predict": n, "temperature": 0.8, "top_p": 0.95, "top_k": 0,
        "min_p": 0, "repeat_penalty": 1, "seed": seed, "steering": steering,
        "return_tokens": True})
    return out["content"], out["tokens"]


def slow_network(page, bytes_per_second: int = 8000) -> None:
    """Chromium's network throttling (DevTools protocol) for this page: the tiny model writes
    a whole answer in a few milliseconds, which a fast loopback hands over in one read; at a
    slow link's pace the page has to show it as it arrives."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": bytes_per_second,
        "uploadThroughput": -1})


def set_seed(page, seed: int = SEED) -> None:
    page.fill("#seed", str(seed))


def create_actadd(page, add: str, sub: str, layer: int) -> None:
    page.select_option("#create-method", "actadd")
    page.fill("#create-add", add)
    page.fill("#create-sub", sub)
    page.fill("#create-layer", str(layer))
    page.click("#create-submit")


# the page and its assets ----------------------------------------------------------------------


def test_page_and_assets_are_served_with_security_headers(server: ServerProcess):
    with urllib.request.urlopen(server.url + "/") as response:
        html = response.read().decode()
        headers = response.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp and headers["X-Content-Type-Options"] == "nosniff"
    # revalidated by ETag: the same tag answers 304 without a body
    req = urllib.request.Request(server.url + "/", headers={"If-None-Match": headers["ETag"]})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 304 and info.value.read() == b""
    # every asset the page names is relative (no leading slash) and served with its type
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "webui/app.js" in assets and "webui/style.css" in assets
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for asset in (a for a in assets if not a.startswith("data:")):
        assert not asset.startswith("/") and "//" not in asset, asset
        with urllib.request.urlopen(f"{server.url}/{asset}") as response:
            assert response.headers["Content-Type"] == types[Path(asset).suffix]
            assert response.headers["ETag"] and response.headers["Content-Security-Policy"]
    # the modules import each other and call the API by relative URLs only
    for js in (Path(__file__).parents[1] / "tiller" / "webui").glob("*.js"):
        source = js.read_text()
        assert not re.search(r"""(?:fetch|get|post|del|call|stream)\(\s*["'`]/""", source), js
        assert "innerHTML" not in source and "insertAdjacentHTML" not in source, js
    status, body = api(server, "/webui/..%2Fcli.py")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


def test_model_identity_is_shown(page, server: ServerProcess):
    card = api_json(server, "/v1/models")["data"][0]
    shown = page.inner_text("#model")
    assert card["id"] in shown and card["meta"]["key"][:12] in shown
    assert card["meta"]["uuid"] in shown
    n_ctx = api_json(server, "/props")["default_generation_settings"]["n_ctx"]
    assert f"/ {n_ctx}" in page.inner_text("#context")


# chat and completion ------------------------------------------------------------------------


def test_chat_streams_the_servers_answer(page, server: ServerProcess, shots: Path):
    set_seed(page)
    page.fill("#max-tokens", "120")
    slow_network(page)
    # record the reply's length at every change, and whether it was still streaming then
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const m = document.querySelector('.message.assistant');
            if (m) window.seen.push([m.querySelector('.body').textContent.length,
                                     m.classList.contains('streaming')]);
        }).observe(document.querySelector('#messages'),
                   {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    page.fill("#chat-input", PROMPT)
    page.press("#chat-input", "Control+Enter")  # keyboard: Ctrl+Enter sends
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60000)
    page.screenshot(path=str(shots / "chat-done.png"))
    final = len(page.inner_text(".message.assistant .body"))
    seen = page.evaluate("() => window.seen")
    # the text grew on the page while the answer was still streaming, in many steps
    growing = {length for length, streaming in seen if streaming and 0 < length < final}
    assert len(growing) >= 5, seen
    deltas = int(page.get_attribute(".message.assistant", "data-deltas"))
    reference = api_json(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": PROMPT}], "seed": SEED, "temperature": 0.8,
        "top_p": 0.95, "max_tokens": 120})
    text = reference["choices"][0]["message"]["content"]
    assert words(page.inner_text(".message.assistant .body")) == words(text)
    assert deltas >= reference["usage"]["completion_tokens"] // 2
    # context use: this exchange's tokens, from the stream's usage chunk
    used = reference["usage"]["total_tokens"]
    assert page.inner_text("#context").startswith(f"context {used} /")


def test_completion_mode_and_model_output_is_text_not_html(page, server: ServerProcess):
    page.select_option("#mode", "completion")
    set_seed(page)
    page.fill("#max-tokens", "24")
    prompt = '<img src=x onerror="window.hacked=1"> **bold** Once upon a time'
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60000)
    reference = api_json(server, "/v1/completions", {
        "prompt": prompt, "seed": SEED, "temperature": 0.8, "top_p": 0.95, "max_tokens": 24})
    assert words(page.inner_text(".message.assistant .body")) == words(
        reference["choices"][0]["text"])
    # the prompt is shown as text (markdown bold becomes <strong>, the tag stays literal text)
    assert page.locator(".message.prompt img").count() == 0
    assert page.inner_text(".message.prompt strong") == "bold"
    assert "<img" in page.inner_text(".message.prompt")
    assert page.evaluate("() => window.hacked") is None


def test_stop_keeps_a_prefix_and_errors_are_messages(page, server: ServerProcess):
    page.select_option("#mode", "completion")
    set_seed(page)
    page.fill("#max-tokens", "400")
    slow_network(page)
    # Esc is pressed from inside the page once the first 40 characters have arrived (the key
    # handler is the page's own)
    page.evaluate("""() => new MutationObserver((_, observer) => {
        const m = document.querySelector('.message.assistant.streaming .body');
        if (m && m.textContent.length >= 40) {
            observer.disconnect();
            window.stoppedAt = m.textContent.length;
            document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}));
        }
    }).observe(document.querySelector('#messages'),
               {subtree: true, childList: true, characterData: true})""")
    page.fill("#chat-input", "Once upon a time")
    page.press("#chat-input", "Control+Enter")
    page.wait_for_selector(".message.assistant:not(.streaming)")
    assert page.evaluate("() => window.stoppedAt") >= 40
    assert page.is_enabled("#chat-send") and page.is_hidden("#chat-error")
    reference = api_json(server, "/v1/completions", {
        "prompt": "Once upon a time", "seed": SEED, "temperature": 0.8, "top_p": 0.95,
        "max_tokens": 400})["choices"][0]["text"]
    shown = words(page.inner_text(".message.assistant .body"))
    assert words(reference).startswith(shown) and len(shown) < len(words(reference))
    # a request the server refuses: its message, naming the field, where the answer would be
    page.fill("#temperature", "-1")
    page.fill("#chat-input", "Once")
    page.click("#chat-send")
    page.wait_for_selector("#chat-error:not([hidden])")
    assert "temperature" in page.inner_text("#chat-error")


def test_themes_and_keyboard(page, shots: Path):
    theme = page.get_attribute("html", "data-theme")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    page.keyboard.press("Alt+t")
    assert page.get_attribute("html", "data-theme") == {"light": "dark", "dark": "light"}[theme]
    assert page.evaluate("() => getComputedStyle(document.body).backgroundColor") != background
    page.keyboard.press("Alt+3")
    assert page.get_attribute("#tab-sweep", "aria-selected") == "true"
    assert page.is_visible("#view-sweep") and page.is_hidden("#view-chat")
    page.keyboard.press("ArrowRight")  # the focused tab list moves on
    assert page.get_attribute("#tab-inside", "aria-selected") == "true"
    page.screenshot(path=str(shots / "theme-toggled.png"))
    page.reload()  # the choice is remembered
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_attribute("html", "data-theme") != theme


# steering -----------------------------------------------------------------------------------


def test_create_vector_attach_and_side_by_side(page, server: ServerProcess, shots: Path):
    # a bad layer is an error message in the panel, not a blank
    create_actadd(page, "happy", "sad", 99)
    page.wait_for_selector("#vectors-error:not([hidden])")
    assert "layer" in page.inner_text("#vectors-error")
    create_actadd(page, "happy", "sad", 2)
    page.wait_for_selector("#vectors li.vector")
    expected = api_json(server, "/v1/steering",
                        {"method": "actadd", "add": "happy", "sub": "sad", "layer": 2})["id"]
    assert page.get_attribute("#vectors li.vector", "data-id") == expected
    assert page.is_hidden("#vectors-error")
    page.click(f"#vectors li[data-id='{expected}'] button.attach")
    page.screenshot(path=str(shots / "vector-attached.png"))

    set_seed(page)
    page.click("#tab-compare")
    page.fill("#compare-prompt", PROMPT)
    page.click("#compare-run")
    page.wait_for_selector("#col-steered[data-done=true]", timeout=60000)
    first = page.inner_text("#col-steered")
    # move the slider: End puts it at its maximum; the comparison runs again by itself
    page.focus("li.attachment input.scale")
    page.keyboard.press("End")
    assert page.input_value("li.attachment input.scale-value") == "10"
    page.wait_for_function("() => document.querySelector('#col-steered').dataset.steering"
                           ".includes('\"scale\":10')", timeout=30000)
    page.wait_for_selector("#col-steered[data-done=true]", timeout=60000)
    page.wait_for_selector("#col-unsteered[data-done=true]", timeout=60000)
    page.screenshot(path=str(shots / "side-by-side.png"))
    unsteered = page.inner_text("#col-unsteered")
    steered = page.inner_text("#col-steered")
    assert steered != unsteered and steered != first
    # each column is what the API answers for the same ids, seed and steering
    ids = json.loads(page.get_attribute("#col-unsteered", "data-prompt-ids"))
    assert ids == api_json(server, "/tokenize", {"content": api_json(
        server, "/apply-template", {"messages": [{"role": "user", "content": PROMPT}]})[
        "prompt"], "add_special": True})["tokens"]
    entry = {"vector": expected, "layer": 2, "scale": 10}
    assert json.loads(page.get_attribute("#col-steered", "data-steering")) == [entry]
    for column, steering in (("#col-unsteered", []), ("#col-steered", [entry])):
        text, tokens = completion_reference(server, ids, steering, SEED)
        assert page.inner_text(column) == text
        assert json.loads(page.get_attribute(column, "data-tokens")) == tokens


def test_a_mean_vector_from_pasted_pairs(page, server: ServerProcess):
    positive = ["I am so happy today.", "What a wonderful, joyful day!"]
    negative = ["I am so sad today.", "What a terrible, gloomy day."]
    page.select_option("#create-method", "mean")
    page.fill("#create-positive", "\n".join(positive))
    page.fill("#create-negative", "\n".join(negative) + "\n")  # blank lines are not prompts
    page.fill("#create-layers", "2-3")
    page.click("#create-submit")
    expected = api_json(server, "/v1/steering", {"method": "mean", "positive": positive,
                                                 "negative": negative, "layers": [2, 3]})
    row = page.wait_for_selector(f"#vectors li[data-id='{expected['id']}']")
    assert "mean of 2 pairs" in row.inner_text() and "layers 2-3" in row.inner_text()
    row.query_selector("button.attach").click()
    page.fill("li.attachment input.scale-value", "-1.5")
    page.press("li.attachment input.scale-value", "Enter")
    page.fill("#max-tokens", "4")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#chat-input", "Hi")
        page.click("#chat-send")
    assert sent.value.post_data_json["steering"] == [
        {"vector": expected["id"], "layers": [2, 3], "scale": -1.5}]
    page.wait_for_selector(".message.assistant:not(.streaming)")
    assert page.is_hidden("#chat-error")


def test_hover_a_token_for_its_readout(page, server: ServerProcess, shots: Path):
    vid = api_json(server, "/v1/steering",
                   {"method": "actadd", "add": "happy", "sub": "sad", "layer": 2})["id"]
    page.wait_for_selector(f"#vectors li[data-id='{vid}']")
    set_seed(page)
    page.click("#tab-compare")
    page.select_option("#readout-vector", vid)
    assert page.input_value("#readout-layer") == "2"
    page.click("#compare-run")
    page.wait_for_selector("#col-unsteered[data-done=true]", timeout=60000)
    token = page.locator("#col-unsteered .token[data-token]").nth(3)
    token.hover()
    page.wait_for_selector("#tooltip:not([hidden])")
    page.screenshot(path=str(shots / "readout-hover.png"))
    tip = page.inner_text("#tooltip")
    shown = float(re.search(r"projection (-?\d+\.\d+)", tip).group(1))
    # numpy: the vector's rows summed and normalized, the state entering block 2
    ids = json.loads(token.evaluate("el => el.parentElement.dataset.promptIds"))
    tokens = json.loads(token.evaluate("el => el.parentElement.dataset.tokens"))
    status, raw = api(server, f"/v1/steering/{vid}?format=npy")
    direction = np.load(io.BytesIO(raw)).astype(np.float64).sum(axis=0)
    direction /= np.linalg.norm(direction)
    features = api_json(server, "/v1/features", {"input": ids + tokens, "layers": [2],
                                                 "points": ["resid_pre"], "steering": []})
    states = np.array(features["data"]["resid_pre"][0], dtype=np.float64)
    expected = float(states[len(ids) + 3] @ direction)
    assert shown == pytest.approx(expected, abs=1e-3)
    assert f"id {tokens[3]}" in tip


def test_sweep_runs_every_scale_at_once(page, server: ServerProcess, shots: Path):
    # NOTE: a mean vector at layer 3: an ActAdd pair moves the built-in model's chat replies
    # too little for three scales to give three texts in 30 tokens
    vid = api_json(server, "/v1/steering", {
        "method": "mean", "layers": [3],
        "positive": ["Tom was very happy", "Sue was very happy", "The dog was happy"],
        "negative": ["Tom was very sad", "Sue was very sad", "The dog was sad"]})["id"]
    page.reload()  # the page lists the store's vectors when it loads
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector(f"#vectors li[data-id='{vid}']")
    set_seed(page)
    page.fill("#max-tokens", "30")
    page.click("#tab-sweep")
    page.select_option("#sweep-vector", vid)
    page.fill("#sweep-prompt", PROMPT)
    page.fill("#sweep-scales", "-3, 0, 3")
    page.click("#sweep-run")
    for scale in ("-3", "0", "3"):
        page.wait_for_selector(f"#sweep-grid .cell[data-scale='{scale}'][data-done=true]",
                               timeout=60000)
    page.screenshot(path=str(shots / "sweep.png"))
    chat = api_json(server, "/apply-template", {"messages": [{"role": "user",
                                                               "content": PROMPT}]})["prompt"]
    ids = api_json(server, "/tokenize", {"content": chat, "add_special": True})["tokens"]
    texts = {}
    for scale in (-3, 0, 3):
        steering = [] if scale == 0 else [{"vector": vid, "layer": 3, "scale": scale}]
        text, _ = completion_reference(server, ids, steering, SEED, 30)
        cell = page.locator(f"#sweep-grid .cell[data-scale='{scale}'] .output")
        assert cell.inner_text() == text
        texts[scale] = text
    assert len(set(texts.values())) == 3


def control_vector_file(path: Path, dim: int, layers: list[int]) -> np.ndarray:
    """A control vector as llama.cpp's cvector-generator and repeng write them (gguf package):
    architecture "controlvector", model_hint, layer_count, one F32 `direction.N` per layer."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((len(layers), dim)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(layers))
    for n, v in zip(layers, vectors, strict=True):
        writer.add_tensor(f"direction.{n}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vectors


def test_upload_a_control_vector_gguf(page, server: ServerProcess, shots: Path,
                                      tmp_path: Path):
    dim = api_json(server, "/v1/models")["data"][0]["meta"]["n_embd"]
    path = tmp_path / "mood.gguf"
    vectors = control_vector_file(path, dim, [2, 3])
    page.click("summary:has-text('Import')")
    page.set_input_files("#import-file", str(path))
    page.click("#import-form button[type=submit]")
    expected = api_json(server, "/v1/steering/import", path.read_bytes())
    row = page.wait_for_selector(f"#vectors li[data-id='{expected['id']}']")
    assert "imported mood.gguf" in row.inner_text()
    assert "layers 3-4" in row.inner_text()  # direction.N is added at tiller layer N + 1
    status, raw = api(server, f"/v1/steering/{expected['id']}?format=npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(raw)), vectors)
    page.screenshot(path=str(shots / "imported.png"))
    # downloaded from the page: the bytes the API serves, and a file the gguf package reads
    with page.expect_download() as download:
        page.click(f"#vectors li[data-id='{expected['id']}'] button:has-text('.gguf')")
    saved = tmp_path / "downloaded.gguf"
    download.value.save_as(saved)
    status, raw = api(server, f"/v1/steering/{expected['id']}?format=gguf")
    assert saved.read_bytes() == raw
    reader = gguf.GGUFReader(str(saved))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(tensors["direction.2"], vectors[0])
    # deleted from the page (a second click confirms): gone from the list and the store
    delete = f"#vectors li[data-id='{expected['id']}'] button.danger"
    page.click(delete)
    assert page.inner_text(delete) == "Sure?"
    page.click(delete)
    page.wait_for_selector(f"#vectors li[data-id='{expected['id']}']", state="detached")
    assert api(server, f"/v1/steering/{expected['id']}")[0] == 404
    # a file that is no control vector: the server's message, shown in the panel
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    page.set_input_files("#import-file", str(bad))
    page.click("#import-form button[type=submit]")
    page.wait_for_selector("#vectors-error:not([hidden])")
    assert "GGUF" in page.inner_text("#vectors-error") or "gguf" in page.inner_text(
        "#vectors-error")


# looking inside ------------------------------------------------------------------------------


def test_heatmap_of_norms_and_the_logit_lens_note(page, server: ServerProcess, shots: Path):
    page.click("#tab-inside")
    page.fill("#heat-prompt", "Once upon a time")
    page.select_option("#heat-point", "resid_post")
    page.click("#heat-run")
    page.wait_for_selector("table.heat td[data-value]")
    page.screenshot(path=str(shots / "heatmap.png"))
    ids = api_json(server, "/tokenize", {"content": "Once upon a time",
                                         "add_special": True})["tokens"]
    features = api_json(server, "/v1/features", {"input": ids, "points": ["resid_post"],
                                                 "steering": []})
    norms = np.linalg.norm(np.array(features["data"]["resid_post"], dtype=np.float64), axis=-1)
    n_layers, n_tokens = norms.shape
    assert page.locator("table.heat td").count() == n_layers * n_tokens
    for block, pos in ((0, 0), (n_layers - 1, n_tokens - 1), (2, 1)):
        cell = page.locator(f"table.heat td[data-block='{block}'][data-pos='{pos}']")
        assert float(cell.get_attribute("data-value")) == pytest.approx(norms[block, pos],
                                                                        rel=1e-4)
    # the logit lens as a table (not a heatmap point): each block's top token per position,
    # the top-k with logprobs on hover, as /v1/features answers them
    assert "logit_lens" not in page.inner_text("#heat-point")
    page.wait_for_selector("table.lens-table td")
    page.screenshot(path=str(shots / "logit-lens.png"))
    lens = api_json(server, "/v1/features", {"input": ids, "points": ["logit_lens"],
                                             "positions": "all", "steering": []})["logit_lens"]
    cells = page.locator("table.lens-table td")
    assert cells.count() == n_layers * n_tokens
    for block, pos in ((0, 0), (n_layers - 1, n_tokens - 1)):
        assert cells.nth(block * n_tokens + pos).inner_text() == lens["tokens"][block][pos][0]
    cells.nth(0).hover()
    top = lens["tokens"][0][0]
    assert f'{json.dumps(top[1])} {lens["logprobs"][0][0][1]:.3f}' in page.inner_text("#tooltip")


def test_advertised_entry_fields_are_offered_and_sent(page, server: ServerProcess,
                                                      shots: Path):
    """The steering entry's fields beyond a vector, layers and scale, as this server's
    /openapi.json lists them (scope, operator, value, norm matching, condition): the page offers
    them per attachment and sends what is chosen."""
    fields = page.get_attribute("body", "data-entry-fields").split(",")
    assert {"op", "positions", "value", "norm_match", "when"} <= set(fields)
    assert "direction" not in fields  # an attachment's direction is its vector
    vid = api_json(server, "/v1/steering",
                   {"method": "actadd", "add": "happy", "sub": "sad", "layer": 2})["id"]
    page.click(f"#vectors li[data-id='{vid}'] button.attach")
    page.select_option("li.attachment select[aria-label=op]", label="ablate")
    page.select_option("li.attachment select[aria-label=positions]", label="range [start, end)")
    page.fill("li.attachment input[aria-label='positions start']", "1")
    page.fill("li.attachment input[aria-label='positions end']", "4")
    page.press("li.attachment input[aria-label='positions end']", "Tab")
    page.screenshot(path=str(shots / "advertised-fields.png"))
    page.fill("#max-tokens", "4")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#chat-input", "Hi")
        page.click("#chat-send")
    body = sent.value.post_data_json
    assert body["steering"] == [{"vector": vid, "layer": 2, "scale": 1, "op": "ablate",
                                 "positions": [1, 4]}]
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60000)


def test_no_webui_flag_leaves_the_api_alone(tmp_path: Path):
    url, process = start_server(tmp_path, "--no-webui", model=BUILTIN_MODEL,
                                tokenizer=BUILTIN_MODEL)
    try:
        for path in ("/", "/webui/app.js"):
            req = urllib.request.Request(url + path)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req)
            assert info.value.code == 404
        with urllib.request.urlopen(url + "/v1/models") as response:
            assert response.status == 200
    finally:
        process.stop()
    assert "ignoring --no-webui" not in process.log()
