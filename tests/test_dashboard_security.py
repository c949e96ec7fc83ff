"""The dashboard as a public demo, attacked: what a hostile visitor or a careless operator does, and what stops it.

Without a browser: a forged widget message is a trait set or a handler call on a kernel-side widget, which is
what ipywidgets does with one; a server test starts the real Voila server and sends crafted requests.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ipywidgets as W  # noqa: E402
import traitlets as T  # noqa: E402

from workbench import Config, RunStore, WorkbenchError  # noqa: E402
from workbench.launch import RunHandle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "scripts" / "serve_dashboard.py"


def _serve_module():
    spec = importlib.util.spec_from_file_location("serve_dashboard", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upload_item(name: str, content: bytes) -> dict:
    """What ipywidgets 8 FileUpload.value holds for one file (what a page sends, or a forged message)."""
    return {"name": name, "type": "application/octet-stream", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _running_run(store: RunStore, name: str = "someone-elses-run") -> str:
    run_id = store.create_run(Config(name=name).to_dict(), name)
    store.mark_running(run_id, pid=os.getpid())  # alive: this very process
    return run_id


def _widgets_built_by(build) -> list[W.Widget]:
    """Every widget (every comm a page could address) that `build()` created."""
    before = set(W.Widget.widgets)
    result = build()
    return result, [W.Widget.widgets[k] for k in set(W.Widget.widgets) - before]


# --- the server: token, Host check, culling, message size -------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--host", "0.0.0.0"], "set a token"),
    (["--host", "192.168.1.20"], "set a token"),
    (["--host", "0.0.0.0", "--token", "short"], "at least 16"),
    (["--host", "0.0.0.0", "--token", "a-long-enough-secret-1234"], "--allowed-host"),
    (["--cull-idle", "0"], "at least 1"),
])
def test_server_refuses_to_start_unprotected(argv, expected, capsys, monkeypatch) -> None:
    monkeypatch.delenv("WORKBENCH_DASHBOARD_TOKEN", raising=False)
    serve = _serve_module()
    monkeypatch.setattr(serve.os, "execve", lambda *a: pytest.fail("the server must not start"))
    assert serve.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_server_settings_host_check_cull_and_message_size(tmp_path: Path) -> None:
    from widgets.data_panel import MAX_UPLOAD_BYTES

    serve = _serve_module()
    assert serve.check_exposure("127.0.0.1", "", []) == []  # loopback: no token needed
    warnings = serve.check_exposure("0.0.0.0", "x" * 20, ["demo.example.org"])
    assert len(warnings) == 1 and "every network interface" in warnings[0]
    loopback = serve.tornado_settings("127.0.0.1", [])
    assert loopback["allow_remote_access"] is False and loopback["local_hostnames"] == ["localhost"]
    assert serve.tornado_settings("0.0.0.0", ["demo.example.org"])["local_hostnames"] == ["demo.example.org",
                                                                                           "localhost"]
    assert serve.tornado_settings("0.0.0.0", ["*"])["allow_remote_access"] is True
    # an upload over the page's limit still fits one websocket message: it is refused in words
    assert loopback["websocket_max_message_size"] > MAX_UPLOAD_BYTES > 10 * 2**20
    config = serve.write_voila_config(tmp_path, "127.0.0.1", [])
    command = serve.voila_command(8866, "127.0.0.1", config.parent, token=True, cull_idle=600)
    assert "--MappingKernelManager.cull_idle_timeout=600" in command
    assert "--MappingKernelManager.cull_connected=False" in command
    assert "--Voila.auto_token=True" in command  # the token itself goes in $JUPYTER_TOKEN, not in `ps`
    assert not any(c.startswith(("--token", "--Voila.token")) for c in command)


def _get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.skipif(importlib.util.find_spec("voila") is None, reason="voila is not installed")
def test_server_token_and_host_check(tmp_path: Path) -> None:
    """The real server on every interface: no token -> login, a foreign Host (DNS rebinding) -> 403."""
    serve = _serve_module()
    port = serve.free_port(None)
    token = "a-long-enough-secret-1234"
    env = {**os.environ, "WORKBENCH_DASHBOARD_TOKEN": token, "WORKBENCH_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(SERVE), "--host", "0.0.0.0", "--port", str(port),
                             "--allowed-host", "demo.example.org"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://demo.example.org:{port}/?token={token}" in first
        base = f"http://127.0.0.1:{port}"
        kernel = f"{base}/api/kernels/00000000-0000-0000-0000-000000000000"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(f"{base}/voila/static/voila.js", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        good = f"demo.example.org:{port}"
        assert _get(f"{kernel}?token={token}", good) == 404  # authenticated; no such kernel
        assert _get(kernel, good) == 403  # no token
        assert _get(f"{base}/", good) == 302  # the page without the token: to the login form, no kernel
        assert _get(f"{kernel}?token={token}", f"127.0.0.1:{port}") == 404  # loopback is always local
        for host in (f"evil.example.com:{port}", "rebind.attacker.test"):
            assert _get(f"{kernel}?token={token}", host) == 403
            assert _get(f"{base}/?token={token}", host) == 403
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        err = proc.stderr.read()
    assert "every network interface" in err
    assert "Blocking request with non-local 'Host'" in err


# --- read-only: nothing to reach, and the kernel refuses anyway -------------------------------------------------

def test_read_only_dashboard_builds_no_setup_upload_or_stop_controls(home: Path) -> None:
    from widgets import Dashboard, DataPanel, MethodPanel, ModelPicker

    dash, built = _widgets_built_by(lambda: Dashboard(home=home, background=False, read_only=True))
    kinds = {type(w) for w in built}
    assert not kinds & {W.FileUpload, ModelPicker, DataPanel, MethodPanel, W.Text, W.Combobox, W.IntText,
                        W.FloatText, W.Checkbox}
    buttons = {w.description for w in built if isinstance(w, W.Button)}
    assert not buttons & {"Start", "Stop", "Load", "Save"}, buttons
    assert dash.model is dash.data is dash.method is None
    with pytest.raises(T.TraitError):
        dash.read_only = False  # fixed at construction
    with pytest.raises(T.TraitError):
        dash.train.read_only = False


def test_read_only_kernel_refuses_forged_stop_start_and_config(home: Path) -> None:
    from widgets import Dashboard

    store = RunStore(home)
    run_id = _running_run(store)
    dash = Dashboard(home=home, background=False, read_only=True)
    dash.train.follow(RunHandle(run_id, store))
    assert dash.train.status == "running"

    dash.train.stop()  # what a click on a Stop button would call
    assert "read-only" in dash.train.error
    assert store.get(run_id)["stop_requested"] == 0 and store.get(run_id)["status"] == "running"
    dash.train.start()
    assert "read-only" in dash.train.error and [r["id"] for r in store.list()] == [run_id]
    for action in (dash.config, lambda: dash.from_config(Config()), lambda: dash.save_config(home / "x.yaml"),
                   lambda: dash.load_config(home / "x.yaml")):
        with pytest.raises(WorkbenchError, match="read-only"):
            action()
    dash._save_clicked()  # the bar's handlers, had a message reached them
    dash._load_clicked()
    assert "read-only" in dash.message
    assert not (home / "configs").exists() and not (home / "x.yaml").exists()


def test_read_only_dashboard_names_the_run_it_shows_after_a_reload(home: Path) -> None:
    """A new kernel (a reload) on a finished run: the Train/Watch tab says which run and how it ended."""
    from widgets import Dashboard

    store = RunStore(home)
    run_id = store.create_run(Config(name="bbc-lora").to_dict(), "bbc-lora")
    store.mark_running(run_id)
    store.finish(run_id, "completed", metrics={"accuracy": 0.9})
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import dashboard_app
    finally:
        sys.path.remove(str(ROOT / "notebooks"))
    for read_only in (True, False):
        dash = Dashboard(home=home, background=False, read_only=read_only)
        dashboard_app.show_latest(dash)
        assert (dash.train.run_id, dash.train.status, dash.train.run_label) == (run_id, "completed", "bbc-lora")
        assert f"run {run_id} (bbc-lora) | completed" in dash.train._progress.value
        assert "not started" not in dash.train._progress.value
        assert dash.curve.run_ids == [run_id] and dash.confusion.run_id == run_id


def test_the_served_page_offers_the_catalog_and_the_operators_demo_model_only(home: Path, monkeypatch) -> None:
    from workbench.catalog import MODELS

    monkeypatch.syspath_prepend(str(ROOT / "notebooks"))
    import dashboard_app

    assert dashboard_app.offered_models(Config()) == tuple(MODELS)
    assert dashboard_app.offered_models(Config(model="/srv/demo-model")) == (*MODELS, "/srv/demo-model")
    monkeypatch.delenv("WORKBENCH_DEMO_MODEL", raising=False)
    monkeypatch.setenv("WORKBENCH_DEMO_OVERRIDES", "data.max_train_samples=16")
    dash = dashboard_app.build(home=home, read_only=False)
    try:
        assert dash.model.choices == tuple(MODELS) and dash.model._trust is None
    finally:
        for panel in (dash.model, dash.data, dash.method):
            panel.wait(60)
        dash.close()


# --- the model: catalog only, no remote code -------------------------------------------------------------------

def test_dashboard_offers_catalog_models_only_and_never_trusts_remote_code(home: Path, tmp_path: Path) -> None:
    from workbench.catalog import MODELS

    from widgets import Dashboard

    assert Dashboard(home=home, background=False).model._trust is not None  # a notebook of one's own: any model
    dash = Dashboard(home=home, background=False, models=tuple(MODELS))  # what the Voila page builds
    picker = dash.model
    assert picker.choices == tuple(MODELS)
    assert picker._text is None and picker._trust is None  # no box to type a hub id or tick "trust"
    for forged in (lambda: setattr(picker, "value", "attacker/model-with-code"),
                   lambda: setattr(picker, "trust_remote_code", True),
                   lambda: setattr(picker._catalog, "value", "attacker/model-with-code")):
        with pytest.raises(T.TraitError):
            forged()
    assert picker.value in MODELS and picker.trust_remote_code is False
    assert dash.config().trust_remote_code is False

    with pytest.raises(WorkbenchError, match="not offered on this page"):
        dash.from_config(Config(model="attacker/model-with-code"))
    with pytest.raises(WorkbenchError, match="trust_remote_code is switched off"):
        dash.from_config(Config(trust_remote_code=True))
    # a config file in the workspace cannot bring one in either
    (home / "configs").mkdir(parents=True)
    Config(model="attacker/model-with-code", trust_remote_code=True).save(home / "configs" / "evil.yaml")
    dash._config_name.value = "evil.yaml"
    dash._load_clicked()
    assert "switched off" in dash.message or "not offered" in dash.message
    assert picker.value in MODELS and picker.trust_remote_code is False


# --- uploads: size, Parquet bombs, quota, forged values --------------------------------------------------------

def _parquet_bytes(rows: int, text_chars: int) -> bytes:
    """One long string on every row, dictionary-encoded: a small file that expands to rows x text_chars."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype="int32")), pa.array(["w " * (text_chars // 2)]))
    label = pa.DictionaryArray.from_arrays(pa.array(np.arange(rows, dtype="int32") % 2), pa.array(["a", "b"]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": text, "label": label}), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def test_upload_parquet_declaring_millions_of_rows_is_refused_before_reading(home: Path) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    data = _parquet_bytes(5_000_000, 1000)  # ~4.7 GiB once read into the kernel
    assert len(data) < 2 * 2**20
    panel._upload.value = (upload_item("reviews.parquet", data),)
    assert "declares 5,000,000 rows" in panel.errors["source"]
    assert "sample it down" in panel._source_error.value
    assert not (home / "uploads").exists() or not any((home / "uploads").glob("*.parquet"))


def test_upload_parquet_that_expands_beyond_the_limit_is_refused(home: Path) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    data = _parquet_bytes(300_000, 2000)  # under the row cap; 600 MB once the dictionary is expanded
    panel._upload.value = (upload_item("wide.parquet", data),)
    assert "once decoded" in panel.errors["source"]
    assert not any((home / "uploads").glob("*.parquet"))
    # a sound Parquet file is accepted and read
    panel._upload.value = (upload_item("fine.parquet", _parquet_bytes(40, 20)),)
    assert panel.errors == {} and panel.rows == 40 and panel.label_column == "label"


def test_a_parquet_file_named_by_a_config_is_checked_before_reading(home: Path, tmp_path: Path) -> None:
    from workbench import DataConfig

    from widgets import DataPanel

    path = tmp_path / "big.parquet"
    path.write_bytes(_parquet_bytes(2_000_000, 10))
    panel = DataPanel(home=home, background=False)
    panel.from_config(DataConfig(source=str(path)))
    assert "declares 2,000,000 rows" in panel.errors["source"] and panel.rows == 0


def test_upload_quota_per_workspace(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from widgets import DataPanel, data_panel

    monkeypatch.setattr(data_panel, "UPLOAD_QUOTA_BYTES", 300)
    monkeypatch.setattr(data_panel, "MAX_UPLOAD_FILES", 2)
    panel = DataPanel(home=home, background=False)
    rows = b"text,label\n" + b"good film,pos\nbad film,neg\n" * 4
    first = panel.save_upload("a.csv", rows)
    assert panel.save_upload("a.csv", rows) == first  # the same file again costs nothing
    panel.save_upload("b.csv", rows + b"ok film,pos\n")
    with pytest.raises(WorkbenchError, match="delete old uploads"):
        panel.save_upload("c.csv", rows + b"fine film,pos\n")  # a third file
    monkeypatch.setattr(data_panel, "MAX_UPLOAD_FILES", 10)
    with pytest.raises(WorkbenchError, match=r"of the 0 MB"):
        panel.save_upload("d.csv", rows * 3)  # over the bytes quota
    panel._upload.value = (upload_item("e.csv", rows * 3),)  # through the widget: words, inline
    assert "delete old uploads" in panel.errors["source"]
    assert sorted(p.name for p in (home / "uploads").iterdir() if not p.name.startswith(".")) == ["a.csv", "b.csv"]


def _sent(name, content) -> dict:
    """One file as a page's message carries it (before ipywidgets deserialises it)."""
    return {"name": name, "type": "text/csv", "size": 1, "content": content, "last_modified": 0}


ROWS = b"text,label\nx,pos\ny,neg\n"


@pytest.mark.parametrize("files, expected", [
    ([_sent("a.csv", memoryview(ROWS)), _sent("b.csv", memoryview(ROWS))], "unexpected form"),  # two at once
    ([_sent(3, memoryview(ROWS))], "file name"),
    ([_sent("a.csv", 12)], "without its content"),
    ([_sent("../../../etc/cron.d/x.csv", memoryview(ROWS))], None),
])
def test_forged_upload_messages(home: Path, files, expected) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    panel._upload.set_state({"value": files})  # what the kernel does with a widget message from the page
    if expected:
        assert expected in panel.errors["source"]
    else:  # a path in the name never leaves the uploads folder
        assert Path(panel.source).parent == (home / "uploads").resolve()
    assert panel._upload.value == ()
    assert not any(p for p in home.parent.rglob("*") if p.is_file() and home not in p.parents)


def test_upload_over_the_limit_is_refused_in_words(home: Path) -> None:
    from widgets import DataPanel
    from widgets.data_panel import MAX_UPLOAD_BYTES

    panel = DataPanel(home=home, background=False)
    big = b"text,label\n" + b"x" * (MAX_UPLOAD_BYTES + 1)
    panel._upload.value = (upload_item("big.csv", big),)
    assert re.search(r"is 50\.0 MB, over the 50 MB limit", panel.errors["source"])
    assert not (home / "uploads" / "big.csv").exists()


# --- the websocket: an upload over tornado's 10 MiB default reaches the kernel -----------------------------------

def _message(msg_type: str, content: dict) -> dict:
    import uuid

    msg_id = uuid.uuid4().hex
    return {"header": {"msg_id": msg_id, "msg_type": msg_type, "username": "", "session": "s", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []}


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("voila") is None, reason="voila is not installed")
def test_a_20_mb_widget_message_reaches_the_kernel(tmp_path: Path) -> None:
    """A file of 20 MB (over tornado's 10 MiB, under the server's limit) travels as one widget message: the
    connection must stay open, so that the page's kernel can answer with the upload limit in words."""
    import asyncio
    import json

    from tornado.websocket import WebSocketClosedError, websocket_connect

    serve = _serve_module()
    port = serve.free_port(None)
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "home")}
    env.pop("WORKBENCH_DASHBOARD_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(SERVE), "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        proc.stdout.readline()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=300) as response:
                    page = response.read().decode()  # runs the dashboard in a new kernel
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.5)
        kernel_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", page).group(0)

        async def exchange() -> bool:
            ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels",
                                         max_message_size=64 * 2**20)
            big = _message("comm_msg", {"comm_id": "no-such-comm", "data": {"x": "a" * (20 * 2**20)}})
            ask = _message("kernel_info_request", {})
            try:
                await ws.write_message(json.dumps(big))
                await ws.write_message(json.dumps(ask))
            except WebSocketClosedError:
                return False  # closed by the server: tornado's default limit (10 MiB) is what did that
            end = time.monotonic() + 120
            while time.monotonic() < end:
                raw = await asyncio.wait_for(ws.read_message(), timeout=max(end - time.monotonic(), 1))
                if raw is None:
                    return False  # closed: the message was too big for the server
                reply = json.loads(raw) if isinstance(raw, str) else {}
                if reply.get("parent_header", {}).get("msg_id") == ask["header"]["msg_id"] \
                        and reply.get("msg_type") == "kernel_info_reply":
                    ws.close()
                    return True
            return False

        assert asyncio.run(exchange()), "the connection closed on a 20 MB message"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


