"""TrainPanel: the schedule, Start and Stop, and the progress of the run it launched.

Start runs `preflight` and then `workbench.launch.launch` on a worker thread: the run is its own
process (a reload or a kernel restart neither kills nor loses it) and the kernel stays free. Progress
comes from polling the run store on a daemon thread.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, get_args, get_type_hints

import ipywidgets as W
import traitlets as T

from workbench import Config, TrackConfig, TrainConfig, WorkbenchError
from workbench.launch import check_processes
from workbench.store import FINAL_STATUSES, RunStore

from . import _style as S
from .auto_number import AutoNumber
from ._background import Poller, run_job

POLL_S = 0.5
ETA_WINDOW = 20  # recent steps used for the time per step
STATUSES = ("idle", "checking", "queued", "running", "stopping", "completed", "stopped", "failed")


def _field(section: str, control: type, **options: Any) -> dict[str, Any]:
    """Metadata for a trait that mirrors a TrainConfig/TrackConfig field: its section and its control."""
    return {"section": section, "control": control, "options": options}


_TRACK_HINTS = get_type_hints(TrackConfig)
_TRAIN_HINTS = get_type_hints(TrainConfig)
_TRAIN_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}


def _choice(name: str, description: str) -> dict[str, Any]:
    """A TrainConfig Literal field as toggle buttons: its allowed values, its help as every button's tooltip."""
    options = list(get_args(_TRAIN_HINTS[name]))
    return _field("train", W.ToggleButtons, description=description, options=options,
                  tooltips=[_TRAIN_HELP[name]] * len(options))


def _auto(description: str, number: type, shown: float) -> dict[str, Any]:
    """A number that may be left out (None = chosen from the data when the run starts): AutoNumber."""
    return _field("train", AutoNumber, description=description, number=number, shown=shown)


AUTO_HINT = ("auto = chosen from the data when the run starts: epochs from the training size, the method's "
             "learning rate, max length from the texts' token lengths; the run lists each choice and why.")


HELP_FIELDS = ("epochs", "learning_rate", "max_length", "class_weights", "best_metric", "baseline", "ensemble",
               "truncation")


def help_html() -> str:
    """What the choices mean, in the config's own words (TrainConfig's help), folded away by default."""
    import html

    items = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(_TRAIN_HELP[name])}</li>" for name in HELP_FIELDS)
    return (f'<details style="color:{S.MUTED_COLOR}"><summary>What auto, class weights, best checkpoint, '
            f'baseline, ensemble and long texts mean</summary><ul style="margin:2px 0">{items}</ul></details>')


