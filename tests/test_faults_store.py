"""The run store under faults: a stop while queued, a reused pid, a run on another machine, a reader racing a
writer, old and corrupt stores, a full disk, two processes at once. Each test does what the fault does."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.store import SCHEMA_VERSION, RunStore, pid_alive, process_start

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"model": "m", "data": {"source": "d.csv"}, "method": {"name": "lora"}}

# The schema of every earlier release, as `git log -p workbench/store.py` shows it: one unversioned schema
# (user_version 0), from the first commit until the version was added.
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
    ended_at REAL, pid INTEGER, config TEXT NOT NULL, metrics TEXT, timings TEXT, info TEXT, error TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS points (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL,
    time REAL NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS points_run ON points (run_id, seq);
"""


def _sql(store: RunStore, query: str, *args) -> None:
    db = sqlite3.connect(store.db_path)
    with db:
        db.execute(query, args)
    db.close()


def _cli(capsys, home, *argv):
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- stop -----------------------------------------------------------------------

def test_a_stop_pressed_while_queued_reaches_the_launched_process(store):
    """Launch -> Stop (still queued) -> the child marks itself running: the stop must survive that."""
    run_id = store.create_run(CONFIG)
    child = os.getpid()  # stands for the launched process: it calls mark_running with its own pid
    store.set_pid(run_id, child)
    assert store.request_stop(run_id) == "stopped"
    assert store.get(run_id)["status"] == "stopped"
    store.mark_running(run_id, child)
    assert store.stop_requested(run_id), "mark_running reset the stop: the run would train to the end"


def test_a_stop_while_queued_reaches_a_rank_started_by_torchrun(store):
    """Under torchrun the launched pid is the launcher; rank 0, its child, marks the run running."""
    run_id = store.create_run(CONFIG)
    store.set_pid(run_id, os.getppid())  # this test process stands for rank 0, its parent for the launcher
    assert store.request_stop(run_id) == "stopped"
    store.mark_running(run_id)
    assert store.stop_requested(run_id)


def test_a_resumed_run_does_not_inherit_an_old_stop(store):
    run_id = store.create_run(CONFIG)
    store.mark_running(run_id)
    assert store.request_stop(run_id) == "stopping"
    store.finish(run_id, "stopped")
    store.requeue(run_id)  # launch(resume_id=...) does this
    store.mark_running(run_id)
    assert store.get(run_id)["status"] == "running" and not store.stop_requested(run_id)


def test_a_launched_run_stopped_while_queued_ends_stopped(tmp_path, tiny_config):
    from workbench.launch import launch

    handle = launch(tiny_config(train={"epochs": 30}), home=tmp_path / "home")
    assert handle.store.get(handle.id)["status"] == "queued"  # the child is still importing torch
    assert handle.stop() == "stopped"
    record = handle.wait(timeout=240)
    assert record["status"] == "stopped", (record["error"], handle.log_path.read_text()[-2000:])
    steps = [p["step"] for p in handle.points(kind="train")]
    assert len(steps) <= 2, f"the run trained {len(steps)} steps after a stop pressed while queued"


@pytest.mark.parametrize("status, says", [
    ("completed", "is already completed: nothing to stop"),
    ("failed", "is already failed: nothing to stop"),
    ("queued", "was queued: marked stopped"),
    ("running", "ends at its next step"),
])
def test_runs_stop_says_what_it_did(tmp_path, capsys, status, says):
    store = RunStore(tmp_path / "home")
    run_id = store.create_run(CONFIG)
    if status != "queued":
        store.mark_running(run_id)
    if status in ("completed", "failed"):
        store.finish(run_id, status)
    code, out, err = _cli(capsys, store.home, "runs", "stop", run_id)
    assert code == 0 and says in out, out + err


# --- liveness --------------------------------------------------------------------

def test_a_reused_pid_is_not_our_run(store):
    """The run's process died and the pid now names another process (here: this one)."""
    run_id = store.create_run(CONFIG)
    store.mark_running(run_id)
    assert store.get(run_id)["status"] == "running"
    _sql(store, "UPDATE runs SET pid_start=pid_start-1 WHERE id=?", run_id)  # an earlier process with our pid
    record = store.get(run_id)
    assert record["status"] == "failed" and "exited unexpectedly" in record["error"]
    assert pid_alive(os.getpid()) and not pid_alive(os.getpid(), process_start(os.getpid()) - 1)


