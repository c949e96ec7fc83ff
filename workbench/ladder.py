"""The method ladder: one task through several tuning methods, the same data, split and seed, and one table.

Each rung is a run in the store, named "<ladder id>/<method>", run one after the other. A rung's config
is the ladder's config with the method changed and that method's learning rate (DEFAULT_LEARNING_RATES,
unless the caller gives its own). Zero-shot rungs use a model of the kind they need: the ladder's model
when it fits, else the catalog's (minilm-l6 for embeddings, smollm2-135m-instruct for prompting); the
table shows which.

Rungs run in this process (`isolate=False`: callbacks see every event; the peak memory of a rung is the
process's peak so far) or each in its own process (`isolate=True`, what `workbench ladder` does: peak
memory and crashes belong to one rung). A ladder can be stopped (Ctrl-C, SIGTERM, `request_stop`: the
current rung stops cooperatively at a step boundary and the ladder ends "stopped") and resumed: completed
rungs are skipped, a stopped rung resumes from its checkpoint.

Layout, next to the run store:

    <home>/ladders/<id>/ladder.json   the plan, each rung's run id and config, the results table (`rows`, one
                                      per rung) and its reference rows (`references`: classical, ensemble)
    <home>/ladders/<id>/ladder.csv    the results table, rungs then references
    <home>/ladders/<id>/STOP          present while a stop is asked
    <home>/ladders/<id>/log.txt       output of a ladder started by `launch_ladder`
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .config import METHOD_LEARNING_RATES, METHODS, ZERO_SHOT_METHODS, Config
from .errors import WorkbenchError
from .methods import default_ladder, method_spec
from .task_table import DEFAULT_TASK, task_spec
from .store import FINAL_STATUSES, RunStore, pid_alive, private_dir, private_file

DEFAULT_METHODS = default_ladder("encoder")
# a causal LM classifies by scoring label tokens: no head to train alone; its zero-shot rung is the prompt
CAUSAL_LM_METHODS = default_ladder("causal-lm")
DEFAULT_LEARNING_RATES: dict[str, float] = METHOD_LEARNING_RATES  # one table: a run with no rate takes these too
COLUMNS = ("method", "model", "status", "accuracy", "f1_macro", "metric", "score", "trainable_params", "total_params",
           "trainable_percent", "wall_seconds", "train_seconds", "peak_memory_mb", "learning_rate", "run_id", "note")
# the rows after the rungs: what the trained rungs are read against (see reference_rows)
CLASSICAL_ROW, ENSEMBLE_ROW = "classical", "ensemble"
POLL_S = 0.5


# --- where ladders live -------------------------------------------------------------------------

def ladders_root(home: str | Path | None = None) -> Path:
    return RunStore(home).home / "ladders"


def ladder_dir(ladder_id: str, home: str | Path | None = None) -> Path:
    return ladders_root(home) / ladder_id


def resolve_ladder(ladder_id: str, home: str | Path | None = None) -> str:
    """Map 'latest' or a unique id prefix to a ladder id."""
    root = ladders_root(home)
    ids = sorted(p.name for p in root.glob("*") if (p / "ladder.json").is_file()) if root.is_dir() else []
    if ladder_id == "latest":
        if not ids:
            raise WorkbenchError(f"no ladders yet in {root.parent}: start one with `workbench ladder CONFIG`")
        return max(ids, key=lambda i: (_read(root / i)["created_at"], i))
    if ladder_id in ids:
        return ladder_id
    matches = [i for i in ids if i.startswith(ladder_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise WorkbenchError(f"no ladder {ladder_id!r} in {root}: `workbench ladder --list` shows the ids")
    raise WorkbenchError(f"ladder id {ladder_id!r} is ambiguous ({', '.join(matches[:5])}): give more characters")


def _read(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "ladder.json").read_text(encoding="utf-8"))


def _write(directory: Path, ladder: dict[str, Any]) -> None:
    tmp = directory / "ladder.json.tmp"
    tmp.write_text(json.dumps(ladder, indent=2), encoding="utf-8")
    tmp.replace(directory / "ladder.json")


def load_ladder(ladder_id: str = "latest", home: str | Path | None = None) -> dict[str, Any]:
    """The ladder as saved; a 'running' ladder whose process is gone reads as 'stopped'."""
    lid = resolve_ladder(ladder_id, home)
    ladder = _read(ladder_dir(lid, home))
    if ladder["status"] == "running" and not pid_alive(ladder.get("pid")):
        ladder["status"] = "stopped"
        ladder["error"] = ladder.get("error") or "the ladder's process ended without finishing: resume it"
    return ladder


def list_ladders(home: str | Path | None = None) -> list[dict[str, Any]]:
    """Every ladder, newest first."""
    root = ladders_root(home)
    if not root.is_dir():
        return []
    found = [load_ladder(p.name, home) for p in root.glob("*") if (p / "ladder.json").is_file()]
    return sorted(found, key=lambda lad: (lad["created_at"], lad["id"]), reverse=True)


# --- planning --------------------------------------------------------------------------------------

def default_methods(config: Config, home: str | Path | None = None) -> tuple[str, ...]:
    """The ladder a model gets when none is named: the encoder ladder, or the causal-LM one, of the methods
    the config's task takes (its table row)."""
    ladder = CAUSAL_LM_METHODS if _is_causal(config, RunStore(home).home) else DEFAULT_METHODS
    return tuple(m for m in ladder if m in config.task_spec.methods)


