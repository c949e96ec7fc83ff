"""Running the server: in this process (`serve`, what `workbench serve` calls) or as a background process that
outlives its caller (`start_server` / `server_status` / `stop_server`, for notebooks and the dashboard).

A running server records itself in `<run dir>/deploy/server.json`: pid, host, port, url, artifact and the key
file (not the key: the key file is the one file that holds it; `server_status` reads it from there). The
deploy folder is 0700 and its files 0600; the key is printed only to a terminal, never into server.log (the
output of a background server). uvicorn drains on SIGTERM or Ctrl-C: it stops accepting connections, lets
the requests in flight (streams included) finish, up to `drain_seconds`, then the micro-batcher stops and
the record is removed.

Personal data: every log handler of a served run (the root logger's, uvicorn's) masks what it writes
(privacy.MaskingFilter: e-mail addresses, phone numbers, card numbers, IP addresses), texts logged with
`log_text=True` and tracebacks included, unless the run's config says data.mask_personal: off.

Connections: request headers must be complete within `header_timeout_s` (else closed), an idle keep-alive
connection is closed after 5 s, and at most `max_connections` are served at once (503 beyond).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..privacy import mask_logging
from ..run_paths import RunPaths
from ..store import RunStore, pid_alive, private_dir, private_file, private_files
from .alerts import AlertThresholds, alert_args, write_alert_rules
from .app import ServeSettings, create_app
from .connections import LOOPBACK_NAMES, DrainingServer, deadline_protocol
from .keys import ensure_api_key, is_loopback, key_path, mask, read_key_file, write_key_file

STATE_FILE = "server.json"
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "workbench.serve")  # whose handlers mask personal data


def served_mask_mode(record: dict[str, Any]) -> str:
    """The served run's data.mask_personal ("stored" when its config does not say)."""
    data = (record.get("config") or {}).get("data") or {}
    return str(data.get("mask_personal") or "stored")


def deploy_dir(run_dir: str | Path) -> Path:
    return RunPaths(Path(run_dir)).deploy


def uvicorn_config(app: Any, settings: ServeSettings | None, drain_seconds: float) -> Any:
    """uvicorn's settings for a served app: the header deadline, the connection cap, quiet logs."""
    import uvicorn

    settings = settings or getattr(app, "settings", None) or ServeSettings()
    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_seconds,
                          lifespan="on", server_header=False, http=deadline_protocol(settings.header_timeout_s),
                          timeout_keep_alive=5, limit_concurrency=settings.max_connections)


def with_key(info: dict[str, Any]) -> dict[str, Any]:
    """A server record with its key read from the key file (in memory only), when it has one."""
    key_file = info.get("api_key_file")
    try:
        key = info.get("api_key") or (read_key_file(key_file) if key_file else None)
    except WorkbenchError:  # the file was removed or opened up since: no key to offer
        key = None
    return {**info, "api_key": key}


def announce_key(key: str | None, created: bool, key_file: str, echo: Callable[[str], None], terminal: bool
                 ) -> None:
    """Say which key guards the server. The key itself only on a terminal, the first time: a background
    server's output goes to server.log, and a log is no place for a secret."""
    if key is None:
        echo("no API key: every route is open (loopback only; Host names checked, cross-site calls refused)")
    elif created and terminal:
        echo(f"API key (shown once; kept in {key_file}, mode 0600): {key}")
    elif created:
        echo(f"API key made and kept in {key_file} (mode 0600); not printed here: this output is not a terminal")
    else:
        echo(f"API key {mask(key)} from {key_file}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named, not 0: asyncio sets TCP_NODELAY only on connections whose socket says IPPROTO_TCP, and an
    # accepted socket copies the listener's proto. With 0, every response after the first on a keep-alive
    # connection waited ~40 ms (Nagle holding the body until the client's delayed ACK of the headers):
    # measured 44 ms for /healthz, 2 ms with this.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WorkbenchError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port, or leave "
                             "it out for a free one") from None
    return sock


def resolve_key(home: Path, host: str, api_key_file: str | None, no_api_key: bool) -> tuple[str | None, bool, str]:
    """The key to require, whether it was made now, and where it is kept. Refuses an open non-loopback server."""
    if no_api_key:
        if not is_loopback(host):
            raise WorkbenchError(f"refusing to listen on {host} without an API key: anyone who reaches this "
                                 "machine could call the model; drop --no-api-key (or listen on 127.0.0.1)")
        return None, False, ""
    if api_key_file:
        return read_key_file(api_key_file), False, str(Path(api_key_file).resolve())
    key, created = ensure_api_key(home)
    return key, created, str(key_path(home))


