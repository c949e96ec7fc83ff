"""The run store: one SQLite row per run plus a directory with its files.

Metrics and events are written as training goes, in their own transactions, so
another process (a widget, a second kernel, a reloaded page, a second CLI) can
follow a run live and always read its whole history. WAL mode lets readers and
the single writer work at the same time; a writer waits up to BUSY_SECONDS for a
lock held by another process.

Layout of the workspace (default ./workbench-runs, or $WORKBENCH_HOME):

    runs.sqlite
    runs/<id>/config.yaml      the config as run
    runs/<id>/log.txt          the run's own log
    runs/<id>/outcome.json     space reserved when the run starts: its end is written here
                               when runs.sqlite cannot be written (a full disk)
    runs/<id>/checkpoints/     resumable state at each evaluation
    runs/<id>/model/           the best weights, restored at the end

The schema is versioned (PRAGMA user_version); an older store is migrated in place
when it is opened, a newer or corrupt one is refused with a one-line message.

Everything here is the owner's only: the workspace, `runs/` and each run directory are created 0700,
runs.sqlite and config.yaml 0600 (SQLite gives its -wal and -shm files the database's mode), because a run
holds user data (its config names the data, its evaluations quote the texts) and its deploy folder the
serving key's record. `private_files()` makes whatever a run writes meanwhile (checkpoints, evaluations,
logs, TensorBoard and wandb files) owner-only too.

What a run records about its data is masked on the way in (privacy.mask_value: e-mail addresses, phone numbers,
card numbers, IP addresses become [EMAIL], [PHONE], ...): its live records (evaluations quote mistaken texts),
its info, its metrics and its error, unless its config says data.mask_personal: off.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import WorkbenchError
from .privacy import mask_text, mask_value
from .run_paths import CONFIG_FILE, LOG_FILE, OUTCOME_FILE

STATUSES = ("queued", "running", "completed", "stopped", "failed")
FINAL_STATUSES = ("completed", "stopped", "failed")
BUSY_SECONDS = 30.0
OUTCOME_BYTES = 8192  # reserved per run for its end on a full disk

# Version 0 is the unversioned schema of the first releases (user_version 0, no pid_start/host).
SCHEMA_VERSION = 1
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
    stop_requested INTEGER NOT NULL DEFAULT 0,
    pid_start INTEGER,
    host TEXT
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
# version -> statements that bring a store at that version to the next one
_MIGRATIONS: dict[int, list[str]] = {
    0: ["ALTER TABLE runs ADD COLUMN pid_start INTEGER", "ALTER TABLE runs ADD COLUMN host TEXT"],
}
_RUN_COLUMNS = ("id", "name", "status", "created_at", "started_at", "ended_at", "pid", "config", "metrics",
                "timings", "info", "error", "stop_requested")

PATH_KEYS = ("path", "predictions_file")  # file paths in records that readers open: never masked
DIED_RUNNING = "the training process exited unexpectedly (killed or out of memory)"


def default_home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", "workbench-runs")).resolve()


# --- processes -----------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (field 3), or None where there is no /proc entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start(pid: int | None) -> int | None:
    """When process `pid` started (clock ticks since boot on Linux), or None when unknown or gone.

    A pid is reused once its process ended; (pid, start time) names one process for good.
    """
    if not pid:
        return None
    fields = _proc_stat(pid)
    if fields is not None and len(fields) > 19:
        return int(fields[19])  # field 22, starttime
    try:  # no /proc (macOS): psutil where it is installed
        import psutil

        return int(psutil.Process(pid).create_time() * 100)
    except Exception:
        return None


def host_id() -> str:
    """This machine and pid namespace: a pid recorded under another one (a container, another host) says nothing here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """Whether process `pid` runs (and, given its start time, is still the same process, not a reused pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    fields = _proc_stat(pid)
    if fields is not None and fields[0] == "Z":  # a zombie child still answers kill(0)
        return False
    if start is not None:
        now = process_start(pid)
        return now is None or now == start
    return True


# --- errors --------------------------------------------------------------------

_FULL = ("database or disk is full", "disk i/o error", "file too large", "no space left")
_CORRUPT = ("file is not a database", "malformed", "file is encrypted", "not a database")


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, (sqlite3.OperationalError, OSError)) and any(s in str(exc).lower() for s in _FULL)


def _is_corrupt(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(s in str(exc).lower() for s in _CORRUPT)


PRIVATE_UMASK = 0o077  # files 0600, folders 0700
_umask_lock = threading.Lock()
_umask_depth = [0, 0]  # [nesting, the umask to restore]


@contextmanager
def private_files() -> Iterator[None]:
    """Files and folders created inside are owner-only (umask 077), whoever creates them (torch, TensorBoard,
    wandb). The umask is per process: nested and concurrent uses share one setting, restored by the last."""
    with _umask_lock:
        if _umask_depth[0] == 0:
            _umask_depth[1] = os.umask(PRIVATE_UMASK)
            os.umask(_umask_depth[1] | PRIVATE_UMASK)
        _umask_depth[0] += 1
    try:
        yield
    finally:
        with _umask_lock:
            _umask_depth[0] -= 1
            if _umask_depth[0] == 0:
                os.umask(_umask_depth[1])


def private_dir(path: str | Path) -> Path:
    """`path` as an owner-only folder (0700), made if missing with its missing parents 0700 too; an existing
    one is tightened (it may hold a secret: a run's deploy folder, the serve folder)."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_file(path: str | Path, flags: int = os.O_APPEND) -> int:
    """An owner-only (0600) file opened for writing (plus `flags`: O_APPEND, O_TRUNC, or 0 to write over it in
    place), as an OS file descriptor; an existing one is tightened."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class RunStore:
    """Reads and writes runs in one workspace directory."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).resolve() if home is not None else default_home()
        if not self.home.exists():
            private_dir(self.home)  # a workspace we make is the owner's; an existing folder keeps its mode
        if not (self.home / "runs").exists():
            private_dir(self.home / "runs")
        self.db_path = self.home / "runs.sqlite"
        if not self.db_path.exists():
            try:  # made 0600 before SQLite opens it (it would use 0644 under the usual umask)
                os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        self._local = threading.local()  # sqlite connections belong to one thread
        self.lost_points = 0  # live records a full disk refused (said in the run's error)
        self.write_error: str | None = None
        self._host = host_id()
        self._mask_modes: dict[str, str] = {}  # run id -> data.mask_personal, read once from its config
        self._migrate()

    # --- plumbing ------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=BUSY_SECONDS)
            try:
                db.execute(f"PRAGMA busy_timeout={int(BUSY_SECONDS * 1000)}")
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as exc:
                db.close()
                raise self._translate(exc) from None
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection (opened once: a connect costs ~15 ms)."""
        db = self._db()
        try:
            with db:  # commits, or rolls back on an error
                yield db
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: sqlite3.DatabaseError) -> Exception:
        """A store problem as one line that names the file and the fix (a full disk keeps its own type)."""
        if _is_corrupt(exc):
            return WorkbenchError(
                f"the run store {self.db_path} is corrupt or not a SQLite file ({exc}): move it aside "
                f"(mv {self.db_path} {self.db_path}.bad) and a new empty store is made; the run directories "
                f"in {self.home / 'runs'} are kept")
        if "locked" in str(exc).lower() or "busy" in str(exc).lower():
            return WorkbenchError(
                f"the run store {self.db_path} stayed locked by another process for {BUSY_SECONDS:.0f} s ({exc}): "
                "retry, or end the process that holds it")
        if _is_full(exc):
            return StoreWriteError(f"could not write the run store {self.db_path} ({exc}): free disk space")
        return exc

    def _migrate(self) -> None:
        """Create the schema, or bring an older store to this version (once, whoever opens it first)."""
        db = self._db()
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise WorkbenchError(
                    f"the run store {self.db_path} has schema version {version}, newer than this workbench's "
                    f"{SCHEMA_VERSION}: upgrade llm-workbench, or point --home / WORKBENCH_HOME at another workspace")
            db.execute("BEGIN IMMEDIATE")  # one migrator at a time; the others wait, then see the new version
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if version < SCHEMA_VERSION and "runs" in tables:
                    have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
                    missing = [c for c in _RUN_COLUMNS if c not in have]
                    if missing:
                        raise WorkbenchError(
                            f"the run store {self.db_path} has a runs table without {', '.join(missing)}: it was "
                            f"not written by the workbench; move it aside (mv {self.db_path} {self.db_path}.bad)")
                    while version < SCHEMA_VERSION:
                        for statement in _MIGRATIONS[version]:
                            column = statement.split("ADD COLUMN ")[-1].split()[0]
                            if column not in have:
                                db.execute(statement)
                        version += 1
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from None

    def close(self) -> None:
        """Close this thread's connection (the last one to close folds the WAL back into runs.sqlite)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def run_dir(self, run_id: str) -> Path:
        return self.home / "runs" / run_id

    # --- masking -------------------------------------------------------------
    def mask_mode(self, run_id: str) -> str:
        """The run's data.mask_personal ("stored" when its config does not say, or the run is unknown)."""
        mode = self._mask_modes.get(run_id)
        if mode is None:
            with self._connect() as db:
                row = db.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
            config = json.loads(row["config"]) if row is not None else {}
            data = config.get("data") if isinstance(config, dict) else None
            mode = str((data or {}).get("mask_personal") or "stored")
            self._mask_modes[run_id] = mode
        return mode

    def _private(self, run_id: str, value: Any) -> Any:
        """A value about the run's data as the store keeps it: masked unless the run says mask_personal: off."""
        return value if self.mask_mode(run_id) == "off" else mask_value(value, keep=PATH_KEYS)

    # --- writing -------------------------------------------------------------
    def create_run(self, config: dict[str, Any], name: str | None = None) -> str:
        """Register a queued run and write its config; returns the new id."""
        import yaml

        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(mode=0o700, parents=True)
        os.chmod(run_dir, 0o700)
        tmp = run_dir / (CONFIG_FILE + ".tmp")
        with os.fdopen(private_file(tmp, os.O_TRUNC), "w", encoding="utf-8") as f:
            f.write(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(run_dir / CONFIG_FILE)
        os.close(private_file(run_dir / LOG_FILE))  # 0600 before a launcher appends the run's output to it
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, created_at, config) VALUES (?, ?, 'queued', ?, ?)",
                (run_id, name or config.get("name"), time.time(), json.dumps(config)),
            )
        return run_id

    def set_pid(self, run_id: str, pid: int) -> None:
        """The process launched for a run not yet started: if it dies before it marks the run running, readers
        see why, and a stop pressed meanwhile reaches it (see mark_running)."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET pid=?, pid_start=?, host=? WHERE id=? "
                "AND (status='queued' OR (status='stopped' AND stop_requested=1 AND pid IS NULL))",
                (pid, process_start(pid), self._host, run_id))

    def requeue(self, run_id: str) -> None:
        """A stopped or failed run about to be resumed by a launched process: queued again, so a stop pressed
        before that process starts reaches it."""
        with self._connect() as db:
            db.execute("UPDATE runs SET status='queued', stop_requested=0, pid=NULL, pid_start=NULL, ended_at=NULL "
                       "WHERE id=? AND status IN ('stopped', 'failed')", (run_id,))

    def mark_running(self, run_id: str, pid: int | None = None) -> None:
        """The run's process has started it. A stop pressed while it was queued, with this very process launched
        for it, is kept: the run then stops at its first step boundary (it used to be lost)."""
        pid = pid or os.getpid()
        # the launched process itself, or (under torchrun) the launcher whose child this rank is
        launcher = os.getppid() if pid == os.getpid() else pid
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET stop_requested = CASE WHEN status='stopped' AND stop_requested=1 AND pid IN (?, ?) "
                "THEN 1 ELSE 0 END, status='running', "
                "started_at=COALESCE(started_at, ?), ended_at=NULL, error=NULL, pid=?, pid_start=?, host=? "
                "WHERE id=?",
                (pid, launcher, time.time(), pid, process_start(pid), self._host, run_id),
            )
        self._reserve_outcome(run_id)

    def set_config(self, run_id: str, config: dict[str, Any]) -> None:
        """The config as the run filled it in (settings left out, chosen from the data): what resume,
        predict and serve read. The file config.yaml keeps the config as it was asked for."""
        with self._connect() as db:
            db.execute("UPDATE runs SET config=? WHERE id=?", (json.dumps(config), run_id))
        self._mask_modes.pop(run_id, None)

    def set_info(self, run_id: str, info: dict[str, Any]) -> None:
        """Facts known once the model is built (parameter counts, labels, sizes)."""
        info = self._private(run_id, info)
        with self._connect() as db:
            db.execute("UPDATE runs SET info=? WHERE id=?", (json.dumps(info), run_id))

    def add_point(self, run_id: str, kind: str, step: int, data: dict[str, Any]) -> None:
        """Append one live record: kind is 'train', 'eval' or 'event'."""
        self.add_points(run_id, [(kind, step, data)])

    def add_points(self, run_id: str, points: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Append several live records (kind, step, data) in one transaction.

        On a full disk the records are dropped and counted (finish() says so in the run's error) instead of
        raising: a live record must not keep the run's end and its reason from being written.
        """
        now = time.time()
        try:
            rows = [(run_id, kind, step, now, json.dumps(self._private(run_id, data))) for kind, step, data in points]
            with self._connect() as db:
                db.executemany("INSERT INTO points (run_id, kind, step, time, data) VALUES (?, ?, ?, ?, ?)", rows)
        except StoreWriteError as exc:
            if self.write_error is None:
                print(f"workbench: {exc}; live records are dropped until it can write again", file=sys.stderr,
                      flush=True)
            self.write_error = str(exc)
            self.lost_points += len(points)

    def truncate_points(self, run_id: str, after_step: int) -> None:
        """Drop records past a checkpoint, so a resumed run's history has no duplicates."""
        with self._connect() as db:
            db.execute("DELETE FROM points WHERE run_id=? AND step>?", (run_id, after_step))

    def finish(self, run_id: str, status: str, metrics: dict[str, Any] | None = None,
               timings: dict[str, Any] | None = None, error: str | None = None,
               expected: str | tuple[str, ...] | None = None) -> bool:
        """Record the run's end. With `expected`, only if its status is still that (a reader never overwrites a
        run that ended meanwhile); returns whether the row changed.

        On a full disk the end goes to the space reserved in runs/<id>/outcome.json, and readers take it from there.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status {status!r} is not final: one of {FINAL_STATUSES}")
        if self.lost_points and status == "failed":
            error = f"{error or 'failed'} ({self.lost_points} live records were lost: {self.write_error})"
        if self.mask_mode(run_id) != "off":
            error, metrics = mask_text(error) if error else error, mask_value(metrics, keep=PATH_KEYS)
        query = ("UPDATE runs SET status=?, ended_at=?, metrics=COALESCE(?, metrics), "
                 "timings=COALESCE(?, timings), error=?, stop_requested=0 WHERE id=?")
        args: list[Any] = [status, time.time(), json.dumps(metrics) if metrics is not None else None,
                           json.dumps(timings) if timings is not None else None, error, run_id]
        if expected is not None:
            expected = (expected,) if isinstance(expected, str) else tuple(expected)
            query += f" AND status IN ({', '.join('?' * len(expected))})"
            args += list(expected)
        try:
            with self._connect() as db:
                changed = db.execute(query, args).rowcount > 0
        except StoreWriteError as exc:
            if not self._write_outcome(run_id, status, error, metrics):
                raise StoreWriteError(f"{exc}; the run ended {status}" + (f": {error}" if error else "")) from None
            return True
        if changed:
            self._clear_outcome(run_id)
        return changed

    def request_stop(self, run_id: str) -> str:
        """Ask a run to stop at its next step boundary (any process may call this).

        Returns what happened: 'stopping' (it ends at its next step), 'stopped' (it was queued: it never
        starts, or its launched process stops at its first step), or 'already <status>' for a run that ended.
        """
        run_id = self.resolve(run_id)
        status = self.get(run_id)["status"]  # a dead process is noticed here first
        if status in FINAL_STATUSES:
            return f"already {status}"
        with self._connect() as db:
            db.execute("UPDATE runs SET stop_requested=1 WHERE id=? AND status IN ('queued', 'running')", (run_id,))
            queued = db.execute(
                "UPDATE runs SET status='stopped', ended_at=? WHERE id=? AND status='queued'",
                (time.time(), run_id)).rowcount
        if queued:
            return "stopped"
        return "stopping" if self.get(run_id)["status"] == "running" else f"already {self.get(run_id)['status']}"

    def force_stop(self, run_id: str) -> str:
        """Mark a run that cannot stop itself (its process is gone, or on another machine) as stopped.

        Refused while its process is alive here: `request_stop` asks it to stop and keeps its checkpoint.
        """
        run_id = self.resolve(run_id)
        record = self.get(run_id)
        if record["status"] in FINAL_STATUSES:
            return f"already {record['status']}"
        with self._connect() as db:
            row = db.execute("SELECT status, pid, pid_start, host FROM runs WHERE id=?", (run_id,)).fetchone()
        # alive for sure only when seen from its own machine with the start time recorded (a pid alone may be reused)
        if row["host"] in (None, self._host) and row["pid_start"] is not None and pid_alive(row["pid"],
                                                                                            row["pid_start"]):
            raise WorkbenchError(
                f"run {run_id} is alive (process {row['pid']}): `workbench runs stop {run_id}` asks it to stop "
                f"at its next step; `kill {row['pid']}` ends it now")
        note = "marked stopped by `runs stop --force` (its process could not be reached)"
        self.finish(run_id, "stopped", error=note, expected=row["status"])
        return "forced"

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

    # --- the end on a full disk --------------------------------------------------
    def _outcome_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / OUTCOME_FILE

    def _reserve_outcome(self, run_id: str) -> None:
        """Blank space for the run's end, allocated now while the disk has room."""
        path = self._outcome_path(run_id)
        try:
            with os.fdopen(private_file(path, 0), "wb") as f:
                f.write(b" " * OUTCOME_BYTES)
        except OSError:
            path.unlink(missing_ok=True)

    def _write_outcome(self, run_id: str, status: str, error: str | None, metrics: dict[str, Any] | None) -> bool:
        """Write the run's end over its reserved space (in place: no new disk blocks); True when written."""
        path = self._outcome_path(run_id)
        record: dict[str, Any] = {"status": status, "ended_at": time.time(), "error": error, "metrics": metrics}
        data = json.dumps(record).encode()
        if len(data) > OUTCOME_BYTES:
            record["metrics"] = None
            data = json.dumps(record).encode()
        while len(data) > OUTCOME_BYTES and record["error"]:
            record["error"] = record["error"][: len(record["error"]) // 2] + " ..."
            data = json.dumps(record).encode()
        try:
            if not path.exists() or path.stat().st_size < len(data):
                return False
            with open(path, "r+b") as f:
                f.write(data + b" " * (OUTCOME_BYTES - len(data)))
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError:
            return False

    def _read_outcome(self, run_id: str) -> dict[str, Any] | None:
        try:
            text = self._outcome_path(run_id).read_text(encoding="utf-8").strip()
            outcome = json.loads(text) if text else None
        except (OSError, ValueError):
            return None
        return outcome if isinstance(outcome, dict) and outcome.get("status") in FINAL_STATUSES else None

    def _clear_outcome(self, run_id: str) -> None:
        if self._read_outcome(run_id) is not None:
            self._reserve_outcome(run_id)

    # --- reading -------------------------------------------------------------
    def resolve(self, run_id: str) -> str:
        """Map 'latest' or a unique id prefix to a full run id (a prefix is literal: '%' and '_' match themselves)."""
        with self._connect() as db:
            if run_id == "latest":
                row = db.execute("SELECT id FROM runs ORDER BY created_at DESC, id DESC LIMIT 1").fetchone()
                if row is None:
                    raise WorkbenchError(f"no runs yet in {self.home}: start one with `workbench train CONFIG`")
                return row[0]
            pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = db.execute("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id", (pattern,)).fetchall()
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

    def _settle(self, row: sqlite3.Row) -> sqlite3.Row:
        """A run that is not final but whose end is known (outcome file) or whose process is gone: record it.

        Conditional on the row being as read: a run that completed meanwhile is never overwritten.
        """
        status = row["status"]
        if status not in ("queued", "running"):
            return row
        outcome = self._read_outcome(row["id"])
        if outcome is not None:
            update = (outcome["status"], outcome.get("error"), outcome.get("metrics"))
        elif row["host"] not in (None, self._host):
            return row  # its process lives where we cannot see it: only `runs stop --force` clears it
        elif status == "running" and not pid_alive(row["pid"], row["pid_start"]):
            update = ("failed", DIED_RUNNING, None)  # killed, out of memory, or the pid now names another process
        elif status == "queued" and row["pid"] and not pid_alive(row["pid"], row["pid_start"]):
            # launched, but gone before it started: without this the run would hold the machine's one slot forever
            update = ("failed", f"the training process exited before it started: see "
                                f"{self.run_dir(row['id']) / LOG_FILE}", None)
        else:
            return row
        try:
            with self._connect() as db:
                db.execute(
                    "UPDATE runs SET status=?, ended_at=?, error=?, metrics=COALESCE(?, metrics) "
                    "WHERE id=? AND status=? AND pid IS ?",
                    (update[0], time.time(), update[1], json.dumps(update[2]) if update[2] else None, row["id"],
                     status, row["pid"]))
                fresh = db.execute("SELECT * FROM runs WHERE id=?", (row["id"],)).fetchone()
        except StoreWriteError:  # a reader on a full disk: say it, write nothing
            return _Patched(row, status=update[0], error=update[1])
        return fresh if fresh is not None else row

    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        row = self._settle(row)
        info = json.loads(row["info"]) if row["info"] else {}
        return {
            "id": row["id"],
            "name": row["name"],
            "status": row["status"],
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "config": json.loads(row["config"]),
            "info": info,
            "metrics": json.loads(row["metrics"]) if row["metrics"] else None,
            "timings": json.loads(row["timings"]) if row["timings"] else None,
            "error": row["error"],
            "stop_requested": bool(row["stop_requested"]),
            "dir": str(self.run_dir(row["id"])),
        }


class StoreWriteError(WorkbenchError):
    """runs.sqlite could not be written (a full disk, a file size limit, an I/O error)."""


class _Patched(dict):
    """A row with some fields replaced (read-only use in _record)."""

    def __init__(self, row: sqlite3.Row, **changes: Any) -> None:
        super().__init__({k: row[k] for k in row.keys()}, **changes)