def _is_causal(config: Config, home: Path) -> bool:
    """Whether the config's model is a causal LM (its config file only; no weights are read)."""
    from .catalog import resolve_model
    from .models.loading import is_causal_lm, load_config

    return is_causal_lm(load_config(resolve_model(config.model, home, config.trust_remote_code),
                                    config.trust_remote_code))


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """A comma-separated string or a list of method names, checked: known, no repeats, at least one."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise WorkbenchError(f"a ladder needs at least one method, e.g. --methods {','.join(DEFAULT_METHODS[:3])}")
    for name in names:
        if name not in METHODS:
            import difflib

            close = difflib.get_close_matches(name, METHODS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise WorkbenchError(f"method {name!r} is unknown: {hint}choose from {', '.join(METHODS)}")
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise WorkbenchError(f"method {repeated[0]!r} is listed twice: a ladder runs each method once")
    return names


def _model_for(method: str, config: Config, models: dict[str, str], home: Path) -> str:
    """The ladder's model when it suits the method, else the catalog model of the kind a zero-shot rung needs."""
    if method in models:
        return models[method]
    if method not in ZERO_SHOT_METHODS:
        return config.model
    kind = "causal-lm" if _is_causal(config, home) else "encoder"
    spec = method_spec(method)
    return config.model if kind in spec.model_kinds else spec.zero_shot_model


def rung_config(config: Config, method: str, ladder_id: str, learning_rate: float | None,
                model: str | None = None) -> Config:
    """The ladder's config for one method: its name, learning rate and model; knobs of other methods reset."""
    raw = config.to_dict()
    raw["name"] = f"{ladder_id}/{method}"
    raw["model"] = model or config.model
    m = raw["method"]
    m["name"] = method
    spec = method_spec(method)
    if not spec.lora_variants:
        m["use_rslora"] = m["use_dora"] = False
    if "few_shot_k" not in spec.fields:
        m["few_shot_k"] = 0
    if spec.virtual_tokens:
        m["target_modules"] = "auto"
    if spec.prunes_ranks and m["init_r"] < m["r"]:
        m["init_r"] = m["r"]
    if learning_rate is not None:
        raw["train"]["learning_rate"] = learning_rate
    return Config.from_dict(raw)


def _preflight(config: Config, home: Path) -> None:
    from .loop import preflight

    preflight(config, home)


