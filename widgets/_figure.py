"""LiveFigure: a plotly FigureWidget that a view opened at any time draws as it is now.

plotly 7 gives a new view the state `_widget_data` / `_widget_layout`, which it sets once, when the
figure is created. Every later change (`add_traces`, `trace.x = ...`, `layout.shapes = ...`) goes out
as a one-off message that only the views open at that moment receive. In Voila the page connects after
the notebook has run, and again after each reload (Voila drops points added before the page connects), so its view started from the figure as
created: empty traces, or no traces at all. Found by experiment in Voila 0.5.13 + plotly 7.1 +
anywidget 0.11: neither replacing whole arrays nor a fixed trace layout fixes a finished run's plot,
since no later message comes.

Here that state is brought up to date whenever a new view asks for it (`get_state`), in place: views
already open get nothing extra, and the one-off messages still update them as before.

Second trap, same stack: anywidget 0.11 gives a model 2 s (AbortSignal.timeout) to load its module
and run its `initialize`, and each plotly figure imports its own copy of the 5 MB bundle. Measured in
headless chromium on 2 loaded cores: 1.5 s for one import, 4.8 s for three; a dashboard opens three or
more figures at once, so some never started ("[anywidget] Failed to initialize model.") and never
updated. A LiveFigure's module is a small loader instead (LOADER below): it imports the bundle once
per page, not within the 2 s, and hands plotly the messages that arrived while it loaded. It also
makes a figure follow the width of its box (under anywidget, plotly sized it once: 700 px when drawn in
a hidden tab, overflowing a narrow page).

Where the bundle comes from: on the dashboard's server (scripts/dashboard_voila.py) the browser fetches it as
a file, by the URL the server puts in $WORKBENCH_PLOTLY_BUNDLE_URL; no kernel message carries it. Anywhere else
(JupyterLab, plain `voila`) it is one PlotlyModule widget per kernel that every figure refers to. Sent as a
trait of each figure, a dashboard's page carried it once per figure (about 10 x 5 MB through the Voila server
per page load); as widget state at all, it still went through the server once per load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from copy import deepcopy
from typing import Any
from urllib.parse import parse_qs, urlsplit

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

STATE_KEYS = ("_widget_data", "_widget_layout")  # what plotly's view draws from when it is created

LOADER = """\
// LiveFigure: plotly's FigureWidget module, imported once per page and outside anywidget's 2 s start limit.
const KEY = Symbol.for("workbench.plotly-widget.DIGEST");
const VIEW = Symbol.for("workbench.plotly-view");
const MESSAGES = ["_py2js_addTraces", "_py2js_deleteTraces", "_py2js_moveTraces", "_py2js_restyle",
                  "_py2js_relayout", "_py2js_update", "_py2js_animate", "_py2js_removeLayoutProps",
                  "_py2js_removeTraceProps"];

async function source(model) {
  // served as a file by the dashboard's server (scripts/dashboard_voila.py): the browser fetches it itself
  const url = model.get("_plotly_url");
  if (url) return new URL(url, location.href).href;
  // elsewhere (JupyterLab) it is held by one PlotlyModule widget per kernel that every figure refers to
  const ref = model.get("_plotly_module");
  const holder = await model.widget_manager.get_model(ref.slice("IPY_MODEL_".length));
  return URL.createObjectURL(new Blob([holder.get("code")], {type: "text/javascript"}));
}

function bundle(model) {
  globalThis[KEY] ??= source(model).then((url) => import(url));
  return globalThis[KEY];
}

