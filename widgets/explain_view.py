"""ExplainView: a text with each word coloured by how much it pushed the answer toward a chosen class.

It shows one explanation of `workbench.explain.explain_predictor` (a classifier's classes, a regressor's value,
a tagger's entities): green for a push toward the chosen target, red for a push away, stronger for a larger
attribution (scaled to the text's largest); each word's figure in its tooltip. Every piece of text is escaped
with `html.escape`: the page shows the text, never runs it.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import traitlets as T

from . import _style as S

POSITIVE_RGB = "46, 160, 67"  # green: toward the target
NEGATIVE_RGB = "214, 39, 40"  # red: away from it
METHOD_WORDS = {"integrated-gradients": "Integrated Gradients", "occlusion": "occlusion (each word deleted in turn)"}


def tokens_html(explanation: dict[str, Any], target: str | None = None) -> str:
    """The explained text with every token's background coloured by its attribution toward `target` (one of
    the explanation's "targets"; its own "target" when None), the text between tokens as written."""
    text = str(explanation.get("text") or "")
    target = target if target is not None else explanation.get("target")
    tokens = [t for t in explanation.get("tokens") or [] if isinstance(t, dict)]
    values = [_value(t, target) for t in tokens]
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    out, at = [], 0
    for token, value in sorted(zip(tokens, values), key=lambda tv: int(tv[0].get("start", 0))):
        start, end = int(token.get("start", -1)), int(token.get("end", -1))
        if start < at or end <= start or end > len(text):
            continue
        out.append(html.escape(text[at:start]))
        rgb = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
        alpha = min(1.0, abs(value) / scale) * 0.85
        out.append(f'<span style="background:rgba({rgb}, {alpha:.2f}); border-radius:3px; padding:1px 0" '
                   f'title="{html.escape(f"{value:+.4f}", quote=True)}">{html.escape(text[start:end])}</span>')
        at = end
    out.append(html.escape(text[at:]))
    return ('<div style="white-space:pre-wrap; overflow-wrap:anywhere; line-height:1.9; font-size:1.1em">'
            + "".join(out) + "</div>")


def _value(token: dict[str, Any], target: Any) -> float:
    by_class = token.get("by_class") if isinstance(token.get("by_class"), dict) else {}
    value = by_class.get(target, token.get("attribution", 0.0)) if target is not None else token.get("attribution")
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def summary_html(explanation: dict[str, Any], target: str | None) -> str:
    """What the colours mean, how they were computed, and any note on what was explained."""
    method = METHOD_WORDS.get(str(explanation.get("method")), str(explanation.get("method")))
    toward = "a higher value" if target == "value" else f"{target}"
    words = f"green pushes toward {toward}, red away from it; attributions by {method}"
    delta = explanation.get("convergence_delta")
    if isinstance(delta, (int, float)):
        words += f" (they add up to the answer's change from an all-padding text, within {abs(delta):.3f})"
    notes = [str(explanation[k]) for k in ("note",) if explanation.get(k)]
    return S.message(words, "muted") + "".join(S.message(n, "muted") for n in notes)


class ExplainView(W.VBox):
    """One explanation: a target dropdown (the classes, the value, the entities) and the coloured text."""

    explanation = T.Dict(allow_none=True, default_value=None, help="one explain_predictor result")
    target = T.Unicode("", help="what the colours show pushes toward: one of the explanation's targets")
    error = T.Unicode("", help="why there is no explanation (one line)")

    def __init__(self, **kwargs: Any) -> None:
        self._target = W.Dropdown(options=[], description="Toward", style=S.label_style(),
                                  layout=S.control_layout())
        self._text = W.HTML("", layout=S.full_width())
        self._summary = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        super().__init__(children=[self._error_html, self._target, self._text, self._summary],
                         **{"layout": S.full_width(), **kwargs})
        self._target.observe(self._on_target_control, names="value")
        self.observe(self._on_explanation, names="explanation")
        self.observe(self._draw, names="target")
        self.observe(self._show_error, names="error")
        self._on_explanation()

    @T.validate("target")
    def _valid_target(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        targets = self.targets
        if value and value not in targets:
            raise T.TraitError(f"target {value!r} is not in this explanation: choose one of {', '.join(targets)}")
        return value

    @property
    def targets(self) -> list[str]:
        return [str(t) for t in (self.explanation or {}).get("targets") or []]

    def _on_explanation(self, change: Any = None) -> None:
        targets = self.targets
        own = str((self.explanation or {}).get("target") or "")
        if self.explanation is not None:
            self.error = ""
        self._target.options = targets
        self._target.layout.display = "" if len(targets) > 1 else "none"
        chosen = self.target if self.target in targets else (own if own in targets else "")
        if chosen != self.target:
            self.target = chosen
        else:
            self._draw()
        self._target.value = chosen or None

    def _on_target_control(self, change: dict[str, Any]) -> None:
        if change["new"] in self.targets:
            self.target = change["new"]

    def _draw(self, change: Any = None) -> None:
        if not self.explanation:
            self._text.value = self._summary.value = ""
            return
        target = self.target or None
        self._text.value = tokens_html(self.explanation, target)
        self._summary.value = summary_html(self.explanation, target or self.explanation.get("target"))

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)