def create_ladder(config: Config, methods: str | list[str] | tuple[str, ...] = DEFAULT_METHODS,
                  home: str | Path | None = None, learning_rates: dict[str, float] | None = None,
                  models: dict[str, str] | None = None, isolate: bool = False) -> str:
    """Check every rung (preflight, no weights loaded) and save the plan; returns the ladder id.

    `learning_rates` and `models` map method names to values that replace the defaults for that rung.
    """
    names = parse_methods(methods)
    store = RunStore(home)
    for extra, what in ((learning_rates or {}, "learning_rates"), (models or {}, "models")):
        unknown = [m for m in extra if m not in names]
        if unknown:
            raise WorkbenchError(f"{what} names {unknown[0]!r}, which is not a rung of this ladder "
                                 f"({', '.join(names)})")
    rates = {**DEFAULT_LEARNING_RATES, **(learning_rates or {})}
    ladder_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    rungs = []
    for method in names:
        rate = None if method in ZERO_SHOT_METHODS else rates.get(method, config.train.learning_rate)
        cfg = rung_config(config, method, ladder_id, rate, _model_for(method, config, models or {}, store.home))
        try:
            _preflight(cfg, store.home)
        except WorkbenchError as exc:
            raise WorkbenchError(f"ladder rung {method}: {exc}") from None
        rungs.append({"method": method, "model": cfg.model, "learning_rate": rate, "config": cfg.to_dict(),
                      "run_id": None})
    directory = ladder_dir(ladder_id, store.home)
    private_dir(directory)  # owner-only, like run folders: the table and log name the user's data
    _write(directory, {"id": ladder_id, "status": "queued", "created_at": time.time(), "started_at": None,
                       "ended_at": None, "pid": None, "isolate": isolate, "config": config.to_dict(),
                       "methods": names, "rungs": rungs, "rows": [], "error": None,
                       "peak_memory": _peak_note(isolate)})
    return ladder_id


def _peak_note(isolate: bool) -> str:
    return ("per rung: each rung ran in its own process" if isolate else
            "process peak so far: the rungs ran in one process, so a rung's peak includes the rungs before it")


# --- running ---------------------------------------------------------------------------------------

class _Stopper:
    """SIGINT/SIGTERM and the STOP file ask for a cooperative stop of the current rung and of the ladder."""

    def __init__(self, directory: Path, store: RunStore) -> None:
        self.directory, self.store = directory, store
        self.requested = False
        self.run_id: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Stopper":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C
        self.request()

    def request(self) -> None:
        self.requested = True
        if self.run_id is not None:
            self.store.request_stop(self.run_id)

    def poll(self) -> bool:
        if not self.requested and (self.directory / "STOP").exists():
            self.request()
        return self.requested


def request_stop(ladder_id: str, home: str | Path | None = None) -> None:
    """Ask a ladder (in any process) to stop: its current rung stops at a step boundary, no rung starts after."""
    lid = resolve_ladder(ladder_id, home)
    directory = ladder_dir(lid, home)
    (directory / "STOP").touch()
    store = RunStore(home)
    for rung in _read(directory)["rungs"]:
        if rung["run_id"] and store.get(rung["run_id"])["status"] in ("queued", "running"):
            store.request_stop(rung["run_id"])


def _run_rung(config: Config, store: RunStore, run_id: str, resume: bool, callbacks: list[Callback] | None,
              isolate: bool, stopper: _Stopper) -> str:
    stopper.run_id = run_id
    try:
        if not isolate:
            from .loop import train

            return train(config, store=store, run_id=run_id, callbacks=callbacks, resume=resume)["status"]
        from .launch import launch

        handle = launch(config, home=store.home, resume_id=run_id)  # --resume of a queued run starts it
        asked = False
        while True:
            record = handle.wait(timeout=POLL_S, poll=min(POLL_S, 0.2))
            if record["status"] in FINAL_STATUSES:
                return record["status"]
            if stopper.poll() and not asked:
                handle.stop()
                asked = True
            code = handle._process.poll() if handle._process is not None else None
            if code is not None and store.get(run_id)["status"] not in FINAL_STATUSES:
                store.finish(run_id, "failed", error=f"the rung's process exited with code {code} before the run "
                                                     f"ended: see {handle.log_path}")
                return "failed"
    finally:
        stopper.run_id = None


