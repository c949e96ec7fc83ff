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
from ._background import run_job

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


class ExampleExplainer(W.VBox):
    """"explain #N" buttons for a list of shown examples (a confusion-matrix cell, the largest regression errors,
    the worst tagged sentences) and the ExplainView of the chosen one.

    `show(run_id, texts)` sets the examples (their texts as the evaluation saved them: first characters,
    personal data masked as the run stores it); the first EXPLAINABLE get a button. `explain(index)` loads the
    run's predictor once per run (`workbench.predict.load_predictor`) and attributes its answer on a worker
    thread (returned; None when refused): the result lands in `explanation`, a failure in the view's error."""

    EXPLAINABLE = 10

    explanation = T.Dict(allow_none=True, default_value=None, help="explain_predictor's answer for the chosen "
                         "example's text, with its index in the shown examples")
    explaining = T.Bool(False)

    def __init__(self, store: Any, background: bool = True, what: str = "example", **kwargs: Any) -> None:
        self.store, self.background, self.what = store, background, what
        self.run_id, self.texts = "", []
        self._predictor: tuple[str, Any] | None = None  # (run_id, its predictor), loaded on the first explain
        self.buttons = W.Box([], layout=S.wrap_row())
        self.view = ExplainView()
        super().__init__(children=[self.buttons, self.view], **{"layout": S.full_width(), **kwargs})
        self.observe(lambda change: setattr(self.view, "explanation", self.explanation), names="explanation")

    def show(self, run_id: str, texts: list[str]) -> None:
        """New examples: their buttons, and no explanation until one is asked for."""
        self.run_id, self.texts = run_id, [str(t or "") for t in texts]
        self.explanation, self.view.error = None, ""
        self.buttons.children = [self._button(i) for i in range(min(self.EXPLAINABLE, len(self.texts)))]

    def explain(self, index: int) -> Any:
        if not 0 <= index < len(self.texts):
            self.view.error = f"no {self.what} {index + 1} shown: choose one of the listed"
            return None
        if self.explaining:
            self.view.error = "an explanation is being computed: wait for it to finish"
            return None

        text, run_id = self.texts[index], self.run_id
        self.explaining, self.view.error = True, ""
        return run_job(lambda: self._explain_now(run_id, text, index), sync=not self.background,
                       name="example-explain")

    def _explain_now(self, run_id: str, text: str, index: int) -> None:
        from workbench.errors import WorkbenchError
        from workbench.explain import explain_predictor
        from workbench.predict import load_predictor

        try:
            if self._predictor is None or self._predictor[0] != run_id:
                self._predictor = (run_id, load_predictor(run_id, self.store.home))
            self.explanation = {**explain_predictor(self._predictor[1], [text])[0], "index": index}
        except WorkbenchError as exc:
            self.explanation, self.view.error = None, str(exc).splitlines()[0]
        except Exception as exc:  # words, never a traceback
            self.explanation = None
            self.view.error = f"explanation failed ({type(exc).__name__}: {str(exc)[:300]})"
        finally:
            self.explaining = False

    def _button(self, index: int) -> W.Button:
        button = W.Button(description=f"explain #{index + 1}", icon="search", layout=W.Layout(width="auto"),
                          tooltip=f"colour each word of this {self.what} by how much it pushed the run's answer")
        button.on_click(lambda _: self.explain(index))
        return button
