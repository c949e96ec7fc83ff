"""Alerts on a served run: the Prometheus rule file, its checks, the same thresholds in Python, the Deploy banner.

Most tests serve a stand-in classifier (no torch: it answers "neg"/"pos", waits or fails on request) with the
real app on a thread of this process, and drive real 4xx, 5xx, slow, backlogged and drifting traffic through
it. `workbench serve` writing alerts.yml and the Deploy panel's banner over a real server are tested in
test_deploy_panel.py, on the server it starts there."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest
import yaml

from workbench.deploy.adapter import ServedModel
from workbench.deploy.alerts import (ALERTS, ALERTS_FILE, AlertThresholds, alert_args, alert_rules, check_rule_file,
                                     expr_metrics, firing_alerts, write_alert_rules)
from workbench.deploy.app import ServeSettings, create_app
from workbench.deploy.monitor import Baseline
from workbench.deploy.server import ThreadedServer, read_metrics
from workbench.errors import WorkbenchError

KEY = "wb-alerts-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class StandIn:
    """A classifier's predictor in shape: "pos" for texts with "good", else "neg"; "fail" raises, and each call
    first waits `delay` seconds, or until `gate` is set when one is given."""

    task = "text-classification"
    labels = ["neg", "pos"]

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate = delay, gate

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)
        if any("fail" in t for t in texts):
            raise RuntimeError("the stand-in model failed")
        label = ["pos" if "good" in t else "neg" for t in texts]
        return [{"text": t, "label": x, "scores": {"neg": float(x == "neg"), "pos": float(x == "pos")}}
                for t, x in zip(texts, label)]


def _serve(predictor: StandIn, baseline: Baseline | None = None, **settings) -> ThreadedServer:
    app, _ = create_app(ServedModel(predictor, "stand-in"), ServeSettings(**settings), KEY,
                        baseline=(lambda served: baseline) if baseline else None)
    return ThreadedServer(app)


def _names(alerts: list[dict]) -> list[str]:
    return [a["name"] for a in alerts]


# --- thresholds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("error_rate", 1.5, r"error_rate must be a share in \[0, 1\), got 1.5"),
    ("client_error_rate", "0.2", r"client_error_rate must be a share"),
    ("min_requests", 0, r"min_requests must be a whole number >= 1, got 0"),
    ("queue_length", 2.5, r"queue_length must be a whole number"),
    ("p95_latency_s", 0.3, r"p95_latency_s must be a bound of the latency histogram, got 0.3: one of 0.005, "),
    ("drift_psi", 0, r"drift_psi must be a number above 0"),
    ("window", "5 minutes", r"window must be a Prometheus duration such as 30s, 5m or 1h, got '5 minutes'"),
    ("for_duration", "", r"for_duration must be a Prometheus duration"),
])
def test_thresholds_refuse_bad_values_naming_the_field(field, value, match):
    with pytest.raises(WorkbenchError, match=match):
        AlertThresholds(**{field: value})


def test_thresholds_round_trip_through_a_server_record_and_serve_options():
    t = AlertThresholds(error_rate=0.1, p95_latency_s=0.5, drift_for_duration="1h")
    assert AlertThresholds.from_record({"alerts": dataclasses.asdict(t)}) == t
    assert AlertThresholds.from_record({"run": "r"}) == AlertThresholds() == AlertThresholds.from_record(None)
    assert alert_args(None) == [] == alert_args(AlertThresholds())
    assert alert_args(t) == ["--alert-error-rate", "0.1", "--alert-p95-latency-s", "0.5",
                             "--alert-drift-for-duration", "1h"]


# --- the rule file -------------------------------------------------------------------------------------------

def test_rules_carry_each_threshold_duration_severity_and_an_action():
    t = AlertThresholds(error_rate=0.02, queue_length=7, drift_psi=0.4, for_duration="2m", window="10m")
    rules = {r["alert"]: r for r in alert_rules("run-9", t)["groups"][0]["rules"]}
    assert list(rules) == [a.name for a in ALERTS]
    assert "> 0.02)" in rules["WorkbenchServerErrors"]["expr"] and "[10m]" in rules["WorkbenchServerErrors"]["expr"]
    assert rules["WorkbenchBacklog"]["expr"] == 'workbench_in_flight_requests{run="run-9"} > 7'
    assert "workbench_drift_psi{run=\"run-9\"} > 0.4" in rules["WorkbenchDrift"]["expr"]
    assert rules["WorkbenchServerErrors"]["for"] == "2m" and rules["WorkbenchDrift"]["for"] == "15m"
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["labels"]["run"] == "run-9"
        assert "run-9" in rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40
        assert 'run="run-9"' in rule["expr"]


def _broken(mutate) -> dict:
    rules = alert_rules("r1")
    mutate(rules)
    return rules


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["groups"][0]["rules"][0].pop("expr"), r"at groups/0/rules/0: .*'expr' is a required property"),
    (lambda r: r["groups"][0]["rules"][0].update({"for": "5 minutes"}), r"at groups/0/rules/0/for: '5 minutes'"),
    (lambda r: r["groups"][0]["rules"][1].update({"severity": "page"}), r"at groups/0/rules/1: Additional properties are not allowed \('severity' was"),
    (lambda r: r["groups"][0]["rules"][0].update({"record": "x"}), r"at groups/0/rules/0: Additional properties .*'record'"),
    (lambda r: r["groups"][0]["rules"][0]["labels"].update({"bad-name": "x"}), r"at groups/0/rules/0/labels: 'bad-name' does not match"),
    (lambda r: r["groups"][0].pop("name"), r"at groups/0: 'name' is a required property"),
    (lambda r: r.update({"rules": []}), r"at top level: Additional properties"),
    (lambda r: r["groups"].append(dict(r["groups"][0])), r"group names must be unique"),
    (lambda r: r["groups"][0]["rules"][0].update({"expr": 'workbench_errors_total{run="r1"} > 0'}),
     r"rule WorkbenchServerErrors reads workbench_errors_total, which the server does not export"),
])
def test_a_broken_rule_file_is_rejected_naming_the_problem(mutate, match):
    assert check_rule_file(alert_rules("r1"))["groups"][0]["name"] == "workbench-r1"  # the unbroken one passes
    with pytest.raises(WorkbenchError, match=match):
        check_rule_file(_broken(mutate))


def test_rule_file_that_is_not_yaml_is_rejected(tmp_path):
    path = tmp_path / ALERTS_FILE
    path.write_text("groups: [\n  - name: x\n    rules: {")
    with pytest.raises(WorkbenchError, match=r"alerts.yml cannot be read as YAML"):
        check_rule_file(path)


def test_every_expression_parses_as_promql_and_names_the_metrics_it_reads():
    """promql-parser (the Rust PromQL parser's Python binding) parses each expression offline."""
    promql = pytest.importorskip("promql_parser")

    for rule in alert_rules('run "7"')["groups"][0]["rules"]:
        names: set[str] = set()
        promql.walk(promql.parse(rule["expr"]),
                    pre_visit=lambda node: names.add(node.name) if isinstance(node, promql.VectorSelector) else None)
        assert names == expr_metrics(rule["expr"]) and names, rule["alert"]
    with pytest.raises(ValueError):
        promql.parse("sum(rate(workbench_requests_total[5m]) > 0.05")


# --- a served stand-in: real /metrics, real errors ---------------------------------------------------------------

def test_every_metric_a_rule_reads_is_in_a_real_scrape():
    from prometheus_client.parser import text_string_to_metric_families

    baseline = Baseline.from_eval(["neg", "pos"] * 10, [10, 20] * 10)
    with _serve(StandIn(), baseline) as url:
        assert httpx.post(url + "/v1/classify", json={"texts": ["good film"]}, headers=AUTH).status_code == 200
        text = httpx.get(url + "/metrics", headers=AUTH).text
    scraped = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    rules = alert_rules("stand-in")
    for rule in rules["groups"][0]["rules"]:
        assert expr_metrics(rule["expr"]) <= scraped | {"up"}, rule["alert"]
    check_rule_file(rules, known=scraped)
    with pytest.raises(WorkbenchError, match="reads workbench_request_latency_seconds_bucket"):
        check_rule_file(rules, known=scraped - {"workbench_request_latency_seconds_bucket"})


def test_server_and_client_errors_fire_past_their_share_and_not_before():
    t = AlertThresholds()  # 5 % 5xx, 25 % 4xx, over at least 20 model requests
    with _serve(StandIn()) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):
            assert client.post("/v1/classify", json={"texts": ["fail"]}, headers=AUTH).status_code == 500
        assert firing_alerts(read_metrics(url, KEY), t) == []  # 3 of 3 failed, but too few to judge
        for _ in range(17):
            assert client.post("/v1/classify", json={"texts": ["good"]}, headers=AUTH).status_code == 200
        for _ in range(20):  # /healthz and /metrics are no model routes: they change no share
            client.get("/healthz")
        fired = firing_alerts(read_metrics(url, KEY), t)
        assert _names(fired) == ["WorkbenchServerErrors"]
        assert fired[0]["value"] == 0.15 and fired[0]["threshold"] == 0.05
        assert fired[0]["message"].startswith("3 of 20 model requests answered 5xx: 0.15 > 0.05. Read the server log")
        for _ in range(40):
            assert client.post("/v1/classify", json={"texts": ["good"]}, headers=AUTH).status_code == 200
        assert firing_alerts(read_metrics(url, KEY), t) == []  # 3 of 60: under 5 %
        for _ in range(25):
            assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 401  # no key
        fired = firing_alerts(read_metrics(url, KEY), t)
    assert _names(fired) == ["WorkbenchClientErrors"] and fired[0]["value"] == round(25 / 85, 4)
    assert "25 of 85 model requests answered 4xx" in fired[0]["message"] and "401" in fired[0]["message"]