def resume_ladder(ladder_id: str, home: str | Path | None = None, callbacks: list[Callback] | None = None,
                  isolate: bool | None = None, echo: bool = False) -> dict[str, Any]:
    """Run the ladder's rungs that are not completed yet (a queued ladder starts); returns the ladder.

    `isolate` None keeps the ladder's own choice.
    """
    store = RunStore(home)
    lid = resolve_ladder(ladder_id, store.home)
    directory = ladder_dir(lid, store.home)
    ladder = _read(directory)
    if ladder["status"] == "running" and pid_alive(ladder.get("pid")) and ladder.get("pid") != os.getpid():
        raise WorkbenchError(f"ladder {lid} is still running (process {ladder['pid']}): stop it first")
    if ladder["status"] == "completed" and all(r["run_id"] and store.get(r["run_id"])["status"] == "completed"
                                               for r in ladder["rungs"]):
        raise WorkbenchError(f"ladder {lid} is completed: nothing to resume (start a new ladder instead)")
    isolate = ladder.get("isolate", False) if isolate is None else isolate
    if isolate and callbacks:
        raise WorkbenchError("callbacks run in this process: use isolate=False to pass them to the rungs")
    (directory / "STOP").unlink(missing_ok=True)
    ladder.update(status="running", pid=os.getpid(), started_at=ladder.get("started_at") or time.time(),
                  ended_at=None, error=None, isolate=isolate, peak_memory=_peak_note(isolate))
    _write(directory, ladder)
    status, error = "failed", None
    with _Stopper(directory, store) as stopper:
        try:
            for rung in ladder["rungs"]:
                if stopper.poll():
                    break
                record = store.get(rung["run_id"]) if rung["run_id"] else None
                if record is not None and record["status"] == "completed":
                    continue
                config = Config.from_dict(rung["config"])
                if record is None:
                    rung["run_id"] = store.create_run(config.to_dict(), config.name)
                    _write(directory, ladder)
                if echo:
                    print(f"ladder {lid}: {rung['method']} (run {rung['run_id']})", flush=True)
                rung_status = _run_rung(config, store, rung["run_id"], record is not None, callbacks, isolate,
                                        stopper)
                _update_table(directory, ladder, store)
                if echo:
                    row = next(r for r in ladder["rows"] if r["run_id"] == rung["run_id"])
                    print(f"  {rung['method']}: {rung_status}, {row['metric']} {_num(row['score'], '{:.3f}')}, "
                          f"{_num(row['wall_seconds'], '{:.0f}')} s", flush=True)
                if rung_status == "stopped":
                    stopper.request()
                    break
            status = "stopped" if stopper.requested else "completed"
        except KeyboardInterrupt:
            status = "stopped"
        except Exception as exc:  # the ladder's own failure; each run's failure stays in its run
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            ladder.update(status=status, ended_at=time.time(), error=error)
            _update_table(directory, ladder, store)
            (directory / "STOP").unlink(missing_ok=True)
    return ladder


def run_ladder(config: Config, methods: str | list[str] | tuple[str, ...] = DEFAULT_METHODS,
               home: str | Path | None = None, callbacks: list[Callback] | None = None,
               learning_rates: dict[str, float] | None = None, models: dict[str, str] | None = None,
               isolate: bool = False, echo: bool = False) -> dict[str, Any]:
    """Plan and run a ladder: every method on the same split and seed, one run each; returns the ladder
    (with `rows`, the table). `callbacks` get every rung's events (in-process rungs only)."""
    if isolate and callbacks:
        raise WorkbenchError("callbacks run in this process: use isolate=False to pass them to the rungs")
    ladder_id = create_ladder(config, methods, home, learning_rates, models, isolate)
    if echo:
        print(f"ladder {ladder_id}: {', '.join(parse_methods(methods))}", flush=True)
    return resume_ladder(ladder_id, home, callbacks, isolate, echo)