# --- hostile files through the data panel: one line of words each, nothing outside the workspace ----------------

HOSTILE_UPLOADS = [
    ("x.exe", b"MZ\x90\x00", "unsupported type"),
    ("x", b"text,label\na,b\n", "unsupported type"),
    ("x.csv.exe", b"text,label\n", "unsupported type"),
    ("x.csv", b"", "empty"),
    ("x.csv", b"   \n\n  ", "empty"),
    ("x.parquet", b"PAR1 not really", "Parquet"),
    ("x.parquet", b"\x00" * 64, "Parquet"),
    ("x.jsonl", b"{not json}\n{\"a\": 1}\n", None),
    ("x.jsonl", b"[[1, 2], [3, 4]]\n", None),
    ("x.jsonl", b"[" * 5000 + b"]" * 5000 + b"\n", None),
    ("x.csv", b"text,label\n" + b"\x00\xff\xfe" * 100, None),
    ("x.csv", b"only a header\n", None),
    ("x.tsv", b"text\tlabel\nsame\tone\nsame\tone\n", "single class"),
    ("x.csv", b"a,b\n" + b"\"unclosed quote,1\n" * 3, None),
    ("x.csv", ("text,label\n" + "\u202e\u0000evil,\u200b\n" * 3).encode(), None),
    ("../../outside.csv", b"text,label\nx,pos\ny,neg\n", "ok"),
    ("/etc/passwd.csv", b"text,label\nx,pos\ny,neg\n", "ok"),
    ("\x00.csv", b"text,label\nx,pos\ny,neg\n", "ok"),
    ("a" * 5000 + ".csv", b"text,label\nx,pos\ny,neg\n", "ok"),
    ("C:\\Windows\\x.csv", b"text,label\nx,pos\ny,neg\n", "ok"),
    (".hidden.csv", b"text,label\nx,pos\ny,neg\n", "ok"),
]


@pytest.mark.parametrize("name, content, expected", HOSTILE_UPLOADS)
def test_hostile_uploads_end_in_one_line_of_words(home: Path, name: str, content: bytes, expected) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    panel._upload.value = (upload_item(name, content),)
    messages = [m for m in panel.errors.values() if m]
    for m in messages:
        assert "Traceback" not in m and "\n" not in m.strip() and len(m) < 600, m
    if expected == "ok":  # a hostile name, sound content: saved inside <home>/uploads under a plain name
        assert messages == [] and Path(panel.source).parent == (home / "uploads").resolve()
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", Path(panel.source).name)
    elif expected:
        assert any(expected in m for m in messages), messages
    else:  # read or refused, but never an exception out of the panel
        assert messages or panel.rows > 0
    outside = [p for p in home.parent.rglob("*") if p.is_file() and home not in p.parents]
    assert outside == []