def test_a_run_on_another_machine_is_not_failed_and_force_clears_it(tmp_path, capsys):
    """A store shared with a container: its pid means nothing here, so the run is left running until forced."""
    store = RunStore(tmp_path / "home")
    run_id = store.create_run(CONFIG)
    store.mark_running(run_id, pid=2 ** 22 + 12345)  # no such pid on this machine
    _sql(store, "UPDATE runs SET host='container-7f3a/pid:[4026532999]' WHERE id=?", run_id)
    assert store.get(run_id)["status"] == "running", "a live run elsewhere was marked failed"
    code, out, err = _cli(capsys, store.home, "runs", "stop", "--force", run_id)
    assert code == 0 and "marked stopped (--force" in out
    record = store.get(run_id)
    assert record["status"] == "stopped" and "--force" in record["error"]


def test_force_refuses_a_live_run_here(tmp_path, capsys):
    store = RunStore(tmp_path / "home")
    run_id = store.create_run(CONFIG)
    store.mark_running(run_id)  # this process: alive, with its start time
    code, out, err = _cli(capsys, store.home, "runs", "stop", "--force", run_id)
    assert code == 2 and f"is alive (process {os.getpid()})" in err and "Traceback" not in err
    assert store.get(run_id)["status"] == "running"


def test_a_reader_never_overwrites_a_run_that_completed_meanwhile(store):
    """The reader saw 'running' with a dead pid; before it wrote 'failed', the run completed."""
    run_id = store.create_run(CONFIG)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.mark_running(run_id, pid=dead.pid)
    with store._connect() as db:
        stale = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
    store.finish(run_id, "completed", metrics={"accuracy": 0.9})  # the writer's last word
    store._record(stale)  # the reader acts on what it read
    record = store.get(run_id)
    assert record["status"] == "completed" and record["metrics"] == {"accuracy": 0.9}
    assert store.finish(run_id, "failed", error="x", expected="running") is False


def test_run_id_lookup_is_literal(store):
    run_id = store.create_run(CONFIG)
    for pattern in ("%", "_", "2%", run_id[:4] + "_"):
        with pytest.raises(WorkbenchError, match=r"no run .* `workbench runs list` shows the ids"):
            store.resolve(pattern)
    assert store.resolve(run_id[:6]) == run_id


# --- schema versions and corrupt stores ---------------------------------------------

def _v0_store(home: Path) -> Path:
    """A store exactly as the first releases wrote it: a queued, a running (dead pid) and a completed run."""
    home.mkdir(parents=True)
    (home / "runs").mkdir()
    db = sqlite3.connect(home / "runs.sqlite")
    db.executescript(SCHEMA_V0)
    db.execute("PRAGMA journal_mode=WAL")
    rows = [("20250101-000000-aaaa", "queued", None, None), ("20250101-000001-bbbb", "running", 2 ** 22 + 1, None),
            ("20250101-000002-cccc", "completed", None, json.dumps({"accuracy": 0.8}))]
    for i, (rid, status, pid, metrics) in enumerate(rows):
        db.execute("INSERT INTO runs (id, name, status, created_at, pid, config, metrics) VALUES (?,?,?,?,?,?,?)",
                   (rid, None, status, 1.0e9 + i, pid, json.dumps(CONFIG), metrics))
        (home / "runs" / rid).mkdir()
    db.execute("INSERT INTO points (run_id, kind, step, time, data) VALUES (?, 'train', 1, 1.0, ?)",
               (rows[2][0], json.dumps({"loss": 0.5})))
    db.commit()
    db.close()
    return home


