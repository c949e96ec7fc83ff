"""MethodPanel: the tuning method, its knobs, and a live readout of trainable parameters and memory.

Methods are a registry, `METHOD_PANELS` (name -> sub-panel builder). A builder receives the panel and
returns the widget with that method's controls, linked to the panel's traits; `to_config()` reads every
`MethodConfig` field from the trait of the same name. A new method is a new builder (and, if it has
new knobs, new traits named like its new `MethodConfig` fields): nothing else is rewritten.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import traitlets as T

from workbench import MethodConfig, WorkbenchError
from workbench.catalog import DEFAULT_MODEL

from . import _style as S
from ._background import Debouncer

DEBOUNCE_S = 0.4
SubPanelBuilder = Callable[["MethodPanel"], W.Widget]


def _note(text: str) -> W.HTML:
    return W.HTML(S.message(text, "muted"), layout=S.full_width())


def full_panel(panel: "MethodPanel") -> W.Widget:
    return _note("Every weight trains. Best accuracy, most memory; use a small learning rate (2e-5).")


def head_only_panel(panel: "MethodPanel") -> W.Widget:
    return _note("The pretrained encoder is frozen; only the task head (classifier and pooler) trains. "
                 "Fast and light; a baseline.")


def lora_panel(panel: "MethodPanel") -> W.Widget:
    """Rank, alpha, dropout, target layers and the trained head; shared by lora and qlora."""
    if panel._lora_box is not None:
        return panel._lora_box
    style = S.label_style()
    r = W.IntSlider(min=1, max=256, description="Rank r", style=style, layout=S.control_layout())
    alpha = W.BoundedFloatText(min=0.001, max=10_000, step=1, description="Alpha", style=style,
                               layout=S.control_layout())
    dropout = W.FloatSlider(min=0.0, max=0.9, step=0.05, description="Dropout", readout_format=".2f",
                            style=style, layout=S.control_layout())
    head = W.Checkbox(description="train the head (classifier, pooler, new layers)", indent=False,
                      layout=W.Layout(width="auto"))
    for control, name in ((r, "r"), (alpha, "alpha"), (dropout, "dropout"), (head, "train_head")):
        W.link((panel, name), (control, "value"))
    targets = panel._targets
    box = W.VBox([
        W.Box([r, alpha, dropout], layout=S.wrap_row()),
        targets,
        _note("Target layers: none selected = auto (every linear layer of the backbone). "
              "Ctrl/Cmd-click to choose several."),
        head,
    ], layout=S.full_width())
    panel._lora_box = box
    return box


def qlora_panel(panel: "MethodPanel") -> W.Widget:
    style = S.label_style()
    quant = W.Dropdown(options=["nf4", "fp4"], description="4-bit type", style=style, layout=S.control_layout())
    double = W.Checkbox(description="double quantisation", indent=False, layout=W.Layout(width="auto"))
    dtype = W.Dropdown(options=["float32", "bfloat16"], description="Compute dtype", style=style,
                       layout=S.control_layout())
    for control, name in ((quant, "quant_type"), (double, "double_quant"), (dtype, "compute_dtype")):
        W.link((panel, name), (control, "value"))
    return W.VBox([lora_panel(panel), S.section("Quantisation (bitsandbytes)"),
                   W.Box([quant, dtype, double], layout=S.wrap_row())], layout=S.full_width())


METHOD_PANELS: dict[str, SubPanelBuilder] = {
    "full": full_panel,
    "head-only": head_only_panel,
    "lora": lora_panel,
    "qlora": qlora_panel,
}


def register_method(name: str, builder: SubPanelBuilder) -> None:
    """Add (or replace) a method's sub-panel; panels built afterwards offer it."""
    METHOD_PANELS[name] = builder


