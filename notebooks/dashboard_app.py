"""The dashboard page (notebooks/dashboard.ipynb under Voila): defaults, one run at a time, reattach.

The page itself is `widgets.Dashboard`; this file only decides what it starts with:

- the embedded default (minilm-l6 + bbc-news + LoRA, course-sized), or what the environment names:
  WORKBENCH_DEMO_MODEL, WORKBENCH_DEMO_DATA, WORKBENCH_DEMO_OVERRIDES ("train.epochs=3 data.max_train_samples=64");
- WORKBENCH_READ_ONLY=1 for public demos: runs can be watched, compared and tried, not started or stopped
  (the setup panels, the upload and Start/Stop are not built at all);
- catalog models only (plus the demo's model), trust_remote_code off: no model repository's code runs here;
- on load, the page follows the run that is training in the store, or shows the latest run: Voila gives
  every visitor (and every reload) a new kernel, while the run goes on in its own process;
- at most one training run at a time on this machine: Start is refused, in words, while one is going;
  the check and the queueing of the new run happen under an OS file lock in the run store, so two
  clicks (two pages, two kernels) cannot both start one;
- a widget callback that fails (or a forged widget message a callback refuses) shows the visitor one line;
  the traceback, with this machine's paths in it, goes to the server's log (the kernel's stderr) only.
"""

from __future__ import annotations

import contextlib
import html
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import ipywidgets as W
import pandas  # noqa: F401  before any worker thread: plotly checks pandas while a DataPanel thread imports it
from IPython.display import display

import course
from workbench import Config, WorkbenchError
from workbench.catalog import MODELS
from workbench.launch import RunHandle, attach
from workbench.store import RunStore
from widgets import Dashboard

ACTIVE = ("queued", "running")
START_LOCK = ".dashboard-start.lock"  # in the run store: every page (kernel) on this machine shares it


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def demo_config() -> Config:
    """The preselected run: the embedded default at course size, or what the environment names."""
    config = course.config("dashboard-demo", method="lora",
                           source=os.environ.get("WORKBENCH_DEMO_DATA", "bbc-news"))
    model = os.environ.get("WORKBENCH_DEMO_MODEL")
    overrides = ([f"model={model}"] if model else []) + shlex.split(os.environ.get("WORKBENCH_DEMO_OVERRIDES", ""))
    return config.with_overrides(overrides) if overrides else config


def active_run(store: RunStore) -> dict[str, Any] | None:
    """The newest queued or running run in the store (a dead process reads as failed, see RunStore)."""
    return next((r for r in store.list() if r["status"] in ACTIVE), None)


@contextlib.contextmanager
def start_lock(home: Path, timeout: float = 30.0) -> Iterator[None]:
    """Hold the store's start lock (an OS file lock: it is released if the process dies)."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / START_LOCK, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WorkbenchError("another page is starting a run right now: try again in a moment") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def refuse_if_going(store: RunStore) -> None:
    going = active_run(store)
    if going is not None:
        raise WorkbenchError(f"run {going['name'] or going['id']} is training on this machine: one run at a "
                             "time, wait for it to finish (its progress is shown below)")


def one_run_at_a_time(home: Path, launch: Callable[[Config], RunHandle]
                      ) -> tuple[Callable[[], None], Callable[[Config], RunHandle]]:
    """The TrainPanel's `start_check` and `launcher` (which wraps `launch`): refuse Start while any run of
    this store is going (another visitor's included).

    Start checks at once (an answer before the preflight), and again when the run is queued: that second
    check and the queueing hold the store's start lock, so of two clicks at the same moment one is refused.
    """
    store = RunStore(home)

    def start_check() -> None:
        refuse_if_going(store)

    def launcher(config: Config) -> RunHandle:
        with start_lock(store.home):
            refuse_if_going(store)
            return launch(config)  # the run is in the store, queued, before the lock is released

    return start_check, launcher


def offered_models(config: Config) -> tuple[str, ...]:
    """The catalog, plus the demo's model when the server's environment names another one (the operator's
    choice; a visitor can only pick from this list, and trust_remote_code stays off)."""
    return tuple(dict.fromkeys([*MODELS, config.model]))


def show_latest(dash: Dashboard) -> None:
    """Follow the run in progress (a reload reattaches), else show the newest run: the Train tab names it
    and says how it ended, the curve and the matrix are its own."""
    going = active_run(dash.store)
    latest = going or next(iter(dash.store.list()), None)
    if latest is not None:
        dash.train.follow(attach(latest["id"], dash.store.home))
    if going is not None:
        dash.tabs.selected_index = 1


def header(read_only: bool) -> W.HTML:
    """One line under the notebook's title: what this page lets a visitor do."""
    note = ("Read-only demo: browse the runs, their curves and confusion matrices, and try the models."
            if read_only else
            "Set up a run, press Start in <b>Train &amp; watch</b>, and follow it live. "
            "One run trains at a time on this machine; reloading the page does not stop it.")
    return W.HTML(f"<div style='color:var(--jp-ui-font-color2,#757575)'>{note}</div>", layout=W.Layout(width="100%"))


def build(home: Any = None, read_only: bool | None = None) -> Dashboard:
    read_only = env_flag("WORKBENCH_READ_ONLY") if read_only is None else read_only
    home = RunStore(home or course.home()).home
    # the panel's own launch, under the store's start lock (`dash` is bound below, before any Start)
    start_check, launcher = one_run_at_a_time(home, lambda config: dash.train.launch(config))
    if read_only:  # viewers only: no setup panel, no upload, no Start or Stop is built
        dash = Dashboard(home=home, read_only=True)
    else:
        config = demo_config()
        dash = Dashboard(home=home, models=offered_models(config), launcher=launcher, start_check=start_check)
        dash.from_config(config)
    show_latest(dash)  # LossCurve and ConfusionMatrix draw on LiveFigures: a page loaded now shows it all
    return dash


def one_line(exc: BaseException | None) -> str:
    """What a visitor is told about an error: a WorkbenchError's own words (written for them), else the type."""
    if isinstance(exc, WorkbenchError):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return text[:300]
    return f"internal error ({type(exc).__name__}): the details are in the server's log"


def one_line_errors(shell: Any = None, log: Any = None) -> Callable[..., None] | None:
    """Make the kernel's `showtraceback` (what ipywidgets calls when a callback or a widget message fails)
    write the whole traceback to `log` (default: the kernel's own stderr, which is the Voila server's log)
    and send the page one line. Returns the replacement, or None outside IPython."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        return None

    def showtraceback(exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
        etype, value, tb = exc_tuple if exc_tuple else sys.exc_info()
        stream = log or sys.__stderr__
        stream.write("dashboard page error:\n" + "".join(traceback.format_exception(etype, value, tb)))
        stream.flush()
        line = one_line(value)
        shell._showtraceback(etype, line, [f"{getattr(etype, '__name__', 'Error')}: {line}"])

    shell.showtraceback = showtraceback
    return showtraceback


def page() -> None:
    """Display the whole page; a failure shows as one line of words, never a traceback."""
    one_line_errors()
    read_only = env_flag("WORKBENCH_READ_ONLY")
    try:
        body: W.Widget = build(read_only=read_only)
    except Exception as exc:  # e.g. assets not installed: say what to do (the traceback: the server's log)
        traceback.print_exc(file=sys.__stderr__)
        text = one_line(exc)
        body = W.HTML(f"<div style='color:var(--jp-error-color1,#d32f2f)'>The dashboard could not start: "
                      f"{html.escape(text)}</div>")
    display(W.VBox([header(read_only), body], layout=W.Layout(width="100%")))
