"""Runs as their own OS processes, so a kernel restart or a closed tab neither kills nor loses them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import WorkbenchError
from .store import FINAL_STATUSES, RunStore, private_file
from .run_paths import LOG_FILE


class RunHandle:
    """A run in the store, followed from any process."""

    def __init__(self, run_id: str, store: RunStore, process: subprocess.Popen | None = None) -> None:
        self.id, self.store, self._process = run_id, store, process

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r}, status={self.status!r})"

    @property
    def record(self) -> dict[str, Any]:
        if self._process is not None:
            self._process.poll()  # reap our own child so a finished run never looks alive
        return self.store.get(self.id)

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self.record["metrics"]

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    def points(self, kind: str | None = None, after_seq: int = 0) -> list[dict[str, Any]]:
        return self.store.points(self.id, kind=kind, after_seq=after_seq)

    def stop(self) -> str:
        """Ask the run to stop at its next step boundary; it saves a checkpoint and ends 'stopped'.

        Returns what happened (RunStore.request_stop): 'stopping', 'stopped' (it was queued) or 'already <status>'.
        """
        return self.store.request_stop(self.id)

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the run ends (or `timeout` seconds pass); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.record
            if record["status"] in FINAL_STATUSES:
                if self._process is not None:
                    self._process.wait()
                return record
            if deadline is not None and time.monotonic() >= deadline:
                return record
            time.sleep(poll)

    @property
    def log_path(self) -> Path:
        return self.store.run_dir(self.id) / LOG_FILE


def check_processes(processes: int, config: Config) -> None:
    """Refuse, before anything starts, a process count this machine cannot run."""
    if not isinstance(processes, int) or processes < 1:
        raise WorkbenchError(f"processes = {processes!r} is not allowed: 1 or more")
    if processes == 1:
        return
    import torch

    gpus = torch.cuda.device_count() if config.train.device == "auto" else 0
    if gpus and processes > gpus:
        raise WorkbenchError(f"processes = {processes} but this machine has {gpus} GPU(s): each process takes its "
                             f"own GPU, so start at most {gpus}, or set train.device: cpu")
    cores = os.cpu_count() or 1
    if not gpus and processes > cores:
        raise WorkbenchError(f"processes = {processes} but this machine has {cores} CPU core(s): start at most "
                             f"{cores}")


def launch(config: Config, home: str | Path | None = None, resume_id: str | None = None,
           env: dict[str, str] | None = None, processes: int = 1) -> RunHandle:
    """Queue a run and start it in its own process (its own session: it outlives the caller).

    `processes` > 1 starts it under torchrun (`python -m torch.distributed.run --standalone`): one process per
    GPU, or CPU processes talking over gloo, each with its share of the cores. The run is one record.
    """
    check_processes(processes, config)
    store = RunStore(home)
    if resume_id is None:
        run_id = store.create_run(config.to_dict(), config.name)
        args = ["--run-id", run_id]
    else:
        run_id = store.resolve(resume_id)
        store.requeue(run_id)  # queued again until its process starts: a stop pressed meanwhile reaches it
        args = ["--resume", run_id]
    log = os.fdopen(private_file(store.run_dir(run_id) / LOG_FILE), "ab")  # owner-only: it may quote user data
    child_env = {**os.environ, "WORKBENCH_HOME": str(store.home), "PYTHONUNBUFFERED": "1", **(env or {})}
    root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "workbench", "train", *args]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "workbench", "train", *args]
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    process = subprocess.Popen(
        command,
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
        start_new_session=True,  # the caller's working directory: relative data/model paths mean the same
    )
    log.close()
    store.set_pid(run_id, process.pid)
    return RunHandle(run_id, store, process)


def attach(run_id: str = "latest", home: str | Path | None = None) -> RunHandle:
    """A handle on an existing run (e.g. after a kernel restart)."""
    store = RunStore(home)
    return RunHandle(store.resolve(run_id), store)
