"""`tiller serve` started with llama-server's command line (tools/server/README.md in
llama.cpp: `llama-server -m model.gguf -c 2048 -np 4 ...`) and driven with llama.cpp's request
shapes, as a drop-in replacement is used."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.cvec import ControlVector, write_control_vector

from tests.live_server import MODEL, ROOT, TOKENIZER, free_port, start_server
from tests.test_real_model import GOLDEN
from tiller.cli import build_parser

PROMPT = "Once upon a time"
ORIGIN = "http://localhost:5173"


def call(url: str, path: str, body: dict | None = None, key: str | None = "k2",
         headers: dict[str, str] | None = None, method: str | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def golden(n: int) -> str:
    from tiller.engine.tokenizer import SpmTokenizer

    tok = SpmTokenizer.from_llama2c(TOKENIZER, vocab_size=512)
    return tok.decode([1, 403, 407, 261, 378, *GOLDEN[:n]])[len(PROMPT):]


def test_llama_server_short_flags_parse_as_llama_server_means_them():
    args = build_parser().parse_args(
        ["serve", "-m", "m.gguf", "-c", "2048", "-np", "3", "-t", "2", "-n", "64", "-a", "x",
         "-ngl", "99", "--control-vector-scaled", "a.gguf", "0.5", "--control-vector", "b.gguf",
         "--control-vector-layer-range", "2", "4"])
    assert (args.model, args.ctx_size, args.parallel, args.threads, args.n_predict,
            args.alias) == (Path("m.gguf"), 2048, 3, 2, 64, "x")
    assert args.control_vector_scaled == [["a.gguf", "0.5"]]
    assert args.control_vector == [Path("b.gguf")] and args.control_vector_layer_range == [2, 4]
    args = build_parser().parse_args(["serve", "-ctk", "bf16", "-ctv", "f32"])
    assert (args.cache_type_k, args.cache_type_v) == ("bf16", "f32")
    # "-n" alone is n_predict, never "-np"'s prefix, whatever the order
    args = build_parser().parse_args(["serve", "-m", "m", "-n", "-1", "-np", "2"])
    assert (args.n_predict, args.parallel) == (-1, 2)


@pytest.fixture(scope="module")
def server(shared_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama-server")
    rng = np.random.default_rng(1)
    cv = tmp / "happy.gguf"
    write_control_vector(cv, ControlVector({layer: (rng.standard_normal(64) * 4).astype(
        np.float32) for layer in range(2, 6)}), 5)
    # llama.cpp's documented command line, word for word but for the file names (the
    # --model/--port that start_server puts first are overridden by -m and kept)
    url, process = start_server(
        tmp, "-m", str(MODEL), "-c", "2048", "-np", "4", "-t", "2", "--host", "127.0.0.1",
        "--temp", "0", "-n", "12", "--control-vector-scaled", str(cv), "0.8",
        "--control-vector-layer-range", "1", "3", "-a", "stories", "--api-key", "k1,k2",
        "--embedding", "--metrics", "--slots", "--no-webui", "--timeout", "600",
        "--cors-origin", ORIGIN)
    yield url, process
    process.stop()


def test_health_props_and_tokenize(server):
    url, process = server
    status, _, body = call(url, "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert call(url, "/props", key=None)[0] == 401  # --api-key
    status, _, body = call(url, "/props", key="k1")  # either comma-separated key
    props = json.loads(body)
    assert status == 200 and props["total_slots"] == 4 and props["model_alias"] == "stories"
    d = props["default_generation_settings"]
    assert (d["temperature"], d["n_predict"], d["top_k"]) == (0.0, 12, 40)
    status, _, body = call(url, "/tokenize", {"content": PROMPT})
    assert status == 200 and json.loads(body)["tokens"] == [403, 407, 261, 378]
    log = process.log()
    for flag in ("--embedding", "--metrics", "--slots", "--timeout"):
        assert f"ignoring {flag}" in log, log[-2000:]
    # --no-webui is acted on: no playground page, and no log line calling it ignored
    assert "ignoring --no-webui" not in log
    assert call(url, "/", key="k1")[0] == 404


def test_completion_with_n_predict_and_the_startup_control_vector(server):
    url, _ = server
    status, _, body = call(url, "/completion", {"prompt": PROMPT, "n_predict": 5,
                                                "steering": []})
    out = json.loads(body)
    assert status == 200 and out["tokens_predicted"] == 5 and out["stop_type"] == "limit"
    assert out["content"] == golden(5)  # --temp 0: greedy, unsteered
    # no n_predict: -n 12; no steering: the control vector from the command line
    status, _, body = call(url, "/completion", {"prompt": PROMPT})
    steered = json.loads(body)
    assert steered["tokens_predicted"] == 12 and steered["content"] != golden(12)
    # streamed: the same text in pieces, then the final event with stop true
    request = urllib.request.Request(url + "/completion", data=json.dumps(
        {"prompt": PROMPT, "stream": True}).encode(), headers={
        "Authorization": "Bearer k2", "Content-Type": "application/json", "Origin": ORIGIN})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        events = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 12
    assert "".join(e["content"] for e in events[:-1]) == steered["content"]


def test_browser_preflight_without_the_key(server):
    url, _ = server
    status, headers, _ = call(url, "/completion", key=None, method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, _ = call(url, "/completion", key=None, method="OPTIONS", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`tiller serve` on the built-in model (no ../shared needed), run until it exits."""
    return subprocess.run(
        [sys.executable, "-m", "tiller", "serve", "--port", str(free_port()), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_broken_control_vector_stops_the_server(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 12)
    result = serve("--control-vector", str(broken))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tiller: error: control vector failed to load:") and str(broken) in last
    wide = tmp_path / "wide.gguf"  # a vector for a model of another width
    write_control_vector(wide, ControlVector({2: np.ones(128, np.float32)}), 5)
    result = serve("--control-vector-scaled", str(wide), "0.5")
    assert result.returncode == 2 and str(wide) in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,message", [
    (["--control-vector", "/nonexistent/cv.gguf"], "/nonexistent/cv.gguf"),
    (["--control-vector-scaled", "x.gguf", "big"], "SCALE must be a number"),
    (["--temp", "-1"], "--temp"),
    (["--top-p", "1.5"], "--top-p"),
    (["--chat-template", "nosuch"], "not a built-in template"),
    (["--chat-template", "{% for m in messages %}"], "--chat-template"),
    (["--chat-template-file", "/nonexistent/t.jinja"], "/nonexistent/t.jinja"),
    (["--cors-origin", "localhost:3000"], "--cors-origin"),
    (["--control-vector-layer-range", "3", "1"], "--control-vector-layer-range"),
])
def test_bad_llama_server_flags_exit_2_before_loading(args, message):
    result = serve(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tiller: error:") and message in result.stderr
    assert "Traceback" not in result.stderr
