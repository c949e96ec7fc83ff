"""MethodPanel: the tuning method, its knobs, and a live readout of trainable parameters and memory.

Methods are a registry, `METHOD_PANELS` (name -> `MethodEntry`: a sub-panel builder, and whether the
core's `inspect_model` gives the live estimate from the panel's traits). A builder receives the panel and
returns the widget with that method's controls, linked to the panel's traits; `to_config()` reads every
`MethodConfig` field from the trait of the same name. A new method is a new builder (and, if it has
new knobs, new traits named like its new `MethodConfig` fields): nothing else is rewritten.

The method selector offers every name in `workbench.config.METHODS` (read when a panel is built), then
any extra registered name; a core method without an entry gets `no_settings_panel`, so a method added
to the core later (a zero-shot baseline, say) can be chosen before anyone writes its sub-panel.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import traitlets as T

from workbench import MethodConfig, WorkbenchError
from workbench import config as core_config
from workbench.catalog import DEFAULT_MODEL
from workbench.methods import METHODS as METHOD_SPECS
from workbench.methods import methods_where

from . import _style as S
from ._background import Debouncer

DEBOUNCE_S = 0.4
SubPanelBuilder = Callable[["MethodPanel"], W.Widget]


def _note(text: str) -> W.HTML:
    return W.HTML(S.message(text, "muted"), layout=S.full_width())


def _check(panel: "MethodPanel", name: str, description: str) -> W.Checkbox:
    box = W.Checkbox(description=description, indent=False, layout=W.Layout(width="auto"))
    W.link((panel, name), (box, "value"))
    return box


def _head_checkbox(panel: "MethodPanel") -> W.Checkbox:
    return _check(panel, "train_head", "train the head (classifier, pooler, new layers)")


def _alpha_dropout(panel: "MethodPanel") -> list[W.Widget]:
    style = S.label_style()
    alpha = W.BoundedFloatText(min=0.001, max=10_000, step=1, description="Alpha", style=style,
                               layout=S.control_layout())
    dropout = W.FloatSlider(min=0.0, max=0.9, step=0.05, description="Dropout", readout_format=".2f",
                            style=style, layout=S.control_layout())
    W.link((panel, "alpha"), (alpha, "value"))
    W.link((panel, "dropout"), (dropout, "value"))
    return [alpha, dropout]


def _int_box(panel: "MethodPanel", name: str, description: str, maximum: int = 100_000) -> W.BoundedIntText:
    """A whole-number box with a wide range, so from_config never clamps a valid value."""
    box = W.BoundedIntText(min=1, max=maximum, description=description, style=S.label_style(),
                           layout=S.control_layout())
    W.link((panel, name), (box, "value"))
    return box


def full_panel(panel: "MethodPanel") -> W.Widget:
    return _note("Every weight trains. Best accuracy, most memory; use a small learning rate (2e-5).")


def head_only_panel(panel: "MethodPanel") -> W.Widget:
    return _note("The pretrained encoder is frozen; only the task head (classifier and pooler) trains. "
                 "Fast and light; a baseline.")


def no_settings_panel(panel: "MethodPanel") -> W.Widget:
    """The registry's fallback: a core method nobody has written a sub-panel for (e.g. a zero-shot one)."""
    trains = ("Nothing trains: the pretrained model is evaluated as it is. "
              if panel.method in getattr(core_config, "ZERO_SHOT_METHODS", ()) else "")
    return _note(f"{trains}Method {panel.method!r} has no settings in this panel: it runs with the values of "
                 "a loaded config, else the core's defaults.")


