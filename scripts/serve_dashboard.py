"""Serve the dashboard (notebooks/dashboard.ipynb) with Voila on a free local port and print its URL.

    python scripts/serve_dashboard.py                 # http://127.0.0.1:<free port>/
    python scripts/serve_dashboard.py --read-only     # a public demo: watch, compare, try; no training
    python scripts/serve_dashboard.py --port 8866 --home workbench-runs

Voila runs standalone: code cells are hidden, tracebacks are not shown, and every visitor gets a new
kernel; training runs are their own processes in the run store ($WORKBENCH_HOME), so a reload
reattaches to them. Stop with Ctrl-C (a run in progress goes on; stop it from the page or the CLI).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "dashboard.ipynb"


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else a port the OS picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")  # unreachable: port 0 always binds


def voila_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", f"--Voila.ip={host}",
            "--show_tracebacks=False", "--strip_sources=True"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8866, help="preferred port; another free one if taken")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--home", help="run store (default: $WORKBENCH_HOME or ./workbench-runs)")
    parser.add_argument("--read-only", action="store_true", help="no training controls (public demos)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env["WORKBENCH_HOME"] = str(Path(args.home or env.get("WORKBENCH_HOME", ROOT / "workbench-runs")).resolve())
    if args.read_only:
        env["WORKBENCH_READ_ONLY"] = "1"
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import voila  # noqa: F401
    except ImportError:
        print("voila is not installed: pip install 'voila>=0.5,<0.6' (or pip install -e '.[notebooks]')",
              file=sys.stderr)
        return 2
    port = free_port(args.port, args.host)
    print(f"LLM Workbench dashboard: http://{args.host}:{port}/  (runs in {env['WORKBENCH_HOME']}; Ctrl-C stops)",
          flush=True)
    os.chdir(ROOT / "notebooks")
    command = voila_command(port, args.host)
    os.execve(command[0], command, env)  # become Voila: signals (Ctrl-C, SIGTERM) reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
