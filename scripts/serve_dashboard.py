"""Serve the dashboard (notebooks/dashboard.ipynb) with Voila on a free local port and print its URL.

    python scripts/serve_dashboard.py                 # http://127.0.0.1:<free port>/, this machine only
    python scripts/serve_dashboard.py --read-only     # a public demo: watch, compare, try; no training
    python scripts/serve_dashboard.py --port 8866 --home workbench-runs
    WORKBENCH_DASHBOARD_TOKEN=... python scripts/serve_dashboard.py --host 0.0.0.0 --allowed-host demo.example.org

Voila runs standalone: code cells are hidden, tracebacks are not shown, and every visitor gets a new
kernel; training runs are their own processes in the run store ($WORKBENCH_HOME), so a reload
reattaches to them. Stop with Ctrl-C (a run in progress goes on; stop it from the page or the CLI).

What the server enforces:
- beyond loopback (any --host other than 127.x.x.x, ::1 or localhost) a token is required
  (--token, or $WORKBENCH_DASHBOARD_TOKEN; --token auto makes one), and the Host header must be one of the
  --allowed-host names (DNS rebinding: a page of another site that resolves its name to this server is
  refused); on loopback the Host must be localhost or a loopback address;
- a visitor's kernel is shut down after --cull-idle seconds without activity once its tab is closed
  (default 600 s), which gives its memory back; a page that is open is never culled;
- a page load sent by another site (Sec-Fetch-Site cross-site or same-site, or an Origin that is not this
  server) is refused with 403 before any kernel starts: each kernel costs 200-600 MB, and a hostile page
  could otherwise load the dashboard in a loop from every browser that visits it;
- at most --max-kernels pages run at once (default 8); the next visitor gets a 503 page saying the
  dashboard is full and when to retry, instead of a kernel the machine may not have the memory for;
- a websocket message may be up to twice the dashboard's upload limit, so an upload over the limit
  reaches the page's kernel and is refused there in words instead of closing the connection.

Memory per page load (benchmarks/bench_dashboard_load.py: 20 loads back to back, each followed by a fetch of
plotly's module file, kernels culled after 30 s; results in benchmarks/results/): the server process grew by
1.56 MB per load (98 -> 130 MB): 9.8 MB with the first load and 1.13 MB per load after it (2.11 before the
warm-up: 88 -> 130 MB, 21 MB with the first load). Before it listens, the server does the one-time work of a
first page (scripts/dashboard_voila.py `warm_up`: IPython, imported by jupyter_client to find kernel folders;
nbformat's schema validator, whose compilation alone peaks at 6 MB of Python objects; the page's templates;
the kernels' address): it starts at 98 MB instead of 88; the first page took 5.1 s. What
the first load still adds is not Python objects (under 4 MB of them after the first load) but heap freed and
kept in small pieces. The growth after the first load follows the number of pages open at once (up to 8 here),
not the number of loads: Python objects differed by 6 KB between loads 5 and 15 of a traced run. The
cause of the growth measured before (10.5 MB per load; 35.8 MB before that) was plotly's 5 MB widget module travelling as widget state: the server
decodes every message of a page's kernel while it runs the notebook and keeps each widget's state (nbclient's
`widget_state`), so each load passed the module's text through the server's heap, and its RSS kept it. The server
now serves the module as a file (scripts/dashboard_voila.py) that no kernel message carries; with 5 loads,
the growth went from 22.4 to 5.3 MB per load (20.2 to 1.5 after the first). After a page's kernel shuts down,
the server hands its heap's free pages back to the system (`trim_freed_memory`; its RSS fell by 3.9 MB as
the last kernels of the 20 loads were culled, not measured without it). A fixed glibc mmap threshold
(`--allocator tuned`, `tune_allocator`) gave 33 vs 36 MB per load when the module still travelled as widget
state, no real change, so it is off by default.
WORKBENCH_DASHBOARD_MEMORY_LOG=<file> makes the server append one JSON line of its memory (RSS, Python objects,
malloc in use and free) to that file on SIGUSR1.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "dashboard.ipynb"
TOKEN_ENV = "WORKBENCH_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
CULL_IDLE_S = 600  # a closed tab's kernel goes after 10 minutes without activity
CULL_INTERVAL_S = 60  # how often the server looks for idle kernels
MAX_KERNELS = 8  # pages served at once: ~580 MB each with the dashboard loaded
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's starting value, now fixed: larger blocks are mmap'd, unmapped on free
MEMORY_LOG_ENV = "WORKBENCH_DASHBOARD_MEMORY_LOG"
MEMORY_FRAMES_ENV = "WORKBENCH_DASHBOARD_MEMORY_FRAMES"  # traceback depth: set, each report also dumps a snapshot
ALLOCATORS = ("tuned", "default")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def upload_limit_bytes() -> int:
    """The dashboard's upload limit (widgets/data_panel.py): one number for the page and the server."""
    from widgets.data_panel import MAX_UPLOAD_BYTES

    return MAX_UPLOAD_BYTES


