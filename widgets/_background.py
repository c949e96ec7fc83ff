"""Work off the UI thread (long work never blocks the kernel): debounced recomputation, one-off jobs, and polling.

Widgets keep the kernel free by running slow calls (model inspection, file
reading, preflight, store polling) on daemon threads. Each helper can also run
inline (`delay=0`, `sync=True`), which is what the headless tests use.
"""

from __future__ import annotations

import threading
from typing import Callable


class Debouncer:
    """Calls `fn()` once, `delay` seconds after the last trigger; runs never overlap. delay <= 0: inline, now."""

    def __init__(self, fn: Callable[[], None], delay: float) -> None:
        self.fn, self.delay = fn, delay
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # guards _timer
        self._running = threading.Lock()  # one run at a time: a late run sees the latest values

    def __call__(self) -> None:
        if self.delay <= 0:
            self._run()
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        with self._running:
            self.fn()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a pending call has run (tests, scripts, notebooks): on the call's state, however slow the
        machine; `timeout` (seconds) gives up earlier and returns False."""
        with self._lock:
            timer = self._timer
        if timer is not None:
            timer.join(timeout)
        acquired = self._running.acquire(timeout=-1 if timeout is None else timeout)
        if acquired:
            self._running.release()
        return acquired


def run_job(fn: Callable[[], None], sync: bool = False, name: str = "widgets-job") -> threading.Thread | None:
    """Run `fn` on a daemon thread (or inline when `sync`); returns the thread."""
    if sync:
        fn()
        return None
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


class Poller:
    """Calls `tick()` every `interval` seconds on a daemon thread until it returns False or `stop()`."""

    def __init__(self, tick: Callable[[], bool], interval: float, name: str = "widgets-poll") -> None:
        self.tick, self.interval, self.name = tick, interval, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name=self.name, daemon=True)
            self._thread.start()

    def stop(self, join: bool = False) -> None:
        self._stop.set()
        thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.tick():
                return
            stop.wait(self.interval)
