"""The security probe's findings (issue 24), each as the attack that found it, kept fixed.

Serving: a text no tokenizer can encode, deep JSON and huge integers are 422 naming the field; one bad request
never fails the requests batched with it; the queue is bounded (503 Retry-After) and every wait has a deadline
(504); silent and slow connections are closed; a server without a key answers loopback names only and no
other site. Files: the run store, run folders, the deploy folder and its log are owner-only, and no file but
the key file holds the key. The dashboard: cross-site page loads start no kernel, kernels are capped, and a
failing widget callback shows one line (the traceback goes to the server's log).

Most tests serve a stand-in model (a real fast tokenizer in front of a trivial classifier: it fails on a lone
surrogate exactly as a real one does) on a thread; the file tests train the tiny BERT once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from workbench.deploy.adapter import ServedModel
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.batching import MicroBatcher, QueueFull, QueueTimeout
from workbench.deploy.connections import LOOPBACK_NAMES
from workbench.deploy.server import ThreadedServer, start_server, stop_server
from workbench.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
KEY = "wb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SURROGATE_BODY = b'{"texts": ["x\\ud800"]}'  # valid JSON: a lone UTF-16 surrogate escape


# --- a stand-in model: a real fast tokenizer, so a bad text fails where a real model fails -----------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "good", "bad", "film", "poison"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


class Predictor:
    """Classifies by a word; tokenizes first (as every real predictor does); 'poison' breaks the model call."""

    labels = ["neg", "pos"]

    def __init__(self, task: str = "text-classification", delay: float = 0.0) -> None:
        self.task, self.delay, self.tokenizer = task, delay, _tokenizer()

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        self.tokenizer(list(texts))  # raises TypeError on a lone surrogate, as a real fast tokenizer does
        if any("poison" in t for t in texts):
            raise RuntimeError("the model failed on this batch")
        time.sleep(self.delay)
        if self.task == "seq2seq":
            return [{"text": t, "translation": t.upper()} for t in texts]
        return [{"text": t, "label": "pos" if "good" in t else "neg", "scores": {}} for t in texts]

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int = 8, **kwargs: Any) -> str:
        self.tokenizer([m["content"] for m in messages])
        return "good"


def _serve(task: str = "text-classification", delay: float = 0.0, key: str | None = KEY, **settings: Any):
    served = ServedModel(Predictor(task, delay), "run-x")
    app, state = create_app(served, ServeSettings(**settings), key)
    return ThreadedServer(app), state


# --- invalid text: 422 naming the field, on every route ----------------------------------------------------------

@pytest.mark.parametrize("task, route, body, field", [
    ("text-classification", "/v1/classify", {"texts": ["good film", "x\ud800"]}, "texts[1]"),
    ("seq2seq", "/v1/translate", {"texts": ["\udc00 film"]}, "texts[0]"),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ("chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages[0].content"),
    ("text-classification", "/v1/classify", {"texts": ["good\x00film"]}, "texts[0]"),
])
def test_text_no_tokenizer_can_encode_is_422_naming_the_field(task, route, body, field):
    server, _ = _serve(task)
    raw = json.dumps(body).encode()  # json.dumps escapes the surrogate as \ud800: valid JSON
    with server as url:
        r = httpx.post(url + route, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert field in message and "Traceback" not in message


@pytest.mark.parametrize("raw, expected", [
    (b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    (b'{"texts": ["good"], "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
    (b'{"texts": ["good"], "n": ' + b"7" * 5000 + b"}", "5000 digits"),
    (b'{"texts": ["good"], "n": NaN}', "not JSON"),
])
def test_deep_nesting_and_huge_numbers_are_422(raw, expected):
    server, _ = _serve()
    with server as url:
        r = httpx.post(url + "/v1/classify", content=raw, headers=AUTH)
        after = httpx.post(url + "/v1/classify", json={"texts": ["good film"]}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert expected in r.json()["error"]["message"]
    assert after.status_code == 200


# --- one request never fails the others of its micro-batch -------------------------------------------------------

def test_a_failing_request_fails_alone_in_its_batch():
    async def scenario() -> list[Any]:
        calls: list[int] = []

        def model(items: list[str]) -> list[str]:
            if "bad" in items:
                raise ValueError("cannot encode")
            return [i.upper() for i in items]

        batcher = MicroBatcher(model, max_batch_size=8, max_wait_ms=100, on_batch=calls.append)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.submit(["a"]), batcher.submit(["bad"]), batcher.submit(["b", "c"]),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    first, bad, third = asyncio.run(scenario())
    assert first == ["A"] and third == ["B", "C"]
    assert isinstance(bad, ValueError)


def _hammer(url: str, body: bytes, stop: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            statuses.append(client.post(url + "/v1/classify", content=body, headers=AUTH).status_code)


@pytest.mark.parametrize("poison", [SURROGATE_BODY, b'{"texts": ["poison film"]}'])
def test_four_clients_sending_poison_do_not_fail_a_fifths_requests(poison):
    """The probe's measurement: 4 clients send a text the model call fails on, in a loop; a fifth sends 100
    normal requests. Before: 99 of 100 got 500. Now all 200 (the surrogate is refused with 422 before the
    model; a text the model itself fails on fails its own request only)."""
    server, _ = _serve(max_wait_ms=20)
    stop, bad_statuses = threading.Event(), [[] for _ in range(4)]
    with server as url:
        threads = [threading.Thread(target=_hammer, args=(url, poison, stop, s)) for s in bad_statuses]
        for t in threads:
            t.start()
        good = []
        with httpx.Client(timeout=60) as client:
            for i in range(100):
                good.append(client.post(url + "/v1/classify", json={"texts": [f"good film {i}"]},
                                        headers=AUTH).status_code)
        stop.set()
        for t in threads:
            t.join(60)
    assert good == [200] * 100
    sent = [s for statuses in bad_statuses for s in statuses]
    assert sent and set(sent) == ({422} if poison == SURROGATE_BODY else {500})


# --- bounded queue, deadlines ------------------------------------------------------------------------------------

def test_batcher_queue_is_bounded_and_every_wait_has_a_deadline():
    async def scenario() -> tuple[Any, Any, Any]:
        batcher = MicroBatcher(lambda items: time.sleep(0.5) or items, max_batch_size=4, max_wait_ms=0,
                               max_queue=4, timeout_s=0.2)
        await batcher.start()
        try:
            results = await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4, 5]),
                                           return_exceptions=True)
            waiting_after = batcher.waiting
        finally:
            await batcher.stop()
        return results, waiting_after, batcher

    (late, full), waiting_after, _ = asyncio.run(scenario())
    assert isinstance(late, QueueTimeout)  # 0.5 s of model work, 0.2 s allowed
    assert isinstance(full, QueueFull) and full.retry_after >= 1 and full.limit == 4
    assert waiting_after == 0  # every admitted item is counted out again


def test_full_queue_is_503_with_retry_after_and_a_slow_model_is_504():
    server, _ = _serve(delay=1.0, max_queue=2, request_timeout_s=0.5, max_wait_ms=0)
    with server as url:
        results: list[httpx.Response] = []

        def call(texts: list[str]) -> None:
            results.append(httpx.post(url + "/v1/classify", json={"texts": texts}, headers=AUTH, timeout=30))

        first = threading.Thread(target=call, args=(["good", "film"],))
        first.start()
        time.sleep(0.2)  # the first request holds the whole queue (2 texts)
        call(["good"])
        first.join()
    busy, late = results
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["limit"] == "max_queue"
    assert late.status_code == 504 and late.json()["error"]["limit"] == "request_timeout_s"


# --- idle and slow connections -----------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("send", [b"", b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_silent_and_partial_header_connections_are_closed(send):
    server, _ = _serve(header_timeout_s=0.5)
    with server as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(send)
            assert _closed_within(sock, 5), "the server held a connection that never sent a whole request"
        assert httpx.get(url + "/healthz").status_code == 200


def test_a_stalled_body_is_408():
    server, _ = _serve(body_timeout_s=0.5)
    with server as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"texts\"")
            sock.settimeout(10)
            answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


# --- a server without a key: loopback names only, no other site ---------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 200),
    ({"Host": "localhost:1234"}, 200),
    ({"Host": "[::1]:1234"}, 200),
    ({"Host": "evil.example"}, 403),  # DNS rebinding: the attacker's name resolved to 127.0.0.1
    ({"Origin": "http://evil.example"}, 403),  # a page of another site POSTing to 127.0.0.1
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "null"}, 403),
])
def test_open_server_answers_loopback_names_from_no_other_site(headers, status):
    server, _ = _serve(key=None, allowed_hosts=LOOPBACK_NAMES)
    with server as url:
        r = httpx.post(url + "/v1/classify", json={"texts": ["good film"]}, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["limit"] == "allowed_hosts"


# --- one-line errors, tracebacks in the server log only ------------------------------------------------------------

def test_http_errors_are_one_line_and_the_traceback_frames_go_to_the_log(caplog):
    import logging

    server, _ = _serve()
    with caplog.at_level(logging.ERROR, logger="workbench.serve"), server as url:
        r = httpx.post(url + "/v1/classify", json={"texts": ["poison film"]}, headers=AUTH)
    assert r.status_code == 500 and len(r.text.splitlines()) == 1
    assert "Traceback" not in r.text and "File " not in r.text and "/" not in r.json()["error"]["message"]
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "RuntimeError" in logged and 'File "' in logged and "poison" not in logged


def _dashboard_app():
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import dashboard_app
    finally:
        sys.path.remove(str(ROOT / "notebooks"))
    return dashboard_app


def test_widget_callback_errors_show_one_line_and_log_the_traceback():
    """What ipywidgets does when a callback (or a forged widget message) raises: `get_ipython().showtraceback()`.
    The page gets one line; the traceback, with this machine's paths, goes to the server's log."""
    from workbench import WorkbenchError

    app = _dashboard_app()
    sent: list[tuple] = []

    class Shell:
        def _showtraceback(self, etype, evalue, stb):
            sent.append((etype, evalue, stb))

    shell, log = Shell(), io.StringIO()
    app.one_line_errors(shell, log)
    for exc in (KeyError("/usr/lib/python3/site-packages/secret_path.py"), WorkbenchError("pick a run first")):
        try:
            raise exc
        except Exception:
            shell.showtraceback()
    (etype, evalue, stb), (_, words, wb_stb) = sent
    assert etype is KeyError and len(stb) == 1 and "/" not in stb[0] and "/" not in evalue
    assert "server's log" in stb[0]
    assert wb_stb == ["WorkbenchError: pick a run first"] and words == "pick a run first"
    assert "Traceback (most recent call last)" in log.getvalue() and "secret_path" in log.getvalue()


# --- files: owner-only, the key in its key file only ---------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_store_and_run_folders_are_owner_only(tmp_path):
    old = os.umask(0o022)  # the usual umask: what made them world-readable
    try:
        store = RunStore(tmp_path / "home")
        run_id = store.create_run({"task": "text-classification"}, "r")
    finally:
        os.umask(old)
    home = tmp_path / "home"
    assert _mode(home) == 0o700 and _mode(home / "runs") == 0o700 and _mode(store.run_dir(run_id)) == 0o700
    for name in ("runs.sqlite", f"runs/{run_id}/config.yaml", f"runs/{run_id}/log.txt"):
        assert _mode(home / name) == 0o600, name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_csv) -> tuple[Path, str]:
    import workbench
    from workbench.config import Config

    home = tmp_path_factory.mktemp("security-home")
    raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": True}}
    old = os.umask(0o022)
    try:
        record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    finally:
        os.umask(old)
    assert record["status"] == "completed", record.get("error")
    return home, record["id"]


def _not_private(folder: Path) -> list[str]:
    return [f"{p} {_mode(p):o}" for p in [folder, *folder.rglob("*")]
            if not p.is_symlink() and _mode(p) & 0o077]


def test_a_trained_runs_files_are_owner_only(trained):
    home, run_id = trained
    assert _not_private(RunStore(home).run_dir(run_id)) == []


def test_dashboard_server_start_keeps_the_key_out_of_every_file_but_the_key_file(trained):
    """The Deploy tab's Start server (widgets/deploy.py -> deploy.start_server): the deploy folder 0700, its
    files 0600, the key in <home>/serve/api_key only (before: server.log 0644 held it whole)."""
    home, run_id = trained
    old = os.umask(0o022)
    try:
        info = start_server(run_id, home, timeout=180)
    finally:
        os.umask(old)
    try:
        key = info["api_key"]
        assert key and httpx.get(info["url"] + "/readyz", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        deploy = RunStore(home).run_dir(run_id) / "deploy"
        assert _mode(deploy) == 0o700 and _not_private(deploy) == []
        holding = [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
        assert holding == ["serve/api_key"]
        assert _mode(home / "serve" / "api_key") == 0o600 and _mode(home / "serve") == 0o700
        assert "not printed here" in (deploy / "server.log").read_text()
    finally:
        stop_server(run_id, home)


def test_open_server_started_in_the_background_refuses_a_foreign_host(trained):
    home, run_id = trained
    info = start_server(run_id, home, timeout=180, extra_args=["--no-api-key"])
    try:
        assert info["api_key"] is None
        ok = httpx.post(info["url"] + "/v1/classify", json={"texts": ["great film"]})
        rebound = httpx.post(info["url"] + "/v1/classify", json={"texts": ["great film"]},
                             headers={"Host": "rebind.attacker.test"})
    finally:
        stop_server(run_id, home)
    assert ok.status_code == 200 and rebound.status_code == 403


# --- the dashboard: cross-site page loads start no kernel, kernels are capped ---------------------------------------

def _serve_module():
    spec = importlib.util.spec_from_file_location("serve_dashboard", ROOT / "scripts" / "serve_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("headers, refused", [
    ({}, False),
    ({"Sec-Fetch-Site": "none"}, False),
    ({"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8866"}, False),
    ({"Sec-Fetch-Site": "cross-site"}, True),
    ({"Sec-Fetch-Site": "same-site"}, True),
    ({"Origin": "http://evil.example"}, True),
    ({"Origin": "null"}, True),
])
def test_dashboard_cross_site_rule(headers, refused):
    serve = _serve_module()
    assert (serve.cross_site_reason(headers, "127.0.0.1:8866") is not None) is refused


def test_dashboard_kernel_cap_counts_kernels_still_starting(monkeypatch):
    import tornado.web
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    started: list[str] = []

    async def slow_start(self, *args, **kwargs):
        await asyncio.sleep(0.2)  # a kernel takes seconds to start: not yet listed meanwhile
        started.append(f"k{len(started)}")
        return started[-1]

    monkeypatch.setattr(AsyncMappingKernelManager, "start_kernel", slow_start)
    manager_class = _serve_module().capped_kernel_manager(2)
    manager = manager_class.__new__(manager_class)
    monkeypatch.setattr(manager_class, "list_kernel_ids", lambda self: list(started))
    monkeypatch.setattr(manager_class, "log", property(lambda self: __import__("logging").getLogger("t")))

    async def three_pages() -> list[Any]:
        return await asyncio.gather(*(manager.start_kernel() for _ in range(3)), return_exceptions=True)

    results = asyncio.run(three_pages())
    refused = [r for r in results if isinstance(r, tornado.web.HTTPError)]
    assert len(started) == 2 and len(refused) == 1 and refused[0].status_code == 503
    assert "dashboard is full" in refused[0].log_message.lower()


def _kernels_of(pid: int) -> int:
    import psutil

    return sum("ipykernel" in " ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True))


def _page(url: str, headers: dict[str, str]) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=300) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.mark.skipif(importlib.util.find_spec("voila") is None, reason="voila is not installed")
def test_cross_site_page_loads_start_no_kernel_and_a_full_server_says_so(tmp_path):
    """The probe's measurement on the real server: ten cross-site GETs of the dashboard, then one ordinary load
    (one kernel), then one more with --max-kernels 1 (a 503 page in words, no second kernel)."""
    serve = _serve_module()
    port = serve.free_port(None)
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "home")}
    env.pop("WORKBENCH_DASHBOARD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_dashboard.py"), "--port", str(port),
                             "--max-kernels", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        proc.stdout.readline()
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/voila/static/voila.js", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.5)
        hostile = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        answers = [_page(base + "/", hostile) for _ in range(10)]
        time.sleep(1)
        assert [status for status, _ in answers] == [403] * 10
        assert "another site" in answers[0][1] and _kernels_of(proc.pid) == 0
        status, _ = _page(base + "/", {})
        assert status == 200 and _kernels_of(proc.pid) == 1
        status, text = _page(base + "/", {"Sec-Fetch-Site": "none"})
        assert status == 503 and "dashboard is full" in text.lower() and _kernels_of(proc.pid) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        err = proc.stderr.read()
    assert "refused a cross-site page load" in err and "dashboard full" in err
