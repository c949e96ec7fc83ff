"""Deploying a trained run: a secured, monitored HTTP server and faster CPU artifacts.

Server: FastAPI on uvicorn, chosen over LitServe because the routes, the auth/limit guard, the micro-batcher
and the metrics here are each a page of code we control and test, while LitServe runs its model in worker
processes of its own (one model copy each) and would bring its own request and error format to fit around.

The API for notebooks and the dashboard (everything returns plain values):

    from workbench import deploy

    info = deploy.start_server("latest", home, artifact=None, max_batch_size=32, max_wait_ms=5)
        # a `workbench serve` process in its own session (it survives the caller, a notebook or a page
        # reload); waits until /readyz answers; returns its record, also kept in <run dir>/deploy/server.json
        # (mode 0600, the folder 0700): {"run", "pid", "host", "port", "url", "artifact", "api_key_file", ...};
        # the returned record adds "api_key", read from the key file (the one file that holds the key)
    deploy.server_status("latest", home)   # that record while the process lives, else None
    deploy.read_metrics(info)               # /metrics parsed: requests {route: {status: n}}, latency
                                            # {route: {count, sum, p50, p95}}, batches, in_flight, tokens_in,
                                            # tokens_out, texts, labels {label: n}, drift {signal: psi}
    deploy.stop_server("latest", home)      # SIGTERM: the server drains its requests, then exits
    report = deploy.optimize("latest", home, int8=True, prune=True, onnx=True,
                             progress=lambda stage, fraction: ...)
        # artifacts in <run dir>/deploy/<name>/, report in <run dir>/deploy/report.json and report.md;
        # report["artifacts"]["int8"] holds speedup, agreement, accuracy, marked, reasons, ...
    deploy.load_report("latest", home)      # the last report, or None
    deploy.serve(...)                       # blocking, in this process (what `workbench serve` runs)
    deploy.mask(key)                        # a key as it may be shown: "wb-...x7Qa"
    deploy.firing_alerts(deploy.read_metrics(info), deploy.AlertThresholds.from_record(info))
        # the alerts the last metrics read crosses: [{name, severity, value, threshold, message}]; `serve` and
        # `start_server(..., alerts=AlertThresholds(...))` write the same thresholds as Prometheus alerting rules
        # to <run dir>/deploy/alerts.yml (error rate, p95 latency, drift PSI, backlog, server down)

Limits (ServeSettings): texts are checked before any tokenizer (422 naming the field), a failed micro-batch is
retried request by request, the queue holds max_queue texts (503 + Retry-After beyond), each request waits at
most request_timeout_s (504), headers must arrive within header_timeout_s and body chunks within
body_timeout_s (408), and a server without a key answers loopback Host names and no other site (403).

Routes (every one but /healthz, /docs and /openapi.json needs `Authorization: Bearer <key>`): GET /healthz,
/readyz (the run's task and its route), /metrics, /v1/models; POST /v1/classify {"texts": [...]} (classification
and regression runs), /v1/ner {"texts": [...]} (entity spans with character offsets), /v1/translate
{"texts": [...]}, /v1/chat/completions (OpenAI-compatible, `stream: true` as server-sent events). A run answers
on its task row's route; the bodies are Pydantic models (deploy/bodies.py), so /docs shows each route's schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..run_paths import RunPaths
from .alerts import AlertThresholds, alert_rules, check_rule_file, firing_alerts, write_alert_rules
from .keys import mask
from .server import read_metrics, serve, server_status, start_server, stop_server


def optimize(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `workbench.deploy.artifacts.optimize` (imported on use: it pulls in torch and onnxruntime)."""
    from .artifacts import optimize as run

    return run(*args, **kwargs)


def load_report(run: str = "latest", home: str | Path | None = None) -> dict[str, Any] | None:
    """The run's last optimize report (<run dir>/deploy/report.json), or None."""
    from ..store import RunStore

    path = RunPaths.of(RunStore(home).get(run)).deploy / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["start_server", "stop_server", "server_status", "read_metrics", "optimize", "load_report", "serve",
           "mask", "AlertThresholds", "alert_rules", "check_rule_file", "firing_alerts", "write_alert_rules"]
