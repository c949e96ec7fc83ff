"""`serve --engine vllm` and `--engine auto`: the `vllm serve` command and environment, every refusal, the auto
choice, and a whole serve against a stand-in `vllm` executable.

vLLM itself is not installed here (it needs Linux, CUDA and an NVIDIA GPU): the end-to-end tests put a small Python
script named `vllm` first on PATH. It records its argv and environment, answers POST /v1/chat/completions with the
key vLLM would take from VLLM_API_KEY, and stops on SIGTERM, as `vllm serve` does. On a machine without a GPU,
CUDA is made visible by monkeypatching `cuda_visible`. The runs are a tiny Llama chat run (test_chat's) and a tiny
BERT classifier."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from test_chat import qa_jsonl, tiny_chat_dir  # noqa: F401  (fixtures)
from workbench.cli import _parser, main
from workbench.config import Config
from workbench.deploy import vllm_engine
from workbench.deploy.keys import key_path, read_key_file
from workbench.deploy.vllm_engine import (API_KEY_ENV, CHAT_TEMPLATE_FILE, VLLM_DIR, auto_engine, resolve_engine,
                                          serve_on_vllm, unservable_reason, vllm_command, vllm_env, vllm_export)
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.run_paths import RunPaths
from workbench.store import RunStore

STAND_IN = '''\
#!{python}
"""A stand-in for `vllm serve`: records argv and environment, answers chat completions, stops on SIGTERM."""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
if os.environ.get("STAND_IN_EXIT"):
    sys.exit(int(os.environ["STAND_IN_EXIT"]))
record = os.environ["STAND_IN_RECORD"]
key = os.environ.get("VLLM_API_KEY")
name = argv[argv.index("--served-model-name") + 1]

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if key and self.headers.get("Authorization") != "Bearer " + key:
            return self.answer(401, {{"error": "Unauthorized"}})
        if self.path != "/v1/chat/completions" or body.get("model") != name:
            return self.answer(404, {{"error": "no such model or route"}})
        text = "stand-in answer to: " + body["messages"][-1]["content"]
        self.answer(200, {{"object": "chat.completion", "model": name, "choices": [
            {{"index": 0, "message": {{"role": "assistant", "content": text}}, "finish_reason": "stop"}}]}})

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = HTTPServer((argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])), Handler)

def stop(signum, frame):
    with open(record + ".signal", "w") as f:
        f.write(str(signum))
    threading.Thread(target=server.shutdown).start()

signal.signal(signal.SIGTERM, stop)
with open(record + ".tmp", "w") as f:
    json.dump({{"argv": argv, "env_key": key, "pid": os.getpid()}}, f)
os.replace(record + ".tmp", record)
server.serve_forever()
'''


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_chat_dir, qa_jsonl):  # noqa: F811
    """(store, run id) of a tiny LoRA chat run."""
    store = RunStore(tmp_path_factory.mktemp("vllm-home"))
    config = Config.from_dict(chat_raw(tiny_chat_dir, qa_jsonl))
    record = train(config, store=store)
    assert record["status"] == "completed", record.get("error")
    return store, record["id"]


def chat_raw(model, data, **method) -> dict:
    return {"task": "chat", "model": str(model), "data": {"source": str(data), "eval_fraction": 0.2},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, **method},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-2, "max_length": 48, "warmup_ratio": 0.0,
                      "early_stopping_patience": 0, "threads": 1},
            "chat": {"max_new_tokens": 6, "sample_prompts": 1},
            "track": {"wandb": "disabled", "tensorboard": False}}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A `vllm` stand-in first on PATH, CUDA made visible; the path of the record it writes."""
    if (Path(sys.executable).parent / "vllm").exists():
        pytest.skip("a real vllm is installed beside this Python: the stand-in on PATH would not be used")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    record = tmp_path / "stand-in.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv(API_KEY_ENV, "an-inherited-key")  # must not reach the child: the workspace key does
    if not vllm_engine.cuda_visible():  # no GPU here: vLLM's precondition is made true (on a GPU, the real check)
        monkeypatch.setattr(vllm_engine, "cuda_visible", lambda: True)
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the command and its environment ---------------------------------------------------------------------

def test_command_names_the_run_listens_where_asked_and_holds_no_key(tmp_path):
    command = vllm_command("/opt/venv/bin/vllm", tmp_path / "vllm", "20261204-1", "127.0.0.1", 8011,
                           ["--gpu-memory-utilization=0.8", "--max-model-len", "2048"])
    assert command == ["/opt/venv/bin/vllm", "serve", str(tmp_path / "vllm"), "--served-model-name", "20261204-1",
                       "--host", "127.0.0.1", "--port", "8011", "--chat-template",
                       str(tmp_path / "vllm" / CHAT_TEMPLATE_FILE), "--gpu-memory-utilization=0.8",
                       "--max-model-len", "2048"]
    assert not any("key" in part.lower() for part in command)