def websocket_limit_bytes() -> int:
    """Twice the upload limit: an upload a little over the limit still reaches the kernel and is refused in words."""
    return 2 * upload_limit_bytes()


class Refused(Exception):
    """A setting the server will not start with; the message names the fix."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else a port the OS picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")  # unreachable: port 0 always binds


def tornado_settings(host: str, allowed_hosts: list[str]) -> dict:
    """The Host check (on unless '*' is allowed) and the websocket message limit."""
    settings: dict = {"websocket_max_message_size": websocket_limit_bytes()}
    if "*" in allowed_hosts:
        settings["allow_remote_access"] = True  # the operator asked for no Host check (a token still guards)
    else:
        # jupyter_server accepts loopback addresses and these names only
        settings["allow_remote_access"] = False
        settings["local_hostnames"] = sorted({"localhost", *allowed_hosts})
    return settings


def cross_site_reason(headers: Any, host: str) -> str | None:
    """Why a page load must not start a kernel (it was sent by another site), or None.

    Browsers say where a request comes from: Sec-Fetch-Site (cross-site, same-site, same-origin, or none for
    a typed address or a bookmark), and Origin on requests made by scripts. A request without either (a
    program, an older browser's typed address) is not a page of another site."""
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"this page was requested by another site (Sec-Fetch-Site: {site})"
    origin = (headers.get("Origin") or "").strip()
    if origin and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
        return f"this page was requested by a page of {origin[:100]}"
    return None


def refuse_cross_site(handler: Any, notebook: Any = None, cwd: str | None = None) -> Any:
    """Voila's prelaunch hook (runs before the page's kernel starts): a 403 page for a load by another site."""
    import tornado.web

    reason = cross_site_reason(handler.request.headers, handler.request.host)
    if reason:
        handler.log.warning("refused a cross-site page load from %s: %s", handler.request.remote_ip, reason)
        # Voila's error page shows the status and its reason only: the reason is the sentence
        words = (f"{reason}. Open the dashboard by typing or pasting its address in the browser: a page of "
                 "another site cannot start it")
        raise tornado.web.HTTPError(403, reason=words, log_message=words)
    return notebook


def capped_kernel_manager(max_kernels: int) -> type:
    """The server's kernel manager, refusing a new page (503, in words) while `max_kernels` run or start."""
    import tornado.web
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    class CappedKernelManager(AsyncMappingKernelManager):
        starting = 0  # kernels being started: not yet in list_kernel_ids, but already paid for

        async def shutdown_kernel(self, kernel_id: str, now: bool = False, restart: bool = False) -> None:
            try:
                await super().shutdown_kernel(kernel_id, now=now, restart=restart)
            finally:
                if not restart:  # a page's kernel has gone (culled, or its page shut it down)
                    trim_freed_memory()

        async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
            if kwargs.get("kernel_id") is None:  # a new kernel, not a restart of a known one
                running = len(self.list_kernel_ids()) + self.starting
                if running >= max_kernels:
                    self.log.warning("dashboard full: %d kernels running or starting, refused one", running)
                    words = (f"The dashboard is full: {max_kernels} pages are open on this server, the most it "
                             "runs at once. Try again in a few minutes (a closed page frees its place after its "
                             "idle time), or ask the operator for a larger --max-kernels")
                    raise tornado.web.HTTPError(503, reason=words, log_message=words)
            self.starting += 1  # counted before the first await: two loads at once cannot both pass
            try:
                return await super().start_kernel(*args, **kwargs)
            finally:
                self.starting -= 1

    return CappedKernelManager


def _libc() -> Any:
    """glibc, or None on another C library (musl, macOS): the allocator calls below are glibc's."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  raises AttributeError where there is no glibc
        return libc
    except (OSError, AttributeError):
        return None


def trim_freed_memory() -> bool:
    """Hand the free pages of this process's C heap back to the system (glibc `malloc_trim`); False without glibc.

    The same call as workbench.deploy.batching.release_freed_memory, made here so that the server does not import
    the core (numpy and the rest: ~1.4 s and tens of MB) for one C call."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold in this process (the server), so freed large buffers go back to the system.

    glibc starts at 128 KiB and raises the threshold to the size of each mmap'd block that is freed; a page's
    5 MB widget messages raise it to 5 MB, after which they come from the heap and their pages stay with the
    server (~37 MB per page load, measured). Setting M_MMAP_THRESHOLD turns the raising off. Only this process
    is affected: kernels and training runs keep glibc's defaults. Returns False where there is no glibc.
    Measured (bench_dashboard_load, 20 loads): 33 MB per load with it, 36 without: not the cause; off by default."""
    libc = _libc()
    if libc is None:
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))


def memory_report() -> dict[str, float]:
    """This process's memory in MB: RSS, Python objects (when tracemalloc runs), malloc in use and free."""
    import ctypes
    import gc
    import tracemalloc

    gc.collect()
    with open("/proc/self/statm") as f:
        report = {"rss_mb": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}
    with open("/proc/self/status") as f:  # anonymous (heaps, arenas) vs file-backed (loaded libraries) pages
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                report[line.split(":")[0].lower().replace("rss", "rss_") + "_mb"] = int(line.split()[1]) / 2**10
    report["threads"] = len(os.listdir("/proc/self/task"))
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        report["python_objects_mb"] = current / 2**20
        report["python_objects_peak_mb"] = peak / 2**20  # the most since the last report
        tracemalloc.reset_peak()
        report["tracemalloc_own_mb"] = tracemalloc.get_tracemalloc_memory() / 2**20
    libc = _libc()
    if libc is not None and hasattr(libc, "mallinfo2"):
        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                                             "keepcost")]

        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        report["malloc_in_use_mb"] = (info.uordblks + info.hblkhd) / 2**20  # heap chunks in use + mmap'd blocks
        report["malloc_free_mb"] = info.fordblks / 2**20  # freed, still held by the process
    return report