class MethodPanel(W.VBox):
    """Choose the tuning method; `to_config()` gives the `MethodConfig`, `estimate` the live readout.

    `model`, `batch_size`, `max_length` and `num_labels` follow the other panels (see dashboard.wire).
    """

    method = T.Unicode("lora", help="a key of METHOD_PANELS")
    r = T.Int(8, min=1)
    alpha = T.Float(16.0)
    dropout = T.Float(0.1, min=0.0, max=0.99)
    target_modules = T.List(T.Unicode(), help="layer names for adapters; empty = auto")
    train_head = T.Bool(True)
    quant_type = T.Enum(("nf4", "fp4"), default_value="nf4")
    double_quant = T.Bool(True)
    compute_dtype = T.Enum(("float32", "bfloat16"), default_value="float32")

    model = T.Unicode(DEFAULT_MODEL, help="followed from ModelPicker.value")
    trust_remote_code = T.Bool(False)
    batch_size = T.Int(16, min=1, help="followed from TrainPanel")
    max_length = T.Int(256, min=8, help="followed from TrainPanel")
    num_labels = T.Int(2, min=2, help="followed from DataPanel")

    linear_layers = T.List(T.Unicode(), help="the model's linear layer names (LoRA candidates)")
    estimate = T.Dict(allow_none=True, default_value=None, help="inspect_model() for the current settings")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, background: bool = True, **kwargs: Any) -> None:
        self.home = Path(home).resolve() if home is not None else None
        self._lora_box: W.Widget | None = None
        self._subpanels: dict[str, W.Widget] = {}
        self._targets = W.SelectMultiple(options=[], description="Target layers", rows=5,
                                         style=S.label_style(), layout=S.full_width(max_width="32em"))
        self._method = W.ToggleButtons(options=list(METHOD_PANELS), value=self.method, description="Method",
                                       style={"description_width": S.LABEL_WIDTH, "button_width": "auto"},
                                       layout=S.full_width())
        self._body = W.VBox([], layout=S.full_width())
        self._readout = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self._estimate = Debouncer(self._estimate_now, DEBOUNCE_S if background else 0)
        super().__init__(children=[self._method, self._body, S.section("Estimate"), self._readout,
                                   self._error_html], **{"layout": S.full_width(), **kwargs})

        self._method.observe(self._on_method_button, names="value")
        self._targets.observe(self._on_targets_control, names="value")
        self.observe(self._show_method, names="method")
        self.observe(self._show_layers, names="linear_layers")
        self.observe(self._show_targets, names="target_modules")
        self.observe(self._show_error, names="error")
        self.observe(self._show_estimate, names="estimate")
        self.observe(self._schedule, names=["method", "r", "model", "trust_remote_code", "batch_size",
                                            "max_length", "num_labels", "target_modules", "train_head"])
        self._show_method()
        self._schedule()

    # --- validation -----------------------------------------------------------------
    @T.validate("method")
    def _valid_method(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] not in METHOD_PANELS:
            raise T.TraitError(f"method {proposal['value']!r} is unknown: choose from {', '.join(METHOD_PANELS)}")
        return proposal["value"]

    @T.validate("target_modules")
    def _valid_targets(self, proposal: dict[str, Any]) -> list[str]:
        """Cross-field: once the model's layers are known, only its layer names can be targets."""
        wanted = list(dict.fromkeys(proposal["value"]))
        if self.linear_layers:
            wanted = [t for t in wanted if t in self.linear_layers]
        return wanted

    @T.validate("alpha")
    def _valid_alpha(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise T.TraitError(f"alpha = {proposal['value']!r}: a positive number (typical: 2 x r)")
        return proposal["value"]

    # --- control -> traits -------------------------------------------------------------
    def _on_method_button(self, change: dict[str, Any]) -> None:
        if change["new"] in METHOD_PANELS:
            self.method = change["new"]

    def _on_targets_control(self, change: dict[str, Any]) -> None:
        if not self._targets.options:
            return  # options not known yet: keep what the config asked for
        self.target_modules = [t for t in change["new"] if t in self._targets.options]

    # --- traits -> view --------------------------------------------------------------------
    def _show_method(self, change: Any = None) -> None:
        name = self.method
        if name not in self._subpanels:
            self._subpanels[name] = METHOD_PANELS[name](self)
        self._method.value = name
        self._body.children = [self._subpanels[name]]

    def _show_layers(self, change: Any = None) -> None:
        """New model, new layer names: refill the multi-select, keeping the chosen names it still has."""
        keep = tuple(t for t in self.target_modules if t in self.linear_layers)
        if tuple(self._targets.options) != tuple(self.linear_layers):
            self._targets.options = list(self.linear_layers)  # resets the selection ...
        self._targets.value = keep  # ... so restore it

    def _show_targets(self, change: Any = None) -> None:
        self._targets.value = tuple(t for t in self.target_modules if t in self._targets.options)

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_estimate(self, change: Any = None) -> None:
        est = self.estimate
        if not est:
            self._readout.value = ""
            return
        trainable, total = est["trainable_parameters"], est["parameters"]
        pct = 100.0 * trainable / max(total, 1)
        mem = est.get("memory_breakdown_mb", {})
        note = ""
        if self.method in ("lora", "qlora") and self.target_modules:
            note = " (counted with adapters on every linear layer; your selection trains fewer)"
        self._readout.value = (
            f"<div><b>{html.escape(S.human_count(trainable))}</b> trainable of "
            f"{html.escape(S.human_count(total))} parameters (<b>{pct:.2f}%</b>){html.escape(note)}</div>"
            f"<div>Training memory estimate: <b>{est.get('memory_estimate_mb', 0):,} MB</b> "
            f'<span style="color:{S.MUTED_COLOR}">(weights {mem.get("weights", 0):,}, gradients and optimiser '
            f'{mem.get("gradients_and_optimiser", 0):,}, activations {mem.get("activations", 0):,}) '
            f"at batch {self.batch_size}, {self.max_length} tokens</span></div>")

    # --- the estimate (worker thread, debounced) ----------------------------------------------
    def _schedule(self, change: Any = None) -> None:
        self._estimate()

    def _estimate_now(self) -> None:
        from workbench.methods import inspect_model

        args = (self.model, self.method, self.batch_size, self.max_length, self.num_labels, self.r,
                self.trust_remote_code)
        if self.method not in ("full", "head-only", "lora", "qlora"):
            self.estimate, self.error = None, ""  # a method inspect_model does not know: no estimate
            return
        try:
            est = inspect_model(args[0], self.home, method=args[1], batch_size=args[2], max_length=args[3],
                                num_labels=args[4], r=args[5], trust_remote_code=args[6])
            error = ""
        except WorkbenchError as exc:
            est, error = None, str(exc)
        except Exception as exc:  # a config transformers cannot build
            est, error = None, f"no estimate for {args[0]!r} ({type(exc).__name__}: {str(exc)[:200]})"
        current = (self.model, self.method, self.batch_size, self.max_length, self.num_labels, self.r,
                   self.trust_remote_code)
        if current != args:
            return  # settings changed meanwhile; the next run reports
        if est is not None:
            self.linear_layers = list(est.get("linear_layers", []))
        self.estimate, self.error = est, error
        if est is not None:
            self._show_estimate()  # the note depends on target_modules too

    def refresh(self) -> None:
        """Recompute the estimate now, inline."""
        self._estimate.cancel()
        self._estimate._run()

    def wait(self, timeout: float = 30.0) -> bool:
        return self._estimate.wait(timeout)

    # --- config -----------------------------------------------------------------------------
    def to_config(self) -> MethodConfig:
        """The MethodConfig; every field is read from the trait of the same name."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(MethodConfig):
            if f.name == "name":
                values["name"] = self.method
            elif f.name == "target_modules":
                values["target_modules"] = list(self.target_modules) or "auto"
            elif self.has_trait(f.name):
                values[f.name] = getattr(self, f.name)
        try:
            cfg = MethodConfig(**values)
        except WorkbenchError as exc:
            self.error = str(exc)
            raise
        self.error = ""
        return cfg

    def from_config(self, cfg: MethodConfig) -> None:
        """Show a MethodConfig ('auto' and 'all-linear' both show as no selection: every backbone layer)."""
        with self.hold_trait_notifications():
            for f in dataclasses.fields(MethodConfig):
                if f.name == "name":
                    self.method = cfg.name
                elif f.name == "target_modules":
                    targets = cfg.target_modules
                    self.target_modules = list(targets) if isinstance(targets, list) else []
                elif self.has_trait(f.name):
                    setattr(self, f.name, getattr(cfg, f.name))