@pytest.mark.parametrize("arg, use", [("--api-key=secret", "VLLM_API_KEY"), ("--api-key", "VLLM_API_KEY"),
                                      ("--host=0.0.0.0", "serve --host"), ("--port", "serve --port"),
                                      ("--served-model-name=x", "the run id is the model's name"),
                                      ("--chat-template=t.jinja", "the run's own template")])
def test_extra_options_that_serve_sets_itself_are_refused(arg, use, tmp_path):
    with pytest.raises(WorkbenchError, match=rf"--vllm-arg '{arg}' sets {arg.split('=')[0]}, which serve sets "
                                             rf"itself: use .*{use}"):
        vllm_command("vllm", tmp_path, "r", "127.0.0.1", 8000, [arg])


def test_the_key_goes_in_the_environment_and_an_inherited_one_never_outlives_no_key():
    assert vllm_env({"PATH": "/bin", API_KEY_ENV: "old"}, "new") == {"PATH": "/bin", API_KEY_ENV: "new"}
    assert vllm_env({"PATH": "/bin", API_KEY_ENV: "old"}, None) == {"PATH": "/bin"}


# --- the auto choice -------------------------------------------------------------------------------------

def never() -> bool:
    raise AssertionError("asked although the answer did not need it")


@pytest.mark.parametrize("method, artifact, installed, cuda, engine, why", [
    ({}, None, True, True, "vllm", "a chat run, vLLM installed and a CUDA device visible; --engine uvicorn"),
    ({}, None, False, never, "uvicorn", "a chat run, but vLLM is not installed"),
    ({}, None, True, False, "uvicorn", "a chat run, but no CUDA device is visible for vLLM"),
    ({}, "int8", never, never, "uvicorn", "--artifact int8 is served by the workbench app"),
    ({"use_dora": True}, None, True, True, "vllm", "a chat run, vLLM installed"),  # merged: DoRA is served
    ({"name": "qlora"}, None, True, True, "vllm", "a chat run, vLLM installed"),  # merged into a float base
])
def test_auto_serves_a_chat_run_on_vllm_only_when_it_is_installed_and_cuda_is_visible(
        method, artifact, installed, cuda, engine, why, tmp_path):
    raw = chat_raw(tmp_path / "model", tmp_path / "qa.jsonl")
    raw["method"].update(method)
    def asked(value):
        return value if callable(value) else (lambda: value)

    chosen, reason = auto_engine(Config.from_dict(raw), "r1", artifact, installed=asked(installed), cuda=asked(cuda))
    assert chosen == engine and reason.startswith(why)


def test_auto_keeps_classification_runs_on_uvicorn_and_explicit_choices_stand(tiny_config, store):
    record = train(tiny_config(train={"epochs": 1}), store=store)
    assert resolve_engine("auto", record["id"], home=store.home) == (
        "uvicorn", "a text-classification run: vLLM serves chat runs only")
    assert auto_engine(Config.from_dict(record["config"]), record["id"], None, never, never)[0] == "uvicorn"
    # an explicit engine is taken as asked, without reading the store (the run need not exist)
    assert resolve_engine("uvicorn", "no-such-run", home=store.home) == ("uvicorn", "--engine uvicorn")
    assert resolve_engine("vllm", "no-such-run", home=store.home) == ("vllm", "--engine vllm")
    assert _parser().parse_args(["serve", "r"]).engine == "auto"
    assert _parser().parse_args(["serve", "r", "--engine", "vllm", "--vllm-arg=--max-model-len=512"]).vllm_args == [
        "--max-model-len=512"]
    # and a classification run is refused by the vllm engine itself, naming why and where it goes
    with pytest.raises(WorkbenchError, match=r"task: text-classification run, and vLLM serves generative decoder "
                                             r"models: only chat runs .* served with --engine uvicorn"):
        _ready_serve(store, record["id"])


