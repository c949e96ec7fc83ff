"""The dashboard's Voila server: Voila with one more route, plotly's widget module served as a static file.

    python scripts/dashboard_voila.py NOTEBOOK [Voila options]     # scripts/serve_dashboard.py runs this

A LiveFigure (widgets/_figure.py) needs plotly's FigureWidget module, 5 MB of JavaScript. Sent as widget state,
it goes from the page's kernel through this server on every page load: the server decodes each kernel message
and keeps every widget's state while it executes the notebook (nbclient's `widget_state`), so each load held
the module's text for a while. Served from here as a file, it never enters a kernel message: the browser fetches
it from /workbench/plotly/widgetbundle.js?v=<digest> and keeps it (the digest names plotly's version, so the
file may be cached for good).

The server tells its kernels where the file is through $WORKBENCH_PLOTLY_BUNDLE_URL (kernels inherit the server's
environment); a kernel whose plotly has another digest ignores it and sends the module as widget state instead.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.util import find_spec
from pathlib import Path

from jupyter_server.base.handlers import FileFindHandler
from jupyter_server.utils import url_path_join
from voila.app import Voila

BUNDLE_URL_ENV = "WORKBENCH_PLOTLY_BUNDLE_URL"  # read by widgets/_figure.py in each kernel
BUNDLE_ROUTE = "/workbench/plotly/(widgetbundle\\.js)"
BUNDLE_PATH = "/workbench/plotly/widgetbundle.js"


def bundle_file() -> Path:
    """plotly's FigureWidget module (the file plotly.basewidget gives anywidget), found without importing plotly."""
    spec = find_spec("plotly")
    if spec is None or spec.origin is None:
        raise RuntimeError("plotly is not installed: pip install 'plotly>=6' (the dashboard's figures need it)")
    return Path(spec.origin).parent / "package_data" / "widgetbundle.js"


def bundle_digest(path: Path) -> str:
    """The version tag a kernel compares with its own plotly's (widgets/_figure.py `bundle_digest`, same text)."""
    return hashlib.sha1(path.read_text(encoding="utf-8").encode()).hexdigest()[:16]


class PlotlyBundleHandler(FileFindHandler):
    """plotly's module, and only it (the route admits one name); cached for good when asked with ?v=<digest>."""

    _static_paths: dict[str, str] = {}  # FileFindHandler caches by file name across its subclasses: not with theirs


class DashboardVoila(Voila):
    """Voila, plus the route that serves plotly's widget module to the dashboard's pages."""

    def init_settings(self) -> dict:
        settings = super().init_settings()
        self.warm_up()
        return settings

    def warm_up(self) -> None:
        """Before the server listens, the one-time work that the first page load would otherwise do.

        Imports, the notebook's validator and templates, the kernel spec: each is done once in any case; done here,
        a page load does only per-page work. No kernel is started."""
        from jupyter_client.localinterfaces import localhost
        from voila.exporter import VoilaExporter

        path = os.path.relpath(self.notebook_path, self.root_dir)
        # the notebook, read and validated (nbformat compiles its JSON-schema validator on first use)
        notebook = self.contents_manager.get(path=path)["content"]  # Voila's LargeFileManager: not async
        # the kernel spec (finding the kernel folders imports IPython, for ~/.ipython/kernels)
        kernel_name = notebook.metadata.get("kernelspec", {}).get("name", self.kernel_manager.default_kernel_name)
        self.kernel_spec_manager.get_kernel_spec(kernel_name)
        localhost()  # the address kernels listen on: jupyter_client lists the network interfaces once
        # the page's exporter and its templates (nbconvert's filters, jinja's compiler)
        VoilaExporter(template_paths=self.template_paths, template_name=self.voila_configuration.template,
                      config=self.config).template  # noqa: B018
        self.kernel_manager.context  # noqa: B018  the zmq context every kernel's channels share

    def init_handlers(self) -> list:
        path = bundle_file()
        # ahead of Voila's own routes: the notebook's route (/(.*)) would take any path
        route = (url_path_join(self.server_url, BUNDLE_ROUTE), PlotlyBundleHandler, {"path": str(path.parent)})
        # every kernel started from now on inherits this (Voila starts kernels with the server's environment)
        os.environ[BUNDLE_URL_ENV] = f"{url_path_join(self.server_url, BUNDLE_PATH)}?v={bundle_digest(path)}"
        return [route, *super().init_handlers()]


if __name__ == "__main__":
    sys.exit(DashboardVoila.launch_instance())