def write_malloc_info(path: str) -> bool:
    """glibc's `malloc_info` (one XML element per arena: its free chunks, in use, mmap'd) into a file."""
    import ctypes

    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_info"):
        return False
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    stream = libc.fopen(path.encode(), b"w")
    if not stream:
        return False
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    return True


def install_memory_log() -> None:
    """With $WORKBENCH_DASHBOARD_MEMORY_LOG set: trace Python allocations, and on SIGUSR1 append
    `memory_report()` as one JSON line to that file (a debugging aid: tracemalloc costs time and memory).
    With $WORKBENCH_DASHBOARD_MEMORY_FRAMES=N as well, allocations are traced N frames deep and each report also
    dumps a tracemalloc snapshot to <file>.<report number>.snapshot (compare two with `Snapshot.compare_to`)."""
    import signal
    import tracemalloc

    path = os.environ.get(MEMORY_LOG_ENV)
    if not path:
        return
    frames = int(os.environ.get(MEMORY_FRAMES_ENV) or 0)
    tracemalloc.start(max(frames, 1))
    reports = [0]

    def write(signum: int, frame: Any) -> None:
        report = memory_report()
        if frames:  # written before the report line, which is what a reader waits for
            tracemalloc.take_snapshot().dump(f"{path}.{reports[0]}.snapshot")
            write_malloc_info(f"{path}.{reports[0]}.malloc.xml")
        reports[0] += 1
        with open(path, "a") as f:
            f.write(json.dumps(report) + "\n")

    signal.signal(signal.SIGUSR1, write)