def _ready_serve(store, run_id, **kwargs):
    """serve_on_vllm with vLLM and CUDA made present (the refusals after them are what is tested)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(vllm_engine, "vllm_executable", lambda: Path("/nonexistent/vllm"))
    mp.setattr(vllm_engine, "cuda_visible", lambda: True)
    try:
        return serve_on_vllm(run_id, home=store.home, echo=lambda line: None, **kwargs)
    finally:
        mp.undo()


# --- refusals, each before anything is exported ------------------------------------------------------------

def test_refusals_name_the_problem_and_the_fix_before_any_export(chat_run, monkeypatch, capsys):
    store, run_id = chat_run
    out = RunPaths.of(store.get(run_id)).deploy / VLLM_DIR
    monkeypatch.setattr(vllm_engine, "vllm_executable", lambda: None)
    with pytest.raises(WorkbenchError, match=r"vLLM is not installed \(no `vllm` executable beside .* or on PATH\): "
                                             r"pip install vllm on a Linux machine with an NVIDIA GPU, or serve with "
                                             r"--engine uvicorn"):
        serve_on_vllm(run_id, home=store.home)
    monkeypatch.setattr(vllm_engine, "vllm_executable", lambda: Path("/nonexistent/vllm"))
    monkeypatch.setattr(vllm_engine, "cuda_visible", lambda: False)
    with pytest.raises(WorkbenchError, match=r"no CUDA device is visible .* run this on a machine with an NVIDIA GPU "
                                             r".* or serve with --engine uvicorn"):
        serve_on_vllm(run_id, home=store.home)
    monkeypatch.setattr(vllm_engine, "cuda_visible", lambda: True)
    with pytest.raises(WorkbenchError, match=r"--artifact int8 is an artifact of the workbench app, and vLLM serves "
                                             r"the run's own weights: drop --artifact"):
        serve_on_vllm(run_id, home=store.home, artifact="int8")
    with pytest.raises(WorkbenchError, match=r"--vllm-arg '--api-key=x' sets --api-key"):
        serve_on_vllm(run_id, home=store.home, extra=["--api-key=x"])
    assert not out.exists()
    assert not key_path(store.home).exists()  # no key made for a server that never started
    # the CLI: exit 2 and the message on stderr
    monkeypatch.setattr(vllm_engine, "vllm_executable", lambda: None)
    assert main(["--home", str(store.home), "serve", run_id, "--engine", "vllm"]) == 2
    assert "error: vLLM is not installed" in capsys.readouterr().err
    assert main(["--home", str(store.home), "serve", run_id, "--engine", "uvicorn",
                 "--vllm-arg=--max-model-len=64"]) == 2
    assert "--vllm-arg applies to the vllm engine, and this run is served with uvicorn" in capsys.readouterr().err


def test_a_method_with_nothing_to_merge_is_refused_and_every_chat_method_is_served(tmp_path):
    from types import SimpleNamespace

    from workbench.config import TRAINING_METHODS

    # chat runs cannot use prompt tuning today (the config refuses it); were it allowed, vLLM could not serve it
    virtual = SimpleNamespace(task="chat", method=SimpleNamespace(name="prompt-tuning"))
    assert unservable_reason(virtual, "r1") == (
        "run r1 trained prompt-tuning (trained virtual token embeddings put before every input), which cannot be "
        "merged into the model's weights, and vLLM serves weights only: serve it with --engine uvicorn")
    allowed = []
    for method in TRAINING_METHODS:
        raw = chat_raw(tmp_path / "model", tmp_path / "qa.jsonl")
        raw["method"] = {"name": method}
        try:
            config = Config.from_dict(raw)
        except WorkbenchError:
            continue  # not a chat method
        allowed.append(method)
        assert unservable_reason(config, "r1") is None, method
    assert {"full", "lora", "qlora"} <= set(allowed)
    raw["method"] = {"name": "lora", "use_dora": True}
    assert unservable_reason(Config.from_dict(raw), "r1") is None  # merged before vLLM sees it


# --- the export ------------------------------------------------------------------------------------------

def test_the_export_is_made_once_and_again_when_the_model_is_newer(chat_run):
    store, run_id = chat_run
    record = store.get(run_id)
    said: list[str] = []
    out = vllm_export(record, store.home, said.append)
    assert out == RunPaths.of(record).deploy / VLLM_DIR
    assert {"config.json", "model.safetensors", "tokenizer.json", CHAT_TEMPLATE_FILE} <= {p.name for p in out.iterdir()}
    assert "{%" in (out / CHAT_TEMPLATE_FILE).read_text()
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert vllm_export(record, store.home, said.append) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    info = out / "workbench_export.json"
    old = RunPaths.of(record).trainable.stat().st_mtime - 60
    os.utime(info, (old, old))  # the run's model is now newer than the export
    vllm_export(record, store.home, said.append)
    assert [line.split(" ")[0] for line in said] == ["exporting", "vLLM", "exporting"]
    assert "(newer than the run's model, reused)" in said[1]


def test_a_dora_run_is_served_merged(tmp_path, tiny_chat_dir, qa_jsonl):  # noqa: F811
    """vLLM's LoRA loader refuses DoRA adapters; merged into the weights, the run is a plain model it serves."""
    from transformers import AutoModelForCausalLM

    store = RunStore(tmp_path / "home")
    record = train(Config.from_dict(chat_raw(tiny_chat_dir, qa_jsonl, r=4, alpha=8, use_dora=True)), store=store)
    assert record["status"] == "completed", record.get("error")
    out = vllm_export(record, store.home, lambda line: None)
    assert json.loads((out / "workbench_export.json").read_text())["merged"] is True
    assert not (out / "adapter").exists()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"


