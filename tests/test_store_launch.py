"""The run store and runs as their own processes: live following, stop, crash, torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workbench.launch import attach, launch
from workbench.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


def test_points_are_readable_by_another_store_while_written(store):
    run_id = store.create_run({"model": "m", "data": {"source": "d"}, "method": {"name": "lora"}})
    store.mark_running(run_id)
    reader = RunStore(store.home)  # another process would open the same files
    for step in range(1, 4):
        store.add_point(run_id, "train", step, {"loss": 1.0 / step})
    seen = reader.points(run_id)
    assert [p["step"] for p in seen] == [1, 2, 3] and seen[0]["loss"] == 1.0
    assert reader.points(run_id, after_seq=seen[1]["seq"])[0]["step"] == 3
    assert reader.get("latest")["status"] == "running"


def test_a_run_whose_process_died_is_reported_failed(store):
    run_id = store.create_run({"model": "m"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.mark_running(run_id, pid=dead.pid)
    record = store.get(run_id)
    assert record["status"] == "failed" and "exited unexpectedly" in record["error"]


def test_a_launched_run_whose_process_never_started_is_failed_not_queued_forever(tmp_path, tiny_config,
                                                                                    monkeypatch):
    """A queued run holds the dashboard's one training slot: a launch that died before it started must free it."""
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # the child exits 1 at once
    handle = launch(tiny_config(), home=tmp_path / "home")
    record = handle.wait(timeout=30)
    assert record["status"] == "failed" and "exited before it started" in record["error"]
    assert "log.txt" in record["error"]
    queued = handle.store.create_run({"model": "m"})  # queued in this process, nothing launched: stays queued
    assert handle.store.get(queued)["status"] == "queued"


def test_id_prefix_and_latest(store):
    a = store.create_run({"model": "a"})
    time.sleep(0.01)
    b = store.create_run({"model": "b"})
    assert store.resolve("latest") == b
    assert store.resolve(a[:-1]) == a or store.resolve(a) == a


def test_launched_run_outlives_its_handle_and_can_be_stopped(tmp_path, tiny_config):
    home = tmp_path / "home"
    handle = launch(tiny_config(train={"epochs": 200}), home=home)
    deadline = time.monotonic() + 120
    while not handle.points(kind="train") and time.monotonic() < deadline:
        record = handle.record
        assert record["status"] in ("queued", "running"), (record["error"], handle.log_path.read_text()[-3000:])
        time.sleep(0.2)
    assert handle.points(kind="train"), "the run never started stepping"
    follower = attach(handle.id, home=home)  # as after a kernel restart
    assert follower.status == "running"
    follower.stop()
    record = handle.wait(timeout=120)
    assert record["status"] == "stopped", (record, handle.log_path.read_text()[-3000:])
    assert list((Path(record["dir"]) / "checkpoints").glob("step-*"))
    assert "stopped" in handle.log_path.read_text()


def test_launched_run_completes(tmp_path, tiny_config):
    handle = launch(tiny_config(train={"epochs": 1}), home=tmp_path / "home")
    record = handle.wait(timeout=180)
    assert record["status"] == "completed", handle.log_path.read_text()[-2000:]
    assert record["metrics"]["accuracy"] >= 0


def test_torchrun_two_processes_make_one_run_with_the_single_process_loss(tmp_path, tiny_config):
    """DDP on CPU (gloo): 2 x batch 4 sees the same examples per step as 1 x batch 8."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    single = tiny_config(train={"epochs": 1, "batch_size": 8})
    dist = tiny_config(train={"epochs": 1, "batch_size": 4})
    cfg_path = tmp_path / "dist.yaml"
    cfg_path.write_text(yaml.safe_dump(dist.to_dict()))
    home = tmp_path / "home"
    env = {**os.environ, "WORKBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "workbench", "train", str(cfg_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    store = RunStore(home)
    runs = store.list()
    assert len(runs) == 1, "rank 0 alone writes the store"
    run = runs[0]
    assert run["status"] == "completed" and run["info"]["num_processes"] == 2
    assert sum(map(sum, run["metrics"]["confusion_matrix"])) == 24, "metrics over the whole eval set"
    dist_losses = [p["loss"] for p in store.points(run["id"], kind="train")]

    from workbench.callbacks import Callback
    from workbench.loop import train

    losses = []

    class Losses(Callback):
        def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
            losses.append(loss)

    train(single, store=RunStore(tmp_path / "single"), callbacks=[Losses()])
    assert len(dist_losses) == len(losses) == 9
    assert dist_losses == pytest.approx(losses, rel=1e-3, abs=1e-4), "DDP must log the same loss as 1 process"


def test_sigterm_is_a_cooperative_stop(tmp_path, tiny_config):
    import signal

    handle = launch(tiny_config(train={"epochs": 200}), home=tmp_path / "home")
    deadline = time.monotonic() + 120
    while not handle.points(kind="train") and time.monotonic() < deadline:
        time.sleep(0.2)
    handle._process.send_signal(signal.SIGTERM)
    record = handle.wait(timeout=120)
    assert record["status"] == "stopped" and record["error"] is None
    assert list((Path(record["dir"]) / "checkpoints").glob("step-*")), "the stop saved a checkpoint"


def test_launched_run_resolves_relative_paths_from_the_callers_directory(tmp_path, tiny_config, tiny_csv,
                                                                        monkeypatch):
    monkeypatch.chdir(tiny_csv.parent)
    handle = launch(tiny_config(data={"source": tiny_csv.name}, train={"epochs": 1}), home=tmp_path / "home")
    record = handle.wait(timeout=180)
    assert record["status"] == "completed", record["error"]
