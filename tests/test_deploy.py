"""The deployment topology on loopback: two `tiller serve` replicas behind Debian's nginx,
sharing steering vectors through Debian's redis-server (AOF on, as docker-compose.yml runs it).

nginx runs the upstream and proxy settings of deploy/tiller.conf.template, the same file the
Docker deployment renders (docker-compose.yml, deploy/nginx.conf); only the addresses differ.
Checked through the proxy: completions, the API key, the body limit, SSE arriving as it is
generated, least_conn spreading requests over both replicas, a steering vector made on one
replica used on both and still there after Redis restarts, and every request still answered
after one replica is SIGKILLed.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from tiller.server.app import ServerConfig
from tiller.server.steering_redis import INDEX

from tests.browser import artifacts_dir, chromium_path, launched
from tests.live_server import ServerProcess, free_port, start_server
from tests.redis_server import RedisServer, find_redis, start_redis

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "tiller.conf.template"
API_KEY = "sk-deploy-test"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
PROMPT = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}


def find_nginx() -> str | None:
    # NOTE: Debian installs it in /usr/sbin, which is not on a normal user's PATH.
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""),
                                                        "/usr/sbin", "/sbin"]))


def render_template(text: str, upstreams: list[str], listen: str) -> str:
    """What the nginx image's envsubst does with one address, with one server line per address."""
    assert text.count("${TILLER_UPSTREAM}") == 1 and text.count("${TILLER_LISTEN}") == 1
    lines = []
    for line in text.splitlines(keepends=True):
        if "${TILLER_UPSTREAM}" in line:
            lines.extend(line.replace("${TILLER_UPSTREAM}", u) for u in upstreams)
        else:
            lines.append(line.replace("${TILLER_LISTEN}", listen))
    return "".join(lines)


def request(port: int, method: str, path: str, body: dict | bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, data, headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wait_until(ok, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready after {timeout:.0f} s\n{tail}")


@dataclass
class Replica:
    port: int
    proc: ServerProcess

    def completions_ok(self) -> int:
        """tiller_requests_total for successful /v1/completions, read from the replica itself."""
        status, _, body = request(self.port, "GET", "/metrics", headers=AUTH)
        assert status == 200
        m = re.search(r'^tiller_requests_total\{route="/v1/completions",status="200"\} (\S+)$',
                      body.decode(), re.M)
        return int(float(m.group(1))) if m else 0


def start_replica(models: Path, tmp: Path, *extra: str) -> Replica:
    url, proc = start_server(tmp, "--threads", "1", "--parallel", "2", "--api-key", API_KEY,
                             *extra, model=models / "stories260K.bin",
                             tokenizer=models / "tok512.bin")
    return Replica(int(url.rsplit(":", 1)[1]), proc)


# A second front door, test-only: the same upstream served under a path, as a site that hosts
# tiller beside other things would (the web UI must then use relative URLs only).
UNDER_PATH = """
    server {{
        listen 127.0.0.1:{port};
        location /tiller/ {{
            proxy_pass http://tiller/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization $http_authorization;
            proxy_buffering off;
        }}
    }}
"""


def nginx_conf(tmp: Path, listen: int, under_path: int) -> str:
    """The test's main config: paths in tmp, foreground; http {} as in deploy/nginx.conf, plus
    the UNDER_PATH server on port `under_path`."""
    temp = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # NOTE: as root the workers would drop to nobody, who cannot enter pytest's tmp directory.
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""
    return (f"{user}daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
            f"error_log {tmp / 'error.log'} warn;\nevents {{ worker_connections 128; }}\n"
            f"http {{\n{temp}\n    include {tmp / 'tiller.conf'};\n"
            f"    access_log {tmp / 'access.log'} tiller;\n"
            f"{UNDER_PATH.format(port=under_path)}}}\n")


@dataclass
class Cluster:
    port: int  # nginx
    under_path: int  # nginx serving the same replicas under /tiller/ (UNDER_PATH)
    replicas: list[Replica]
    error_log: Path
    redis: RedisServer | None  # None: redis-server is not installed


@pytest.fixture(scope="module")
def cluster(shared_models: Path, tmp_path_factory: pytest.TempPathFactory):
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("deploy")
    replicas: list[Replica] = []
    nginx_proc: subprocess.Popen | None = None
    # NOTE: without redis-server only the steering-sharing test skips, not the nginx checks
    store = start_redis(tmp / "redis", appendonly=True) if find_redis() else None
    cluster: Cluster | None = None
    try:
        # One at a time: the second start finds the kernels the first one compiled.
        for _ in range(2):
            replicas.append(start_replica(shared_models, tmp, *(
                ["--steering-store", store.url] if store else [])))
        port = free_port()
        (tmp / "tiller.conf").write_text(render_template(
            TEMPLATE.read_text(), [f"127.0.0.1:{r.port}" for r in replicas], f"127.0.0.1:{port}"))
        under_path = free_port()
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, port, under_path))
        cmd = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx rejects the rendered config:\n{check.stderr}"
        nginx_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: request(port, "GET", "/health")[0] == 200, 20, "nginx",
                   tmp / "error.log")
        cluster = Cluster(port, under_path, replicas, tmp / "error.log", store)
        yield cluster
    finally:
        if nginx_proc is not None:
            nginx_proc.terminate()
            nginx_proc.wait(timeout=15)
        for r in replicas:
            if r.proc.returncode is None:  # not the one killed on purpose
                r.proc.stop()
        if cluster is not None and cluster.redis is not None:  # perhaps restarted by a test
            cluster.redis.stop()
        elif store is not None:
            store.stop()


