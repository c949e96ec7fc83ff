"""Serving a chat run on vLLM (`serve --engine vllm`, and what `--engine auto` picks on a machine that has vLLM and
a CUDA device).

vLLM serves generative decoder models; a chat run is one (a causal LM that answers in turns). The run is exported
once with `export_run(format="vllm", merge=True)` into <run dir>/deploy/vllm (the adapters merged into a float
base: a plain transformers directory with its tokenizer and chat_template.jinja), and exported again when the
run's model is newer than that export. Merged, not base + LoRA adapter: vLLM then needs no LoRA kernels, no
--max-lora-rank, and serves what peft merges but vLLM's LoRA loader refuses (DoRA, AdaLoRA, IA3, a 4-bit base).
A method whose weights cannot be merged (prompt tuning's virtual tokens are an input to the model) is refused.

`vllm serve <export> --served-model-name <run id> --host H --port P --chat-template <export>/chat_template.jinja`
then runs as a child process: the model name is the run id, as the workbench app names it. The API key goes
through the VLLM_API_KEY environment variable, never the command line (where `ps` shows it); vLLM checks it on
/v1 routes only and leaves its other routes (/health, /metrics, /tokenize, ...) open. SIGINT and SIGTERM are
forwarded to the child (started in its own session, so a terminal's Ctrl-C reaches it once), the child is
stopped when this process dies (Linux: PR_SET_PDEATHSIG), and its exit code is returned.

What only the workbench app has (/readyz, drift, alert rules, Host checks, the request limits of ServeSettings)
is not there on this engine; `--engine uvicorn` serves the same run with them.

vLLM is never imported here: it runs as its own executable, found beside sys.executable or on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..errors import WorkbenchError
from ..methods import method_spec
from ..run_paths import RunPaths
from ..store import RunStore, private_dir, private_files

ENGINES: tuple[str, ...] = ("auto", "uvicorn", "ray", "vllm")
VLLM_DIR = "vllm"  # in the run's deploy/: the merged export vLLM serves
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' tokenizer.save_pretrained writes the template here
API_KEY_ENV = "VLLM_API_KEY"
VLLM_MISSING = ("vLLM is not installed (no `vllm` executable beside {python} or on PATH): pip install vllm on a "
                "Linux machine with an NVIDIA GPU, or serve with --engine uvicorn")
NO_CUDA = ("no CUDA device is visible (torch.cuda.is_available() is False), and vLLM serves on a GPU: run this on a "
           "machine with an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES), or serve with --engine uvicorn")
# `vllm serve` options this module sets itself: option -> what to use instead
OWN_OPTIONS = {"--api-key": "the workspace key or --api-key-file (it reaches vLLM through VLLM_API_KEY, out of `ps`)",
               "--host": "serve --host", "--port": "serve --port",
               "--served-model-name": "nothing (the run id is the model's name)",
               "--chat-template": "nothing (the run's own template is passed)"}


# --- what is there, and what can be served --------------------------------------------------------------

def vllm_executable() -> Path | None:
    """The `vllm` executable of this environment (beside sys.executable) or else on PATH; None when neither."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("vllm")
    return Path(found) if found else None


def cuda_visible() -> bool:
    """Whether torch sees a CUDA device (vLLM's GPU builds need one)."""
    import torch

    return torch.cuda.is_available()


def unservable_reason(config: Config, run_id: str) -> str | None:
    """Why vLLM cannot serve this run (a sentence naming the fix), or None when it can: a chat run whose trained
    weights are a plain model or merge into one."""
    from .engines_export import engine_exportable

    if not engine_exportable(config):
        return (f"run {run_id} is a task: {config.task} run, and vLLM serves generative decoder models: only chat "
                "runs (a causal LM that answers in turns) go to vLLM; translation (seq2seq) and classification "
                "runs are served with --engine uvicorn")
    spec = method_spec(config.method.name)
    if not (spec.merges or spec.trains_backbone):  # chat allows none such today; a method added for it may be one
        return (f"run {run_id} trained {spec.name} ({spec.summary}), which cannot be merged into the model's "
                "weights, and vLLM serves weights only: serve it with --engine uvicorn")
    return None


def check_vllm_ready(executable: Path | None, cuda: bool) -> Path:
    """The vllm executable, or a WorkbenchError naming what is missing and the fix."""
    if executable is None:
        raise WorkbenchError(VLLM_MISSING.format(python=Path(sys.executable).parent))
    if not cuda:
        raise WorkbenchError(NO_CUDA)
    return executable


