"""ModelPicker: a catalog model, a model a completed continued-pretraining run saved (`run:<id>`), a local
directory or a hub id, with what it is and whether it works offline."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as W
import traitlets as T

from workbench import WorkbenchError
from workbench.catalog import DEFAULT_MODEL, MODELS, pretrained_runs
from workbench.store import default_home

from . import _style as S
from ._background import Debouncer

SOURCES = ("catalog", "local directory", "hub id")
MAX_NAME_CHARS = 500
DEBOUNCE_S = 0.3


class ModelPicker(W.VBox):
    """Choose the model to fine-tune. `value` is what `Config.model` gets; `info` is `inspect_model`'s answer.

    The catalog list also offers the models that completed continued-pretraining runs saved (`run:<id>`),
    newest first; `refresh_runs()` lists the runs completed since.

    `choices` (e.g. the catalog, for a public page) limits the picker to those names: it then builds no
    text box and no "trust remote code" box, refuses any other value (a forged widget message included)
    and keeps `trust_remote_code` off, so no model repository's code can run in the page's kernel.
    With `background=False` inspections run inline (tests, scripts); otherwise on a worker thread.
    """

    value = T.Unicode(DEFAULT_MODEL, help="catalog name, local directory, or hub id")
    source = T.Enum(SOURCES, default_value="catalog", help="where the model comes from")
    trust_remote_code = T.Bool(False, help="allow code shipped with a hub model")
    info = T.Dict(allow_none=True, default_value=None, help="inspect_model() result for `value`; None if unknown")
    context_length = T.Int(None, allow_none=True, help="the model's token limit, when known")
    error = T.Unicode("", help="why the model cannot be used, in words")
    busy = T.Bool(False, help="an inspection is running")

    def __init__(self, value: str = DEFAULT_MODEL, home: str | Path | None = None, background: bool = True,
                 choices: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.home = Path(home).resolve() if home is not None else None
        self.choices = tuple(dict.fromkeys(choices)) if choices is not None else None
        if self.choices is not None and value not in self.choices:
            value = self.choices[0]
        options = ([(f"{n} - {MODELS[n].description}" if n in MODELS else n, n) for n in self.choices]
                   if self.choices is not None else [*catalog_options(), *run_options(self.home)])
        self._catalog = W.Dropdown(options=options, value=value if self.choices is not None else DEFAULT_MODEL,
                                   description="Catalog" if self.choices is None else "Model", style=S.label_style(),
                                   layout=S.full_width(max_width="48em"))
        self._info_html = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self._inspect = Debouncer(self._inspect_now, DEBOUNCE_S if background else 0)
        if self.choices is None:
            self._source_buttons = W.ToggleButtons(options=list(SOURCES), value="catalog", description="Model from",
                                                   style={"description_width": S.LABEL_WIDTH, "button_width": "auto"},
                                                   layout=S.full_width())
            self._text = W.Text(value="", placeholder="/path/to/saved/model or org/model-name", description="Model",
                                continuous_update=False, style=S.label_style(), layout=S.full_width(max_width="48em"))
            self._trust = W.Checkbox(value=False, description="trust remote code (runs the model author's code)",
                                     indent=False, layout=W.Layout(width="auto"))
            controls: list[W.Widget] = [self._source_buttons, self._catalog, self._text, self._trust]
        else:  # a fixed list: nothing else to choose, nothing to trust
            self._source_buttons = self._text = self._trust = None
            controls = [self._catalog]
        super().__init__(children=[*controls, self._error_html, self._info_html],
                         **{"layout": S.full_width(), **kwargs})

        self._catalog.observe(self._on_catalog, names="value")
        if self.choices is None:
            self._source_buttons.observe(self._on_source_button, names="value")
            self._text.observe(self._on_text, names="value")
            self._trust.observe(self._on_trust, names="value")
        self.observe(self._on_value, names=["value", "trust_remote_code"])
        self.observe(self._show_error, names="error")
        self.observe(self._show_source, names="source")
        self.value = value
        self._show_source()
        if value == DEFAULT_MODEL:  # no change event fired
            self._on_value()

    # --- validation -----------------------------------------------------------
    @T.validate("value")
    def _valid_value(self, proposal: dict[str, Any]) -> str:
        text = proposal["value"]
        if not isinstance(text, str):
            raise T.TraitError("the model must be given as text")
        text = text.strip()
        if self.choices is not None and text not in self.choices:
            raise T.TraitError(f"model {text[:80]!r} is not offered on this page: choose one of "
                               f"{', '.join(self.choices)}")
        if not text or len(text) > MAX_NAME_CHARS or "\x00" in text:
            raise T.TraitError(f"give a catalog model ({', '.join(MODELS)}), a local directory or a hub id")
        return text

    @T.validate("trust_remote_code")
    def _valid_trust(self, proposal: dict[str, Any]) -> bool:
        if proposal["value"] and self.choices is not None:
            raise T.TraitError("trust_remote_code is switched off on this page: it would run a model "
                               "repository's code on the server")
        return bool(proposal["value"])

    def refresh_runs(self) -> None:
        """List the models of the continued-pretraining runs completed by now (a fixed `choices` list stays)."""
        if self.choices is not None:
            return
        self._catalog.options = [*catalog_options(), *run_options(self.home)]
        if self.value in self._offered():
            self._catalog.value = self.value

    def _offered(self) -> set[str]:
        """The names the list offers: the catalog's and the saved models of completed runs."""
        return {value for _, value in self._catalog.options}

    # --- control -> traits ------------------------------------------------------
    def _on_source_button(self, change: dict[str, Any]) -> None:
        if change["new"] in SOURCES:
            self.source = change["new"]
        if change["new"] == "catalog" and self._catalog.value in self._offered():
            self.value = self._catalog.value
        elif self._text.value.strip():
            self._on_text({"new": self._text.value})

    def _on_catalog(self, change: dict[str, Any]) -> None:
        if change["new"] in (self._offered() if self.choices is None else self.choices):
            self.value = change["new"]

    def _on_text(self, change: dict[str, Any]) -> None:
        try:
            self.value = change["new"]
        except T.TraitError as exc:
            self.error = str(exc)

    def _on_trust(self, change: dict[str, Any]) -> None:
        self.trust_remote_code = bool(change["new"])

    # --- traits -> view -----------------------------------------------------------
    def _show_source(self, change: Any = None) -> None:
        if self._source_buttons is None:
            return
        self._source_buttons.value = self.source
        self._catalog.layout.display = "" if self.source == "catalog" else "none"
        self._text.layout.display = "none" if self.source == "catalog" else ""
        self._trust.layout.display = "" if self.source == "hub id" else "none"
        self._text.placeholder = ("/path/to/a/saved/transformers/model" if self.source == "local directory"
                                  else "org/model-name (needs network unless cached)")

    def _on_value(self, change: Any = None) -> None:
        name = self.value
        # the control first, then the source: switching the source reads the control
        if self.choices is not None:
            self._catalog.value = name
        elif name in self._offered():
            self._catalog.value = name
            self.source = "catalog"
        else:
            self._text.value = name
            local = Path(name).expanduser().is_dir() or name.startswith((".", "/", "~"))
            self.source = "local directory" if local else "hub id"
        if self._trust is not None:
            self._trust.value = self.trust_remote_code
        self.busy = True
        self._info_html.value = S.message(f"inspecting {name} ...", "muted")
        self._inspect()

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    # --- inspection (worker thread) -------------------------------------------------
    def _inspect_now(self) -> None:
        from workbench import inspect_model

        name, trust = self.value, self.trust_remote_code
        try:
            info = inspect_model(name, self.home, trust_remote_code=trust)
            error = ""
        except WorkbenchError as exc:
            info, error = None, str(exc)
        except Exception as exc:  # a model transformers cannot read: say so in words
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            info, error = None, f"model {name!r} could not be inspected ({type(exc).__name__}: {first})"
        if (name, trust) != (self.value, self.trust_remote_code):
            return  # the choice changed meanwhile; the newer inspection will report
        self.info = info
        self.context_length = (info or {}).get("context_length")
        self.error = error
        self._info_html.value = _describe(info) if info else ""
        self.busy = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a pending inspection finished (scripts, notebooks, tests); `timeout` gives up earlier."""
        return self._inspect.wait(timeout)


def catalog_options() -> list[tuple[str, str]]:
    return [(f"{n} - {a.description}", n) for n, a in MODELS.items()]


def run_options(home: Path | None) -> list[tuple[str, str]]:
    """(label, `run:<id>`) for each completed continued-pretraining run of the workspace, newest first; none
    when the workspace has no run store yet (the picker never creates one)."""
    home = home if home is not None else default_home()
    if not (home / "runs.sqlite").is_file():
        return []
    try:
        runs = pretrained_runs(home)
    except WorkbenchError:  # an unreadable store: the catalog still works
        return []
    options = []
    for run in runs:
        before, after = run["perplexity_before"], run["perplexity"]
        figures = (f", perplexity {before:.1f} -> {after:.1f}" if isinstance(before, (int, float))
                   and isinstance(after, (int, float)) else "")
        named = f" '{run['name']}'" if run["name"] else ""
        options.append((f"{run['model']}{named} - {run['base']} pretrained further on {run['data']}{figures}",
                        run["model"]))
    return options


def _describe(info: dict[str, Any]) -> str:
    offline = ("available offline" if info.get("offline") else
               "downloads from the Hugging Face hub (needs network unless cached)")
    rows = [
        ("Architecture", f"{info.get('architecture')} ({info.get('model_type')})"),
        ("Parameters", f"{S.human_count(info.get('parameters'))} ({info.get('parameters', 0):,})"),
        ("Context length", f"{info.get('context_length') or 'unknown'} tokens"),
        ("Availability", offline),
    ]
    cells = "".join(f'<div style="color:{S.MUTED_COLOR}">{html.escape(k)}</div><div>{html.escape(str(v))}</div>'
                    for k, v in rows)
    return (f'<div style="display:grid; grid-template-columns:max-content minmax(0,1fr); gap:2px 12px; '
            f'margin:4px 0">{cells}</div>')