def artifact_warning(run_dir: str | Path, artifact: str | None) -> str | None:
    """The warning to print before serving a marked artifact (slower than fp32, or > 1 point less accurate)."""
    from .artifacts import artifact_record

    if not artifact or artifact == "fp32":
        return None
    info = artifact_record(run_dir, artifact)
    if not info.get("marked"):
        return None
    return f"warning: artifact {artifact} is marked in the optimize report: {'; '.join(info['reasons'])}"


def serve(run: str = "latest", home: str | Path | None = None, host: str = "127.0.0.1", port: int = 0,
          artifact: str | None = None, settings: ServeSettings | None = None, api_key_file: str | None = None,
          no_api_key: bool = False, drain_seconds: float = 30.0, echo: Callable[[str], None] = print,
          terminal: bool | None = None, alerts: AlertThresholds | None = None) -> None:
    """Serve a run until SIGTERM / Ctrl-C (blocking). Prints the URL (and the key, the first time only, when
    `terminal`: by default when stdout is one). Without a key, only loopback Host names are answered unless
    `settings.allowed_hosts` names others. Writes the run's Prometheus alerting rules (<run dir>/deploy/alerts.yml,
    from `alerts`, by default AlertThresholds()) and keeps the thresholds in its record."""
    with private_files():
        _serve(run, home, host, port, artifact, settings, api_key_file, no_api_key, drain_seconds, echo,
               sys.stdout.isatty() if terminal is None else terminal, alerts or AlertThresholds())


