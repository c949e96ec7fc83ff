"""Alerts on a served model: Prometheus alerting rules, and the same thresholds checked in Python.

`workbench serve` writes `<run dir>/deploy/alerts.yml` when it starts (`write_alert_rules`): a Prometheus rule
file (groups -> rules with alert, expr, for, labels, annotations) for that run, from an `AlertThresholds`.
Every selector names the run (`run="<run id>"`), so one Prometheus can watch several served runs: the scrape
job must attach that label to the server's target (the file's header comment holds a scrape config that does,
with the server's address and key file). `check_rule_file` validates such a file against a JSON schema written
from the Prometheus rule-file documentation and checks that each expression reads metrics the server exports.

The alerts, one row each in ALERTS (thresholds are AlertThresholds fields; their defaults in brackets):

    WorkbenchServerErrors   critical  share of model requests answered 5xx > error_rate [0.05]
    WorkbenchClientErrors   warning   share of model requests answered 4xx > client_error_rate [0.25]
    WorkbenchSlowResponses  warning   p95 latency of a model route > p95_latency_s [2.5 s]
    WorkbenchDrift          warning   PSI of a drift signal > drift_psi [0.25], on >= min_drift_samples [100] texts
    WorkbenchBacklog        warning   requests in flight (queued or running) > queue_length [64]
    WorkbenchServerDown     critical  the scrape fails (`up == 0`; Prometheus only)

The error shares and the latency count only model routes (classify, ner, translate, chat, explain: not /healthz,
/readyz, /metrics, /v1/models or unknown paths) and only over at least min_requests [20] requests. Prometheus
reads rates over `window` [5m] and fires after `for_duration` [5m] (`drift_for_duration` [15m] for drift,
1m for a server down). A PSI above 0.25 is usually read as a large shift (monitor.py).

`firing_alerts(read_metrics(info), thresholds)` checks the same thresholds on one /metrics read, for a page
with no Prometheus server. It differs in two ways: counts are since the server started (not over `window`),
and an alert fires on the read that crosses its threshold (no `for`). The p95 latency there is the upper bound
of the histogram bucket that holds it (monitor.parse_metrics); Prometheus interpolates inside that bucket. The
two agree on "p95 above the threshold" because the threshold must be a bucket bound (LATENCY_BUCKETS).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from .app import CHAT_ROUTE, EXPLAIN_ROUTE, TEXT_ROUTES, route_label
from .monitor import LATENCY_BUCKETS

ALERTS_FILE = "alerts.yml"
MODEL_ROUTES = tuple(route_label(path) for path in (*TEXT_ROUTES, CHAT_ROUTE, EXPLAIN_ROUTE))  # run the model
PROMETHEUS_SERIES = frozenset({"up"})  # written by Prometheus for each scrape, not by the server
DURATION = r"^(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?$"
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"


@dataclass(frozen=True)
class AlertThresholds:
    """When a served run's alerts fire. Rates and shares are fractions (0.05 = 5 %); durations are Prometheus
    durations ("30s", "5m", "1h")."""

    error_rate: float = 0.05  # share of model requests answered 5xx (the server failed)
    client_error_rate: float = 0.25  # share answered 4xx: a wrong key, a malformed body, a limit passed
    min_requests: int = 20  # shares and latency are judged on at least this many model requests
    p95_latency_s: float = 2.5  # p95 latency of a model route; one of LATENCY_BUCKETS
    drift_psi: float = 0.25  # population stability index of a drift signal (> 0.25: a large shift)
    min_drift_samples: int = 100  # served texts the drift signal must rest on before it can fire
    queue_length: int = 64  # requests in flight, queued or running (the /metrics request itself counts 1)
    window: str = "5m"  # the range Prometheus computes rates over
    for_duration: str = "5m"  # how long a condition must hold before Prometheus fires
    drift_for_duration: str = "15m"  # the same for drift, which moves slowly

    def __post_init__(self) -> None:
        for name in ("error_rate", "client_error_rate"):
            self._check_share(name)
        for name in ("min_requests", "min_drift_samples", "queue_length"):
            self._check_count(name)
        self._check_latency()
        if not (isinstance(self.drift_psi, (int, float)) and self.drift_psi > 0):
            raise WorkbenchError(f"drift_psi must be a number above 0, got {self.drift_psi!r}: 0.1 reads as a "
                                 "moderate shift, 0.25 as a large one")
        for name in ("window", "for_duration", "drift_for_duration"):
            self._check_duration(name)

    def _check_share(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise WorkbenchError(f"{name} must be a share in [0, 1), got {value!r}: e.g. 0.05 for 5 %")

    def _check_count(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WorkbenchError(f"{name} must be a whole number >= 1, got {value!r}")

    def _check_latency(self) -> None:
        if self.p95_latency_s not in LATENCY_BUCKETS:
            raise WorkbenchError(f"p95_latency_s must be a bound of the latency histogram, got "
                                 f"{self.p95_latency_s!r}: one of {', '.join(f'{b:g}' for b in LATENCY_BUCKETS)} "
                                 "(seconds)")

    def _check_duration(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, str) or not value or value == "0" or not re.match(DURATION, value):
            raise WorkbenchError(f"{name} must be a Prometheus duration such as 30s, 5m or 1h, got {value!r}")

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "AlertThresholds":
        """The thresholds a server record names (server.json "alerts"); the defaults when it names none."""
        given = (record or {}).get("alerts") or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in known})


@dataclass(frozen=True)
class Alert:
    """One alert: its Prometheus rule and its check on a /metrics read (`observe` gives (value, what) pairs)."""

    name: str
    severity: str
    threshold: str  # the AlertThresholds field it compares with
    pending: Callable[[AlertThresholds], str]  # the rule's `for`
    expr: Callable[[str, AlertThresholds], str]  # PromQL, given the run's selector
    summary: str  # Prometheus template; {{ $value }} is the expression's value
    action: str  # what to do
    observe: Callable[[dict[str, Any], AlertThresholds], list[tuple[float, str]]] | None


# --- PromQL --------------------------------------------------------------------------------------------------

def _selector(run_id: str, *matchers: str) -> str:
    quoted = run_id.replace("\\", "\\\\").replace('"', '\\"')
    return "{" + ",".join([f'run="{quoted}"', *matchers]) + "}"


def _models() -> str:
    return 'route=~"' + "|".join(MODEL_ROUTES) + '"'


def _share_expr(first_digit: str, field: str) -> Callable[[str, AlertThresholds], str]:
    """The share of model requests whose status starts with `first_digit`, above the threshold `field`."""
    def expr(run_id: str, t: AlertThresholds) -> str:
        every = "workbench_requests_total" + _selector(run_id, _models())
        bad = "workbench_requests_total" + _selector(run_id, _models(), f'status=~"{first_digit}.."')
        limit = getattr(t, field)
        return (f"(sum(rate({bad}[{t.window}])) / sum(rate({every}[{t.window}])) > {limit:g})"
                f" and sum(increase({every}[{t.window}])) >= {t.min_requests}")
    return expr


def _latency_expr(run_id: str, t: AlertThresholds) -> str:
    sel = _selector(run_id, _models())
    return (f"(histogram_quantile(0.95, sum by (route, le) (rate(workbench_request_latency_seconds_bucket{sel}"
            f"[{t.window}]))) > {t.p95_latency_s:g})"
            f" and on (route) sum by (route) (increase(workbench_request_latency_seconds_count{sel}[{t.window}]))"
            f" >= {t.min_requests}")


def _drift_expr(run_id: str, t: AlertThresholds) -> str:
    sel = _selector(run_id)
    return (f"workbench_drift_psi{sel} > {t.drift_psi:g}"
            f" and ignoring (signal) workbench_drift_samples{sel} >= {t.min_drift_samples}")


# --- the same checks on one /metrics read --------------------------------------------------------------------

def _share_observed(first_digit: str) -> Callable[[dict[str, Any], AlertThresholds], list[tuple[float, str]]]:
    def observe(metrics: dict[str, Any], t: AlertThresholds) -> list[tuple[float, str]]:
        counts = [(metrics.get("requests") or {}).get(route, {}) for route in MODEL_ROUTES]
        total = sum(sum(c.values()) for c in counts)
        bad = sum(v for c in counts for status, v in c.items() if str(status).startswith(first_digit))
        if total < t.min_requests:
            return []
        return [(bad / total, f"{int(bad)} of {int(total)} model requests answered {first_digit}xx")]
    return observe


def _latency_observed(metrics: dict[str, Any], t: AlertThresholds) -> list[tuple[float, str]]:
    out = []
    for route in MODEL_ROUTES:
        lat = (metrics.get("latency") or {}).get(route) or {}
        if lat.get("count", 0) >= t.min_requests and lat.get("p95") is not None:
            out.append((float(lat["p95"]), f"route {route}, {int(lat['count'])} requests"))
    return out


def _drift_observed(metrics: dict[str, Any], t: AlertThresholds) -> list[tuple[float, str]]:
    samples = metrics.get("drift_samples") or 0
    if samples < t.min_drift_samples:
        return []
    return [(float(v), f"signal {signal}, {int(samples)} texts") for signal, v in sorted(
        (metrics.get("drift") or {}).items())]


def _backlog_observed(metrics: dict[str, Any], t: AlertThresholds) -> list[tuple[float, str]]:
    return [(float(metrics.get("in_flight") or 0), "requests in flight")]


ALERTS: tuple[Alert, ...] = (
    Alert("WorkbenchServerErrors", "critical", "error_rate", lambda t: t.for_duration, _share_expr("5", "error_rate"),
          "{{ $value | humanizePercentage }} of model requests failed with 5xx",
          "Read the server log (<run dir>/deploy/server.log): 500 is a model failure, 503 a full queue "
          "(raise --max-batch-size or add a server), 504 a request past its deadline.",
          _share_observed("5")),
    Alert("WorkbenchClientErrors", "warning", "client_error_rate", lambda t: t.for_duration, _share_expr("4", "client_error_rate"),
          "{{ $value | humanizePercentage }} of model requests were refused with 4xx",
          "Check the callers: 401 is a missing or wrong API key, 413 a limit passed (--max-texts, --max-chars), "
          "422 a malformed body; the JSON error of each names the field.",
          _share_observed("4")),
    Alert("WorkbenchSlowResponses", "warning", "p95_latency_s", lambda t: t.for_duration, _latency_expr,
          "p95 latency of route {{ $labels.route }} is {{ $value }} s",
          "Serve a faster artifact (workbench optimize: int8 or ONNX), lower --max-wait-ms, or add a server; "
          "on a busy CPU check the machine's load.",
          _latency_observed),
    Alert("WorkbenchDrift", "warning", "drift_psi", lambda t: t.drift_for_duration, _drift_expr,
          "drift signal {{ $labels.signal }} moved away from the evaluation split (PSI {{ $value }})",
          "Compare recent inputs with the training data; label a sample of them and retrain or fine-tune on "
          "the new data if the model's answers are worse.",
          _drift_observed),
    Alert("WorkbenchBacklog", "warning", "queue_length", lambda t: t.for_duration,
          lambda run_id, t: f"workbench_in_flight_requests{_selector(run_id)} > {t.queue_length}",
          "{{ $value }} requests are waiting or running",
          "The server cannot keep up: add a server, serve a faster artifact, or raise --max-batch-size; "
          "callers beyond the queue get 503 with Retry-After.",
          _backlog_observed),
    Alert("WorkbenchServerDown", "critical", "", lambda t: "1m",
          lambda run_id, t: f"up{_selector(run_id)} == 0",
          "the server does not answer /metrics",
          "Check whether `workbench serve` still runs (workbench serve prints its URL; the dashboard's Deploy tab "
          "shows it) and read <run dir>/deploy/server.log; start it again.",
          None),
)


# --- the rule file -------------------------------------------------------------------------------------------

def alert_rules(run_id: str, thresholds: AlertThresholds | None = None) -> dict[str, Any]:
    """The Prometheus rule file for one served run, as a dict (groups -> rules)."""
    t = thresholds or AlertThresholds()
    rules = []
    for a in ALERTS:
        limit = f" (threshold {getattr(t, a.threshold):g})" if a.threshold else ""
        rules.append({"alert": a.name, "expr": a.expr(run_id, t), "for": a.pending(t),
                      "labels": {"severity": a.severity, "run": run_id},
                      "annotations": {"summary": f"run {run_id}: {a.summary}{limit}", "description": a.action}})
    return {"groups": [{"name": f"workbench-{run_id}", "rules": rules}]}


def scrape_config(run_id: str, target: str, key_file: str | None = None) -> dict[str, Any]:
    """A prometheus.yml scrape job for the server at `target` (host:port) that attaches the run label the
    rules select on; with the key file as its bearer credentials."""
    job: dict[str, Any] = {"job_name": f"workbench-{run_id}", "metrics_path": "/metrics"}
    if key_file:
        job["authorization"] = {"type": "Bearer", "credentials_file": key_file}
    job["static_configs"] = [{"targets": [target], "labels": {"run": run_id}}]
    return {"scrape_configs": [job]}


def write_alert_rules(deploy_dir: str | Path, run_id: str, thresholds: AlertThresholds | None = None,
                      target: str | None = None, key_file: str | None = None) -> Path:
    """Write `<deploy_dir>/alerts.yml` atomically (temp file + os.replace); its path. With `target`
    (host:port), a header comment shows the scrape job and rule_files lines that load it."""
    import yaml

    path = Path(deploy_dir) / ALERTS_FILE
    header = [f"Prometheus alerting rules for the served run {run_id} (written by workbench serve).",
              "Load them from prometheus.yml; every rule selects run=\"" + run_id + "\", a label the scrape "
              "job must attach:"]
    if target:
        header += yaml.safe_dump({**scrape_config(run_id, target, key_file), "rule_files": [str(path)]},
                                 sort_keys=False).splitlines()
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(alert_rules(run_id, thresholds),
                                                                     sort_keys=False, width=100)
    fd, tmp = tempfile.mkstemp(prefix=".alerts-", suffix=".yml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def alert_args(thresholds: AlertThresholds | None) -> list[str]:
    """`workbench serve` options for the thresholds that differ from the defaults (--alert-error-rate 0.1 ...)."""
    if thresholds is None:
        return []
    default, out = AlertThresholds(), []
    for f in dataclasses.fields(AlertThresholds):
        value = getattr(thresholds, f.name)
        if value != getattr(default, f.name):
            out += ["--alert-" + f.name.replace("_", "-"), str(value)]
    return out


# --- checking a rule file ------------------------------------------------------------------------------------

_LABELS = {"type": "object", "propertyNames": {"pattern": LABEL_NAME}, "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": DURATION, "minLength": 1}
RULE_FILE_SCHEMA: dict[str, Any] = {  # prometheus.io/docs/prometheus/latest/configuration/recording_rules
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["groups"], "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                       "query_offset": _DURATION, "limit": {"type": "integer", "minimum": 0}, "labels": _LABELS,
                       "rules": {"type": "array", "items": {  # an alerting rule, else a recording rule
                           "type": "object", "if": {"required": ["alert"]},
                           "then": {"required": ["alert", "expr"], "additionalProperties": False,
                                    "properties": {"alert": {"type": "string", "minLength": 1},
                                                   "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                                                   "keep_firing_for": _DURATION, "labels": _LABELS,
                                                   "annotations": _LABELS}},
                           "else": {"required": ["record", "expr"], "additionalProperties": False,
                                    "properties": {"record": {"type": "string", "pattern": METRIC_NAME},
                                                   "expr": {"type": "string", "minLength": 1},
                                                   "labels": _LABELS}}}}}}}},
}
_SELECTED = re.compile(r"(?<![\w:\"])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")  # a metric name before its {matchers}


def expr_metrics(expr: str) -> set[str]:
    """The metric names an expression selects. Reads names written before their `{...}` matchers, as every
    selector of `alert_rules` is (each names the run)."""
    return set(_SELECTED.findall(expr))


def exported_metrics() -> set[str]:
    """The sample names the server's /metrics can hold (counters as *_total, histograms as *_bucket,
    *_count and *_sum), from the server's own registry."""
    from .monitor import ServerMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    return {family.name + s for family in ServerMetrics().registry.collect() for s in suffixes[family.type]}


