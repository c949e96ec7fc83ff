"""Dashboard: pick, configure, train, watch, inspect, compare, try. All wiring lives in `wire()`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import ipywidgets as W
import traitlets as T

from workbench import Config, WorkbenchError
from workbench.catalog import MODELS
from workbench.loop.defaults import CPU_MAX_LENGTH
from workbench.store import FINAL_STATUSES, RunStore
from workbench.task_table import task_spec

from . import _style as S
from .compare import RunCompare
from .confusion import ConfusionMatrix
from .data_panel import DataPanel
from .deploy import DeployPanel
from .loss_curve import LossCurve
from .method_panel import MethodPanel
from .model_picker import ModelPicker
from .playground import Playground
from .run_summary import RunSummary
from .task_chooser import TaskChooser, dashboard_tasks
from .train_panel import TrainPanel
from .labelling import LabellingWidget
from .trust import TrustView

CATALOG_ONLY = tuple(MODELS)  # for Dashboard(models=...) on a page others can reach
CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def wire(train: TrainPanel, curve: LossCurve, confusion: ConfusionMatrix, compare: RunCompare,
         playground: Playground, model: ModelPicker | None = None, data: DataPanel | None = None,
         method: MethodPanel | None = None, deploy: DeployPanel | None = None,
         summary: RunSummary | None = None, trust: TrustView | None = None,
         labelling: LabellingWidget | None = None) -> None:
    """Connect the panels: the ONE place where one widget follows another (no setup panels when read-only)."""
    if model is not None and data is not None and method is not None:
        # the method's estimate follows the model, the data and the schedule
        T.dlink((model, "value"), (method, "model"))
        T.dlink((model, "trust_remote_code"), (method, "trust_remote_code"))
        T.dlink((data, "num_labels"), (method, "num_labels"))
        T.dlink((train, "batch_size"), (method, "batch_size"))
        # auto (None): the estimate assumes the longest a CPU run chooses
        T.dlink((train, "max_length"), (method, "max_length"),
                transform=lambda n: CPU_MAX_LENGTH if n is None else n)
        T.dlink((model, "context_length"), (train, "max_length_limit"))

    # the live views follow the run that Train launched (or shows)
    T.dlink((train, "run_id"), (curve, "run_ids"), transform=lambda run_id: [run_id] if run_id else [])
    T.dlink((train, "run_id"), (confusion, "run_id"))
    if summary is not None:  # the model beside its classical baseline, the run's choices, what answers
        T.dlink((train, "run_id"), (summary, "run_id"))
    if trust is not None:  # robustness and slices of the shown run; a file scored in the playground adds slices
        T.dlink((train, "run_id"), (trust, "run_id"))
        playground.observe(lambda change: trust.refresh() if change["new"] else None, names="evaluation")

    if labelling is not None:  # active learning: the shown run suggests what to label next
        T.dlink((train, "run_id"), (labelling, "run_id"))

    # a run that ends shows up in the comparison and the playground
    def on_status(change: dict[str, Any]) -> None:
        if change["new"] in FINAL_STATUSES or change["new"] == "queued":
            compare.refresh()
            playground.refresh_runs()
            if deploy is not None:  # a finished run can be optimised and served
                deploy.refresh_runs()
            if model is not None:  # a finished language-modeling run is a model to start from (run:<id>)
                model.refresh_runs()

    train.observe(on_status, names="status")
    if summary is not None and summary.extend is not None:  # a run "Extend run" started: listed when it ends
        summary.extend.observe(on_status, names="status")


class Dashboard(W.VBox):
    """Every panel in tabs and one config load/save bar; `read_only` builds the viewers only.

    `models` limits the model picker to those names (`CATALOG_ONLY`: the catalog) and keeps
    trust_remote_code off: a page others can reach (the Voila dashboard) passes it, so no model
    repository's code runs in its kernels; the default `None` (a notebook of one's own) allows any name,
    local directory or hub id, with the "trust remote code" box. `read_only=True` (set at construction, not changeable) builds
    no model, data, method or deploy panel, no upload, no config files and no Start/Stop at all, so a forged
    widget message has nothing to reach; the run status stays (which run is shown, and how it is going).
    `launcher` and `start_check` go to the TrainPanel (one run at a time: notebooks/dashboard_app.py).
    """

    read_only = T.Bool(False, read_only=True, help="view runs only: no training controls (public demos)")
    message = T.Unicode("", help="the outcome of the last load/save")

    def __init__(self, home: str | Path | None = None, read_only: bool = False, background: bool = True,
                 models: Sequence[str] | None = None, launcher: Callable[[Config], Any] | None = None,
                 start_check: Callable[[], None] | None = None, **kwargs: Any) -> None:
        self.store = RunStore(home)
        home = self.store.home
        self.set_trait("read_only", bool(read_only))
        self.model: ModelPicker | None = None
        self.data: DataPanel | None = None
        self.method: MethodPanel | None = None
        self.task: TaskChooser | None = None
        self.deploy: DeployPanel | None = None  # not built on a read-only page: it starts servers
        if not read_only:
            self.model = ModelPicker(home=home, background=background, choices=models)
            self.task = TaskChooser()  # the rows of the task table offered here (in_dashboard)
            self.data = DataPanel(home=home, background=background)
            W.dlink((self.task, "value"), (self.data, "task"))
            self.method = MethodPanel(home=home, background=background)
            self.deploy = DeployPanel(store=self.store, background=background)
        self.train = TrainPanel(home=home, background=background, read_only=read_only, config_factory=self.config,
                                launcher=launcher, start_check=start_check)
        self.curve = LossCurve(store=self.store, background=background)
        # "Extend run" (continual learning on new data) launches runs: not on a read-only page
        self.summary = RunSummary(store=self.store, background=background, extend=not read_only)
        self.confusion = ConfusionMatrix(store=self.store, background=background)
        self.compare = RunCompare(store=self.store, background=background)
        self.playground = Playground(store=self.store, background=background, uploads=not read_only)
        self.trust = TrustView(store=self.store, background=background, read_only=read_only)
        # labelling writes to data files: not on a read-only page
        self.labelling = None if read_only else LabellingWidget(None, store=self.store, background=background,
                                                                uploads=True)
        wire(self.train, self.curve, self.confusion, self.compare, self.playground, self.model, self.data,
             self.method, self.deploy, self.summary, self.trust, self.labelling)
        self.tabs = W.Tab(layout=S.full_width())
        if read_only:
            tabs = [("Runs", self.compare),
                    ("Watch", W.VBox([self.train, self.curve, self.summary, self.confusion, self.trust],
                                     layout=S.full_width())),
                    ("Try", self.playground)]
            children: list[W.Widget] = [self.tabs]
        else:
            children = [self._build_config_bar(), self.tabs]
            self._setup = setup = W.VBox([S.section("1. Model"), self.model, S.section("2. Data"), self.task, self.data,
                            S.section("3. Method"), self.method], layout=S.full_width())
            self._run_tab = run_tab = W.VBox([S.section("4. Train"), self.train, S.section("5. Watch"), self.curve,
                              S.section("Against the classical baseline"), self.summary,
                              S.section("6. Inspect"), self.confusion,
                              S.section("7. Trust: perturbed texts, out-of-domain texts, slices"), self.trust],
                             layout=S.full_width())
            tabs = [("Set up", setup), ("Train & watch", run_tab), ("Compare runs", self.compare),
                    ("Try it", self.playground), ("Label", self.labelling), ("Deploy", self.deploy)]
        self.tabs.children = [w for _, w in tabs]
        self.tabs.titles = tuple(t for t, _ in tabs)
        super().__init__(children=children, **{"layout": S.full_width(), **kwargs})
        if not read_only:
            self.observe(lambda c: setattr(self._message, "value", S.message(c["new"], "muted")), names="message")
            self._list_configs()

    def _build_config_bar(self) -> W.VBox:
        style = S.label_style()
        self._config_name = W.Combobox(placeholder="name.yaml", description="Config file", ensure_option=False,
                                       style=style, layout=S.control_layout())
        load = W.Button(description="Load", icon="folder-open", layout=W.Layout(width="auto"))
        save = W.Button(description="Save", icon="save", layout=W.Layout(width="auto"))
        load.on_click(lambda _: self._load_clicked())
        save.on_click(lambda _: self._save_clicked())
        self._message = W.HTML("", layout=S.full_width())
        return W.VBox([W.Box([self._config_name, load, save], layout=S.wrap_row()), self._message],
                      layout=S.full_width())

    # --- config files ---------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.store.home / "configs"

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise WorkbenchError("this page is read-only: runs can be watched, compared and tried, not set up")

    def config(self) -> Config:
        """The whole Config from every panel (a WorkbenchError is shown in the panel it concerns)."""
        self._refuse_if_read_only()
        return Config(task=self.task.value, model=self.model.value, trust_remote_code=self.model.trust_remote_code,
                      name=self.train.run_name or None, data=self.data.to_config(), method=self.method.to_config(),
                      train=self.train.to_config(), track=self.train.to_track_config())

    def from_config(self, cfg: Config) -> None:
        """Show a Config in every panel (a model this page does not offer is refused, nothing changed)."""
        self._refuse_if_read_only()
        if cfg.task not in dashboard_tasks():
            *first, last = dashboard_tasks()
            raise WorkbenchError(f"this page sets up {', '.join(first)} and {last} runs: a task: {cfg.task} run "
                                 f"({task_spec(cfg.task).title}) starts from the CLI (workbench train CONFIG) or a "
                                 "notebook")
        try:
            self.task.value = cfg.task
            self.model.trust_remote_code = cfg.trust_remote_code
            self.model.value = cfg.model
        except T.TraitError as exc:
            raise WorkbenchError(str(exc)) from None
        self.data.from_config(cfg.data)
        self.method.from_config(cfg.method)
        self.train.from_config(cfg.train, cfg.track, cfg.name or "")

    def load_config(self, path: str | Path) -> Config:
        """Load a YAML config (any path: this is the Python API) and show it."""
        self._refuse_if_read_only()
        cfg = Config.load(path)
        self.from_config(cfg)
        self.message = f"loaded {Path(path).name}"
        return cfg

    def save_config(self, path: str | Path) -> Path:
        """Save the current settings as YAML (any path: this is the Python API)."""
        self.config().save(path)
        self.message = f"saved {Path(path).name}"
        return Path(path)

    def _config_path(self) -> Path:
        """The file named in the page: a plain name inside <home>/configs (a page visitor may type anything)."""
        self._refuse_if_read_only()
        name = self._config_name.value if isinstance(self._config_name.value, str) else ""
        name = name.strip()
        if name and not name.endswith((".yaml", ".yml")):
            name += ".yaml"
        if not CONFIG_NAME.match(name) or ".." in name:
            raise WorkbenchError(f"config name {name[:60]!r} is not allowed: use letters, digits, '.', '_' or '-' "
                                 f"(it is saved in {self.config_dir})")
        return self.config_dir / name

    def _load_clicked(self) -> None:
        try:
            self.load_config(self._config_path())
        except WorkbenchError as exc:
            self.message = str(exc)

    def _save_clicked(self) -> None:
        try:
            path = self._config_path()
            self.config_dir.mkdir(parents=True, exist_ok=True)
            self.save_config(path)
        except WorkbenchError as exc:
            self.message = str(exc)
        self._list_configs()

    def _list_configs(self) -> None:
        if self.read_only:
            return
        files = sorted(p.name for p in self.config_dir.glob("*.y*ml")) if self.config_dir.is_dir() else []
        self._config_name.options = files