def lora_panel(panel: "MethodPanel") -> W.Widget:
    """Rank, alpha, dropout, rsLoRA/DoRA, target layers and the trained head; shared by lora and qlora."""
    if panel._lora_box is not None:
        return panel._lora_box
    style = S.label_style()
    r = W.IntSlider(min=1, max=256, description="Rank r", style=style, layout=S.control_layout())
    W.link((panel, "r"), (r, "value"))
    box = W.VBox([
        W.Box([r, *_alpha_dropout(panel)], layout=S.wrap_row()),
        W.Box([_check(panel, "use_rslora", "rsLoRA: scale by alpha / sqrt(r) (steadier at high rank)"),
               _check(panel, "use_dora", "DoRA: also train a magnitude per output feature")],
              layout=S.wrap_row()),
        panel._targets,
        _note("Target layers: none selected = auto (every linear layer of the backbone). "
              "Ctrl/Cmd-click to choose several."),
        _head_checkbox(panel),
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


def adalora_panel(panel: "MethodPanel") -> W.Widget:
    """LoRA whose ranks start at init_r and are pruned, by importance, to an average of r."""
    style = S.label_style()
    ratio = {"min": 0.0, "max": 0.99, "step": 0.01, "readout_format": ".2f", "style": style,
             "layout": S.control_layout()}
    warmup = W.FloatSlider(description="Warm-up share", **ratio)
    final = W.FloatSlider(description="Final share", **ratio)
    W.link((panel, "rank_warmup_ratio"), (warmup, "value"))
    W.link((panel, "rank_final_ratio"), (final, "value"))
    return W.VBox([
        _note("AdaLoRA: every target layer starts at rank init_r; after the warm-up share of the steps, the "
              "least important ranks are pruned until the average is r, then the final share trains with "
              "the ranks fixed."),
        W.Box([_int_box(panel, "init_r", "Start rank init_r", 1024),
               _int_box(panel, "r", "Average rank r", 256), *_alpha_dropout(panel)], layout=S.wrap_row()),
        W.Box([warmup, final], layout=S.wrap_row()),
        panel._targets,
        _note("Target layers: none selected = auto (every linear layer of the backbone)."),
        _head_checkbox(panel),
    ], layout=S.full_width())


def ia3_panel(panel: "MethodPanel") -> W.Widget:
    return W.VBox([
        _note("IA3: learned vectors rescale chosen activations; the fewest trained parameters of the "
              "adapter methods. No rank or alpha."),
        panel._targets,
        _note("Target layers: none selected = auto (keys, values and the feed-forward down projections)."),
        _check(panel, "all_linear", "with none selected: every linear layer (all-linear) instead of auto"),
        _head_checkbox(panel),
    ], layout=S.full_width())


def _virtual_tokens_panel(panel: "MethodPanel", what: str) -> W.Widget:
    return W.VBox([
        _note(what + " train.max_length plus the virtual tokens must fit the model's context."),
        W.Box([_int_box(panel, "num_virtual_tokens", "Virtual tokens", 4096)], layout=S.wrap_row()),
        _head_checkbox(panel),
    ], layout=S.full_width())


def prompt_tuning_panel(panel: "MethodPanel") -> W.Widget:
    return _virtual_tokens_panel(panel, "Prompt tuning: trained embeddings (virtual tokens) are put before every "
                                        "input; the model itself stays frozen.")


def prefix_tuning_panel(panel: "MethodPanel") -> W.Widget:
    return _virtual_tokens_panel(panel, "Prefix tuning: trained keys and values (virtual tokens) in every "
                                        "attention layer; the model itself stays frozen.")


def zero_shot_embedding_panel(panel: "MethodPanel") -> W.Widget:
    text = W.Text(description="Label text", style=S.label_style(), layout=S.control_layout())
    W.link((panel, "label_template"), (text, "value"))
    return W.VBox([
        _note("Nothing trains: each text is compared with a text per label (cosine of the encoder's mean-pooled "
              "embeddings); {label} is replaced by each label's name. An encoder model (minilm-l6)."),
        W.Box([text], layout=S.wrap_row()),
    ], layout=S.full_width())


def zero_shot_prompt_panel(panel: "MethodPanel") -> W.Widget:
    scoring = W.Dropdown(options=["sum", "mean", "first"], description="Label score", style=S.label_style(),
                         layout=S.control_layout())
    shots = W.BoundedIntText(min=0, max=64, description="Examples (k)", style=S.label_style(),
                             layout=S.control_layout())
    W.link((panel, "prompt_scoring"), (scoring, "value"))
    W.link((panel, "few_shot_k"), (shots, "value"))
    return W.VBox([
        _note("Nothing trains: a causal LM (smollm2-135m-instruct) is asked which label fits each text; only the "
              "label tokens are scored. Examples (k): labelled training texts shown in the prompt first."),
        W.Box([scoring, shots], layout=S.wrap_row()),
        _check(panel, "prompt_calibration", "calibrate: divide out the label bias the prompt alone has"),
    ], layout=S.full_width())


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """A registered method: its sub-panel builder, and whether the live estimate applies.

    `estimate` is true when `inspect_model` knows the method and reads its knobs from the panel's
    traits; otherwise the readout stays empty rather than show numbers for something else.
    """

    build: SubPanelBuilder
    estimate: bool = False

    def __call__(self, panel: "MethodPanel") -> W.Widget:
        return self.build(panel)


METHOD_PANELS: dict[str, MethodEntry] = {
    "full": MethodEntry(full_panel, estimate=True),
    "head-only": MethodEntry(head_only_panel, estimate=True),
    "lora": MethodEntry(lora_panel, estimate=True),
    "qlora": MethodEntry(qlora_panel, estimate=True),
    "adalora": MethodEntry(adalora_panel, estimate=True),
    "ia3": MethodEntry(ia3_panel, estimate=True),
    "prompt-tuning": MethodEntry(prompt_tuning_panel, estimate=True),
    "prefix-tuning": MethodEntry(prefix_tuning_panel, estimate=True),
    "zero-shot-embedding": MethodEntry(zero_shot_embedding_panel),
    "zero-shot-prompt": MethodEntry(zero_shot_prompt_panel),
}
PROMPT_ONLY = {"few_shot_k": 0, "prompt_calibration": False}  # zero-shot-prompt options: neutral elsewhere
NO_SETTINGS = MethodEntry(no_settings_panel, estimate=False)
LORA_VARIANT_METHODS = methods_where(lora_variants=True)  # the methods that take use_rslora / use_dora
AUTO_IS_ALL_LINEAR = methods_where(auto_is_all_linear=True)  # where 'auto' = every backbone linear layer
# where 'all-linear' is not the same layers as 'auto' (ia3: keys, values and feed-forward layers)
ALL_LINEAR_DIFFERS = tuple(m for m in methods_where(family="adapter") if m not in AUTO_IS_ALL_LINEAR)


def register_method(name: str, builder: SubPanelBuilder, estimate: bool = False) -> None:
    """Add (or replace) a method's sub-panel; panels built afterwards offer it.

    Pass `estimate=True` only when the core's `inspect_model` knows the method and the sub-panel's
    controls are the panel's traits (so the readout counts what the controls say).
    """
    METHOD_PANELS[name] = MethodEntry(builder, estimate)


def method_entry(name: str) -> MethodEntry:
    """The registered entry, or the generic no-settings one for a core method without a sub-panel."""
    return METHOD_PANELS.get(name, NO_SETTINGS)


def method_names() -> list[str]:
    """What the selector offers: the core's methods in its order, then registered extras."""
    core = list(core_config.METHODS)
    return core + [name for name in METHOD_PANELS if name not in core]


class MethodPanel(W.VBox):
    """Choose the tuning method; `to_config()` gives the `MethodConfig`, `estimate` the live readout.

    `model`, `batch_size`, `max_length` and `num_labels` follow the other panels (see dashboard.wire).
    When the model cannot take the method (prefix-tuning on BERT), `refusal` holds the core's reason:
    it shows next to the method selector and `to_config()` raises it.
    """

    method = T.Unicode("lora", help="a name of workbench.config.METHODS or a key of METHOD_PANELS")
    r = T.Int(8, min=1)
    alpha = T.Float(16.0)
    dropout = T.Float(0.1, min=0.0, max=0.99)
    target_modules = T.List(T.Unicode(), help="layer names for adapters; empty = auto")
    all_linear = T.Bool(False, help="with no target selected: 'all-linear' instead of 'auto' (ia3 only)")
    train_head = T.Bool(True)
    use_rslora = T.Bool(False, help="lora, qlora")
    use_dora = T.Bool(False, help="lora, qlora")
    init_r = T.Int(12, min=1, help="adalora")
    rank_warmup_ratio = T.Float(0.1, min=0.0, max=1.0, help="adalora")
    rank_final_ratio = T.Float(0.2, min=0.0, max=1.0, help="adalora")
    num_virtual_tokens = T.Int(20, min=1, help="prompt-tuning, prefix-tuning")
    quant_type = T.Enum(("nf4", "fp4"), default_value="nf4")
    double_quant = T.Bool(True)
    compute_dtype = T.Enum(("float32", "bfloat16"), default_value="float32")
    label_template = T.Unicode(MethodConfig.label_template, help="zero-shot-embedding")
    prompt_scoring = T.Enum(("sum", "mean", "first"), default_value="sum", help="zero-shot-prompt")
    few_shot_k = T.Int(0, min=0, help="zero-shot-prompt")
    prompt_calibration = T.Bool(False, help="zero-shot-prompt")

    model = T.Unicode(DEFAULT_MODEL, help="followed from ModelPicker.value")
    trust_remote_code = T.Bool(False)
    batch_size = T.Int(16, min=1, help="followed from TrainPanel")
    max_length = T.Int(256, min=8, help="followed from TrainPanel")
    num_labels = T.Int(2, min=2, help="followed from DataPanel")

    linear_layers = T.List(T.Unicode(), help="the model's linear layer names (LoRA candidates)")
    estimate = T.Dict(allow_none=True, default_value=None, help="inspect_model() for the current settings")
    refusal = T.Unicode("", help="why the model cannot take the method (inspect_model's note), else empty")
    error = T.Unicode("")

    # the traits the estimate reads (besides the model and the schedule)
    ESTIMATE_KNOBS = ("r", "target_modules", "all_linear", "train_head", "num_virtual_tokens", "init_r",
                      "use_dora")

    def __init__(self, home: str | Path | None = None, background: bool = True, **kwargs: Any) -> None:
        self.home = Path(home).resolve() if home is not None else None
        self._lora_box: W.Widget | None = None
        self._loaded: tuple[str, dict[str, Any]] = ("", {})  # (method, fields with no trait) from from_config
        self._subpanels: dict[str, W.Widget] = {}
        self._targets = W.SelectMultiple(options=[], description="Target layers", rows=5,
                                         style=S.label_style(), layout=S.full_width(max_width="32em"))
        self._method = W.Dropdown(options=method_names(), value=self.method, description="Method",
                                  style=S.label_style(), layout=S.control_layout())
        self._refusal_html = W.HTML("", layout=W.Layout(flex="2 1 20em", min_width="0"))
        self._body = W.VBox([], layout=S.full_width())
        self._readout = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self._estimate = Debouncer(self._estimate_now, DEBOUNCE_S if background else 0)
        super().__init__(children=[W.Box([self._method, self._refusal_html], layout=S.wrap_row()), self._body,
                                   S.section("Estimate"), self._readout, self._error_html],
                         **{"layout": S.full_width(), **kwargs})

        self._method.observe(self._on_method_button, names="value")
        self._targets.observe(self._on_targets_control, names="value")
        self.observe(self._show_method, names="method")
        self.observe(self._show_layers, names="linear_layers")
        self.observe(self._show_targets, names="target_modules")
        self.observe(self._show_error, names=["error", "refusal"])
        self.observe(self._show_refusal, names="refusal")
        self.observe(self._show_estimate, names="estimate")
        self.observe(self._schedule, names=["method", "model", "trust_remote_code", "batch_size", "max_length",
                                            "num_labels", *self.ESTIMATE_KNOBS])
        self._show_method()
        self._schedule()

    # --- validation -----------------------------------------------------------------
    @T.validate("method")
    def _valid_method(self, proposal: dict[str, Any]) -> str:
        names = method_names()
        if proposal["value"] not in names:
            raise T.TraitError(f"method {proposal['value']!r} is unknown: choose from {', '.join(names)}")
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
        if change["new"] in method_names():
            self.method = change["new"]

    def _on_targets_control(self, change: dict[str, Any]) -> None:
        if not self._targets.options:
            return  # options not known yet: keep what the config asked for
        self.target_modules = [t for t in change["new"] if t in self._targets.options]

    # --- traits -> view --------------------------------------------------------------------
    def _show_method(self, change: Any = None) -> None:
        name = self.method
        if name not in self._subpanels:
            self._subpanels[name] = method_entry(name)(self)
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
        # a refusal raised by to_config() already shows next to the method selector
        shown = self.error if self.error != self.refusal else ""
        self._error_html.value = S.message(shown)

    def _show_refusal(self, change: Any = None) -> None:
        self._refusal_html.value = S.message(self.refusal)

    def _show_estimate(self, change: Any = None) -> None:
        est = self.estimate
        if not est:
            self._readout.value = ""
            return
        trainable, total = est["trainable_parameters"], est["parameters"]
        if trainable is None:  # the method cannot run on this model: the core says why
            self._readout.value = (f"<div>No trainable count for {html.escape(str(est.get('method')))} on this model "
                                   f"({html.escape(S.human_count(total))} parameters).</div>"
                                   + S.message(est.get("note") or "", "muted"))
            return
        pct = 100.0 * trainable / max(total, 1)
        mem = est.get("memory_breakdown_mb", {})
        self._readout.value = (
            f'<div><b title="{trainable:,}">{html.escape(S.human_count(trainable))}</b> trainable of '
            f'<span title="{total:,}">{html.escape(S.human_count(total))}</span> parameters (<b>{pct:.2f}%</b>)'
            f"{html.escape(self._count_note(est))}</div>"
            f"<div>Training memory estimate: <b>{est.get('memory_estimate_mb', 0):,} MB</b> "
            f'<span style="color:{S.MUTED_COLOR}">(weights {mem.get("weights", 0):,}, gradients and optimiser '
            f'{mem.get("gradients_and_optimiser", 0):,}, activations {mem.get("activations", 0):,}) '
            f"at batch {self.batch_size}, {self.max_length} tokens</span></div>")

    def _count_note(self, est: dict[str, Any]) -> str:
        """What the (exact) count is of, where the settings alone do not say."""
        method = est.get("method")
        parts = []
        if method in METHOD_SPECS and METHOD_SPECS[method].prunes_ranks:
            parts.append(f"counted at the starting rank init_r = {self.init_r}; pruning masks ranks, "
                         "the tensors stay")
        chosen = [t for t in self.target_modules if t in self.linear_layers]
        if method in AUTO_IS_ALL_LINEAR and chosen and len(chosen) < len(self.linear_layers):
            parts.append(f"adapters on {', '.join(chosen)} only: the selection trains fewer than auto")
        if est.get("note"):
            parts.append(str(est["note"]))
        return f" ({'; '.join(parts)})" if parts else ""

    # --- the estimate (worker thread, debounced) ----------------------------------------------
    def _schedule(self, change: Any = None) -> None:
        if change is not None and change["name"] in ("method", "model", "trust_remote_code"):
            self.refusal = ""  # the last refusal was about another model or method
        self._estimate()

    def _estimate_args(self) -> dict[str, Any]:
        """inspect_model's arguments for the current settings."""
        targets: str | list[str] = list(self.target_modules) or self._auto_targets()
        return {"name": self.model, "method": self.method, "batch_size": self.batch_size,
                "max_length": self.max_length, "num_labels": self.num_labels, "r": self.r,
                "target_modules": targets, "train_head": self.train_head,
                "trust_remote_code": self.trust_remote_code, "num_virtual_tokens": self.num_virtual_tokens,
                "init_r": self.init_r, "use_dora": self.use_dora and self.method in LORA_VARIANT_METHODS}

    def _auto_targets(self) -> str:
        return "all-linear" if self.all_linear and self.method in ALL_LINEAR_DIFFERS else "auto"

    def _estimate_now(self) -> None:
        from workbench.models.inspect import inspect_model

        args = self._estimate_args()
        if not method_entry(self.method).estimate or self.method not in core_config.METHODS:
            self.estimate, self.refusal, self.error = None, "", ""  # no estimate for it: no stale numbers
            return
        try:
            est = inspect_model(home=self.home, **args)
            error = ""
        except WorkbenchError as exc:
            est, error = None, str(exc)
        except Exception as exc:  # a config transformers cannot build
            est, error = None, f"no estimate for {args['name']!r} ({type(exc).__name__}: {str(exc)[:200]})"
        if self._estimate_args() != args:
            return  # settings changed meanwhile; the next run reports
        if est is not None:
            self.linear_layers = list(est.get("linear_layers", []))
        refusal = str(est.get("note") or "") if est is not None and est["trainable_parameters"] is None else ""
        self.estimate, self.refusal, self.error = est, refusal, error
        if est is not None:
            self._show_estimate()  # the note depends on target_modules too

    def refresh(self) -> None:
        """Recompute the estimate now, inline."""
        self._estimate.cancel()
        self._estimate._run()

    def wait(self, timeout: float | None = None) -> bool:
        return self._estimate.wait(timeout)

    # --- config -----------------------------------------------------------------------------
    def to_config(self) -> MethodConfig:
        """The MethodConfig; every field is read from the trait of the same name.

        Knobs the chosen method's sub-panel hides, and which the core would refuse for it, are left at
        their neutral value (no target list for virtual-token methods, no rsLoRA/DoRA outside lora and
        qlora); fields with no trait come from the last from_config() while its method is chosen, else
        the defaults. A refusal by the model (`refusal`) raises like any invalid setting.
        """
        name = self.method
        values: dict[str, Any] = {}
        for f in dataclasses.fields(MethodConfig):
            if f.name == "name":
                values["name"] = name
            elif f.name == "target_modules":
                uses_targets = name not in core_config.VIRTUAL_TOKEN_METHODS
                values["target_modules"] = (list(self.target_modules) if uses_targets else []) or self._auto_targets()
            elif f.name in ("use_rslora", "use_dora"):
                values[f.name] = getattr(self, f.name) and name in LORA_VARIANT_METHODS
            elif f.name in PROMPT_ONLY and (name not in METHOD_SPECS or f.name not in METHOD_SPECS[name].fields):
                values[f.name] = PROMPT_ONLY[f.name]
            elif self.has_trait(f.name):
                values[f.name] = getattr(self, f.name)
            elif self._loaded[0] == name and f.name in self._loaded[1]:
                values[f.name] = self._loaded[1][f.name]  # no control here: kept as loaded, for its method
        try:
            if name not in core_config.METHODS:
                raise WorkbenchError(f"method {name!r} has a panel but the core does not know it: choose from "
                                     f"{', '.join(core_config.METHODS)}")
            cfg = MethodConfig(**values)
            if self.refusal:
                raise WorkbenchError(self.refusal)
        except WorkbenchError as exc:
            self.error = str(exc)
            raise
        self.error = ""
        return cfg

    def from_config(self, cfg: MethodConfig) -> None:
        """Show a MethodConfig. 'auto' and 'all-linear' both show as no selection (every backbone layer),
        except for ia3, where 'all-linear' is its own choice (`all_linear`). Fields with no trait here
        (another method's options, say) are kept and given back by to_config() while cfg's method is chosen."""
        self._loaded = (cfg.name, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MethodConfig)
                                   if f.name not in ("name", "target_modules") and not self.has_trait(f.name)})
        with self.hold_trait_notifications():
            for f in dataclasses.fields(MethodConfig):
                if f.name == "name":
                    self.method = cfg.name
                elif f.name == "target_modules":
                    targets = cfg.target_modules
                    self.target_modules = list(targets) if isinstance(targets, list) else []
                    self.all_linear = targets == "all-linear"
                elif self.has_trait(f.name):
                    setattr(self, f.name, getattr(cfg, f.name))
