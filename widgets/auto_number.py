"""AutoNumber: a number that may be left to the run ("auto", None): an "auto" checkbox beside a number box.

A TrainConfig field such as `epochs` is None when left out, and the run chooses it from the data when it
starts. The control's `value` is that field: None while "auto" is ticked (the number box is greyed and
shows a typical value), else the number typed. Panels link a trait to `value` like any other control.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W
import traitlets as T

AUTO_TOOLTIP = "chosen from the data when the run starts (the run's record says what and why)"


class AutoNumber(W.HBox):
    """`value`: None ("auto") or the number in the box; `number` is W.IntText or W.FloatText."""

    value = T.Union([T.Int(), T.Float()], allow_none=True, default_value=None, help="None = auto")

    def __init__(self, description: str = "", number: type = W.IntText, shown: float = 0, value: Any = None,
                 style: dict[str, str] | None = None, layout: W.Layout | None = None, **kwargs: Any) -> None:
        self.number = number(value=shown, description=description, style=style or {}, disabled=True,
                             layout=W.Layout(flex="1 1 auto", min_width="0", width="auto"))
        self.auto = W.Checkbox(value=True, description="auto", indent=False, tooltip=AUTO_TOOLTIP,
                               layout=W.Layout(width="auto", flex="0 0 auto"))
        super().__init__(children=[self.number, self.auto], layout=layout or W.Layout(), **kwargs)
        self.auto.observe(self._on_auto, names="value")
        self.number.observe(self._on_number, names="value")
        self.observe(self._show_value, names="value")
        self.value = value

    @property
    def description(self) -> str:
        return self.number.description

    # --- controls -> value ---------------------------------------------------------------------------
    def _on_auto(self, change: dict[str, Any]) -> None:
        self.number.disabled = bool(change["new"])
        self.value = None if change["new"] else self.number.value

    def _on_number(self, change: dict[str, Any]) -> None:
        if not self.auto.value:
            self.value = change["new"]

    # --- value -> controls ----------------------------------------------------------------------------
    def _show_value(self, change: dict[str, Any]) -> None:
        if change["new"] is None:
            self.auto.value = True
            return
        self.number.value = change["new"]  # first: unticking "auto" reads the number box
        self.auto.value = False