export default () => {
  let plotly = null;
  let loaded = null;
  return {
    initialize(context) {
      const { model } = context;
      // messages that come before plotly is there: kept, then replayed to it in order
      const early = [];
      const keep = MESSAGES.map((name) => [name, () => {
        const value = model.get(name);
        if (value !== null) early.push([name, value]);
      }]);
      for (const [name, fn] of keep) model.on(`change:${name}`, fn);
      loaded = bundle(model).then((mod) => {
        for (const [name, fn] of keep) model.off(`change:${name}`, fn);
        const proto = mod.FigureView.prototype;  // each view is kept on its element, for resizing
        if (!proto[VIEW]) {
          const draw = proto.perform_render;
          proto.perform_render = function (...args) {
            this.el[VIEW] = this;
            return draw.apply(this, args);
          };
          proto[VIEW] = true;
        }
        plotly = mod.default();
        plotly.initialize(context);
        for (const [name, value] of early) {
          model.set(name, value);
          model.set(name, null);
        }
      });
      // not awaited: anywidget would fail the model if this took more than 2 s
    },
    async render(context) {
      await loaded;
      const { el } = context;
      el.style.width = "100%";  // as wide as its box, not as its drawing: it can then follow the box
      el.style.minWidth = "0";
      const cleanup = plotly.render(context);
      // plotly sizes a figure once, as it is drawn (700 px when drawn in a hidden tab), and under anywidget
      // nothing resizes it later: this view is resized whenever its box changes width
      const view = el[VIEW];
      let width = 0;
      let frame = 0;
      const observer = new ResizeObserver(([entry]) => {
        const now = Math.round(entry.contentRect.width);
        if (now > 0 && now !== width && view) {
          width = now;
          cancelAnimationFrame(frame);
          frame = requestAnimationFrame(() => view.autosizeFigure());
        }
      });
      observer.observe(el);
      return () => {
        observer.disconnect();
        if (typeof cleanup === "function") cleanup();
      };
    },
  };
};
"""


BUNDLE_URL_ENV = "WORKBENCH_PLOTLY_BUNDLE_URL"  # set by the dashboard's server (scripts/dashboard_voila.py)


def bundle_digest(code: str) -> str:
    """The version tag of plotly's widget module: the first 16 hex digits of the SHA-1 of its text."""
    return hashlib.sha1(code.encode()).hexdigest()[:16]


BUNDLE_DIGEST = bundle_digest(str(go.FigureWidget._esm))


def loader(code: str) -> str:
    """The module every LiveFigure loads: small; plotly's bundle comes by URL or from the shared PlotlyModule."""
    return LOADER.replace("DIGEST", bundle_digest(code))


def served_bundle_url() -> str | None:
    """Where the page's server serves this kernel's plotly module as a file ("/workbench/plotly/...?v=<digest>"),
    or None: no such server (JupyterLab, `voila` itself), or one that serves another plotly's module."""
    url = os.environ.get(BUNDLE_URL_ENV, "")
    if not url.startswith("/") or parse_qs(urlsplit(url).query).get("v") != [BUNDLE_DIGEST]:
        return None
    return url


class PlotlyModule(W.Widget):
    """plotly's widget module (5 MB of JavaScript) as one widget that every LiveFigure of the kernel refers to:
    a page receives it once, however many figures it shows. A plain widget model, with no view. Used only where
    the page's server does not serve the module as a file (`served_bundle_url()` is None)."""

    code = T.Unicode("", help="plotly's FigureWidget module, run by every LiveFigure's loader").tag(sync=True)


_shared_module: PlotlyModule | None = None


def plotly_module() -> PlotlyModule:
    """The kernel's PlotlyModule (made again if it was closed, e.g. by Widget.close_all)."""
    global _shared_module
    if _shared_module is None or _shared_module.comm is None:
        _shared_module = PlotlyModule(code=str(go.FigureWidget._esm))
    return _shared_module


class LiveFigure(go.FigureWidget):
    """A FigureWidget whose state, as a view opened later reads it, is the figure as it is now."""

    _esm = loader(str(go.FigureWidget._esm))
    _plotly_url = T.Unicode("", help="where the page's server serves plotly's module; empty: use _plotly_module"
                            ).tag(sync=True)
    _plotly_module = T.Instance(PlotlyModule, allow_none=True, help="the widget that holds plotly's module, shared "
                                "by every figure (None when the module is served by URL)"
                                ).tag(sync=True, **W.widget_serialization)

    @T.default("_plotly_url")
    def _served_plotly_url(self) -> str:
        return served_bundle_url() or ""

    @T.default("_plotly_module")
    def _shared_plotly_module(self) -> PlotlyModule | None:
        return None if served_bundle_url() else plotly_module()

    def get_state(self, key: str | Iterable[str] | None = None, drop_defaults: bool = False) -> dict[str, Any]:
        if key is None:  # the whole state: a new view (a page connecting, a reload, an embed) is starting
            self.sync_view_state()
        # one trait (an ordinary change being sent) is left alone: had it been updated in place here,
        # plotly's own `_widget_data = ...` at creation would compare equal and never be sent
        return super().get_state(key=key, drop_defaults=drop_defaults)

    def sync_view_state(self) -> None:
        """Copy the figure's data and layout into the state a new view starts from (nothing is sent)."""
        if not hasattr(self, "_layout_obj"):  # the widget opens its comm before plotly has built the figure
            return
        for _ in range(5):  # a poller thread may be redrawing: copy again if a dict changed under us
            try:
                data, layout = deepcopy(self._data), deepcopy(self._layout_obj._props)
                break
            except RuntimeError:
                continue
        else:
            return
        # in place: assigning the traits would send the whole figure to every open view again
        self._widget_data[:] = data
        self._widget_layout.clear()
        self._widget_layout.update(layout)
