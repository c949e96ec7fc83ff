"""Screenshots for the README, from real runs: every widget in JupyterLab, the dashboard, the Voila page.

    python scripts/screenshots.py                      # trains its own runs in a temporary workspace
    python scripts/screenshots.py --home /tmp/runs     # reuses a run store (e.g. the one the notebooks filled)
    python scripts/screenshots.py --only lab voila     # parts: lab (widgets, themes, widths), notebooks, voila
    python scripts/screenshots.py --only lab --widgets widget-run-compare --home /tmp/runs   # one widget again

Debian chromium driven by Python playwright (never `playwright install`); the real packaged MiniLM at
course size (notebooks/course.py). PNGs go to docs/screenshots/ (or --out), each under ~300 KB.
With --home, the notebooks' key figures are drawn again from the runs the teaching notebooks made
(run them first with WORKBENCH_HOME set to that folder); runs it lacks are skipped, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_BYTES = 300 * 1024
PARTS = ("lab", "notebooks", "voila")
VOILA_RUN = "data.max_train_samples=160 data.max_eval_samples=60 train.epochs=2 train.eval_every=4"  # ~2-4 min


# --- runs ----------------------------------------------------------------------------------------------

def make_runs(home: Path) -> None:
    """Two finished runs and a ladder at course size, so every widget has something real to show."""
    sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
    import course
    import workbench
    from workbench import RunStore
    from workbench.ladder import create_ladder, launch_ladder

    store = RunStore(home)
    if any(r["status"] == "completed" for r in store.list()):
        return
    for name, method in (("lora", "lora"), ("head-only", "head-only")):
        config = course.config(name, method=method, train={"epochs": 2, "eval_every": 5})
        print(f"training {name} ...", flush=True)
        record = workbench.train(config, store=store)
        print(f"  {record['status']}, accuracy {(record['metrics'] or {}).get('accuracy')}", flush=True)
    print("running a ladder (zero-shot-embedding, head-only, lora) ...", flush=True)
    ladder_id = create_ladder(course.config("ladder"), ["zero-shot-embedding", "head-only", "lora"], home,
                              isolate=True)
    launch_ladder(ladder_id, home).wait()


# --- servers ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (rc {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=10):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def base_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORKBENCH_COURSE_SCALE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "notebooks"), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def jupyter_lab(work: Path, home: Path) -> Iterator[str]:
    """JupyterLab on `work`, light theme, no news, every cell rendered (no windowing), the app exposed."""
    settings = work / ".lab-settings"
    for rel, value in (("@jupyterlab/apputils-extension/themes.jupyterlab-settings", {"theme": "JupyterLab Light"}),
                       ("@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                        {"fetchNews": "false", "checkForUpdates": False}),
                       ("@jupyterlab/notebook-extension/tracker.jupyterlab-settings", {"windowingMode": "none"})):
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port = free_port()
    env = {**base_env(home), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(work / ".lab-workspaces")}
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={work}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/lab", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def voila(home: Path, overrides: str) -> Iterator[str]:
    env = {**base_env(home), "WORKBENCH_DEMO_OVERRIDES": overrides}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_dashboard.py"), "--port", str(free_port()),
                             "--home", str(home)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        wait_http(url, proc)
        yield url
    finally:
        stop(proc)


# --- pages -------------------------------------------------------------------------------------------------

def save(target: Any, path: Path, page: Any = None) -> None:
    """A screenshot of a page (all of it) or of one element, made smaller (256 colours) when over MAX_BYTES.

    JupyterLab and Voila scroll inside their own panels, so the viewport is made as tall as what is shown
    (at most 3000 px) for the time of the shot.
    """
    page = page or target
    size = page.viewport_size
    if target is page:
        height = page.evaluate("() => Math.max(0, ...Array.from(document.querySelectorAll('.jp-Cell'))"
                               ".map(e => e.getBoundingClientRect().bottom)) + 24")
    else:
        target.scroll_into_view_if_needed()
        height = target.bounding_box()["height"] + 400
    page.set_viewport_size({"width": size["width"], "height": int(min(max(size["height"], height), 3000))})
    time.sleep(1.5)  # figures follow the new size
    try:
        target.screenshot(path=str(path), animations="disabled")
    finally:
        page.set_viewport_size(size)
    trim_bottom(path)
    if path.stat().st_size > MAX_BYTES:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"  {path.name}: {path.stat().st_size // 1024} KB", flush=True)


def trim_bottom(path: Path, margin: int = 16) -> None:
    """Cut the empty rows (the page's background colour) under the content."""
    from PIL import Image, ImageChops

    image = Image.open(path).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box and box[3] + margin < image.height:
        image.crop((0, 0, image.width, box[3] + margin)).save(path, optimize=True)


def lab_command(page: Any, command: str, args: dict[str, Any] | None = None) -> None:
    page.evaluate("([c, a]) => window.jupyterapp.commands.execute(c, a)", [command, args or {}])


def run_notebook(page: Any, base: str, name: str, timeout: float = 900) -> None:
    """Open a notebook, Run All once the kernel is idle (earlier, Run All runs nothing), wait for every cell, hide the code."""
    page.goto(f"{base}/lab/tree/{name}?reset", timeout=180_000)  # ?reset: no tab left from an earlier session
    page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=180_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands", timeout=60_000)
    lab_command(page, "application:toggle-left-area")
    lab_command(page, "notebook:run-all-cells")
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prompts = [cells.nth(i).locator(".jp-InputPrompt").inner_text() for i in range(cells.count())]
        if prompts and all(re.search(r"\[\d+\]", p) for p in prompts):
            break
        if page.locator(".jp-OutputArea-output:has-text('Traceback')").count():
            raise RuntimeError(f"{name}: a cell raised (see the page)")
        time.sleep(1)
    else:
        raise RuntimeError(f"{name}: cells still running after {timeout} s")
    page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=120_000)
    lab_command(page, "notebook:hide-all-cell-code")
    time.sleep(3)  # plots settle (autosize, the bundle loads once per page)