def test_a_v0_store_is_migrated_in_place(tmp_path):
    home = _v0_store(tmp_path / "home")
    store = RunStore(home)
    db = sqlite3.connect(home / "runs.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"pid_start", "host"} <= {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    by_id = {r["id"]: r for r in store.list()}
    assert by_id["20250101-000002-cccc"]["metrics"] == {"accuracy": 0.8}
    assert by_id["20250101-000001-bbbb"]["status"] == "failed"  # its pid is gone: said once, as before
    assert store.points("20250101-000002-cccc")[0]["loss"] == 0.5
    new = store.create_run(CONFIG)  # and the store works on
    store.mark_running(new)
    assert store.get(new)["status"] == "running"


def test_two_processes_opening_a_v0_store_at_once_both_work(tmp_path):
    home = _v0_store(tmp_path / "home")
    code = f"from workbench.store import RunStore; s = RunStore({str(home)!r}); print(len(s.list()))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["3", "3"]


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    RunStore(tmp_path / "home")
    _sql(RunStore(tmp_path / "home"), "PRAGMA user_version=99")
    with pytest.raises(WorkbenchError, match=r"schema version 99, newer than this workbench's .*: upgrade"):
        RunStore(tmp_path / "home")


def test_a_foreign_runs_table_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    db = sqlite3.connect(home / "runs.sqlite")
    db.execute("CREATE TABLE runs (id TEXT, owner TEXT)")
    db.commit()
    db.close()
    with pytest.raises(WorkbenchError, match=r"runs table without name, status.*not written by the workbench"):
        RunStore(home)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed-header"])
def test_a_corrupt_store_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, damage):
    home = tmp_path / "home"
    store = RunStore(home)
    for _ in range(30):
        store.add_point(store.create_run(CONFIG), "train", 1, {"loss": 1.0, "pad": "x" * 2000})
    store.close()
    path = home / "runs.sqlite"
    for extra in ("-wal", "-shm"):
        Path(str(path) + extra).unlink(missing_ok=True)
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    else:
        path.write_bytes(b"\0" * 100 + raw[100:])
    code, out, err = _cli(capsys, home, "runs", "list")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"the run store {path} is corrupt" in lines[0] and f"mv {path} {path}.bad" in lines[0]


# --- a full disk ----------------------------------------------------------------------

FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from workbench.store import RunStore

    home, run_id = sys.argv[1], sys.argv[2]
    store = RunStore(home)
    store.mark_running(run_id)
    store.add_point(run_id, "train", 1, {"loss": 1.0})
    # the disk fills up: no file may grow any more (a write past the limit gets EFBIG, as ENOSPC on a full disk)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = max(p.stat().st_size for p in Path(home).glob("runs.sqlite*"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    # what the training loop does from here: steps, then the checkpoint write fails, the exception hook
    # records the error, then the run's end
    for step in range(2, 50):
        store.add_points(run_id, [("train", step, {"loss": 1.0 / step, "pad": "x" * 500})])
    error = "internal error: OSError: [Errno 28] No space left on device (checkpoint step-50)"
    store.add_point(run_id, "event", 50, {"event": "exception", "message": error})
    store.finish(run_id, "failed", error=error)
    store.add_point(run_id, "event", 50, {"event": "train_end", "status": "failed"})
    print(store.get(run_id)["status"])
""")


def test_a_full_disk_keeps_the_failure_reason(tmp_path):
    store = RunStore(tmp_path / "home")
    run_id = store.create_run(CONFIG)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(store.home), run_id], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "failed", "the run's own process must see its end"
    assert "live records are dropped" in proc.stderr  # said once, on the run's log
    record = RunStore(store.home).get(run_id)  # another process, once the disk has room
    assert record["status"] == "failed", record
    assert "No space left on device" in record["error"] and "live records were lost" in record["error"]
    assert "killed or out of memory" not in record["error"]


# --- two processes at once ---------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from workbench.store import RunStore
    store = RunStore(sys.argv[1])
    for i in range(40):
        run_id = store.create_run({"model": "m", "data": {"source": "d"}, "method": {"name": "lora"}})
        store.mark_running(run_id)
        store.add_points(run_id, [("train", s, {"loss": 1.0}) for s in range(1, 20)])
        store.finish(run_id, "completed", metrics={"accuracy": 1.0})
        store.list()
    print("ok")
""")


def test_two_writers_and_two_clis_on_one_store_at_once(tmp_path):
    home = tmp_path / "home"
    RunStore(home)
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(home)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    lists = []
    while any(w.poll() is None for w in writers):
        lists.append(subprocess.run([sys.executable, "-m", "workbench", "runs", "list", "--json"], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=120))
    outs = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outs
    assert all(r.returncode == 0 for r in lists), [r.stderr for r in lists if r.returncode]
    runs = RunStore(home).list()
    assert len(runs) == 80 and all(r["status"] == "completed" for r in runs)