def auto_engine(config: Config, run_id: str, artifact: str | None, installed: Callable[[], bool],
                cuda: Callable[[], bool]) -> tuple[str, str]:
    """What `--engine auto` serves a run with, and why: vLLM for a chat run vLLM can serve when vLLM is installed
    and a CUDA device is visible, else uvicorn. `installed` and `cuda` are asked only when the answer needs them."""
    from .engines_export import engine_exportable

    if unservable_reason(config, run_id) is not None:
        return "uvicorn", (f"a {config.task} run: vLLM serves chat runs only" if not engine_exportable(config) else
                           f"a {config.method.name} chat run, which vLLM cannot serve")
    if artifact and artifact != "fp32":
        return "uvicorn", f"--artifact {artifact} is served by the workbench app"
    if not installed():
        return "uvicorn", "a chat run, but vLLM is not installed"
    if not cuda():
        return "uvicorn", "a chat run, but no CUDA device is visible for vLLM"
    return "vllm", ("a chat run, vLLM installed and a CUDA device visible; --engine uvicorn serves it with the "
                    "workbench app")


def resolve_engine(requested: str, run: str, home: str | Path | None = None, artifact: str | None = None
                   ) -> tuple[str, str]:
    """The engine to serve `run` with, and why ("auto" resolved; any other choice is kept as asked)."""
    if requested not in ENGINES:
        raise WorkbenchError(f"--engine {requested!r} is unknown: choose {', '.join(ENGINES)}")
    if requested != "auto":
        return requested, f"--engine {requested}"
    record = RunStore(home).get(run)
    return auto_engine(Config.from_dict(record["config"]), record["id"], artifact,
                       installed=lambda: vllm_executable() is not None, cuda=cuda_visible)


# --- the command --------------------------------------------------------------------------------------

def check_extra(extra: list[str] | tuple[str, ...]) -> None:
    """Refuse extra `vllm serve` options that set what serve sets itself (a key among them would show in `ps`)."""
    for arg in extra:
        option = arg.split("=", 1)[0]
        if option in OWN_OPTIONS:
            raise WorkbenchError(f"--vllm-arg {arg!r} sets {option}, which serve sets itself: use "
                                 f"{OWN_OPTIONS[option]}")


