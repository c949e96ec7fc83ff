"""TrainPanel: the schedule, Start and Stop, and the progress of the run it launched.

Start runs `preflight` and then `workbench.launch.launch` on a worker thread: the run is its own
process (a reload or a kernel restart neither kills nor loses it) and the kernel stays free. Progress
comes from polling the run store on a daemon thread.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import traitlets as T

from workbench import Config, TrackConfig, TrainConfig, WorkbenchError
from workbench.store import FINAL_STATUSES, RunStore

from . import _style as S
from ._background import Poller, run_job

POLL_S = 0.5
ETA_WINDOW = 20  # recent steps used for the time per step
STATUSES = ("idle", "checking", "queued", "running", "stopping", "completed", "stopped", "failed")


class TrainPanel(W.VBox):
    """Training settings (`to_config()` -> TrainConfig, `to_track_config()` -> TrackConfig) and run control.

    `config_factory` builds the whole Config at Start; the dashboard sets it to gather every panel.
    `launcher` queues and starts the checked Config (default `workbench.launch.launch`); a page that allows
    one run at a time wraps it in a lock (notebooks/dashboard_app.py).
    """

    epochs = T.Int(2, min=1, max=1000)
    batch_size = T.Int(16, min=1, max=4096)
    learning_rate = T.Float(5e-4)
    warmup_ratio = T.Float(0.1, min=0.0, max=0.99)
    gradient_accumulation = T.Int(1, min=1, max=1024)
    max_length = T.Int(256, min=8)
    max_length_limit = T.Int(None, allow_none=True, help="the model's context length (followed from ModelPicker)")
    eval_every = T.Int(0, min=0, help="0 = evaluate each epoch")
    early_stopping_patience = T.Int(2, min=0, max=100)
    seed = T.Int(42, min=0, max=2**31 - 1)
    wandb = T.Enum(("offline", "online", "disabled"), default_value="offline")
    tensorboard = T.Bool(True)
    gradient_checkpointing = T.Bool(False, help="less activation memory, slower steps (train.gradient_checkpointing)")
    run_name = T.Unicode("", help="a label for the run in lists and plots")

    run_id = T.Unicode("", help="the run this panel launched (or follows)")
    status = T.Enum(STATUSES, default_value="idle")
    step = T.Int(0)
    max_steps = T.Int(0)
    epoch = T.Float(0.0)
    samples_per_second = T.Float(0.0)
    eta_seconds = T.Float(None, allow_none=True)
    error = T.Unicode("")
    read_only = T.Bool(False, help="hide Start/Stop (view runs only)")

    def __init__(self, home: str | Path | None = None, background: bool = True,
                 config_factory: Callable[[], Config] | None = None, **kwargs: Any) -> None:
        self.store = RunStore(home)
        self.home = self.store.home
        self.background = background
        self.config_factory: Callable[[], Config] = config_factory or self.default_config
        self.launcher: Callable[[Config], Any] = self.launch
        self.handle: Any = None
        self._base_train, self._base_track = TrainConfig(), TrackConfig()
        self._seq = 0
        self._times: list[tuple[int, float]] = []
        self._steps_per_epoch = 0
        self._poller = Poller(self._tick, POLL_S, name="train-panel-poll")
        style = S.label_style()
        cl = S.control_layout

        epochs = W.BoundedIntText(min=1, max=1000, description="Epochs", style=style, layout=cl())
        batch = W.BoundedIntText(min=1, max=4096, description="Batch size", style=style, layout=cl())
        lr = W.FloatLogSlider(base=10, min=-6, max=-2, step=0.1, description="Learning rate", readout_format=".1e",
                              style=style, layout=cl())
        warmup = W.FloatSlider(min=0.0, max=0.5, step=0.01, description="Warmup ratio", readout_format=".2f",
                               style=style, layout=cl())
        accum = W.BoundedIntText(min=1, max=1024, description="Grad accum.", style=style, layout=cl())
        self._max_length = W.BoundedIntText(min=8, max=131072, description="Max length", style=style, layout=cl())
        eval_every = W.BoundedIntText(min=0, max=10**7, description="Eval every", style=style, layout=cl())
        patience = W.BoundedIntText(min=0, max=100, description="Early stop after", style=style, layout=cl())
        seed = W.BoundedIntText(min=0, max=2**31 - 1, description="Seed", style=style, layout=cl())
        wandb = W.ToggleButtons(options=["offline", "online", "disabled"], description="wandb",
                                style={"description_width": S.LABEL_WIDTH, "button_width": "auto"},
                                layout=S.full_width())
        tensorboard = W.Checkbox(description="TensorBoard files", indent=False, layout=W.Layout(width="auto"))
        checkpointing = W.Checkbox(description="gradient checkpointing (less memory, ~1/3 slower steps)",
                                   indent=False, layout=W.Layout(width="auto"))
        name = W.Text(placeholder="optional", description="Run name", style=style, layout=cl())
        name.observe(self._on_name, names="value")
        hints = W.HTML(S.message("Eval every 0 = each epoch; early stop after N evaluations without "
                                 "improvement, 0 = off.", "muted"), layout=S.full_width())

        self._start = W.Button(description="Start", icon="play", button_style="success",
                               layout=W.Layout(width="auto"))
        self._stop = W.Button(description="Stop", icon="stop", button_style="warning", disabled=True,
                              layout=W.Layout(width="auto"))
        self._start.on_click(lambda _: self.start())
        self._stop.on_click(lambda _: self.stop())
        self._controls = W.Box([self._start, self._stop], layout=S.wrap_row())
        self._bar = W.IntProgress(value=0, min=0, max=1, layout=S.full_width())
        self._progress = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        super().__init__(children=[
            W.Box([epochs, batch, lr, warmup, accum, self._max_length, eval_every, patience, seed, name],
                  layout=S.wrap_row()),
            hints, wandb, W.Box([tensorboard, checkpointing], layout=S.wrap_row()), self._controls, self._bar, self._progress, self._error_html,
        ], **{"layout": S.full_width(), **kwargs})
        self._lr = lr
        self.observe(self._widen_lr_range, names="learning_rate")  # before the link: never clamp a config
        for control, trait in ((epochs, "epochs"), (batch, "batch_size"), (lr, "learning_rate"),
                               (warmup, "warmup_ratio"), (accum, "gradient_accumulation"),
                               (self._max_length, "max_length"), (eval_every, "eval_every"),
                               (patience, "early_stopping_patience"), (seed, "seed"), (wandb, "wandb"),
                               (tensorboard, "tensorboard"), (checkpointing, "gradient_checkpointing")):
            W.link((self, trait), (control, "value"))  # the trait is the source of truth
        self.observe(self._show_error, names="error")
        self.observe(self._show_progress, names=["status", "step", "max_steps", "epoch", "samples_per_second",
                                                 "eta_seconds", "run_id"])
        self.observe(self._show_read_only, names="read_only")
        self.observe(self._on_limit, names="max_length_limit")
        self._show_progress()

    # --- validation ---------------------------------------------------------------------
    @T.validate("learning_rate")
    def _valid_lr(self, proposal: dict[str, Any]) -> float:
        value = proposal["value"]
        if not 0 < value < 1:
            raise T.TraitError(f"learning_rate = {value!r}: a positive number below 1, e.g. 5e-4")
        return value

    @T.validate("max_length")
    def _valid_max_length(self, proposal: dict[str, Any]) -> int:
        """Cross-field: no more tokens than the model's context length."""
        limit = self.max_length_limit
        if limit is not None and proposal["value"] > limit:
            raise T.TraitError(f"max_length = {proposal['value']} is beyond the model's limit of {limit} tokens")
        return proposal["value"]

    def _widen_lr_range(self, change: dict[str, Any]) -> None:
        import math

        exponent = math.log10(change["new"])
        self._lr.min, self._lr.max = min(self._lr.min, math.floor(exponent)), max(self._lr.max, math.ceil(exponent))

    def _on_limit(self, change: dict[str, Any]) -> None:
        limit = change["new"]
        self._max_length.max = limit or 131072
        if limit is not None and self.max_length > limit:
            self.max_length = limit

    def _on_name(self, change: dict[str, Any]) -> None:
        value = change["new"] if isinstance(change["new"], str) else ""
        self.run_name = value.strip()[:100]

    # --- config -------------------------------------------------------------------------------
    def to_config(self) -> TrainConfig:
        """The TrainConfig; fields without a control here (scheduler, weight decay...) come from the last
        `from_config`, else the defaults. A WorkbenchError is shown inline and re-raised."""
        try:
            cfg = dataclasses.replace(
                self._base_train, epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                warmup_ratio=self.warmup_ratio, gradient_accumulation=self.gradient_accumulation,
                max_length=self.max_length, eval_every=self.eval_every,
                early_stopping_patience=self.early_stopping_patience, seed=self.seed,
                gradient_checkpointing=self.gradient_checkpointing)
        except WorkbenchError as exc:
            self.error = str(exc)
            raise
        return cfg

    def to_track_config(self) -> TrackConfig:
        return dataclasses.replace(self._base_track, wandb=self.wandb, tensorboard=self.tensorboard)

    def from_config(self, cfg: TrainConfig, track: TrackConfig | None = None, name: str | None = None) -> None:
        """Show a TrainConfig (and TrackConfig); fields without a control are kept for `to_config`."""
        self._base_train = cfg
        if track is not None:
            self._base_track = track
        with self.hold_trait_notifications():
            for trait in ("epochs", "batch_size", "learning_rate", "warmup_ratio", "gradient_accumulation",
                          "eval_every", "early_stopping_patience", "seed", "gradient_checkpointing"):
                setattr(self, trait, getattr(cfg, trait))
            if self.max_length_limit is not None and cfg.max_length > self.max_length_limit:
                self.max_length_limit = None  # the config's model may differ; its own check runs at Start
            self.max_length = cfg.max_length
            if track is not None:
                self.wandb, self.tensorboard = track.wandb, track.tensorboard
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
            config = self.config_factory()
        except WorkbenchError as exc:
            self.error = str(exc)
            return
        self.error, self.status = "", "checking"
        self._start.disabled = True
        run_job(lambda: self._preflight_and_launch(config), sync=not self.background, name="train-panel-start")

    def launch(self, config: Config) -> Any:
        """Queue `config` in the store and start it as its own process; returns its RunHandle."""
        from workbench.launch import launch

        return launch(config, home=self.store.home)

    def _preflight_and_launch(self, config: Config) -> None:
        from workbench.trainer import preflight

        try:
            preflight(config, self.store.home)
            handle = self.launcher(config)
        except WorkbenchError as exc:
            self.error, self.status = str(exc), "idle"
            self._start.disabled = False
            return
        except Exception as exc:  # an unexpected failure still reads as words, not a traceback
            self.error = f"could not start the run ({type(exc).__name__}: {str(exc)[:300]})"
            self.status = "idle"
            self._start.disabled = False
            return
        self.follow(handle)

    def follow(self, handle: Any) -> None:
        """Show the progress of a run (a RunHandle) and enable Stop."""
        self.handle, self._seq, self._times, self._steps_per_epoch = handle, 0, [], 0
        self.step, self.max_steps, self.epoch, self.samples_per_second, self.eta_seconds = 0, 0, 0.0, 0.0, None
        self.run_id = handle.id
        self.status = "queued"
        self._stop.disabled = False
        self._start.disabled = True
        if self.background:
            self._poller.start()

    def stop(self) -> None:
        """Ask the run to stop at its next step boundary (it saves a checkpoint and ends 'stopped')."""
        if self.handle is None or not self.active:
            return
        self.handle.stop()
        self.status = "stopping"
        self._stop.disabled = True

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
            self._stop.disabled, self._start.disabled = True, self.read_only
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
        parts = [f"run {self.run_id}" if self.run_id else "", self.status]
        if self.max_steps:
            parts.append(f"step {self.step}/{self.max_steps}")
            epochs = -(-self.max_steps // self._steps_per_epoch) if self._steps_per_epoch else None
            parts.append(f"epoch {int(self.epoch) + 1}" + (f"/{epochs}" if epochs else "") if self.step else "")
        if self.samples_per_second:
            parts.append(f"{self.samples_per_second:,.0f} samples/s")
        if self.active and self.eta_seconds is not None:
            parts.append(f"ETA {S.human_seconds(self.eta_seconds)}")
        self._progress.value = S.message(" | ".join(p for p in parts if p), "muted")

    def _show_read_only(self, change: Any = None) -> None:
        self._controls.layout.display = "none" if self.read_only else ""
        self._start.disabled = self.read_only or self.active

    def wait(self, timeout: float = 60.0, poll: float = 0.2) -> str:
        """Block until the launched run ends (scripts and tests); returns the status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status in FINAL_STATUSES or (self.status == "idle" and self.error):
                return self.status
            if not self.background and self.handle is not None:
                self._tick()
            time.sleep(poll)
        return self.status

    def close(self) -> None:
        self._poller.stop()
        super().close()
