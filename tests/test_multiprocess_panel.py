"""Multi-process runs from the UI: TrainPanel's processes control launches the run under torchrun (CPU, gloo);
it is one record, followed live like a one-process run."""

from __future__ import annotations

import pytest

from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.launch import check_processes
from workbench.store import RunStore


def test_a_two_process_run_from_the_panel_is_one_record_with_a_live_curve(tiny_config, tmp_path):
    from widgets import LossCurve, TrainPanel

    home = tmp_path / "home"
    config = tiny_config(train={"epochs": 1, "batch_size": 4})
    panel = TrainPanel(home=home, background=False, config_factory=lambda: config)
    panel.processes = 2
    panel.start()
    assert panel.error == "" and panel.run_id, panel.error
    record = panel.handle.wait(timeout=600)
    assert record["status"] == "completed", (record["error"], panel.handle.log_path.read_text()[-2000:])
    panel.refresh()
    assert panel.status == "completed"
    store = RunStore(home)
    assert [r["id"] for r in store.list()] == [panel.run_id], "rank 0 alone writes the store: one run"
    assert record["info"]["num_processes"] == 2
    assert sum(map(sum, record["metrics"]["confusion_matrix"])) == 24, "metrics over the whole eval set"
    curve = LossCurve(home=home, run_ids=[panel.run_id], background=False)
    curve.refresh()
    steps = [p["step"] for p in store.points(panel.run_id, kind="train")]
    assert steps == list(range(1, 10)) and curve.points_seen >= len(steps)


def test_a_process_count_the_machine_cannot_run_is_refused_inline(tiny_config, tmp_path):
    from widgets import TrainPanel

    config = tiny_config()
    panel = TrainPanel(home=tmp_path / "home", background=False, config_factory=lambda: config)
    panel.processes = 0
    panel.start()
    assert "processes = 0 is not allowed: 1 or more" in panel.error and panel.status == "idle"
    assert RunStore(tmp_path / "home").list() == []


@pytest.mark.parametrize("n, match", [(0, "1 or more"), (10_000, "CPU core")])
def test_check_processes_names_the_limit(n, match):
    with pytest.raises(WorkbenchError, match=match):
        check_processes(n, Config.from_dict({"train": {"device": "cpu"}}))