def completion_text(status: int, body: bytes) -> str:
    assert status == 200, body
    return json.loads(body)["choices"][0]["text"]


def test_shared_config_is_what_docker_uses():
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/tiller.conf.template:/etc/nginx/templates/tiller.conf.template" in compose
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf" in compose
    assert "include /etc/nginx/conf.d/tiller.conf;" in (ROOT / "deploy" / "nginx.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)m;", TEMPLATE.read_text())
    assert limit and int(limit.group(1)) * 1024 * 1024 == ServerConfig.max_body_bytes
    # the replicas share steering through the compose file's Redis, which keeps an AOF
    assert '"--steering-store", "redis://redis:6379/0"' in compose
    assert '"redis-server", "--appendonly", "yes"' in compose and "redis-data:/data" in compose


def test_requests_pass_through_with_the_api_key(cluster: Cluster):
    assert request(cluster.port, "GET", "/health")[0] == 200  # public, no key
    status, _, body = request(cluster.port, "POST", "/v1/completions", PROMPT,
                              {"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert completion_text(*request(cluster.port, "POST", "/v1/completions", PROMPT, AUTH)[::2])


def test_body_limit_matches_the_server(cluster: Cluster):
    def padded(size: int) -> bytes:
        body = json.dumps({"prompt": "Once", "max_tokens": 1}).encode()
        return body[:-1] + b" " * (size - len(body)) + b"}"

    limit = ServerConfig.max_body_bytes
    status, _, body = request(cluster.port, "POST", "/v1/completions", padded(limit), AUTH)
    assert status == 200, body  # the largest body the server takes gets through
    status, headers, _ = request(cluster.port, "POST", "/v1/completions", padded(limit + 1),
                                 AUTH)
    assert status == 413 and headers["Server"] == "nginx"  # refused before a replica reads it


def test_stream_arrives_as_generated(cluster: Cluster):
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "stream": True,
            "max_tokens": 200, "temperature": 0}
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=60)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), AUTH)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    reads: list[tuple[float, bytes]] = []
    while chunk := resp.read1(65536):
        reads.append((time.perf_counter() - start, chunk))
    conn.close()
    stream = b"".join(c for _, c in reads)
    events = stream.count(b"data: ")
    assert stream.rstrip().endswith(b"data: [DONE]") and events > 50
    # Direct from a replica every event is its own read; a proxy that buffers hands them over
    # in blocks of many events, or all at once at the end.
    assert len(reads) >= events // 8, f"{events} events in {len(reads)} reads"
    first, last = reads[0][0], reads[-1][0]
    assert first < last / 2, f"first event after {first:.3f} s of {last:.3f} s"


def test_web_ui_and_its_assets_load_through_nginx(cluster: Cluster):
    """The page and every asset it names pass the proxy public, with their types, ETag and CSP
    (revalidation answered 304 through it); the API behind it still wants the key."""
    status, headers, body = request(cluster.port, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert request(cluster.port, "GET", "/", headers={"If-None-Match": headers["ETag"]})[0] == 304
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', body.decode())
              if not a.startswith("data:")]
    assert "webui/app.js" in assets
    for asset in assets:
        status, headers, _ = request(cluster.port, "GET", "/" + asset)
        assert status == 200 and headers["Content-Type"].startswith(
            ("text/javascript", "text/css")), (asset, status, headers)
        assert headers["ETag"] and headers["Content-Security-Policy"]
        # the same file under the path prefix: relative URLs resolve below /tiller/
        assert request(cluster.under_path, "GET", "/tiller/" + asset)[0] == 200
    assert request(cluster.port, "GET", "/v1/steering")[0] == 401