# --- end to end, against the stand-in ----------------------------------------------------------------------

def serve_and_ask(store, run_id: str, stand_in: Path, *options: str, key: str | None = None) -> tuple[int, dict]:
    """`workbench serve RUN --engine vllm` in this process's main thread while a client thread asks one question
    (without, then with `key` when given) and then sends this process SIGTERM, as `kill <serve pid>` would; the
    exit code and what the client saw."""
    import httpx

    port = free_port()
    seen: dict = {"port": port}

    def client() -> None:
        deadline = time.monotonic() + 120
        while not stand_in.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not stand_in.exists():
            return  # the serve failed before the child started: nothing to stop, the assertions say why
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            body = {"model": run_id, "messages": [{"role": "user", "content": "what colour is the sky ?"}]}
            for _ in range(200):  # the stand-in binds after writing its record
                try:
                    seen["without_key"] = httpx.post(url, json=body, timeout=5).status_code
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            headers = {"Authorization": f"Bearer {key() if callable(key) else key}"} if key else {}
            seen["answer"] = httpx.post(url, json=body, headers=headers, timeout=5).json()
            seen["state"] = json.loads((RunPaths.of(store.get(run_id)).deploy / "server.json").read_text())
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve forwards it to vLLM

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    handler = signal.getsignal(signal.SIGTERM)
    code = main(["--home", str(store.home), "serve", run_id, "--engine", "vllm", "--port", str(port), *options])
    thread.join(10)
    assert signal.getsignal(signal.SIGTERM) is handler  # serve put the previous handler back
    recorded = json.loads(stand_in.read_text())
    assert Path(f"{stand_in}.signal").read_text() == str(int(signal.SIGTERM))  # forwarded, and the child ended
    with pytest.raises(ProcessLookupError):
        os.kill(recorded["pid"], 0)
    assert not (RunPaths.of(store.get(run_id)).deploy / "server.json").exists()
    return code, {**seen, **recorded}


def test_serve_engine_vllm_answers_with_the_key_from_the_environment_and_sigterm_stops_both(chat_run, stand_in,
                                                                                            capsys):
    store, run_id = chat_run
    code, seen = serve_and_ask(store, run_id, stand_in, "--vllm-arg=--max-model-len=64",
                               key=lambda: read_key_file(key_path(store.home)))  # made by serve, read once there
    printed = capsys.readouterr().out
    assert code == 0, printed
    key, port = read_key_file(key_path(store.home)), seen["port"]
    model_dir = RunPaths.of(store.get(run_id)).deploy / VLLM_DIR
    assert seen["argv"] == ["serve", str(model_dir), "--served-model-name", run_id, "--host", "127.0.0.1",
                            "--port", str(port), "--chat-template", str(model_dir / CHAT_TEMPLATE_FILE),
                            "--max-model-len=64"]
    assert seen["env_key"] == key != "an-inherited-key"
    assert not any(key in arg for arg in seen["argv"])
    assert seen["without_key"] == 401
    assert seen["answer"]["model"] == run_id
    assert seen["answer"]["choices"][0]["message"]["content"] == "stand-in answer to: what colour is the sky ?"
    assert seen["state"]["engine"] == "vllm" and seen["state"]["engine_pid"] == seen["pid"]
    assert seen["state"]["pid"] == os.getpid() and seen["state"]["url"] == f"http://127.0.0.1:{port}"
    assert f"serving run {run_id} on vLLM at http://127.0.0.1:{port}" in printed
    assert key not in printed  # not a terminal: the key is not printed


def test_no_api_key_on_loopback_starts_vllm_without_one_and_says_what_is_open(chat_run, stand_in, capsys):
    store, run_id = chat_run
    code, seen = serve_and_ask(store, run_id, stand_in, "--no-api-key")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert seen["env_key"] is None  # the inherited VLLM_API_KEY was not passed on
    assert seen["without_key"] == 200
    assert "no API key: every vLLM route is open to whatever reaches 127.0.0.1" in printed
    assert "(newer than the run's model, reused)" in printed
    assert main(["--home", str(store.home), "serve", run_id, "--engine", "vllm", "--host", "0.0.0.0",
                 "--no-api-key"]) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_auto_picks_vllm_says_why_and_returns_its_exit_code(chat_run, stand_in, monkeypatch, capsys):
    store, run_id = chat_run
    monkeypatch.setenv("STAND_IN_EXIT", "3")  # a vLLM that fails at start
    assert main(["--home", str(store.home), "serve", run_id]) == 3
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("engine: vllm (a chat run, vLLM installed and a CUDA device visible; --engine uvicorn "
                          "serves it with the workbench app)")
    assert not (RunPaths.of(store.get(run_id)).deploy / "server.json").exists()