def launch_ladder(ladder_id: str, home: str | Path | None = None) -> subprocess.Popen:
    """Run a saved ladder as its own process (`python -m workbench ladder --resume ID`), in its own session."""
    store = RunStore(home)
    lid = resolve_ladder(ladder_id, store.home)
    directory = ladder_dir(lid, store.home)
    env = {**os.environ, "WORKBENCH_HOME": str(store.home), "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with os.fdopen(private_file(directory / "log.txt"), "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "workbench", "ladder", "--resume", lid], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=str(store.home))


# --- the table ----------------------------------------------------------------------------------------

def ladder_rows(ladder: dict[str, Any], store: RunStore) -> list[dict[str, Any]]:
    """One row per rung, read from its run record (a rung not started yet has status 'pending')."""
    rows = []
    for rung in ladder["rungs"]:
        record = store.get(rung["run_id"]) if rung.get("run_id") else None
        info = (record or {}).get("info") or {}
        metrics = (record or {}).get("metrics") or {}
        timings = (record or {}).get("timings") or {}
        headline = task_spec((record or {}).get("config", {}).get("task", DEFAULT_TASK)).metrics[0]
        rows.append({
            "method": rung["method"], "model": rung["model"],
            "status": record["status"] if record else "pending",
            "accuracy": metrics.get("accuracy"), "f1_macro": metrics.get("f1_macro"),
            "metric": headline, "score": metrics.get(headline),  # the task's own headline figure
            "trainable_params": info.get("trainable_params"), "total_params": info.get("total_params"),
            "trainable_percent": info.get("trainable_percent"),
            "wall_seconds": timings.get("wall_seconds"), "train_seconds": timings.get("train_seconds"),
            "peak_memory_mb": timings.get("peak_memory_mb"), "learning_rate": rung.get("learning_rate"),
            "run_id": rung.get("run_id"),
        })
    return rows


def _update_table(directory: Path, ladder: dict[str, Any], store: RunStore) -> None:
    """The rung rows and the reference rows, in ladder.json and ladder.csv."""
    ladder["rows"] = ladder_rows(ladder, store)
    ladder["references"] = reference_rows(ladder["rows"], store)
    _write(directory, ladder)
    write_table(directory, ladder["rows"] + ladder["references"])


def reference_rows(rows: list[dict[str, Any]], store: RunStore) -> list[dict[str, Any]]:
    """What the trained rungs are read against: the classical baseline (TF-IDF + logistic regression, which
    every classification run fits on its split: the rungs share split and seed, so the first rung that has
    one gives it), and the ensemble of the best trained rung with it (the mean of their class probabilities
    on the shared eval split), whose note says whether it beats both its members. [] before any has one."""
    records = [store.get(r["run_id"]) for r in rows if r["method"] not in ZERO_SHOT_METHODS
               and r["status"] == "completed" and r.get("run_id")]
    records = [rec for rec in records if isinstance((rec.get("metrics") or {}).get("baseline"), dict)]
    if not records:
        return []
    base = records[0]["metrics"]["baseline"]
    if "accuracy" not in base:  # a regression ladder: its baseline has RMSE, not the table's figures
        return []
    classical = _reference_row(CLASSICAL_ROW, "TF-IDF + logistic regression", base, records[0]["id"])
    classical.update(trainable_params=0, trainable_percent=0.0, wall_seconds=base.get("seconds"),
                     train_seconds=base.get("seconds"),
                     note=f"fitted on run {records[0]['id']}'s split ({base.get('class_weight', 'none')} class weights)")
    ensemble = ensemble_row(records, classical)
    return [classical] + ([ensemble] if ensemble is not None else [])