def vllm_command(executable: str | Path, model_dir: str | Path, run_id: str, host: str, port: int,
                 extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `vllm serve` command line (no secret in it), with the caller's extra options after ours."""
    check_extra(extra)
    model_dir = Path(model_dir)
    return [str(executable), "serve", str(model_dir), "--served-model-name", run_id, "--host", host,
            "--port", str(port), "--chat-template", str(model_dir / CHAT_TEMPLATE_FILE), *extra]


def vllm_env(base: dict[str, str], api_key: str | None) -> dict[str, str]:
    """The child's environment: `base` with the key in VLLM_API_KEY, or without that variable when there is no
    key (an inherited one would guard a server announced as open)."""
    env = {name: value for name, value in base.items() if name != API_KEY_ENV}
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    return env


# --- the export ------------------------------------------------------------------------------------------

def vllm_export(record: dict[str, Any], home: Path, echo: Callable[[str], None] = print) -> Path:
    """<run dir>/deploy/vllm: the run's merged export for vLLM, written when missing or older than the run's model."""
    from ..export import EXPORT_INFO, export_run, read_export_info

    paths = RunPaths.of(record)
    out = private_dir(paths.deploy) / VLLM_DIR
    info = read_export_info(out)
    fresh = (info is not None and info.get("run_id") == record["id"] and info.get("format") == "vllm"
             and info.get("merged") is True and (out / CHAT_TEMPLATE_FILE).is_file()
             and (out / EXPORT_INFO).stat().st_mtime >= paths.trainable.stat().st_mtime)
    if fresh:
        echo(f"vLLM export of run {record['id']}: {out} (newer than the run's model, reused)")
        return out
    echo(f"exporting run {record['id']} for vLLM (adapters merged) into {out}")
    return export_run(record["id"], out=out, merge=True, home=home, force=True, format="vllm")


# --- serving ---------------------------------------------------------------------------------------------

def serve_on_vllm(run: str = "latest", home: str | Path | None = None, host: str = "127.0.0.1", port: int = 0,
                  api_key_file: str | None = None, no_api_key: bool = False, artifact: str | None = None,
                  extra: list[str] | tuple[str, ...] = (), echo: Callable[[str], None] = print,
                  terminal: bool | None = None) -> int:
    """Serve a chat run on vLLM until it exits or SIGINT / SIGTERM (forwarded to it) stops it; return its exit
    code. The key is chosen as by `serve` (the workspace key, a key file, or none on loopback)."""
    from .keys import is_loopback, write_key_file
    from .ray_engine import free_port
    from .server import STATE_FILE, announce_key, resolve_key

    with private_files():
        store = RunStore(home)
        record = store.get(run)
        run_id, paths = record["id"], RunPaths.of(record)
        # every refusal before anything is exported or started
        if not paths.trainable.is_file():
            raise WorkbenchError(f"run {run_id} has no trained model to serve (status {record['status']}): wait "
                                 "until it completes an evaluation, or pick another run")
        if artifact and artifact != "fp32":
            raise WorkbenchError(f"--artifact {artifact} is an artifact of the workbench app, and vLLM serves the "
                                 "run's own weights: drop --artifact, or serve with --engine uvicorn")
        executable = check_vllm_ready(vllm_executable(), cuda_visible())
        reason = unservable_reason(Config.from_dict(record["config"]), run_id)
        if reason is not None:
            raise WorkbenchError(reason)
        check_extra(extra)
        key, created, key_file = resolve_key(store.home, host, api_key_file, no_api_key)

        model_dir = vllm_export(record, store.home, echo)
        port = port or free_port(host)
        command = vllm_command(executable, model_dir, run_id, host, port, extra)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        state_path = private_dir(paths.deploy) / STATE_FILE
        echo(f"starting vLLM: {shlex.join(command)}")
        echo(f"serving run {run_id} on vLLM at {url} (model name {run_id}; ready once GET {url}/health answers "
             "200): OpenAI routes under /v1, vLLM's own /metrics; no /readyz, drift or alert rules on this engine")
        if key is None:  # the workbench app's Host and cross-site checks are not there on vLLM: say so
            echo(f"no API key: every vLLM route is open to whatever reaches {host}:{port}, web pages in this "
                 "machine's browser included (vLLM checks no Host names and allows every origin by default)")
        else:
            announce_key(key, created, key_file, echo, sys.stdout.isatty() if terminal is None else terminal)
        if not is_loopback(host):
            echo(f"warning: vLLM checks the key on /v1 routes only; its other routes answer anyone who reaches "
                 f"{host}:{port}: keep it behind a proxy that passes /v1 only")
        echo("Ctrl-C or SIGTERM stops it")

        def started(pid: int) -> None:
            write_key_file(state_path, json.dumps({
                "run": run_id, "pid": os.getpid(), "engine": "vllm", "engine_pid": pid, "host": host,
                "port": port, "url": url, "artifact": "fp32", "api_key_file": key_file, "started_at": time.time(),
                "model_dir": str(model_dir)}))

        try:
            return run_forwarding_signals(command, vllm_env(dict(os.environ), key), started)
        finally:
            try:
                if json.loads(state_path.read_text()).get("pid") == os.getpid():
                    state_path.unlink()
            except (OSError, ValueError):
                pass


def run_forwarding_signals(command: list[str], env: dict[str, str],
                           started: Callable[[int], None] = lambda pid: None) -> int:
    """Run `command` until it exits, forwarding SIGINT and SIGTERM to it (from the main thread: elsewhere Python
    cannot take signals); its exit code, 128 + N when signal N ended it. `started(pid)` is called once it runs."""
    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not child:
            pending.append(signum)  # arrived before the child existed: sent once it does
        elif child[0].poll() is None:
            child[0].send_signal(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    try:
        try:
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:
            raise WorkbenchError(f"cannot start {command[0]} ({exc}): reinstall vllm, or serve with --engine "
                                 "uvicorn") from None
        child.append(proc)
        for signum in pending:
            proc.send_signal(signum)
        started(proc.pid)
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child and child[0].poll() is None:  # we are leaving on an error: the child goes too
            child[0].terminate()
            try:
                child[0].wait(30)
            except subprocess.TimeoutExpired:
                child[0].kill()
                child[0].wait()
    return code if code >= 0 else 128 - code


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when its parent dies, so a killed `serve` leaves no vLLM."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