class TrainPanel(W.VBox):
    """Training settings (`to_config()` -> TrainConfig, `to_track_config()` -> TrackConfig) and run control.

    Each setting is declared once, below: a trait named after its config field, with its default from the
    config and its control in the tag. The panel checks nothing itself: `to_config()` builds the config,
    whose ValueError shows inline (as soon as a setting changes, and again at Start).

    `config_factory` builds the whole Config at Start (the dashboard gathers every panel); `launcher` queues
    and starts the checked Config (default `workbench.launch.launch`); `start_check` may refuse Start before
    the preflight (a page that allows one run at a time). All three are given at construction.
    `read_only=True` builds no settings and no Start/Stop at all, and refuses start() and stop().
    """

    epochs = T.Int(TrainConfig.epochs, allow_none=True).tag(**_auto("Epochs", W.IntText, 3))
    batch_size = T.Int(TrainConfig.batch_size).tag(**_field("train", W.IntText, description="Batch size"))
    learning_rate = T.Float(TrainConfig.learning_rate, allow_none=True).tag(**_auto("Learning rate", W.FloatText, 1e-3))
    warmup_ratio = T.Float(TrainConfig.warmup_ratio).tag(**_field("train", W.FloatText, description="Warmup ratio"))
    gradient_accumulation = T.Int(TrainConfig.gradient_accumulation).tag(
        **_field("train", W.IntText, description="Grad accum."))
    max_length = T.Int(TrainConfig.max_length, allow_none=True).tag(**_auto("Max length", W.IntText, 128))
    eval_every = T.Int(TrainConfig.eval_every).tag(**_field("train", W.IntText, description="Eval every"))
    early_stopping_patience = T.Int(TrainConfig.early_stopping_patience).tag(
        **_field("train", W.IntText, description="Early stop after"))
    seed = T.Int(TrainConfig.seed).tag(**_field("train", W.IntText, description="Seed"))
    class_weights = T.Enum(get_args(_TRAIN_HINTS["class_weights"]), TrainConfig.class_weights).tag(**_choice("class_weights", "class weights"))
    best_metric = T.Enum(get_args(_TRAIN_HINTS["best_metric"]), TrainConfig.best_metric).tag(**_choice("best_metric", "best checkpoint by"))
    ensemble = T.Enum(get_args(_TRAIN_HINTS["ensemble"]), TrainConfig.ensemble).tag(**_choice("ensemble", "ensemble"))
    truncation = T.Enum(get_args(_TRAIN_HINTS["truncation"]), TrainConfig.truncation).tag(**_choice("truncation", "long texts"))
    baseline = T.Bool(TrainConfig.baseline).tag(**_field(
        "train", W.Checkbox, description="classical baseline (TF-IDF + logistic regression, beside the model)",
        indent=False))
    gradient_checkpointing = T.Bool(TrainConfig.gradient_checkpointing).tag(**_field(
        "train", W.Checkbox, description="gradient checkpointing (less memory, ~1/3 slower steps)", indent=False))
    wandb = T.Unicode(TrackConfig.wandb).tag(**_field("track", W.ToggleButtons, description="wandb",
                                                      options=list(get_args(_TRACK_HINTS["wandb"]))))
    tensorboard = T.Bool(TrackConfig.tensorboard).tag(**_field("track", W.Checkbox, description="TensorBoard files",
                                                               indent=False))
    processes = T.Int(1, help="processes the run trains with (torchrun): CPU processes, or one per GPU")
    max_length_limit = T.Int(None, allow_none=True, help="the model's context length (followed from ModelPicker)")
    run_name = T.Unicode("", help="a label for the run in lists and plots")

    run_id = T.Unicode("", help="the run this panel launched (or follows)")
    run_label = T.Unicode("", help="that run's name, when it has one")
    status = T.Enum(STATUSES, default_value="idle")
    step = T.Int(0)
    max_steps = T.Int(0)
    epoch = T.Float(0.0)
    samples_per_second = T.Float(0.0)
    eta_seconds = T.Float(None, allow_none=True)
    error = T.Unicode("")
    read_only = T.Bool(False, read_only=True, help="no settings, no Start/Stop (view runs only); set at construction")

    def __init__(self, home: str | Path | None = None, background: bool = True,
                 config_factory: Callable[[], Config] | None = None,
                 launcher: Callable[[Config], Any] | None = None,
                 start_check: Callable[[], None] | None = None, read_only: bool = False, **kwargs: Any) -> None:
        self.store = RunStore(home)
        self.home = self.store.home
        self.background = background
        self.config_factory: Callable[[], Config] = config_factory or self.default_config
        self.launcher: Callable[[Config], Any] = launcher or self.launch
        self.start_check = start_check
        self.handle: Any = None
        self._base_train, self._base_track = TrainConfig(), TrackConfig()
        self._field_error = ""
        self._seq = 0
        self._times: list[tuple[int, float]] = []
        self._steps_per_epoch = 0
        self._poller = Poller(self._tick, POLL_S, name="train-panel-poll")
        self._bar = W.IntProgress(value=0, min=0, max=1, layout=S.full_width())
        self._progress = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self.set_trait("read_only", bool(read_only))
        if read_only:  # nothing a visitor could press or set: the controls do not exist
            self._controls: dict[str, W.ValueWidget] = {}
            self._start = self._stop = None
            children: list[W.Widget] = [self._bar, self._progress, self._error_html]
        else:
            children = self._build_controls()
        super().__init__(children=children, **{"layout": S.full_width(), **kwargs})
        self.observe(self._check_fields, names=self.field_names())
        self.observe(self._show_error, names="error")
        self.observe(self._show_progress, names=["status", "step", "max_steps", "epoch", "samples_per_second",
                                                 "eta_seconds", "run_id", "run_label"])
        self.observe(self._on_limit, names="max_length_limit")
        self._show_progress()

    @classmethod
    def field_names(cls, section: str | None = None) -> list[str]:
        """The traits that mirror config fields, in declaration order (the order of the controls)."""
        names = []
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, T.TraitType) and "section" in value.metadata and name not in names:
                    if section is None or value.metadata["section"] == section:
                        names.append(name)
        return names

    def _build_controls(self) -> list[W.Widget]:
        style = S.label_style()
        self._controls = {}
        for name in self.field_names():
            meta = self.trait_metadata(name, "control"), self.trait_metadata(name, "options")
            control, options = meta
            if control is AutoNumber:
                widget = control(style=style, layout=S.control_layout(), **options)
            elif control is W.Checkbox:
                widget = control(layout=W.Layout(width="auto"), **options)
            elif control is W.ToggleButtons:
                widget = control(style={**style, "button_width": "auto"}, layout=S.full_width(), **options)
            else:
                widget = control(style=style, layout=S.control_layout(), **options)
            widget.value = getattr(self, name)
            W.link((self, name), (widget, "value"))  # the trait is the source of truth; no control clamps it
            self._controls[name] = widget
        processes = W.IntText(value=self.processes, description="Processes", style=style,
                              layout=S.control_layout(), tooltip="torchrun: CPU processes, or one per GPU")
        W.link((self, "processes"), (processes, "value"))
        name = W.Text(placeholder="optional", description="Run name", style=style, layout=S.control_layout())
        name.observe(self._on_name, names="value")
        hints = W.HTML(S.message("Eval every 0 = each epoch; early stop after N evaluations without "
                                 "improvement, 0 = off. " + AUTO_HINT, "muted"), layout=S.full_width())
        self._help = W.HTML(help_html(), layout=S.full_width())
        self._start = W.Button(description="Start", icon="play", button_style="success",
                               layout=W.Layout(width="auto"))
        self._stop = W.Button(description="Stop", icon="stop", button_style="warning", disabled=True,
                              layout=W.Layout(width="auto"))
        self._start.on_click(lambda _: self.start())
        self._stop.on_click(lambda _: self.stop())
        boxes = [w for w in self._controls.values() if isinstance(w, W.Checkbox)]
        toggles = [w for w in self._controls.values() if isinstance(w, W.ToggleButtons)]
        fields = [w for w in self._controls.values() if w not in boxes and w not in toggles]
        return [W.Box([*fields, processes, name], layout=S.wrap_row()), hints, *toggles, W.Box(boxes, layout=S.wrap_row()),
                self._help,
                W.Box([self._start, self._stop], layout=S.wrap_row()), self._bar, self._progress, self._error_html]

    # --- cross-field rule with the model (the config cannot know the model's context) --------------
    @T.validate("max_length")
    def _valid_max_length(self, proposal: dict[str, Any]) -> int:
        """Cross-field: no more tokens than the model's context length."""
        limit = self.max_length_limit
        if limit is not None and proposal["value"] is not None and proposal["value"] > limit:
            raise T.TraitError(f"max_length = {proposal['value']} is beyond the model's limit of {limit} tokens")
        return proposal["value"]

    def _on_limit(self, change: dict[str, Any]) -> None:
        limit = change["new"]
        if limit is not None and self.max_length is not None and self.max_length > limit:
            self.max_length = limit
        control = self._controls.get("max_length")
        if limit is not None and isinstance(control, AutoNumber) and control.number.value > limit:
            control.number.value = limit  # what unticking "auto" would set

    def _on_name(self, change: dict[str, Any]) -> None:
        value = change["new"] if isinstance(change["new"], str) else ""
        self.run_name = value.strip()[:100]

    def _check_fields(self, change: Any = None) -> None:
        """A setting changed: the config says at once whether it accepts it (shown inline)."""
        try:
            self.to_config()
            self.to_track_config()
            problem = ""
        except WorkbenchError as exc:
            problem = str(exc)
        if problem:
            self.error = problem
        elif self.error and self.error == self._field_error:
            self.error = ""
        self._field_error = problem

    # --- config -------------------------------------------------------------------------------
    def to_config(self) -> TrainConfig:
        """The TrainConfig; fields without a control here (scheduler, weight decay...) come from the last
        `from_config`, else the defaults. The config's WorkbenchError is shown inline and re-raised."""
        try:
            return dataclasses.replace(self._base_train, **{n: getattr(self, n) for n in self.field_names("train")})
        except WorkbenchError as exc:
            self.error = str(exc)
            raise

    def to_track_config(self) -> TrackConfig:
        try:
            return dataclasses.replace(self._base_track, **{n: getattr(self, n) for n in self.field_names("track")})
        except WorkbenchError as exc:
            self.error = str(exc)
            raise

    def from_config(self, cfg: TrainConfig, track: TrackConfig | None = None, name: str | None = None) -> None:
        """Show a TrainConfig (and TrackConfig); fields without a control are kept for `to_config`."""
        self._base_train = cfg
        if track is not None:
            self._base_track = track
        with self.hold_trait_notifications():
            if self.max_length_limit is not None and (cfg.max_length or 0) > self.max_length_limit:
                self.max_length_limit = None  # the config's model may differ; its own check runs at Start
            for trait in self.field_names("train"):
                setattr(self, trait, getattr(cfg, trait))
            for trait in self.field_names("track") if track is not None else ():
                setattr(self, trait, getattr(track, trait))
            if name is not None:
                self.run_name = name

    def default_config(self) -> Config:
        """A Config with this panel's settings and defaults elsewhere (the dashboard supplies a full one)."""
        return Config(name=self.run_name or None, train=self.to_config(), track=self.to_track_config())

    # --- run control ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ("checking", "queued", "running", "stopping")

    def start(self) -> None:
        """Check the config (preflight) and launch it as its own process; errors show inline."""
        if self.read_only:
            self.error = "this page is read-only: training is switched off"
            return
        if self.active:
            self.error = "a run is already going: stop it first"
            return
        try:
            if self.start_check is not None:
                self.start_check()
            config = self.config_factory()
            check_processes(self.processes, config)
        except WorkbenchError as exc:
            self.error = str(exc)
            return
        self.error, self.status = "", "checking"
        self._enable(start=False, stop=False)
        run_job(lambda: self._preflight_and_launch(config), sync=not self.background, name="train-panel-start")

    def launch(self, config: Config) -> Any:
        """Queue `config` in the store and start it as its own process; returns its RunHandle."""
        from workbench.launch import launch

        return launch(config, home=self.store.home, processes=self.processes)

    def _preflight_and_launch(self, config: Config) -> None:
        from workbench.loop import preflight

        try:
            preflight(config, self.store.home)
            handle = self.launcher(config)
        except WorkbenchError as exc:
            self.error, self.status = str(exc), "idle"
            self._enable(start=True, stop=False)
            return
        except Exception as exc:  # an unexpected failure still reads as words, not a traceback
            self.error = f"could not start the run ({type(exc).__name__}: {str(exc)[:300]})"
            self.status = "idle"
            self._enable(start=True, stop=False)
            return
        self.follow(handle)

    def follow(self, handle: Any) -> None:
        """Show a run (a RunHandle): its name, status and progress at once (a finished run too, e.g. after a
        reload), then follow it while it goes on; Stop is enabled while it does."""
        self.handle, self._seq, self._times, self._steps_per_epoch = handle, 0, [], 0
        self.step, self.max_steps, self.epoch, self.samples_per_second, self.eta_seconds = 0, 0, 0.0, 0.0, None
        try:
            self.run_label = str(handle.record.get("name") or "")
        except Exception:  # the record is read again by the first tick, which reports a lost store
            self.run_label = ""
        self.run_id = handle.id
        self.status = "queued"
        self._enable(start=False, stop=True)
        if self._tick() and self.background:
            self._poller.start()

    def stop(self) -> None:
        """Ask the run to stop at its next step boundary (it saves a checkpoint and ends 'stopped')."""
        if self.read_only:  # a forged click or call from a read-only page
            self.error = "this page is read-only: runs cannot be stopped from it"
            return
        if self.handle is None or not self.active:
            return
        self.handle.stop()
        self.status = "stopping"
        self._enable(start=False, stop=False)

    def _enable(self, start: bool, stop: bool) -> None:
        if self._start is not None:
            self._start.disabled = not start
            self._stop.disabled = not stop

    def refresh(self) -> bool:
        """Read new progress from the store now; returns True while the run is still going."""
        return self._tick()

    def _tick(self) -> bool:
        handle = self.handle
        if handle is None:
            return False
        try:
            points = handle.points(after_seq=self._seq)
            record = handle.record
        except Exception as exc:  # the store vanished or is locked for too long: say so and stop polling
            self.error = f"lost track of run {handle.id} ({type(exc).__name__}: {exc})"
            return False
        self._absorb(points)
        status = record["status"]
        if status in FINAL_STATUSES:
            self.status = status
            if status == "failed":
                self.error = record.get("error") or "the run failed: see its log.txt"
            self.eta_seconds = 0.0 if status == "completed" else None
            self._enable(start=True, stop=False)
            return False
        if status == "running" and self.status != "stopping":
            self.status = "running"
        return True

    def _absorb(self, points: list[dict[str, Any]]) -> None:
        for p in points:
            self._seq = max(self._seq, p["seq"])
            if p["kind"] == "event" and p.get("event") == "train_begin":
                self.max_steps = int(p.get("max_steps") or 0)
                self._steps_per_epoch = int(p.get("steps_per_epoch") or 0)
                self._times = []
            elif p["kind"] == "train":
                self.step = int(p["step"])
                self.max_steps = int(p.get("max_steps") or self.max_steps)
                self.epoch = float(p.get("epoch", 0))
                self.samples_per_second = float(p.get("samples_per_second", 0.0))
                self._times = (self._times + [(int(p["step"]), float(p["time"]))])[-ETA_WINDOW:]
        if len(self._times) >= 2 and self.max_steps:
            (s0, t0), (s1, t1) = self._times[0], self._times[-1]
            per_step = (t1 - t0) / max(s1 - s0, 1)
            self.eta_seconds = max(self.max_steps - self.step, 0) * per_step

    # --- view -----------------------------------------------------------------------------------
    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_progress(self, change: Any = None) -> None:
        self._bar.max = max(self.max_steps, 1)
        self._bar.value = min(self.step, self._bar.max)
        self._bar.bar_style = {"completed": "success", "failed": "danger", "stopped": "warning"}.get(self.status, "")
        if self.status == "idle" and not self.run_id:
            self._progress.value = S.message("not started", "muted")
            return
        title = f"run {self.run_id}" + (f" ({self.run_label})" if self.run_label else "") if self.run_id else ""
        parts = [title, self.status]
        if self.max_steps:
            parts.append(f"step {self.step}/{self.max_steps}")
            epochs = -(-self.max_steps // self._steps_per_epoch) if self._steps_per_epoch else None
            parts.append(f"epoch {int(self.epoch) + 1}" + (f"/{epochs}" if epochs else "") if self.step else "")
        if self.samples_per_second:
            parts.append(f"{self.samples_per_second:,.0f} samples/s")
        if self.active and self.eta_seconds is not None:
            parts.append(f"ETA {S.human_seconds(self.eta_seconds)}")
        self._progress.value = S.message(" | ".join(p for p in parts if p), "muted")

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> str:
        """Block until the launched run ends (scripts, notebooks, tests); returns the status. Waits on the
        run's state, however slow the machine; `timeout` (seconds) gives up earlier and returns the status then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            if self.status in FINAL_STATUSES or (self.status == "idle" and self.error):
                return self.status
            if not self.background and self.handle is not None:
                self._tick()
            time.sleep(poll)
        return self.status

    def close(self) -> None:
        self._poller.stop()
        super().close()
