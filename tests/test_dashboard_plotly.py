"""plotly's widget module on the dashboard's server: served as a file, never inside a kernel message.

The in-process tests build LiveFigures as a kernel under scripts/dashboard_voila.py would (its environment
variable set) or under JupyterLab (not set). The server test starts scripts/serve_dashboard.py and asks for the
file; the browser test loads the dashboard in chromium and checks that no websocket frame carries the module.
The last test checks that the server's kernel manager hands freed heap pages back when a page's kernel goes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ipywidgets as W  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _dashboard_voila():
    spec = importlib.util.spec_from_file_location("dashboard_voila", ROOT / "scripts" / "dashboard_voila.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plotly_modules() -> set[str]:
    from widgets._figure import PlotlyModule

    return {k for k, w in W.Widget.widgets.items() if isinstance(w, PlotlyModule)}


def test_server_and_kernel_agree_on_the_variable_and_the_digest() -> None:
    from widgets import _figure

    server = _dashboard_voila()
    assert server.BUNDLE_URL_ENV == _figure.BUNDLE_URL_ENV
    assert server.bundle_digest(server.bundle_file()) == _figure.BUNDLE_DIGEST


def test_live_figure_takes_plotly_by_url_on_the_dashboard_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import plotly.graph_objects as go

    from widgets._figure import BUNDLE_DIGEST, BUNDLE_URL_ENV, LiveFigure

    url = f"/workbench/plotly/widgetbundle.js?v={BUNDLE_DIGEST}"
    monkeypatch.setenv(BUNDLE_URL_ENV, url)
    before = _plotly_modules()
    fig = LiveFigure(data=[go.Scatter(x=[1, 2], y=[3, 4])])
    state = fig.get_state()
    assert state["_plotly_url"] == url and state["_plotly_module"] is None
    assert _plotly_modules() == before, "no widget carries plotly's module where the server serves it"
    assert sum(len(str(v)) for v in state.values()) < 100_000
    assert 'model.get("_plotly_url")' in fig._esm


@pytest.mark.parametrize("value", [
    "/workbench/plotly/widgetbundle.js?v=0000000000000000",  # a server with another plotly
    "/workbench/plotly/widgetbundle.js",  # no version tag
    "workbench/plotly/widgetbundle.js?v=DIGEST",  # not a path on the page's server
])
def test_live_figure_falls_back_to_the_module_widget(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from widgets._figure import BUNDLE_DIGEST, BUNDLE_URL_ENV, LiveFigure, PlotlyModule

    monkeypatch.setenv(BUNDLE_URL_ENV, value.replace("DIGEST", BUNDLE_DIGEST))
    fig = LiveFigure()
    assert fig.get_state()["_plotly_url"] == ""
    assert isinstance(fig._plotly_module, PlotlyModule) and len(fig._plotly_module.code) > 1_000_000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_dashboard.py"), "--port",
                             str(_free_port()), "--cull-idle", "5"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "voila/static/voila.js", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the dashboard server did not start"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_serves_plotly_module_as_a_cacheable_file(server: str) -> None:
    from widgets._figure import BUNDLE_DIGEST

    module = _dashboard_voila()
    with urllib.request.urlopen(f"{server}workbench/plotly/widgetbundle.js?v={BUNDLE_DIGEST}") as response:
        body = response.read()
        assert response.headers["Content-Type"] in ("text/javascript", "application/javascript")
        assert "max-age" in response.headers["Cache-Control"]
    assert body == module.bundle_file().read_bytes()
    # the route admits plotly's widget module only, not the rest of plotly's package data
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"{server}workbench/plotly/plotly.min.js", timeout=30)
    assert refused.value.code in (302, 404)


def _browser_missing() -> str:
    if not Path(CHROMIUM).is_file():
        return f"chromium not found at {CHROMIUM}"
    return "" if importlib.util.find_spec("playwright") else "the playwright Python package is not installed"


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "ok")
def test_dashboard_page_fetches_plotly_by_url_not_over_the_websocket(server: str) -> None:
    """A real page load: the figures draw, plotly's module comes once as a file, and no kernel message holds it."""
    from playwright.sync_api import sync_playwright

    frames: list[int] = []
    fetched: list[int] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(len(payload))))
            page.on("response", lambda r: fetched.append(r.status) if "/workbench/plotly/" in r.url else None)
            page.goto(server, timeout=180_000)
            page.wait_for_selector(".lm-TabBar-tabLabel:has-text('Train & watch')", timeout=180_000)
            page.locator(".lm-TabBar-tabLabel:has-text('Train & watch')").click()
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0", timeout=90_000)
        finally:
            browser.close()
    assert fetched == [200], f"plotly's module is fetched once per page as a file: {fetched}"
    assert frames and max(frames) < 1_000_000, f"a websocket frame of {max(frames)} bytes: plotly's module?"


def test_server_trims_its_heap_when_a_page_kernel_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    spec = importlib.util.spec_from_file_location("serve_dashboard", ROOT / "scripts" / "serve_dashboard.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    assert serve.trim_freed_memory() is (serve._libc() is not None)
    trims: list[bool] = []
    monkeypatch.setattr(serve, "trim_freed_memory", lambda: trims.append(True) or True)
    manager = serve.capped_kernel_manager(2)()

    async def start_and_stop() -> None:
        kernel_id = await manager.start_kernel(kernel_name="python3")
        assert trims == []
        await manager.shutdown_kernel(kernel_id)

    asyncio.run(start_and_stop())
    assert trims == [True], "a shut-down kernel's page hands the server's free heap pages back"


def test_server_warms_up_before_it_listens() -> None:
    """The one-time work of a first page is done at start-up: IPython (which jupyter_client imports to find kernel
    folders), the page's exporter and templates, the notebook read and validated; and no kernel is started."""
    code = (
        "import json, sys, tempfile\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "from dashboard_voila import DashboardVoila\n"
        f"app = DashboardVoila(); app.initialize([{str(ROOT / 'notebooks' / 'dashboard.ipynb')!r}, '--no-browser'])\n"
        "app.connection_dir = tempfile.mkdtemp()\n"
        "from jupyter_client import localinterfaces\n"
        "before, ips_before = set(sys.modules), list(localinterfaces.LOCAL_IPS)\n"
        "app.init_settings()\n"
        "new = set(sys.modules) - before\n"
        "print(json.dumps({'new': sorted(new), 'ips': [ips_before, localinterfaces.LOCAL_IPS],\n"
        "                  'kernels': app.kernel_manager.list_kernel_ids()}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "notebooks", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "IPython" in report["new"], report["new"]
    assert report["ips"][0] == [] and "127.0.0.1" in report["ips"][1], "the kernels' address is looked up once, here"
    assert report["kernels"] == []
