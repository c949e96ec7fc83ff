"""DeployPanel without a browser: build, set traits, click, assert on traits (a tiny BERT trained here in seconds).

One test starts a real `workbench serve` process through the panel, calls it over HTTP, reads the counts back in
the panel's live metrics, checks the alerting rules the server wrote and the alert banner while an alert fires,
finds the server again from a new panel (a page reload) and stops it."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
import traitlets as T

from workbench import deploy
from workbench.config import Config
from workbench.deploy.alerts import ALERTS_FILE, AlertThresholds, alert_rules, check_rule_file
from workbench.run_paths import RunPaths
from workbench.store import RunStore
from widgets import DeployPanel
from widgets.deploy import MARKED_COLOR, examples, psi_words


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_csv):
    import workbench

    home = tmp_path_factory.mktemp("deploy-panel-home")
    raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": False}}
    record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    assert record["status"] == "completed", record.get("error")
    return record["id"], home


def _all_states(widget) -> str:
    """Every synced value of the widget and its descendants, as the page would receive them."""
    seen, out, todo = set(), [], [widget]
    while todo:
        w = todo.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        state = w.get_state()
        out.append(json.dumps(state, default=str))
        todo += [c for c in getattr(w, "children", ()) or ()]
    return "\n".join(out)


def test_build_picks_the_newest_trained_run_with_no_report_and_no_server(run):
    run_id, home = run
    panel = DeployPanel(home=home, background=False)
    try:
        assert panel.runs == [run_id] and panel.run_id == run_id and panel.task == "text-classification"
        assert panel.report is None and panel.artifacts == ["fp32"] and panel.artifact == "fp32"
        assert panel.server_state == "stopped" and panel.url == "" and panel._stop.disabled
        assert "no report yet" in panel._stage.value
        with pytest.raises(T.TraitError, match="artifact 'int8' is not made for this run"):
            panel.artifact = "int8"
        with pytest.raises(T.TraitError, match="has no trained model"):
            panel.run_id = "no-such-run"
    finally:
        panel.close()


def test_optimise_refuses_nothing_ticked_in_words(run):
    run_id, home = run
    panel = DeployPanel(home=home, background=False)
    try:
        panel.int8 = panel.prune = panel.onnx = False
        panel._optimize.click()
        assert panel.error == "nothing to make: tick at least one of int8, prune, ONNX"
        assert panel.report is None and not panel.optimizing
    finally:
        panel.close()


def test_optimise_click_shows_progress_the_report_table_and_the_figure(run):
    run_id, home = run
    panel = DeployPanel(home=home, background=False)
    stages: list[tuple[str, float]] = []
    panel.observe(lambda c: stages.append((panel.stage, panel.progress)), names="progress")
    try:
        panel._boxes["prune"].value = True  # the checkbox drives the trait
        assert panel.prune and panel.int8 and not panel.onnx
        panel._optimize.click()
        assert panel.error == "" and panel.stage == "done" and panel.progress == 1.0 and not panel.optimizing
        assert any(s.startswith("measuring") for s, _ in stages), stages
        report = panel.report
        assert report == deploy.load_report(run_id, home)
        assert set(report["artifacts"]) == {"int8", "pruned"} and panel.artifacts == ["fp32", "int8", "pruned"]
        assert list(panel._serve_pick.options) == ["fp32", "int8", "pruned"]
        bars, latency = panel.fig.data
        assert list(bars.x) == ["fp32", "int8", "pruned"] == list(latency.x)
        assert list(bars.y) == [report["fp32"]["samples_per_s"]] + [
            report["artifacts"][n]["samples_per_s"] for n in ("int8", "pruned")]
        for name, color, text in zip(bars.x[1:], bars.marker.color[1:], bars.text[1:]):
            marked = report["artifacts"][name]["marked"]
            assert (color == MARKED_COLOR) == marked and ("marked" in text) == marked
            assert text.startswith(f"{report['artifacts'][name]['speedup']}x")
        assert "int8 (" in panel._report_table.value and "pruned" in panel._report_table.value
        # a new panel (a page reload) shows the saved report
        again = DeployPanel(home=home, background=False)
        assert again.report == report and again.artifacts == panel.artifacts
        again.close()
    finally:
        panel.close()


def test_start_serves_the_run_metrics_count_the_requests_a_new_panel_finds_it_and_stop_ends_it(run):
    run_id, home = run
    panel = DeployPanel(home=home, background=False)
    reloaded = None
    try:
        panel._start.click()
        assert panel.error == "" and panel.server_state == "running", panel.error
        info = deploy.server_status(run_id, home)
        assert info is not None and panel.url == info["url"] and info["pid"] == panel.server["pid"]
        assert panel.masked_key == deploy.mask(info["api_key"]) and panel.masked_key in panel._server_html.value
        assert info["api_key"] not in _all_states(panel), "the key must never reach the page"
        assert panel._start.disabled and not panel._stop.disabled and panel._serve_pick.disabled
        assert info["api_key_file"] in panel._curl.value and "/v1/classify" in panel._python.value
        headers = {"Authorization": f"Bearer {info['api_key']}"}
        for _ in range(3):
            r = httpx.post(info["url"] + "/v1/classify", json={"texts": ["great film", "awful plot"]},
                           headers=headers, timeout=60)
            assert r.status_code == 200
        assert httpx.post(info["url"] + "/v1/classify", json={"texts": ["x"]}, timeout=60).status_code == 401
        assert panel.refresh_metrics()
        assert panel.requests_total == 4  # 3 answered, 1 refused: every status counts
        assert sum(panel.label_counts.values()) == 6 and set(panel.label_counts) == {"neg", "pos"}
        assert panel.p95_ms is not None and panel.p95_ms > 0
        assert set(panel.drift) == {"predicted_label", "input_length"}
        assert "requests/s" in panel._metrics_html.value and "PSI" in panel._metrics_html.value
        httpx.post(info["url"] + "/v1/classify", json={"texts": ["lovely"]}, headers=headers, timeout=60)
        assert panel.refresh_metrics() and panel.requests_total == 5 and panel.requests_per_second > 0
        # the server wrote the run's alerting rules at its thresholds (the defaults), kept in its record
        rules = RunPaths.of(RunStore(home).get(run_id)).deploy / ALERTS_FILE
        assert info["alert_rules"] == str(rules) and check_rule_file(rules) == alert_rules(run_id)
        assert info["alerts"] == dataclasses.asdict(AlertThresholds())
        assert panel.alerts == [] and panel._banner.layout.display == "none"  # 1 of 5 refused: too few to judge
        for _ in range(20):  # 21 of 25 model requests refused: over the 25 % of 4xx the defaults allow
            assert httpx.post(info["url"] + "/v1/classify", json={"texts": ["x"]}, timeout=60).status_code == 401
        assert panel.refresh_metrics() and [a["name"] for a in panel.alerts] == ["WorkbenchClientErrors"]
        assert panel._banner.layout.display is None and "1 alert firing on run" in panel._banner.value
        assert "21 of 25 model requests answered 4xx" in panel._banner.value
        # a page reload: a new panel finds the running server, its counts and its alert
        reloaded = DeployPanel(home=home, background=False)
        assert reloaded.server_state == "running" and reloaded.url == panel.url
        assert reloaded.requests_total == 25 and reloaded.alerts == panel.alerts
        reloaded._stop.click()
        assert reloaded.server_state == "stopped" and deploy.server_status(run_id, home) is None
        assert reloaded.alerts == [] and reloaded._banner.layout.display == "none"
        assert not panel.refresh_metrics() and panel.server_state == "stopped"
        assert "no longer running" in panel.error and panel._banner.layout.display == "none"
    finally:
        deploy.stop_server(run_id, home)
        panel.close()
        if reloaded is not None:
            reloaded.close()


def test_alert_banner_lists_the_firing_alerts_and_hides_when_none_fire(run):
    run_id, home = run
    panel = DeployPanel(home=home, background=False)
    quiet = {"requests": {"classify": {"200": 40.0}}, "latency": {"classify": {"count": 40.0, "p95": 0.05}},
             "in_flight": 1.0, "drift": {"input_length": 0.02}, "drift_samples": 40.0}
    failing = {**quiet, "requests": {"classify": {"200": 30.0, "500": 10.0}}, "in_flight": 9.0}
    try:
        panel.server = {"alerts": {"queue_length": 8}}  # the record of a server started with --alert-queue-length 8
        panel.server_state = "running"
        panel.metrics = quiet
        assert panel.alerts == [] and panel._banner.layout.display == "none" and panel._banner.value == ""
        panel.metrics = failing
        assert [a["name"] for a in panel.alerts] == ["WorkbenchServerErrors", "WorkbenchBacklog"]
        assert panel._banner.layout.display is None and "2 alerts firing on run " + run_id in panel._banner.value
        assert "10 of 40 model requests answered 5xx: 0.25 &gt; 0.05. Read the server log" in panel._banner.value
        assert "requests in flight: 9 &gt; 8" in panel._banner.value
        panel.metrics = quiet
        assert panel.alerts == [] and panel._banner.layout.display == "none"
        panel.metrics = failing
        panel.server_state = "stopped"  # a stopped server fires nothing
        assert panel.alerts == [] and panel._banner.layout.display == "none"
        panel.server, panel.server_state = {"alerts": {"p95_latency_s": 0.3}}, "running"  # thresholds refused
        assert panel.alerts == [] and "p95_latency_s must be a bound of the latency histogram" in panel.error
    finally:
        panel.server = None
        panel.close()


def test_examples_and_drift_words():
    chat = examples("chat", "http://127.0.0.1:9", "/k/api key", run="r1")
    assert "/v1/chat/completions" in chat["curl"] and "'/k/api key'" in chat["curl"] and '"model": "r1"' in chat["curl"]
    assert "httpx.post('http://127.0.0.1:9/v1/chat/completions'" in chat["python"]
    assert "/v1/translate" in examples("seq2seq", "http://h", "/k")["curl"]
    assert [psi_words(v) for v in (None, 0.05, 0.2, 0.3)] == ["no data yet", "stable", "moderate shift", "large shift"]


def test_dashboard_has_a_deploy_tab_except_when_read_only(run):
    from widgets import Dashboard

    run_id, home = run
    dash = Dashboard(home=home, background=False)
    viewer = Dashboard(home=home, background=False, read_only=True)
    try:
        assert dash.tabs.titles[-1] == "Deploy" and dash.tabs.children[-1] is dash.deploy
        assert dash.deploy.run_id == run_id and dash.deploy.store is dash.store
        assert viewer.deploy is None and "Deploy" not in viewer.tabs.titles
        assert "Start server" not in _all_states(viewer) and "Optimise" not in _all_states(viewer)
    finally:
        for d in (dash, viewer):
            for panel in (d.model, d.data, d.method):
                if panel is not None:
                    panel.wait(60)
            d.close()


def test_without_the_serve_extra_the_panel_says_what_to_install(run, monkeypatch):
    import sys

    from workbench import WorkbenchError
    from widgets.deploy import core

    run_id, home = run
    monkeypatch.setitem(sys.modules, "workbench.deploy", None)  # as if fastapi & co. were not installed
    monkeypatch.delattr("workbench.deploy", raising=False)
    with pytest.raises(WorkbenchError, match=r"pip install 'llm-workbench\[serve\]'"):
        core()
    panel = DeployPanel(home=home, background=False)
    try:
        assert panel.run_id == run_id and "pip install 'llm-workbench[serve]'" in panel.error
        panel._start.click()
        assert panel.server_state == "stopped" and "llm-workbench[serve]" in panel.error
    finally:
        panel.close()