def check_rule_file(source: str | Path | dict[str, Any], known: set[str] | None = None) -> dict[str, Any]:
    """A rule file (a path, YAML text, or the dict) checked: the Prometheus rule-file structure (RULE_FILE_SCHEMA),
    group names unique, and every metric an expression selects one the server exports (`known`, by default
    `exported_metrics()`, plus Prometheus' own `up`). Returns the parsed file; WorkbenchError names the first
    problem."""
    import jsonschema
    import yaml

    where = str(source) if isinstance(source, Path) else "the rule file"
    try:
        rules = source if isinstance(source, dict) else yaml.safe_load(
            source.read_text() if isinstance(source, Path) else source)
    except (OSError, yaml.YAMLError) as exc:
        raise WorkbenchError(f"{where} cannot be read as YAML ({str(exc).splitlines()[0]}): "
                             "write it again (workbench serve writes alerts.yml)") from None
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(RULE_FILE_SCHEMA).iter_errors(rules))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise WorkbenchError(f"{where} is not a Prometheus rule file: at {at}: {error.message[:300]} (the format: groups, each a "
                             "name and rules; a rule an alert or a record, its expr, for, labels, annotations)")
    names = [g["name"] for g in rules["groups"]]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"{where}: group names must be unique, got {names}")
    allowed = (exported_metrics() if known is None else set(known)) | PROMETHEUS_SERIES
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = sorted(expr_metrics(rule["expr"]) - allowed)
            if unknown:
                raise WorkbenchError(f"{where}: rule {rule.get('alert') or rule.get('record')} reads "
                                     f"{', '.join(unknown)}, which the server does not export: use one of "
                                     f"{', '.join(sorted(allowed))}")
    return rules


# --- Python evaluation ---------------------------------------------------------------------------------------

def firing_alerts(metrics: dict[str, Any], thresholds: AlertThresholds | None = None) -> list[dict[str, Any]]:
    """The alerts a /metrics read (`read_metrics` / `monitor.parse_metrics`) crosses, each as
    {"name", "severity", "value", "threshold", "message"}: message says what crossed and what to do.
    Counts since the server started; no `for` (see the module docstring)."""
    t = thresholds or AlertThresholds()
    out = []
    for a in ALERTS:
        if a.observe is None:
            continue
        limit = getattr(t, a.threshold)
        for value, what in a.observe(metrics or {}, t):
            if value > limit:
                out.append({"name": a.name, "severity": a.severity, "value": round(value, 4), "threshold": limit,
                            "message": f"{what}: {value:.3g} > {limit:g}. {a.action}"})
    return out


__all__ = ["ALERTS", "ALERTS_FILE", "MODEL_ROUTES", "RULE_FILE_SCHEMA", "AlertThresholds", "alert_args",
           "alert_rules", "check_rule_file", "expr_metrics", "exported_metrics", "firing_alerts", "scrape_config",
           "write_alert_rules"]