def output(page: Any, index: int) -> Any:
    """The output area of the index-th code cell."""
    return page.locator(".jp-Notebook .jp-CodeCell").nth(index).locator(".jp-Cell-outputArea")


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                     "source": src} for src in cells],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))


SETUP = """\
import time
import course
from workbench import Config, RunStore
from widgets import (ConfusionMatrix, Dashboard, DataPanel, LossCurve, MethodLadder, MethodPanel, ModelPicker,
                     Playground, RunCompare, RunSummary, TrainPanel)
H = course.home()
store = RunStore(H)
done = [r for r in store.list() if r["status"] == "completed" and r["config"]["method"]["name"] != "zero-shot-embedding"]
best = max(done, key=lambda r: (r["config"]["method"]["name"] == "lora", len(store.points(r["id"], kind="eval"))))
"""

GALLERY = {  # screenshot name -> the cell that shows the widget
    "widget-model-picker": "w = ModelPicker(home=H); w.wait(); w",
    "widget-data-panel": "w = DataPanel(home=H); w.max_train_samples = 240; w.wait(); w",
    "widget-method-panel": "w = MethodPanel(home=H); w.num_labels = 5; w.wait(); w",
    "widget-train-panel": "w = TrainPanel(home=H); w.run_name = 'my-first-run'; w",
    "widget-loss-curve": "LossCurve(home=H, run_ids=[best['id']], background=False)",
    "widget-run-summary": "RunSummary(home=H, run_id=best['id'], background=False)",
    "widget-confusion-matrix": ("cm = ConfusionMatrix(home=H, run_id=best['id'], background=False)\n"
                                "cm.select_cell(*max(((t, p) for t in cm.labels for p in cm.labels if t != p), "
                                "key=lambda c: cm.matrix[cm.labels.index(c[0])][cm.labels.index(c[1])]))\ncm"),
    "widget-run-compare": ("rc = RunCompare(home=H, background=False)\nrc.sort_by = 'accuracy'\n"
                           "rc.selected = [r['id'] for r in done[:2]]\nrc"),
    "widget-playground": ("pg = Playground(home=H)\npg.refresh_runs()\n"
                          "pg.predict('The striker scored twice as the home team won the cup final on Saturday.')\n"
                          "for _ in range(900):\n    time.sleep(0.1)\n    if not pg.busy: break\npg"),
    "widget-method-ladder": "MethodLadder(home=H)",
    "dashboard": ("dash = Dashboard(home=H)\ndash.from_config(Config.from_dict(best['config']))\n"
                  "dash.data.wait(); dash.model.wait()\n"
                  "dash.curve.run_ids = [best['id']]; dash.confusion.run_id = best['id']\n"
                  "dash.summary.run_id = best['id']\n"
                  "dash.tabs.selected_index = 1\ndash"),
}


def lab_part(browser: Any, work: Path, home: Path, out: Path, names: list[str] | None = None) -> None:
    gallery = {k: v for k, v in GALLERY.items() if not names or k in names}
    write_notebook(work / "gallery.ipynb", [SETUP, *gallery.values()])
    with jupyter_lab(work, home) as base:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        run_notebook(page, base, "gallery.ipynb")
        print("JupyterLab, light theme:", flush=True)
        for i, name in enumerate(gallery, start=1):
            save(output(page, i), out / (f"{name}-lab-light.png" if name == "dashboard" else f"{name}.png"), page)
        if "dashboard" not in gallery:
            page.close()
            return
        print("JupyterLab, dark theme:", flush=True)
        lab_command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        time.sleep(4)
        dash = list(gallery).index("dashboard") + 1
        save(output(page, dash), out / "dashboard-lab-dark.png", page)
        if "widget-loss-curve" in gallery:
            save(output(page, list(gallery).index("widget-loss-curve") + 1), out / "widget-loss-curve-dark.png", page)
        print("JupyterLab, 700 px wide:", flush=True)
        lab_command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})
        page.set_viewport_size({"width": 700, "height": 1000})
        time.sleep(4)
        save(output(page, dash), out / "dashboard-lab-narrow.png", page)
        page.close()


