"""Serving a run on Ray Serve: the same app in replicas whose number follows the traffic (`serve --engine ray`).

Each replica builds the app of `app.create_app` (the same routes, Guard, key, bodies, limits and metrics as the
uvicorn engine) with its model already loaded: `__serve_build_asgi_app__` loads it on a thread, then Ray runs
the app's lifespan (the micro-batcher starts, the model is registered) before the replica takes traffic, so a
replica added under load never answers "still loading". Ray's proxy listens on host:port and spreads requests
over the replicas; its autoscaler keeps about `target_ongoing_requests` requests on each, between min and max
replicas, after the load has stayed above (below) that for `upscale_delay_s` (`downscale_delay_s`).

Locally (`ray_address=None`) a Ray of `num_cpus` CPUs is started in this process and stopped with it; with an
address (`auto`, `ray://head:10001`) the application is deployed on that cluster and deleted on exit, and
every node must reach the run's home at the same path (or run the image of `cluster.py`, which holds it).

GET /metrics answers the counters of the replica that took the request (each replica has its own); Ray's
own metrics (`ray_serve_*`, the dashboard) add them up. Ray is imported only here, when the engine is used.

`build_app(args)` is the application builder that a KubeRay RayService's serveConfigV2 names by import path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..run_paths import RunPaths
from ..store import RunStore, private_dir, private_files
from .app import ServeSettings

APP_NAME = "workbench"
DEPLOYMENT_NAME = "WorkbenchReplica"
RAY_MISSING = ('Ray Serve is not installed: pip install "ray[serve]" (or the cluster extra: '
               'pip install "llm-workbench[cluster]"), or serve with --engine uvicorn')


@dataclass
class Autoscaling:
    """How many replicas, and when Ray Serve adds or removes one (its `autoscaling_config`)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0  # requests in progress or queued per replica that the autoscaler aims at
    upscale_delay_s: float = 30.0         # load above target this long before a replica is added
    downscale_delay_s: float = 600.0      # load below target this long before a replica is removed
    look_back_period_s: float = 30.0      # the load is the average of the requests in flight over this window
    replica_cpus: float = 0.5             # CPUs Ray reserves for each replica
    max_ongoing_requests: int = 16        # requests one replica takes at once (its micro-batcher groups them)

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas", "max_ongoing_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "min_replicas" else 1):
                raise WorkbenchError(f"{name} must be a whole number >= {0 if name == 'min_replicas' else 1}, "
                                     f"got {value!r}: fix --{name.replace('_', '-')}")
        if self.min_replicas > self.max_replicas:
            raise WorkbenchError(f"min_replicas={self.min_replicas} is more than max_replicas={self.max_replicas}: "
                                 "give --min-replicas <= --max-replicas")
        if not self.target_ongoing_requests > 0:
            raise WorkbenchError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests!r}: fix "
                                 "--target-ongoing")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            least = 0.0 if name.endswith("delay_s") else 0.1
            if not getattr(self, name) >= least:
                raise WorkbenchError(f"{name} must be a number of seconds >= {least:g}, got {getattr(self, name)!r}")
        if not self.replica_cpus > 0:
            raise WorkbenchError(f"replica_cpus must be > 0, got {self.replica_cpus!r}")

    def ray_config(self) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config` (also what serveConfigV2 holds)."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s}


def import_ray() -> tuple[Any, Any]:
    """`ray` and `ray.serve`, or a WorkbenchError naming the install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise WorkbenchError(RAY_MISSING) from None
    return ray, serve


def replica_class() -> type:
    """The deployment class (made on use: defining it needs ray). One replica = one app with its own model."""
    _, serve = import_ray()

    @serve.ingress(None)
    class WorkbenchReplica:
        def __init__(self, run_id: str, home: str, settings: dict[str, Any], api_key: str | None,
                     artifact: str | None = None) -> None:
            self.run_id, self.home, self.api_key, self.artifact = run_id, home, api_key, artifact
            self.settings = ServeSettings(**settings)

        async def __serve_build_asgi_app__(self) -> Any:
            from .adapter import drift_baseline, load_served_model
            from .app import create_app

            # loaded before the app exists, off the replica's event loop: Ray sends traffic once this returns
            served = await asyncio.to_thread(load_served_model, self.run_id, self.home, self.artifact)
            record = RunStore(self.home).get(self.run_id)
            app, _ = create_app(served, self.settings, self.api_key,
                                baseline=lambda model: drift_baseline(record, self.home))
            return app

    return WorkbenchReplica


def bind_app(run_id: str, home: str | Path, settings: ServeSettings, api_key: str | None,
             scaling: Autoscaling, artifact: str | None = None) -> Any:
    """The Ray Serve application (deployment bound to its arguments), ready for `serve.run`."""
    _, serve = import_ray()
    deployment = serve.deployment(
        replica_class(), name=DEPLOYMENT_NAME, autoscaling_config=scaling.ray_config(),
        max_ongoing_requests=scaling.max_ongoing_requests, ray_actor_options={"num_cpus": scaling.replica_cpus},
        # a request may wait for the model up to request_timeout_s; Ray's own health check must not kill a
        # replica that is busy serving
        health_check_timeout_s=max(30.0, settings.request_timeout_s))
    return deployment.bind(run_id, str(home), dataclasses.asdict(settings), api_key, artifact)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for a Serve config file (KubeRay's serveConfigV2 `import_path`). `args`: run, home
    (default $WORKBENCH_HOME), api_key_file (none: no key, loopback only), artifact; the autoscaling and the
    replica's CPUs are set on the deployment in the config file."""
    from .keys import read_key_file

    store = RunStore(args.get("home") or None)
    record = store.get(str(args.get("run", "latest")))
    key_file = args.get("api_key_file")
    key = read_key_file(key_file) if key_file else None
    settings = ServeSettings() if key else ServeSettings(allowed_hosts=("localhost", "127.0.0.1", "::1"))
    return bind_app(record["id"], store.home, settings, key, Autoscaling(), args.get("artifact"))


def free_port(host: str) -> int:
    """A port free on host now (Ray's proxy needs a number; 0 is not one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """The application's replicas by state (RUNNING, STARTING, STOPPING, ...) from `serve.status()`."""
    _, serve = import_ray()
    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    deployment = application.deployments.get(DEPLOYMENT_NAME)
    return {str(state): int(n) for state, n in (deployment.replica_states if deployment else {}).items()}


def start_ray(ray_address: str | None, num_cpus: int | None) -> bool:
    """Connect to a cluster, or start a local Ray; True when this process started it (and must stop it)."""
    ray, _ = import_ray()
    if ray.is_initialized():
        return False
    if ray_address:
        try:
            ray.init(address=ray_address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise WorkbenchError(f"cannot reach the Ray cluster at {ray_address!r} ({exc}): start one "
                                 "(`ray start --head`) or fix --ray-address") from None
        return False
    attempts = 3
    for _ in range(attempts):
        before = _children()
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            return True
        except Exception as exc:
            # Ray 2.60's raylet aborts when its agents (Python processes) have not written their ports within
            # 15 s, a limit it does not let us raise: on a busy machine a start can miss it, and a retry (the
            # agents' imports now in the page cache) usually makes it. The failed start leaves its GCS and
            # helpers running, children of this process: they are ended first.
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            _end(_children() - before)
    raise WorkbenchError(f"a local Ray did not start, {attempts} times (this machine is too busy for its 15 s "
                         "start-up limit): retry when it is quieter, or give --ray-address of a running Ray")


def _children() -> set[Any]:
    """This process's descendants (psutil.Process objects; empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return set()
    return set(psutil.Process().children(recursive=True))


def _end(processes: set[Any]) -> None:
    """Terminate these processes, then kill the ones still alive after 5 s."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(processes), timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def deploy(run_id: str, home: str | Path, host: str, port: int, settings: ServeSettings, api_key: str | None,
           scaling: Autoscaling, artifact: str | None = None, timeout_s: float = 300.0) -> str:
    """Deploy on the connected Ray (Serve's proxy on host:port) and wait until every replica is up: the URL."""
    _, serve = import_ray()
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(bind_app(run_id, home, settings, api_key, scaling, artifact), name=APP_NAME, route_prefix="/",
                  blocking=False)
    except RuntimeError as exc:  # a replica that failed (the model did not load) fails the deployment
        raise WorkbenchError(f"run {run_id} failed to deploy on Ray Serve: {str(exc).strip().splitlines()[-1]} "
                             "(the replica logs are under /tmp/ray/session_latest/logs/serve)") from None
    deadline = time.monotonic() + timeout_s
    while replica_counts().get("RUNNING", 0) < scaling.min_replicas and time.monotonic() < deadline:
        time.sleep(0.5)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve_on_ray(run: str = "latest", home: str | Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 settings: ServeSettings | None = None, api_key_file: str | None = None, no_api_key: bool = False,
                 scaling: Autoscaling | None = None, ray_address: str | None = None, num_cpus: int | None = None,
                 artifact: str | None = None, echo: Callable[[str], None] = print, terminal: bool | None = None,
                 stop: threading.Event | None = None) -> None:
    """Serve a run on Ray Serve until SIGTERM / Ctrl-C (or `stop` is set), blocking; then delete the
    application (and stop the local Ray this started). The key is chosen as by `serve` (the workspace key,
    a key file, or none on loopback)."""
    import sys

    from .connections import LOOPBACK_NAMES
    from .server import STATE_FILE, announce_key, deploy_dir, resolve_key, write_key_file

    scaling = scaling or Autoscaling()
    import_ray()  # before anything is started: a missing Ray is a one-line error
    with private_files():
        store = RunStore(home)
        record = store.get(run)
        run_id, run_dir = record["id"], Path(record["dir"])
        if not RunPaths(run_dir).trainable.is_file():
            raise WorkbenchError(f"run {run_id} has no trained model to serve (status {record['status']}): wait "
                                 "until it completes an evaluation, or pick another run")
        key, created, key_file = resolve_key(store.home, host, api_key_file, no_api_key)
        settings = settings or ServeSettings()
        if key is None and settings.allowed_hosts is None:
            settings = dataclasses.replace(settings, allowed_hosts=LOOPBACK_NAMES)
        port = port or free_port(host)
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        local = start_ray(ray_address, num_cpus)
        state_path = private_dir(deploy_dir(run_dir)) / STATE_FILE
        try:
            echo(f"deploying run {run_id} on Ray Serve ({scaling.min_replicas}-{scaling.max_replicas} replicas, "
                 f"target {scaling.target_ongoing_requests:g} requests in flight each)")
            url = deploy(run_id, store.home, host, port, settings, key, scaling, artifact)
            write_key_file(state_path, json.dumps({
                "run": run_id, "pid": os.getpid(), "host": host, "port": port, "url": url, "engine": "ray",
                "artifact": artifact or "fp32", "api_key_file": key_file, "started_at": time.time(),
                "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas}))
            echo(f"serving run {run_id} ({artifact or 'fp32'}) on Ray Serve at {url}")
            announce_key(key, created, key_file, echo, sys.stdout.isatty() if terminal is None else terminal)
            echo("Ctrl-C or SIGTERM stops it; `ray.serve.status()` / the Ray dashboard show the replicas")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
        finally:
            state_path.unlink(missing_ok=True)
            stop_ray(local)


def stop_ray(local: bool) -> None:
    """Delete the application (its replicas drain), and shut Serve and Ray down when this process started them."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        return
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        if local:
            ray.shutdown()