def _reference_row(method: str, model: str, figures: dict[str, Any], run_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(method=method, model=model, status="completed", accuracy=figures.get("accuracy"),
               f1_macro=figures.get("f1_macro"), metric="accuracy", score=figures.get("accuracy"), run_id=run_id,
               note="")
    return row


def _metric(record: dict[str, Any]) -> str:
    chosen = (record.get("config") or {}).get("train", {}).get("best_metric")
    return chosen if chosen in ("accuracy", "f1_macro") else "accuracy"


def ensemble_row(records: list[dict[str, Any]], classical: dict[str, Any]) -> dict[str, Any] | None:
    """The best trained rung averaged with the classical baseline, as that run weighed the two itself: every
    classification run tries shares of its model's probabilities (tasks/ensemble.MODEL_WEIGHTS) against the
    baseline's on its eval split and keeps the best in `metrics.ensemble` (used or not); the row shows that
    mean, so the ladder and the run agree. None when the rung has no such entry."""
    metric = _metric(records[0])
    best = max(records, key=lambda rec: rec["metrics"].get(metric) or 0.0)  # the first of equals
    mean = best["metrics"].get("ensemble")
    if not isinstance(mean, dict) or mean.get(metric) is None:
        return None
    method = (best.get("config") or {}).get("method", {}).get("name", "?")
    row = _reference_row(ENSEMBLE_ROW, f"{method} + classical", mean, best["id"])
    timings, info = best.get("timings") or {}, best.get("info") or {}
    row.update(trainable_params=info.get("trainable_params"), total_params=info.get("total_params"),
               trainable_percent=info.get("trainable_percent"), peak_memory_mb=timings.get("peak_memory_mb"),
               wall_seconds=_sum(timings.get("wall_seconds"), classical["wall_seconds"]),
               train_seconds=_sum(timings.get("train_seconds"), classical["train_seconds"]))
    members = {method: best["metrics"].get(metric), CLASSICAL_ROW: classical[metric]}
    beaten = [m for m, value in members.items() if value is not None and mean[metric] > value]
    shown = ", ".join(f"{m} {v:.3f}" for m, v in members.items() if v is not None)
    weights = mean.get("weights") or []
    share = f"{weights[0]:g} x {method} + {weights[1]:g} x classical; " if len(weights) == 2 else ""
    answers = " (the run answers with it)" if mean.get("chosen") else ""
    row["note"] = (f"{share}beats both members on {metric} ({mean[metric]:.3f}; {shown}){answers}"
                   if len(beaten) == 2 else
                   f"{share}does not beat {' and '.join(m for m in members if m not in beaten)} on {metric} "
                   f"({mean[metric]:.3f}; {shown})")
    return row


def _sum(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) + float(b)


def write_table(directory: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows([{k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows])
    tmp = directory / "ladder.csv.tmp"
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    tmp.replace(directory / "ladder.csv")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as aligned text: method, accuracy, macro-F1, trainable params and share, wall time, peak memory;
    the reference rows' notes (classical, ensemble) under it."""
    headline = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    figures = [("accuracy", "accuracy"), ("f1_macro", "macro-F1")] if headline == "accuracy" else \
        [("score", headline)]  # another task's headline figure (entity F1, rmse) in their place
    header = ["method", "model", "status", *(name for _, name in figures), "trainable", "% params", "wall s",
              "peak MB"]
    lines = [header]
    for r in rows:
        lines.append([
            r["method"], r["model"], r["status"], *(_num(r.get(key), "{:.3f}") for key, _ in figures),
            _num(r["trainable_params"], "{:,}"), _num(r["trainable_percent"], "{:.3g}"),
            _num(r["wall_seconds"], "{:.0f}"), _num(r["peak_memory_mb"], "{:.0f}"),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    notes = [f"{r['method']}: {r['note']}" for r in rows if r.get("note") and r["method"] in (CLASSICAL_ROW,
                                                                                           ENSEMBLE_ROW)]
    return "\n".join(["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines] + notes)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