KEY_FIGURES = {  # notebook -> the cell that draws its key figure again from the notebook's runs
    "notebook-01-quickstart": ("r = runs('quickstart-lora')[0]\ndash = Dashboard(home=H)\n"
                               "dash.from_config(Config.from_dict(r['config']))\n"
                               "dash.curve.run_ids = [r['id']]; dash.confusion.run_id = r['id']\n"
                               "dash.tabs.selected_index = 1\ndash.data.wait(); dash.model.wait()\ndash._run_tab"),
    "notebook-02-full-vs-lora-vs-qlora": ("rs = [runs(f'compare-{m}')[0] for m in ('full', 'lora', 'qlora')]\n"
                                          "course.table(rs)"),
    "notebook-03-overfitting": ("LossCurve(home=H, run_ids=[runs('A-aggressive')[0]['id'], "
                                "runs('B-careful')[0]['id']], background=False)"),
    "notebook-04-your-own-data": "ConfusionMatrix(home=H, run_id=runs('my-reviews')[0]['id'], background=False)",
    "notebook-05-method-ladder": "MethodLadder(home=H)",
}


def notebooks_part(browser: Any, work: Path, home: Path, out: Path) -> None:
    from workbench import RunStore

    names = {r.get("name") for r in RunStore(home).list() if r["status"] == "completed"}
    needed = {"notebook-01-quickstart": ["quickstart-lora"],
              "notebook-02-full-vs-lora-vs-qlora": ["compare-full", "compare-lora", "compare-qlora"],
              "notebook-03-overfitting": ["A-aggressive", "B-careful"], "notebook-04-your-own-data": ["my-reviews"],
              "notebook-05-method-ladder": []}
    chosen = {k: v for k, v in KEY_FIGURES.items() if all(n in names for n in needed[k])}
    for k in KEY_FIGURES.keys() - chosen.keys():
        print(f"  {k}: skipped, {home} has no completed run named {', '.join(needed[k])}", flush=True)
    if not chosen:
        return
    setup = SETUP + ("def runs(name):\n    return [r for r in store.list() if r.get('name') == name "
                     "and r['status'] == 'completed']\n")
    write_notebook(work / "key-figures.ipynb", [setup, *chosen.values()])
    with jupyter_lab(work, home) as base:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        run_notebook(page, base, "key-figures.ipynb")
        print("notebook key figures (JupyterLab, light):", flush=True)
        for i, name in enumerate(chosen, start=1):
            save(output(page, i), out / f"{name}.png", page)
        page.close()


def voila_part(browser: Any, work: Path, out: Path) -> None:
    """The Voila dashboard: a run started from the page, mid-run and after (a store of its own)."""
    from workbench import RunStore

    home = work / "voila-runs"
    store = RunStore(home)
    with voila(home, VOILA_RUN) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, timeout=180_000)
        page.wait_for_selector(".lm-TabBar-tabLabel:has-text('Train & watch')", timeout=180_000)
        time.sleep(3)
        print("Voila dashboard:", flush=True)
        save(page, out / "voila-dashboard-setup.png")
        page.locator(".lm-TabBar-tabLabel:has-text('Train & watch')").click()
        page.get_by_role("button", name="Start").click()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = store.list()
            if runs and len(store.points(runs[0]["id"], kind="eval")) >= 2:
                break
            time.sleep(1)
        time.sleep(2)
        save(page, out / "voila-dashboard-live.png")
        while time.monotonic() < deadline and store.list()[0]["status"] in ("queued", "running"):
            time.sleep(1)
        time.sleep(3)
        save(page, out / "voila-dashboard-done.png")
        page.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a run store to reuse (default: a new one, with runs made here)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--widgets", nargs="+", choices=list(GALLERY), help="lab part: only these widgets")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        print(f"chromium not found at {CHROMIUM}: apt-get install -y chromium (as root)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="workbench-shots-"))
    home = args.home.resolve() if args.home else work / "runs"
    os.environ.update(base_env(home))
    if "lab" in args.only:
        make_runs(home)
    with sync_playwright() as p:
        # headless chromium hides scrollbars by default: show them, as a user's browser does
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True,
                                    ignore_default_args=["--hide-scrollbars"])
        try:
            if "lab" in args.only:
                lab_part(browser, work, home, args.out, args.widgets)
            if "notebooks" in args.only:
                notebooks_part(browser, work, home, args.out)
            if "voila" in args.only:
                voila_part(browser, work, args.out)
        except Exception:
            print(f"failed: the workspace (lab.log, notebooks) is kept in {work}", file=sys.stderr)
            raise
        finally:
            browser.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