def write_voila_config(folder: Path, host: str, allowed_hosts: list[str], max_kernels: int = MAX_KERNELS,
                       allocator: str = "default") -> Path:
    """<folder>/voila.json with the tornado settings (a command line would pass their booleans as strings), and
    <folder>/voila.py with what only Python can set: the cross-site hook, the capped kernel manager, the
    allocator setting (`tune_allocator`, unless `allocator` is "default") and the memory log.
    Returns voila.json's path. The folder is the owner's only (0700)."""
    if allocator not in ALLOCATORS:
        raise Refused(f"--allocator {allocator}: use one of {', '.join(ALLOCATORS)}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / "voila.json"
    path.write_text(json.dumps({"Voila": {"tornado_settings": tornado_settings(host, allowed_hosts)}}, indent=1))
    (folder / "voila.py").write_text(
        "# written by scripts/serve_dashboard.py at each start: what a JSON config cannot hold\n"
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import serve_dashboard\n"
        "c.VoilaConfiguration.prelaunch_hook = serve_dashboard.refuse_cross_site\n"
        f"c.VoilaConfiguration.multi_kernel_manager_class = serve_dashboard.capped_kernel_manager({int(max_kernels)})\n"
        + ("serve_dashboard.tune_allocator()\n" if allocator == "tuned" else "")
        + "serve_dashboard.install_memory_log()\n")
    return path


def voila_command(port: int, host: str, config_dir: Path, token: bool = False,
                  cull_idle: int = CULL_IDLE_S) -> list[str]:
    """The Voila command line (the token itself travels in $JUPYTER_TOKEN, never on a command line)."""
    # Voila plus the route that serves plotly's widget module as a file (scripts/dashboard_voila.py)
    command = [sys.executable, str(Path(__file__).resolve().parent / "dashboard_voila.py"), str(NOTEBOOK),
               "--no-browser", f"--port={port}", f"--Voila.ip={host}",
               "--show_tracebacks=False", "--strip_sources=True",
               f"--Voila.config_file_paths={config_dir}",  # only ours: no stray voila.json from elsewhere
               f"--MappingKernelManager.cull_idle_timeout={cull_idle}",
               f"--MappingKernelManager.cull_interval={min(CULL_INTERVAL_S, max(cull_idle // 2, 1))}",
               "--MappingKernelManager.cull_connected=False",  # an open page keeps its kernel
               "--MappingKernelManager.cull_busy=False"]
    if token:
        command.append("--Voila.auto_token=True")  # the identity provider reads $JUPYTER_TOKEN
    return command


def check_exposure(host: str, token: str, allowed_hosts: list[str]) -> list[str]:
    """Refuse an unprotected server beyond loopback (Refused, one line); returns the warnings to print."""
    if is_loopback(host):
        return []
    if not token:
        raise Refused(f"--host {host} listens beyond this machine: set a token (--token auto, --token TOKEN, "
                         f"or ${TOKEN_ENV}) so that only visitors with the link can use the dashboard")
    if not allowed_hosts:
        raise Refused(f"--host {host} listens beyond this machine: name the host visitors type in their browser "
                         "with --allowed-host NAME (repeatable; '*' turns the Host check off)")
    warnings = []
    if host in ("0.0.0.0", "::", ""):
        warnings.append(f"warning: --host {host} listens on every network interface of this machine; "
                        "anyone who can reach it and has the token can use the dashboard")
    if "*" in allowed_hosts:
        warnings.append("warning: --allowed-host '*' turns the Host-header check off (DNS rebinding is then only "
                        "stopped by the token)")
    return warnings


def resolve_token(value: str | None) -> str:
    token = value if value is not None else os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    if token == "auto":
        return secrets.token_urlsafe(24)
    if token and len(token) < MIN_TOKEN_CHARS:
        raise Refused(f"the token is {len(token)} characters: use at least {MIN_TOKEN_CHARS} "
                         "(or --token auto for a random one)")
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8866, help="preferred port; another free one if taken")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--token", help=f"required beyond loopback: a secret of {MIN_TOKEN_CHARS}+ characters, "
                                        f"or 'auto' (default: ${TOKEN_ENV})")
    parser.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                        help="a host name visitors use (beyond loopback; repeatable; '*' = no Host check)")
    parser.add_argument("--cull-idle", type=int, default=CULL_IDLE_S, metavar="SECONDS",
                        help=f"shut down a closed page's kernel after this many idle seconds (default {CULL_IDLE_S})")
    parser.add_argument("--max-kernels", type=int, default=MAX_KERNELS, metavar="N",
                        help=f"pages served at once, each its own kernel of ~580 MB (default {MAX_KERNELS})")
    parser.add_argument("--home", help="run store (default: $WORKBENCH_HOME or ./workbench-runs)")
    parser.add_argument("--read-only", action="store_true", help="no training controls (public demos)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="default: glibc as it is; tuned: a fixed mmap threshold in the server (an experiment "
                             "for bench_dashboard_load.py: it did not reduce the growth per page load)")
    args = parser.parse_args(argv)

    try:
        token = resolve_token(args.token)
        warnings = check_exposure(args.host, token, args.allowed_hosts)
        if args.cull_idle < 1:
            raise Refused(f"--cull-idle {args.cull_idle}: give a number of seconds (at least 1)")
        if args.max_kernels < 1:
            raise Refused(f"--max-kernels {args.max_kernels}: give a number of pages (at least 1)")
    except Refused as exc:
        print(f"serve_dashboard: {exc}", file=sys.stderr)
        return 2
    for line in warnings:
        print(line, file=sys.stderr)

    env = dict(os.environ)
    env["WORKBENCH_HOME"] = str(Path(args.home or env.get("WORKBENCH_HOME", ROOT / "workbench-runs")).resolve())
    if args.read_only:
        env["WORKBENCH_READ_ONLY"] = "1"
    env.pop(TOKEN_ENV, None)
    env.pop("JUPYTER_TOKEN", None)
    if token:
        env["JUPYTER_TOKEN"] = token
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import voila  # noqa: F401
    except ImportError:
        print("voila is not installed: pip install 'voila>=0.5,<0.6' (or pip install -e '.[notebooks]')",
              file=sys.stderr)
        return 2
    port = free_port(args.port, args.host)
    names = [h for h in args.allowed_hosts if h != "*"]
    shown = names[0] if names and not is_loopback(args.host) else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    query = f"?token={token}" if token else ""
    print(f"LLM Workbench dashboard: http://{shown}:{port}/{query}  (runs in {env['WORKBENCH_HOME']}; "
          "Ctrl-C stops)", flush=True)
    os.chdir(ROOT / "notebooks")
    config_dir = write_voila_config(Path(env["WORKBENCH_HOME"]) / ".dashboard-server", args.host,
                                    args.allowed_hosts, args.max_kernels, args.allocator).parent
    command = voila_command(port, args.host, config_dir, bool(token), args.cull_idle)
    os.execve(command[0], command, env)  # become Voila: signals (Ctrl-C, SIGTERM) reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