def _serve(run: str, home: str | Path | None, host: str, port: int, artifact: str | None,
           settings: ServeSettings | None, api_key_file: str | None, no_api_key: bool, drain_seconds: float,
           echo: Callable[[str], None], terminal: bool, alerts: AlertThresholds) -> None:
    import dataclasses

    from .adapter import drift_baseline, load_served_model

    store = RunStore(home)
    record = store.get(run)
    run_id, run_dir = record["id"], Path(record["dir"])
    if not RunPaths(run_dir).trainable.is_file():
        raise WorkbenchError(f"run {run_id} has no trained model to serve (status {record['status']}): wait "
                             "until it completes an evaluation, or pick another run")
    warning = artifact_warning(run_dir, artifact)  # refuses an unknown artifact before anything listens
    if warning:
        echo(warning)
    key, created, key_file = resolve_key(store.home, host, api_key_file, no_api_key)
    settings = settings or ServeSettings()
    if key is None and settings.allowed_hosts is None:  # an open server answers this machine's names only
        settings = dataclasses.replace(settings, allowed_hosts=LOOPBACK_NAMES)
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, state = create_app(lambda: load_served_model(run_id, store.home, artifact), settings, key,
                            baseline=lambda served: drift_baseline(record, store.home))
    server = DrainingServer(uvicorn_config(app, settings, drain_seconds))  # uvicorn's log handlers are made here
    if served_mask_mode(record) != "off":
        mask_logging(*LOGGERS)
    state_path = private_dir(deploy_dir(run_dir)) / STATE_FILE
    rules = write_alert_rules(state_path.parent, run_id, alerts, target=f"{shown_host}:{port}", key_file=key_file)
    write_key_file(state_path, json.dumps({
        "run": run_id, "pid": os.getpid(), "host": host, "port": port, "url": url, "artifact": artifact or "fp32",
        "api_key_file": key_file, "started_at": time.time(), "alerts": dataclasses.asdict(alerts),
        "alert_rules": str(rules), "max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms}))
    echo(f"serving run {run_id} ({artifact or 'fp32'}) at {url}")
    announce_key(key, created, key_file, echo, terminal)
    echo(f"try: curl -H 'Authorization: Bearer <key>' {url}/readyz   (Ctrl-C or SIGTERM stops it, draining)")
    echo(f"the API, its bodies and their limits: {url}/docs")
    echo(f"Prometheus alerting rules for this run: {rules}")
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains on SIGTERM, then re-raises it with the handler found at start: a no-op here, so the
        # process ends normally (exit 0, its server.json removed) instead of dying on the re-raised signal
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        try:
            if json.loads(state_path.read_text()).get("pid") == os.getpid():
                state_path.unlink()
        except (OSError, ValueError):
            pass


# --- a background server that outlives its caller ---------------------------------------------------------

def server_status(run: str = "latest", home: str | Path | None = None) -> dict[str, Any] | None:
    """The run's server record (pid, port, url, api_key, ...) when its process is alive, else None."""
    store = RunStore(home)
    record = store.get(run)
    path = deploy_dir(record["dir"]) / STATE_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(info.get("pid")):
        path.unlink(missing_ok=True)  # a server killed without draining left its record behind
        return None
    return with_key(info)


def start_server(run: str = "latest", home: str | Path | None = None, artifact: str | None = None,
                 port: int = 0, host: str = "127.0.0.1", max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 api_key_file: str | None = None, timeout: float = 180.0, extra_args: list[str] | None = None,
                 alerts: AlertThresholds | None = None) -> dict[str, Any]:
    """Start `workbench serve` as its own process (a new session: closing a notebook or a page does not stop it),
    wait until /readyz answers, and return its record (see `server_status`). One server per run. `alerts`:
    the thresholds of its alerting rules (passed as --alert-* options when they differ from the defaults)."""
    import httpx

    store = RunStore(home)
    record = store.get(run)
    run_id = record["id"]
    running = server_status(run_id, store.home)
    if running:
        raise WorkbenchError(f"run {run_id} is already served at {running['url']} (pid {running['pid']}): "
                             "stop it first")
    out_dir = private_dir(deploy_dir(record["dir"]))
    log_path = out_dir / "server.log"
    cmd = [sys.executable, "-m", "workbench", "--home", str(store.home), "serve", run_id, "--host", host,
           "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
           "--engine", "uvicorn"]  # the app this module watches (/readyz, /metrics), never vLLM's on a GPU machine
    if artifact:
        cmd += ["--artifact", artifact]
    if api_key_file:
        cmd += ["--api-key-file", str(api_key_file)]
    cmd += alert_args(alerts) + list(extra_args or [])
    with os.fdopen(private_file(log_path), "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    state_path = out_dir / STATE_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise WorkbenchError(f"the server for run {run_id} exited (code {proc.returncode}): "
                                 + " | ".join(tail))
        try:
            info = json.loads(state_path.read_text())
        except (OSError, ValueError):
            info = None
        if info and info.get("pid") == proc.pid:
            info = with_key(info)
            headers = {"Authorization": f"Bearer {info['api_key']}"} if info.get("api_key") else {}
            try:
                r = httpx.get(info["url"] + "/readyz", headers=headers, timeout=5)
                if r.status_code == 200:
                    return info
                if r.status_code == 503 and "failed" in r.text:
                    stop_server(run_id, store.home)
                    raise WorkbenchError(f"run {run_id}: {r.json()['error']['message']}")
            except httpx.HTTPError:
                pass
        time.sleep(0.25)
    proc.terminate()
    raise WorkbenchError(f"the server for run {run_id} was not ready within {timeout:.0f} s: see {log_path}")


def stop_server(run: str = "latest", home: str | Path | None = None, timeout: float = 30.0) -> bool:
    """SIGTERM the run's server (it drains its requests first); True if one was running."""
    info = server_status(run, home)
    if info is None:
        return False
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        try:  # our own child (started in this process) must be reaped, or it stays a zombie
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    record = RunStore(home).get(run)
    (deploy_dir(record["dir"]) / STATE_FILE).unlink(missing_ok=True)
    return True


def read_metrics(server: dict[str, Any] | str, api_key: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """GET /metrics of a server (its record from `start_server`/`server_status`, or a URL) as plain values
    (`monitor.parse_metrics`: requests, latency p50/p95, batches, labels, drift, tokens)."""
    import httpx

    from .monitor import parse_metrics

    if isinstance(server, dict):
        url, api_key = server["url"], api_key or server.get("api_key")
    else:
        url = server.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url + "/metrics", headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise WorkbenchError(f"{url}/metrics answered {r.status_code}: {r.text[:200]}")
    return parse_metrics(r.text)


class ThreadedServer:
    """An app served by uvicorn on a thread of this process, on a free loopback port (tests, notebooks).

    `with ThreadedServer(app) as url: ...`; leaving the block drains and stops it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, drain_seconds: float = 10.0) -> None:
        import threading

        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = DrainingServer(uvicorn_config(app, None, drain_seconds))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
