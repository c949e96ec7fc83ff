"""The run store: one SQLite row per run plus a directory with its files.

Metrics and events are written as training goes, in their own transactions, so
another process (a widget, a second kernel, a reloaded page) can follow a run
live and always read its whole history. WAL mode lets readers and the single
writer work at the same time.

Layout of the workspace (default ./workbench-runs, or $WORKBENCH_HOME):

    runs.sqlite
    runs/<id>/config.yaml      the config as run
    runs/<id>/log.txt          the run's own log
    runs/<id>/checkpoints/     resumable state at each evaluation
    runs/<id>/model/           the best weights, restored at the end
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import WorkbenchError

STATUSES = ("queued", "running", "completed", "stopped", "failed")
FINAL_STATUSES = ("completed", "stopped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    pid INTEGER,
    config TEXT NOT NULL,
    metrics TEXT,
    timings TEXT,
    info TEXT,
    error TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS points (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS points_run ON points (run_id, seq);
"""


def default_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", "workbench-runs")).resolve()


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); look at its state where /proc exists
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


class RunStore:
    """Reads and writes runs in one workspace directory."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).resolve() if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "runs").mkdir(exist_ok=True)
        self.db_path = self.home / "runs.sqlite"
        self._local = threading.local()  # sqlite connections belong to one thread
        with self._connect() as db:
            db.executescript(_SCHEMA)

    # --- plumbing ------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection (opened once: a connect costs ~15 ms)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        with db:  # commits, or rolls back on an error
            yield db

    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    # --- writing -------------------------------------------------------------
    def create_run(self, config: dict[str, Any], name: str | None = None) -> str:
        """Register a queued run and write its config; returns the new id."""
        import yaml

        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        tmp.replace(run_dir / "config.yaml")
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, created_at, config) VALUES (?, ?, 'queued', ?, ?)",
                (run_id, name or config.get("name"), time.time(), json.dumps(config)),
            )
        return run_id

    def set_pid(self, run_id: str, pid: int) -> None:
        """The process launched for a queued run: if it dies before it marks the run running, readers see why."""
        with self._connect() as db:
            db.execute("UPDATE runs SET pid=? WHERE id=? AND status='queued'", (pid, run_id))

    def mark_running(self, run_id: str, pid: int | None = None) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status='running', started_at=COALESCE(started_at, ?), ended_at=NULL, "
                "error=NULL, pid=?, stop_requested=0 WHERE id=?",
                (time.time(), pid or os.getpid(), run_id),
            )

    def set_info(self, run_id: str, info: dict[str, Any]) -> None:
        """Facts known once the model is built (parameter counts, labels, sizes)."""
        with self._connect() as db:
            db.execute("UPDATE runs SET info=? WHERE id=?", (json.dumps(info), run_id))

    def add_point(self, run_id: str, kind: str, step: int, data: dict[str, Any]) -> None:
        """Append one live record: kind is 'train', 'eval' or 'event'."""
        with self._connect() as db:
            db.execute(
                "INSERT INTO points (run_id, kind, step, time, data) VALUES (?, ?, ?, ?, ?)",
                (run_id, kind, step, time.time(), json.dumps(data)),
            )

    def add_points(self, run_id: str, points: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Append several live records (kind, step, data) in one transaction."""
        now = time.time()
        with self._connect() as db:
            db.executemany(
                "INSERT INTO points (run_id, kind, step, time, data) VALUES (?, ?, ?, ?, ?)",
                [(run_id, kind, step, now, json.dumps(data)) for kind, step, data in points],
            )

    def truncate_points(self, run_id: str, after_step: int) -> None:
        """Drop records past a checkpoint, so a resumed run's history has no duplicates."""
        with self._connect() as db:
            db.execute("DELETE FROM points WHERE run_id=? AND step>?", (run_id, after_step))

    def finish(self, run_id: str, status: str, metrics: dict[str, Any] | None = None,
               timings: dict[str, Any] | None = None, error: str | None = None) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"status {status!r} is not final: one of {FINAL_STATUSES}")
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, ended_at=?, metrics=COALESCE(?, metrics), "
                "timings=COALESCE(?, timings), error=? WHERE id=?",
                (status, time.time(), json.dumps(metrics) if metrics is not None else None,
                 json.dumps(timings) if timings is not None else None, error, run_id),
            )

    def request_stop(self, run_id: str) -> None:
        """Ask a run to stop at its next step boundary (any process may call this)."""
        run_id = self.resolve(run_id)
        with self._connect() as db:
            db.execute("UPDATE runs SET stop_requested=1 WHERE id=?", (run_id,))
            # a queued run that never started is simply stopped
            db.execute(
                "UPDATE runs SET status='stopped', ended_at=? WHERE id=? AND status='queued'",
                (time.time(), run_id),
            )

    def stop_requested(self, run_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT stop_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    def delete(self, run_id: str) -> None:
        import shutil

        run_id = self.resolve(run_id)
        with self._connect() as db:
            db.execute("DELETE FROM points WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # --- reading -------------------------------------------------------------
    def resolve(self, run_id: str) -> str:
        """Map 'latest' or a unique id prefix to a full run id."""
        with self._connect() as db:
            if run_id == "latest":
                row = db.execute("SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 1").fetchone()
                if row is None:
                    raise WorkbenchError(f"no runs yet in {self.home}: start one with `workbench train CONFIG`")
                return row[0]
            rows = db.execute("SELECT id FROM runs WHERE id LIKE ? ORDER BY id", (run_id + "%",)).fetchall()
        ids = [r[0] for r in rows]
        if run_id in ids:
            return run_id
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise WorkbenchError(f"no run {run_id!r} in {self.home}: `workbench runs list` shows the ids")
        raise WorkbenchError(f"run id {run_id!r} is ambiguous ({', '.join(ids[:5])}): give more characters")

    def get(self, run_id: str) -> dict[str, Any]:
        """The run as the stable JSON contract (see README: `runs show --json`)."""
        run_id = self.resolve(run_id)
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return self._record(row)

    def list(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created_at DESC, id DESC").fetchall()
        return [self._record(r) for r in rows]

    def points(self, run_id: str, kind: str | None = None, after_seq: int = 0) -> list[dict[str, Any]]:
        """Live records after `after_seq`, oldest first, each with its `seq`."""
        query = "SELECT seq, kind, step, time, data FROM points WHERE run_id=? AND seq>?"
        args: list[Any] = [run_id, after_seq]
        if kind is not None:
            query += " AND kind=?"
            args.append(kind)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY seq", args).fetchall()
        return [
            {"seq": r["seq"], "kind": r["kind"], "step": r["step"], "time": r["time"], **json.loads(r["data"])}
            for r in rows
        ]

    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        status, error = row["status"], row["error"]
        if status == "running" and not _pid_alive(row["pid"]):
            # the process died without a word (killed, out of memory): say so, once
            status, error = "failed", "the training process exited unexpectedly (killed or out of memory)"
            self.finish(row["id"], status, error=error)
        elif status == "queued" and row["pid"] and not _pid_alive(row["pid"]):
            # launched, but gone before it started: without this the run would hold the machine's one slot forever
            status = "failed"
            error = f"the training process exited before it started: see {self.run_dir(row['id']) / 'log.txt'}"
            self.finish(row["id"], status, error=error)
        info = json.loads(row["info"]) if row["info"] else {}
        return {
            "id": row["id"],
            "name": row["name"],
            "status": status,
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "config": json.loads(row["config"]),
            "info": info,
            "metrics": json.loads(row["metrics"]) if row["metrics"] else None,
            "timings": json.loads(row["timings"]) if row["timings"] else None,
            "error": error,
            "stop_requested": bool(row["stop_requested"]),
            "dir": str(self.run_dir(row["id"])),
        }