def test_slow_responses_fire_the_latency_alert_at_its_threshold_only():
    with _serve(StandIn(delay=0.06)) as url:
        for _ in range(5):
            assert httpx.post(url + "/v1/classify", json={"texts": ["good"]}, headers=AUTH).status_code == 200
        m = read_metrics(url, KEY)
    assert m["latency"]["classify"]["p95"] >= 0.1  # each call waited 60 ms: the (0.05, 0.1] bucket or above
    fired = firing_alerts(m, AlertThresholds(p95_latency_s=0.05, min_requests=5))
    assert _names(fired) == ["WorkbenchSlowResponses"] and fired[0]["message"].startswith("route classify, 5 ")
    assert firing_alerts(m, AlertThresholds(p95_latency_s=5.0, min_requests=5)) == []
    assert firing_alerts(m, AlertThresholds(p95_latency_s=0.05, min_requests=6)) == []  # too few requests


def test_a_backlog_fires_while_requests_wait_and_clears_when_they_are_answered():
    gate = threading.Event()
    t = AlertThresholds(queue_length=5)
    with _serve(StandIn(gate=gate), max_batch_size=1) as url:
        codes: list[int] = []
        calls = [threading.Thread(target=lambda: codes.append(httpx.post(
            url + "/v1/classify", json={"texts": ["good"]}, headers=AUTH, timeout=60).status_code)) for _ in range(6)]
        for c in calls:
            c.start()
        deadline = time.monotonic() + 20
        while (m := read_metrics(url, KEY))["in_flight"] < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = firing_alerts(m, t)
        gate.set()
        for c in calls:
            c.join()
        after = firing_alerts(read_metrics(url, KEY), t)
    assert codes == [200] * 6
    assert _names(waiting) == ["WorkbenchBacklog"] and waiting[0]["value"] == 7  # 6 waiting + this read
    assert after == []