def test_web_ui_under_a_path_with_the_api_key(cluster: Cluster,
                                              tmp_path_factory: pytest.TempPathFactory):
    """In a browser through nginx under /tiller/: the page asks for the key, then shows the model,
    and a chat answer streams through the proxy."""
    with launched(chromium_path()) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(f"http://127.0.0.1:{cluster.under_path}/tiller/")
        page.wait_for_selector("#banner:not([hidden])")
        assert "API key" in page.inner_text("#banner")  # /props answered 401
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        page.wait_for_selector("body[data-ready=true]", timeout=30000)
        assert "stories260K" in page.inner_text("#model") and page.is_hidden("#banner")
        page.fill("#seed", "3")
        page.fill("#max-tokens", "40")
        page.fill("#chat-input", "Tell me a story")
        page.click("#chat-send")
        page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60000)
        page.screenshot(path=str(artifacts_dir(tmp_path_factory) / "deploy-under-path.png"))
        reply = page.inner_text(".message.assistant .body")
        assert reply.strip() and page.is_hidden("#chat-error")
        assert not errors, errors
        prefix = f"http://127.0.0.1:{cluster.under_path}/tiller/"
        assert urls and all(u.startswith((prefix, "data:")) for u in urls), urls


def test_least_conn_spreads_over_both_replicas(cluster: Cluster):
    before = [r.completions_ok() for r in cluster.replicas]
    texts = {completion_text(*request(cluster.port, "POST", "/v1/completions", PROMPT,
                                      AUTH)[::2]) for _ in range(6)}
    after = [r.completions_ok() for r in cluster.replicas]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 6 and min(served) >= 2, served
    assert len(texts) == 1  # same model, temperature 0: same answer from either replica


def test_steering_is_shared_by_the_replicas_and_survives_a_redis_restart(cluster: Cluster):
    if cluster.redis is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run "
                    "installs it)")
    status, _, body = request(cluster.port, "POST", "/v1/steering", {
        "method": "actadd", "add": "dog", "sub": "cat", "layer": 1}, AUTH)
    assert status == 200, body
    vid = json.loads(body)["id"]
    steered = {**PROMPT, "max_tokens": 24, "temperature": 0.8, "seed": 5,
               "steering": [{"vector": vid, "layer": 3, "scale": 8.0}]}

    def steered_everywhere() -> str:
        """Every replica knows the vector, and steered requests through nginx reach both."""
        for r in cluster.replicas:
            assert request(r.port, "GET", f"/v1/steering/{vid}", headers=AUTH)[0] == 200
        before = [r.completions_ok() for r in cluster.replicas]
        texts = {completion_text(*request(cluster.port, "POST", "/v1/completions", steered,
                                          AUTH)[::2]) for _ in range(6)}
        served = [r.completions_ok() - b for r, b in zip(cluster.replicas, before, strict=True)]
        assert sum(served) == 6 and min(served) >= 2, served
        assert len(texts) == 1  # the same vector on both replicas: the same text
        return texts.pop()

    text = steered_everywhere()
    assert text != completion_text(*request(cluster.port, "POST", "/v1/completions",
                                            {**steered, "steering": []}, AUTH)[::2])
    # Redis crashes and comes back on its AOF: the vector is still there, for both replicas
    old = cluster.redis
    old.kill()
    status, _, body = request(cluster.port, "POST", "/v1/completions", steered, AUTH)
    assert status == 503 and b"steering_store_unavailable" in body
    cluster.redis = start_redis(old.directory, port=old.port, appendonly=True)
    assert redis.Redis.from_url(cluster.redis.url).hexists(INDEX, vid)  # read from the AOF
    assert steered_everywhere() == text


# NOTE: destructive, so it runs last (pytest keeps file order).
def test_killed_replica_is_routed_around(cluster: Cluster):
    alive, dead = cluster.replicas
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(timeout=10)
    before = alive.completions_ok()
    for _ in range(6):
        assert completion_text(*request(cluster.port, "POST", "/v1/completions", PROMPT,
                                        AUTH)[::2])
    status, _, body = request(cluster.port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                               "max_tokens": 8}, AUTH)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert alive.completions_ok() - before == 6
    log = cluster.error_log.read_text()
    assert f'upstream: "http://127.0.0.1:{dead.port}/' in log, log
    assert "Connection refused" in log, log
