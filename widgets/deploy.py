"""DeployPanel: optimise a trained run, serve it behind its own HTTP server, and watch that server live.

Everything heavy is `workbench.deploy`: `optimize` (int8, structured pruning, ONNX, with a progress callback),
`start_server` / `stop_server` / `server_status` (a `workbench serve` process in its own session: a page
reload or a kernel restart neither stops nor loses it) and `read_metrics` (its /metrics as plain values).
This panel picks the run, shows the report as a table and a figure, the URL, the masked key and two
ready-to-run examples, and polls /metrics once a second while the server runs. A banner at the top lists the
alerts that read crosses (`workbench.deploy.alerts.firing_alerts`, at the thresholds the server was started
with: the same as its alerts.yml for Prometheus) and hides when none fire. Below, the run's model card
(`workbench.model_card`) is shown as Markdown the page renders (its sanitiser applies; the card escapes every
text from the data), and "Write README.md" puts it into the run's export.

The API key itself never leaves the kernel: the page gets the masked key and the examples read the key
from its file (mode 0600) on the machine that runs the server.
"""

from __future__ import annotations

import html
import json
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

from workbench import WorkbenchError
from workbench.export import export_dir, read_export_info
from workbench.model_card import model_card, write_model_card
from workbench.run_paths import RunPaths
from workbench.store import RunStore
from workbench.task_table import DEFAULT_TASK, TASKS, task_spec

from . import _style as S
from ._background import Poller, run_job
from ._figure import LiveFigure

POLL_S = 1.0  # /metrics is read once a second while a server runs
PROGRESS_EVERY_S = 0.2  # progress redraws at most this often (STYLE: live plots ~0.2 s)
SERVER_STATES = ("stopped", "starting", "running", "stopping")
SERVICE_ROUTES = ("healthz", "readyz", "metrics", "models", "other")  # /metrics' routes that run no model
EXAMPLE_TEXT = {"encoder": "The striker scored twice in the cup final.",
                "tokens": "Barack Obama met Angela Merkel in Paris on Monday."}  # by the task row's kind
MARKED_COLOR = "#d62728"
BANNER_STYLE = ("border:1px solid {color}; border-left-width:6px; padding:4px 8px; margin:4px 0; "
                "background:rgba(211, 47, 47, 0.06)")


def core() -> Any:
    """`workbench.deploy`, imported on first use: it needs the serve extra (fastapi, uvicorn, onnxruntime...),
    which a notebook that never deploys does without."""
    try:
        from workbench import deploy
    except ImportError as exc:
        raise WorkbenchError(f"deploying needs the serve extra ({exc.name or exc} is not installed): "
                             "pip install 'llm-workbench[serve]'") from None
    return deploy


def unexpected(what: str, exc: BaseException, chars: int = 300) -> str:
    """One line for the page about an unexpected failure; its traceback goes to the server's log (the kernel's
    own stderr: under Voila, the dashboard server's output), never to the page."""
    print(f"DeployPanel: {what}:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
          file=sys.__stderr__, flush=True)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{what} ({type(exc).__name__}: {first[:chars]})"


def psi_words(value: float | None) -> str:
    """How a population stability index is usually read."""
    if value is None:
        return "no data yet"
    if value < 0.1:
        return "stable"
    if value < 0.25:
        return "moderate shift"
    return "large shift"