def test_drift_fires_on_enough_shifted_texts_only():
    baseline = Baseline.from_eval(["neg"] * 50 + ["pos"] * 50, [10 + i % 20 for i in range(100)])
    with _serve(StandIn(), baseline, max_texts=64) as url:
        shifted = ["good " + "long text " * 40] * 30  # 400+ characters, all "pos": both signals move
        assert httpx.post(url + "/v1/classify", json={"texts": shifted}, headers=AUTH).status_code == 200
        m = read_metrics(url, KEY)
    assert m["drift_samples"] == 30 and all(v > 0.25 for v in m["drift"].values())
    fired = firing_alerts(m, AlertThresholds(min_drift_samples=30))
    assert _names(fired) == ["WorkbenchDrift", "WorkbenchDrift"]
    assert [f["message"].split(",")[0] for f in fired] == ["signal input_length", "signal predicted_label"]
    assert firing_alerts(m, AlertThresholds()) == []  # 30 texts: under the default 100
    assert firing_alerts(m, AlertThresholds(min_drift_samples=30, drift_psi=50.0)) == []


# --- the file serve writes ----------------------------------------------------------------------------------------

def test_written_rules_load_back_and_their_header_holds_a_scrape_job_for_the_run(tmp_path):
    path = write_alert_rules(tmp_path, "run-3", AlertThresholds(drift_psi=0.1), target="127.0.0.1:8123",
                             key_file="/keys/api_key")
    assert path == tmp_path / ALERTS_FILE and [p.name for p in tmp_path.iterdir()] == [ALERTS_FILE]  # no temp left
    assert check_rule_file(path) == alert_rules("run-3", AlertThresholds(drift_psi=0.1))
    header = yaml.safe_load("\n".join(line[2:] for line in path.read_text().splitlines()
                                      if line.startswith("# ")).split("attach:", 1)[1])
    job = header["scrape_configs"][0]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8123"], "labels": {"run": "run-3"}}]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/keys/api_key"}
    assert header["rule_files"] == [str(path)]


def test_the_cli_reads_its_alert_options_back_into_the_same_thresholds():
    from workbench.cli import _alert_thresholds, _parser

    t = AlertThresholds(error_rate=0.1, p95_latency_s=0.5, window="1m", min_requests=7)
    args = _parser().parse_args(["serve", "r", *alert_args(t)])
    assert _alert_thresholds(args) == t
    assert _alert_thresholds(_parser().parse_args(["serve", "r"])) == AlertThresholds()
    with pytest.raises(WorkbenchError):
        _alert_thresholds(_parser().parse_args(["serve", "r", "--alert-error-rate", "2"]))
