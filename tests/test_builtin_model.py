"""tiller's built-in model (tiller/models/, made by train/build.py): the README's first command
serves it on a fresh machine, and the engine runs it as it was trained."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from tiller.engine.engine import Engine
from tiller.engine.generate import generate
from tiller.engine.loader import load_tokenizer
from tiller.engine.sampling import SamplingParams

from tests.live_server import free_port
from tiller import BUILTIN_MODEL

ROOT = Path(__file__).resolve().parents[1]
# the corpus's attribute words (train/corpus.py): characters, animals, places, weather
STORY_WORDS = ("girl", "boy", "dog", "cat", "bird", "rabbit", "fish", "horse", "duck", "frog",
               "park", "forest", "beach", "farm", "garden", "river", "village", "hill", "sun",
               "rain", "snow", "wind", "warm", "cold")


def reads_as_a_story(text: str) -> bool:
    """Sentences of the corpus's kind: several, and at least three of its attribute words."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return text.count(".") >= 2 and len(words & set(STORY_WORDS)) >= 3


def readme_command(title: str) -> str:
    """The first ```sh block after the README line starting with `title`."""
    text = (ROOT / "README.md").read_text("utf-8")
    start = text.index(title)
    block = re.search(r"```sh\n(.*?)\n```", text[start:], re.S)
    assert block is not None, f"no command after {title!r} in README.md"
    return block.group(1).strip()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def fresh_copy(dst: Path) -> None:
    """The checkout's files as a fresh clone has them (tracked, or new and not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith("train/"):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def test_the_builtin_model_ships_with_the_package():
    assert BUILTIN_MODEL.is_file() and BUILTIN_MODEL.stat().st_size < 16 * 1024 * 1024


def test_greedy_story_reads_as_the_corpus_does():
    engine = Engine.load(BUILTIN_MODEL, "f32")
    tok = load_tokenizer(BUILTIN_MODEL, None, engine.config.vocab_size)
    ids = list(generate(engine, tok.encode("Once upon a time", bos=True),
                        SamplingParams(temperature=0.0), 60, tok.end_ids))
    text = tok.decode(ids)
    assert reads_as_a_story(text), text


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout to make a fresh copy of")
def test_readme_first_command_serves_the_builtin_model_from_a_fresh_clone(tmp_path: Path):
    """Exactly the README's first command, in a fresh copy with no ../shared beside it and a
    fresh virtual environment (its own pip install), then a completion and a chat."""
    command = readme_command("Run the server")
    assert command.endswith("tiller serve"), command
    clone = tmp_path / "tiller"
    fresh_copy(clone)
    assert not (clone.parent / "shared").exists()
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "NUMBA_CACHE_DIR", "PYTHONPATH")}
    env["TILLER_CACHE_DIR"] = str(tmp_path / "cache")
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(["bash", "-c", f"{command} --port {port}"], cwd=clone, env=env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # pip install, then the first compile of the kernels
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        models = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=10).read())
        assert models["data"][0]["id"] == BUILTIN_MODEL.stem
        completion = post(f"{url}/v1/completions", {"prompt": "Once upon a time",
                                                    "max_tokens": 60, "seed": 1})
        text = completion["choices"][0]["text"]
        assert reads_as_a_story(text), text
        chat = post(f"{url}/v1/chat/completions", {"seed": 1, "messages": [
            {"role": "user", "content": "Tell me a story about a dog named Max."}]})
        reply = chat["choices"][0]["message"]["content"]
        assert chat["choices"][0]["finish_reason"] == "stop", reply  # it ends its turn
        assert "dog" in reply and "<|im_end|>" not in reply, reply
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