def firing(metrics: dict[str, Any], record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The alerts a /metrics read crosses, at the thresholds in the server's record (the defaults if it names
    none): what `deploy.alerts.firing_alerts` gives."""
    if not metrics:
        return []
    core()  # the serve extra, or words on what to install
    from workbench.deploy.alerts import AlertThresholds, firing_alerts

    return firing_alerts(metrics, AlertThresholds.from_record(record))


def banner_html(alerts: list[dict[str, Any]], run_id: str) -> str:
    """The alerts as a banner: one line each, its name, severity and message (what crossed, what to do)."""
    items = "".join(f"<li><b>{html.escape(a['name'])}</b> ({html.escape(a['severity'])}): "
                    f"{html.escape(a['message'])}</li>" for a in alerts)
    head = f"{len(alerts)} alert{'s' if len(alerts) != 1 else ''} firing on run {html.escape(run_id)}"
    return (f'<div style="{BANNER_STYLE.format(color=S.ERROR_COLOR)}"><b style="color:{S.ERROR_COLOR}">'
            f'&#9888; {head}</b><ul style="margin:2px 0 2px 1.2em; padding:0">{items}</ul></div>')


def model_routes(requests: dict[str, Any]) -> list[str]:
    """The routes of a /metrics read that run the model (what "requests" counts), in a stable order."""
    return sorted(r for r in requests if r not in SERVICE_ROUTES)


def examples(task: str, url: str, key_file: str, run: str = "run") -> dict[str, str]:
    """A curl and a Python (httpx) call of the served run on its task's route (the task table's); the key is
    read from its file, never shown."""
    spec = TASKS.get(task) or task_spec(DEFAULT_TASK)
    route = spec.route
    if spec.system_prompt:  # a conversation: the OpenAI-compatible body
        body: dict[str, Any] = {"model": run, "messages": [{"role": "user", "content": "Hello!"}],
                                "max_tokens": 32}
    else:
        body = {"texts": [EXAMPLE_TEXT.get(spec.kind, EXAMPLE_TEXT["encoder"])]}
    key = f"$(cat {shlex.quote(key_file)})" if key_file else "KEY"
    curl = (f"curl -s {url}{route} \\\n  -H \"Authorization: Bearer {key}\" \\\n"
            f"  -H 'Content-Type: application/json' \\\n  -d {shlex.quote(json.dumps(body))}")
    python = ("import httpx\n"
              f"key = open({key_file!r}).read().strip()\n"
              f"r = httpx.post({(url + route)!r}, json={body!r},\n"
              "               headers={'Authorization': f'Bearer {key}'}, timeout=60)\n"
              "print(r.json())")
    return {"curl": curl, "python": python}


class DeployPanel(W.VBox):
    """Optimise, serve and monitor one trained run (`run_id`); the server outlives the panel and the page."""

    run_id = T.Unicode("", help="the run deployed")
    runs = T.List(T.Unicode(), help="runs with a trained model (every task the server serves)")
    task = T.Unicode("", help="the chosen run's task")
    int8 = T.Bool(True, help="make an int8 artifact (dynamic quantisation; the faster of torch and onnxruntime)")
    prune = T.Bool(False, help="make a pruned artifact (attention heads and feed-forward neurons cut out)")
    onnx = T.Bool(False, help="export the merged fp32 model to ONNX")
    optimizing = T.Bool(False)
    stage = T.Unicode("", help="what optimize is doing now")
    progress = T.Float(0.0, help="fraction of that stage done (0..1)")
    report = T.Dict(allow_none=True, default_value=None, help="the run's optimize report (deploy.load_report)")
    artifact = T.Unicode("fp32", help="what the server serves: fp32 or an artifact of the report")
    artifacts = T.List(T.Unicode(), help="what can be served: fp32 and the report's artifacts")
    server_state = T.Enum(SERVER_STATES, default_value="stopped")
    url = T.Unicode("", help="the server's URL while it runs")
    masked_key = T.Unicode("", help="the API key as it may be shown (deploy.mask)")
    metrics = T.Dict(help="the last /metrics read (deploy.read_metrics)")
    requests_total = T.Int(0, help="model requests answered since the server started (every status)")
    requests_per_second = T.Float(0.0, help="model requests per second between the last two reads")
    p95_ms = T.Float(None, allow_none=True, help="p95 latency of the model route (histogram bucket bound), ms")
    label_counts = T.Dict(help="predicted labels served so far")
    drift = T.Dict(help="population stability index per signal (predicted_label or predicted_value, input_length)")
    alerts = T.List(T.Dict(), help="alerts the last /metrics read crosses: name, severity, value, threshold, "
                                   "message (deploy.alerts.firing_alerts)")
    card = T.Unicode("", help="the chosen run's model card (Markdown with its YAML front matter)")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, run_id: str = "", background: bool = True,
                 store: RunStore | None = None, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self.server: dict[str, Any] | None = None  # the record with the key: kept here, never synced
        self._lock = threading.Lock()
        self._last: tuple[float, float] | None = None  # (time, model requests) of the previous read
        self._last_draw = 0.0
        self._poller = Poller(self._tick, POLL_S, name="deploy-metrics-poll")
        self._tasks: dict[str, str] = {}
        super().__init__(children=self._build(), **{"layout": S.full_width(), **kwargs})
        self._wire()
        self.refresh_runs()  # chooses the newest run
        if run_id:
            self.run_id = run_id

    # --- building -----------------------------------------------------------------------------------
    def _build(self) -> list[W.Widget]:
        style = S.label_style()
        self._run = W.Dropdown(options=[], description="Run", style=style, layout=S.full_width(max_width="48em"))
        refresh = W.Button(description="Refresh runs", icon="refresh", layout=W.Layout(width="auto"))
        refresh.on_click(lambda _: self.refresh_runs())
        self._boxes = {name: W.Checkbox(description=text, indent=False, layout=W.Layout(width="auto"))
                       for name, text in (("int8", "int8"), ("prune", "prune heads/neurons"), ("onnx", "ONNX"))}
        self._optimize = W.Button(description="Optimise", icon="bolt", button_style="primary",
                                  layout=W.Layout(width="auto"))
        self._optimize.on_click(lambda _: self.optimize())
        self._bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=S.full_width())
        self._stage = W.HTML("", layout=S.full_width())
        self._report_table = W.HTML("", layout=S.full_width())
        self.fig = LiveFigure(  # a page opened at any time shows the current report
            # offsetgroup: side by side although on two y axes (barmode "group" alone overlays them)
            data=[go.Bar(x=[], y=[], name="samples/s at batch 32", text=[], textposition="outside",
                         offsetgroup="throughput",
                         hovertemplate="%{x}: %{y:.1f} samples/s<br>%{text}<extra></extra>"),
                  go.Bar(x=[], y=[], name="p50 latency at batch 1 (ms)", yaxis="y2", opacity=0.6,
                         offsetgroup="latency", marker={"color": S.RUN_COLORS[1]},
                         hovertemplate="%{x}: %{y:.1f} ms<extra></extra>")],
            layout=S.figure_layout(height=320, barmode="group",
                                   yaxis={"title": {"text": "samples/s (batch 32)"}, "gridcolor": S.GRID_GREY},
                                   yaxis2={"title": {"text": "ms (batch 1, p50)"}, "overlaying": "y",
                                           "side": "right", "showgrid": False},
                                   xaxis={"type": "category"}))
        self._serve_pick = W.Dropdown(options=["fp32"], value="fp32", description="Serve", style=style,
                                      layout=S.control_layout())
        self._start = W.Button(description="Start server", icon="play", button_style="success",
                               layout=W.Layout(width="auto"))
        self._stop = W.Button(description="Stop server", icon="stop", button_style="warning", disabled=True,
                              layout=W.Layout(width="auto"))
        self._start.on_click(lambda _: self.start())
        self._stop.on_click(lambda _: self.stop())
        self._server_html = W.HTML("", layout=S.full_width())
        self._curl = W.Textarea(description="curl", disabled=True, rows=5, style=style, layout=S.full_width())
        self._python = W.Textarea(description="Python", disabled=True, rows=6, style=style, layout=S.full_width())
        self._metrics_html = W.HTML("", layout=S.full_width())
        self._write_card = W.Button(description="Write README.md", icon="file-text-o", layout=W.Layout(width="auto"),
                                    tooltip="write this card into the run's export (workbench export RUN)")
        self._write_card.on_click(lambda _: self.write_card())
        self._card_status = W.HTML("", layout=S.full_width())
        self._card_view = W.Output(layout=S.full_width(max_height="40em", overflow="auto",
                                                       border="1px solid var(--jp-border-color2, #ddd)"))
        self._error_html = S.inline_error()
        self._banner = W.HTML("", layout=S.full_width(display="none"))
        return [W.Box([self._run, refresh], layout=S.wrap_row()), self._error_html, self._banner,
                S.section("Optimise"), W.Box([*self._boxes.values(), self._optimize], layout=S.wrap_row()),
                self._bar, self._stage, self._report_table, self.fig,
                S.section("Serve"), W.Box([self._serve_pick, self._start, self._stop], layout=S.wrap_row()),
                self._server_html, self._curl, self._python,
                S.section("Live metrics"), self._metrics_html,
                S.section("Model card"), W.Box([self._write_card, self._card_status], layout=S.wrap_row()),
                self._card_view]

    def _wire(self) -> None:
        for name, box in self._boxes.items():
            box.value = getattr(self, name)
            W.link((self, name), (box, "value"))
        self._run.observe(self._on_run_control, names="value")
        self._serve_pick.observe(self._on_serve_control, names="value")
        self.observe(self._on_run, names="run_id")
        self.observe(self._show_error, names="error")
        self.observe(self._show_progress, names=["stage", "progress", "optimizing"])
        self.observe(self._show_report, names="report")
        self.observe(self._show_server, names=["server_state", "url", "masked_key", "artifact"])
        self.observe(self._show_metrics, names=["metrics"])
        self.observe(self._check_alerts, names=["metrics", "server_state"])
        self.observe(self._show_alerts, names="alerts")
        self.observe(self._show_card, names="card")
        self._show_report()
        self._show_server()
        self._show_metrics()
        self._show_card()

    # --- validation -----------------------------------------------------------------------------------
    @T.validate("run_id")
    def _valid_run(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value and value not in self.runs:
            raise T.TraitError(f"run {value!r} has no trained model: choose one of {', '.join(self.runs) or 'none'}")
        return value

    @T.validate("artifact")
    def _valid_artifact(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value != "fp32" and value not in self.artifacts:
            raise T.TraitError(f"artifact {value!r} is not made for this run: one of {', '.join(self.artifacts)} "
                               "(Optimise makes the others)")
        return value

    # --- runs -------------------------------------------------------------------------------------------
    def refresh_runs(self) -> None:
        """Find the runs with a trained model (classification, regression, chat and seq2seq: the server serves
        each through its own route)."""
        try:
            records = self.store.list()
        except Exception as exc:
            self.error = unexpected("could not read the runs", exc)
            return
        ready = [r for r in records if RunPaths.of(r).trainable.is_file()]
        self._tasks = {r["id"]: (r.get("config") or {}).get("task", DEFAULT_TASK) for r in ready}
        self.runs = [r["id"] for r in ready]
        names = {r["id"]: r.get("name") for r in ready}
        # the run shown stays; else the newest (the store lists newest first)
        keep = self.run_id if self.run_id in self.runs else (self.runs[0] if self.runs else "")
        self._run.options = [(f"{i} ({names[i]}, {self._tasks[i]})" if names[i] else f"{i} ({self._tasks[i]})", i)
                             for i in self.runs]
        self._run.value = keep or None
        self.run_id = keep

    def _on_run_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if isinstance(value, str) and value in self.runs and value != self.run_id:
            self.run_id = value

    def _on_serve_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if isinstance(value, str) and (value == "fp32" or value in self.artifacts):
            self.artifact = value

    def _on_run(self, change: Any = None) -> None:
        """Another run: its task, its last report, and its server if one runs (a page reload finds it here)."""
        self._poller.stop()
        self._last = None
        if self._run.value != self.run_id:
            self._run.value = self.run_id or None
        self.task = self._tasks.get(self.run_id, "")
        self.error, self.stage, self.progress = "", "", 0.0
        self.metrics, self.requests_total, self.requests_per_second, self.p95_ms = {}, 0, 0.0, None
        self.label_counts, self.drift = {}, {}
        self.server, self.url, self.masked_key, self.server_state = None, "", "", "stopped"
        self._card_status.value = ""
        self.show_card()
        if not self.run_id:
            self.report = None
            return
        try:
            self.report = core().load_report(self.run_id, self.store.home)
            info = core().server_status(self.run_id, self.store.home)
        except Exception as exc:
            self.error = f"run {self.run_id}: {exc}"
            return
        if info is not None:
            self._attach(info)

    # --- optimise -------------------------------------------------------------------------------------
    def optimize(self) -> None:
        """Make the ticked artifacts and measure them against fp32 (on a worker thread); errors show inline."""
        if self.optimizing:
            self.error = "optimise is already running"
            return
        if not self.run_id:
            self.error = "no run chosen: train one first, then press Refresh runs"
            return
        if self.task not in TASKS or not TASKS[self.task].optimizable:
            which = " and ".join(n for n, t in TASKS.items() if t.optimizable)
            self.error = (f"run {self.run_id} is a {self.task} run: Optimise makes int8, pruned and ONNX artifacts "
                          f"of {which} runs; serve this one as fp32")
            return
        if not (self.int8 or self.prune or self.onnx):
            self.error = "nothing to make: tick at least one of int8, prune, ONNX"
            return
        self.error, self.optimizing, self.stage, self.progress = "", True, "starting", 0.0
        self._optimize.disabled = True
        run_id, asked = self.run_id, dict(int8=self.int8, prune=self.prune, onnx=self.onnx)
        run_job(lambda: self._optimize_job(run_id, asked), sync=not self.background, name="deploy-optimize")

    def _on_progress(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != self.stage or fraction >= 1.0 or now - self._last_draw >= PROGRESS_EVERY_S:
            self._last_draw = now
            self.stage, self.progress = stage, max(0.0, min(1.0, float(fraction)))

    def _optimize_job(self, run_id: str, asked: dict[str, bool]) -> None:
        try:
            report = core().optimize(run_id, self.store.home, progress=self._on_progress, **asked)
        except WorkbenchError as exc:
            self.error, self.stage = str(exc), "failed"
        except Exception as exc:  # an unexpected failure still reads as words, not a traceback
            self.error, self.stage = unexpected("optimise failed", exc), "failed"
        else:
            if run_id == self.run_id:
                self.report = report
            self.stage, self.progress = "done", 1.0
        finally:
            self.optimizing = False
            self._optimize.disabled = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until optimise or a server start/stop has finished (scripts, notebooks, tests): on the panel's
        state, however slow the machine; `timeout` (seconds) gives up earlier and returns False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.optimizing or self.server_state in ("starting", "stopping"):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    # --- serve ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the run's server as its own process (on a worker thread: loading takes seconds)."""
        if self.server_state != "stopped":
            self.error = f"the server is {self.server_state}: stop it first"
            return
        if not self.run_id:
            self.error = "no run chosen: train one first, then press Refresh runs"
            return
        self.error, self.server_state = "", "starting"
        run_id, artifact = self.run_id, None if self.artifact == "fp32" else self.artifact
        run_job(lambda: self._start_job(run_id, artifact), sync=not self.background, name="deploy-start")

    def _start_job(self, run_id: str, artifact: str | None) -> None:
        try:
            info = core().start_server(run_id, self.store.home, artifact=artifact)
        except WorkbenchError as exc:
            self.error, self.server_state = str(exc), "stopped"
            return
        except Exception as exc:
            self.error = unexpected("the server did not start", exc)
            self.server_state = "stopped"
            return
        if run_id != self.run_id:  # another run was chosen meanwhile: the server runs on, found when chosen again
            return
        self._attach(info)

    def _attach(self, info: dict[str, Any]) -> None:
        self.server = info
        self._last = None
        if info.get("artifact") and info["artifact"] != self.artifact and (
                info["artifact"] == "fp32" or info["artifact"] in self.artifacts):
            self.artifact = info["artifact"]
        self.url = str(info.get("url", ""))
        self.masked_key = core().mask(info["api_key"]) if info.get("api_key") else "none (loopback, open)"
        self.server_state = "running"
        self.refresh_metrics()
        if self.background:
            self._poller.start()

    def stop(self) -> None:
        """SIGTERM the run's server: it drains the requests in flight, then exits."""
        if self.server_state != "running":
            return
        self._poller.stop()
        self.server_state = "stopping"
        run_id = self.run_id
        run_job(lambda: self._stop_job(run_id), sync=not self.background, name="deploy-stop")

    def _stop_job(self, run_id: str) -> None:
        try:
            core().stop_server(run_id, self.store.home)
        except Exception as exc:
            self.error = unexpected("could not stop the server", exc)
        self.server, self.url, self.masked_key, self.server_state = None, "", "", "stopped"

    # --- metrics --------------------------------------------------------------------------------------
    def refresh_metrics(self) -> bool:
        """Read /metrics now; True while the server answers."""
        info = self.server
        if info is None:
            return False
        try:
            m = core().read_metrics(info)
        except Exception as exc:  # the server went away (stopped elsewhere, killed): say so, stop polling
            if core().server_status(self.run_id, self.store.home) is None:
                self.error = f"the server of run {self.run_id} is no longer running"
                self.server, self.url, self.masked_key, self.server_state = None, "", "", "stopped"
            else:
                self.error = unexpected(f"could not read {info.get('url')}/metrics", exc, 200)
            return False
        now = time.monotonic()
        models = model_routes({**m["requests"], **m["latency"]})
        total = sum(v for route in models for v in m["requests"].get(route, {}).values())
        with self._lock:
            last, self._last = self._last, (now, total)
        if last is not None and now > last[0]:
            self.requests_per_second = round(max(0.0, total - last[1]) / (now - last[0]), 2)
        routes = [r for r in models if m["latency"].get(r, {}).get("count")]
        p95 = m["latency"][routes[0]].get("p95") if routes else None
        self.p95_ms = None if p95 is None else round(1000 * float(p95), 1)
        self.requests_total = int(total)
        self.label_counts = {k: int(v) for k, v in m.get("labels", {}).items()}
        self.drift = {k: round(float(v), 4) for k, v in m.get("drift", {}).items()}
        self.metrics = m
        return True

    def _check_alerts(self, change: Any = None) -> None:
        """The alerts of the last read while the server runs; none once it stops."""
        try:
            self.alerts = firing(self.metrics, self.server) if self.server_state == "running" else []
        except Exception as exc:  # a record with thresholds this version refuses: say so, keep the page alive
            self.alerts = []
            self.error = str(exc) if isinstance(exc, WorkbenchError) else unexpected("could not check alerts", exc)

    def _tick(self) -> bool:
        try:
            return self.refresh_metrics()
        except Exception as exc:  # keep the page alive; say what went wrong
            self.error = unexpected("stopped reading metrics", exc)
            return False

    # --- model card -----------------------------------------------------------------------------------
    def show_card(self) -> None:
        """Build the chosen run's card from its record and reports (the export's load lines when it has one)."""
        if not self.run_id:
            self.card = ""
            return
        try:
            record = self.store.get(self.run_id)
            self.card = model_card(record, read_export_info(export_dir(record["id"], self.store.home)))
        except WorkbenchError as exc:
            self.card, self.error = "", str(exc)
        except Exception as exc:  # a report the card cannot read still leaves the panel working
            self.card, self.error = "", unexpected("could not build the model card", exc)

    def write_card(self) -> Path | None:
        """Write the card, rebuilt from the newest reports, as README.md into the run's export; its path."""
        if not self.run_id:
            self.error = "no run chosen: train one first, then press Refresh runs"
            return None
        target = export_dir(self.run_id, self.store.home)
        info = read_export_info(target)
        if info is None:
            self.error = (f"run {self.run_id} has no export in {target}: export it first "
                          f"(workbench export {self.run_id} --merge), then write its README.md")
            return None
        try:
            path = write_model_card(self.store.get(self.run_id), target, info)
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, WorkbenchError) else unexpected("could not write the card", exc)
            return None
        self.show_card()
        self._card_status.value = S.message(f"written: {path}", "ok")
        return path

    # --- view -----------------------------------------------------------------------------------------
    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_progress(self, change: Any = None) -> None:
        self._bar.value = self.progress
        self._bar.bar_style = "danger" if self.stage == "failed" else "success" if self.stage == "done" else ""
        if self.optimizing:
            self._stage.value = S.message(f"{self.stage} ({100 * self.progress:.0f}%)", "muted")
        elif self.stage == "done":
            self._stage.value = S.message("done: the report below is new", "ok")
        else:
            self._stage.value = S.message("" if self.report else
                                          "no report yet: tick what to make and press Optimise", "muted")

    def _show_report(self, change: Any = None) -> None:
        report = self.report or {}
        arts = report.get("artifacts") or {}
        self.artifacts = ["fp32", *arts]
        self._serve_pick.options = self.artifacts
        if self.artifact not in self.artifacts:
            self.artifact = "fp32"
        self._serve_pick.value = self.artifact
        self._show_progress()
        bars, lat = self.fig.data
        if not report:
            self._report_table.value = ""
            with self.fig.batch_update():
                bars.x, bars.y, bars.text, bars.marker.color = [], [], [], []
                lat.x, lat.y = [], []
            return
        rows, names, speed, ms, text, colors = [], [], [], [], [], []
        metric, unit = report.get("metric", "accuracy"), report.get("unit", "texts")  # a tagger: f1, sentences
        for name, a in [("fp32", report["fp32"]), *arts.items()]:
            label = name + (f" ({a['backend']})" if a.get("backend") else "")
            marked = "; ".join(a.get("reasons") or []) if a.get("marked") else ""
            rows.append([label, a.get("size_mb"), a["latency_ms"]["batch_1"]["p50"], a["latency_ms"]["batch_1"]["p95"],
                         a["latency_ms"]["batch_32"]["p50"], a.get("samples_per_s"), f"{a.get('speedup', 1.0)}x",
                         a.get(metric), a.get("agreement", 1.0), ("marked: " + marked) if marked else "-"])
            names.append(name)
            speed.append(a.get("samples_per_s"))
            ms.append(a["latency_ms"]["batch_1"]["p50"])
            text.append(f"{a.get('speedup', 1.0)}x" + (" marked" if marked else ""))
            colors.append(MARKED_COLOR if marked else S.RUN_COLORS[0])
        load = report.get("load_average") or [0.0]
        self._report_table.value = S.message(
            f"run {report.get('run')}: {report.get('eval_size')} evaluation {unit}, {report.get('threads')} threads, "
            f"load average {load[0]:.2f}, measured {report.get('measured_at')}. Marked: slower than fp32 or more "
            f"than 1 {metric} point lost (the server warns before serving it).", "muted") + S.table_html(
            ["artifact", "size MB", "b1 p50 ms", "b1 p95 ms", "b32 p50 ms", f"{unit}/s", "speedup", metric,
             "agreement", "marked"], rows, nowrap=True)
        with self.fig.batch_update():  # whole arrays, every time
            bars.x, bars.y, bars.text, bars.marker.color = names, speed, text, colors
            lat.x, lat.y = names, ms

    def _show_server(self, change: Any = None) -> None:
        running = self.server_state == "running"
        self._start.disabled = self.server_state != "stopped"
        self._stop.disabled = not running
        self._serve_pick.disabled = self.server_state != "stopped"
        if self._serve_pick.value != self.artifact and self.artifact in self._serve_pick.options:
            self._serve_pick.value = self.artifact
        if not running:
            words = {"starting": "starting the server (loading the model)...", "stopping": "stopping (draining)...",
                     "stopped": "no server running for this run"}[self.server_state]
            self._server_html.value = S.message(words, "muted")
            self._curl.value = self._python.value = ""
            return
        info = self.server or {}
        self._server_html.value = (
            f'<div style="line-height:1.6">serving <b>{html.escape(str(info.get("artifact", "fp32")))}</b> at '
            f'<code>{html.escape(self.url)}</code> (pid {int(info.get("pid") or 0)}) &nbsp; API key '
            f'<code>{html.escape(self.masked_key)}</code>'
            + (f' kept in <code>{html.escape(str(info.get("api_key_file")))}</code>' if info.get("api_key_file") else "")
            + f'<br><span style="color:{S.MUTED_COLOR}">Its own process: closing this page or the notebook does '
              'not stop it. Every route but /healthz and /docs needs <code>Authorization: Bearer KEY</code>.</span></div>')
        ex = examples(self.task, self.url, str(info.get("api_key_file") or ""), self.run_id)
        self._curl.value, self._python.value = ex["curl"], ex["python"]

    def _show_metrics(self, change: Any = None) -> None:
        if self.server_state != "running" and not self.metrics:
            self._metrics_html.value = S.message("start the server to see its requests, latency, labels and drift",
                                                 "muted")
            return
        p95 = "-" if self.p95_ms is None else f"{self.p95_ms:g} ms"
        head = S.table_html(["requests", "requests/s", "p95 latency", "texts", "mean batch"],
                            [[self.requests_total, f"{self.requests_per_second:.2f}", p95,
                              int(self.metrics.get("texts", 0)),
                              f"{(self.metrics.get('batches') or {}).get('mean', 0.0):.1f}"]], max_height="5em")
        drift = "".join(f"<div>drift {html.escape(k.replace('_', ' '))}: PSI {v:.3f} ({psi_words(v)})</div>"
                        for k, v in sorted(self.drift.items()))
        labels = S.bars_html(self.label_counts, total=sum(self.label_counts.values()) or None) \
            if any(self.label_counts.values()) else ""
        self._metrics_html.value = head + (f"<div>{drift}</div>" if drift else "") + (
            "<div style='margin-top:4px'>predicted labels</div>" + labels if labels else "")

    def _show_alerts(self, change: Any = None) -> None:
        self._banner.value = banner_html(self.alerts, self.run_id) if self.alerts else ""
        self._banner.layout.display = None if self.alerts else "none"

    def _show_card(self, change: Any = None) -> None:
        """The card's body as Markdown for the page to render (the YAML front matter is for the Hub, not shown)."""
        body = self.card.split("\n---\n", 1)[1] if self.card.startswith("---\n") else self.card
        text = body.strip() or "no model card: choose a run with a trained model"
        self._card_view.outputs = ({"output_type": "display_data", "metadata": {},
                                    "data": {"text/markdown": text, "text/plain": text}},)

    def close(self) -> None:
        """Close the view; the server goes on (stop it with Stop server or `deploy.stop_server`)."""
        self._poller.stop()
        super().close()
