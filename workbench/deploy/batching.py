"""Dynamic micro-batching: concurrent requests are grouped into one model call, run on a worker thread.

Each request submits its items (texts) and awaits its own results. One collector task on the event loop
takes the first waiting request, then keeps taking requests until the group holds `max_batch_size` items
or `max_wait_ms` has passed, and runs the model once on the whole group in a single worker thread (the
model is never called on the event loop, and never from two threads at once). While the model works,
new requests queue up, so under load the next group fills without waiting: throughput grows with
concurrency. A request with more items than `max_batch_size` runs alone (the model chunks it).
`max_batch_size=1` is batch-1 serving: one request per model call.

Two things keep one client from hurting the others:
- a group that fails is run again one request at a time, so an input that breaks the model fails its own
  request only (before this, one text the tokenizer refused failed every request grouped with it: with 4
  clients sending such a text, 99 of 100 normal requests from a fifth got 500);
- the queue is bounded (`max_queue` items waiting or running; `QueueFull` beyond it, with a retry delay) and
  every wait has a deadline (`timeout_s`; `QueueTimeout`): a backlog of large requests delays a small one by at
  most the time the bounded queue takes, never without end (8 requests of 64 long texts had delayed a
  1-text request by 17.7 s). The server answers these 503 with Retry-After and 504.

Admission by expected wait: a count bound alone lets a slow model keep every admitted request waiting for
seconds (128 classify clients against a MiniLM run on 2 cores: every request answered, median 3.6 s, 95th
percentile 9.0 s). So a request is also refused (`QueueFull`, Retry-After = the time the admitted work takes
to drain) when the wait it would see exceeds `max_queue_wait_s`: what is admitted is answered within about that
budget, the rest is shed at once and told when to come back. The wait is priced from the last `RATE_WINDOW`
model calls as `per_call + per_item * n` seconds for a call of n items (least squares; a call's fixed cost is
what batching saves): the rest of the call now running, then the groups of `max_batch_size` that the queued
items and the new request make. Priced per item alone, a batch-1 call's time was charged to every queued item,
so a queue of 2 already looked over budget and the server never batched again (1 item per call under load).
While the recent calls all had one size, the fixed cost is taken as the whole call (a larger group priced like
it: optimistic until calls of other sizes correct it). An empty queue admits any request (a larger one runs
alone); before the first model call the count bound is the only one.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

Item = Any
Job = tuple[list[Item], "asyncio.Future[list[Any]]"]
MAX_QUEUE_WAIT_S = 0.5  # the default wait budget: see max_queue_wait_s in MicroBatcher
RATE_WINDOW = 16  # model calls the cost estimate is taken over
TRIM_EVERY_S = 1.0  # the least time between two returns of the model's freed memory (see release_freed_memory)


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc malloc_trim); False where there is no glibc.

    Model calls on batches of varying shapes leave freed tensor memory in glibc's heap, which it keeps: a
    served MiniLM grew from 664 to 967 MB RSS over 300 calls of 1-32 texts and went back to 716 MB after one
    malloc_trim; trimmed after every call it stayed at 716 MB (about 4 ms a trim)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


class QueueFull(Exception):
    """A request refused before it queued: try again after `retry_after` seconds. `limit_name` names the bound it
    met: max_queue (`waiting` items already, `limit` at most), max_queue_wait_s (it would wait longer than the
    budget) or shutdown (the batcher is stopping)."""

    def __init__(self, waiting: int, limit: int, retry_after: int, reason: str | None = None,
                 limit_name: str = "max_queue") -> None:
        reason = reason or f"{waiting} items are waiting, the queue holds at most {limit}"
        super().__init__(f"{reason}: retry in {retry_after} s")
        self.waiting, self.limit, self.retry_after, self.limit_name = waiting, limit, retry_after, limit_name


class QueueTimeout(Exception):
    """A request waited (queued and running) longer than the batcher's `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no answer within {timeout_s:g} s")
        self.timeout_s = timeout_s


class MicroBatcher:
    """Groups `submit` calls into calls of `fn(items) -> results` (same length, same order).

    `max_queue` bounds the items admitted (waiting or running); `max_queue_wait_s` bounds the wait a new request
    is expected to see (None: the count bound only); `timeout_s` is each request's deadline (None: none)."""

    def __init__(self, fn: Callable[[list[Item]], list[Any]], max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 1024,
                 timeout_s: float | None = None, max_queue_wait_s: float | None = MAX_QUEUE_WAIT_S) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (or None for no deadline), got {timeout_s}")
        if max_queue_wait_s is not None and not max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be > 0 (or None for the count bound only), got {max_queue_wait_s}")
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self.on_batch = on_batch  # called on the worker thread with each group's item count (metrics)
        self.max_queue, self.timeout_s, self.max_queue_wait_s = max_queue, timeout_s, max_queue_wait_s
        self.waiting = 0  # items admitted and not yet answered (queued or in the model)
        self.shed = 0  # requests refused with QueueFull
        # (seconds, items) of the recent model calls, appended on the model thread
        self._calls: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW)
        self._running: tuple[int, float] | None = None  # (items, perf_counter at start) of the call in the model
        self._closing = False
        self._trimmed_at = 0.0  # perf_counter of the last release_freed_memory
        self._trim_owed = False  # a call ended idle within TRIM_EVERY_S of the last trim: trim when it stays idle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._carry: Job | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self, drain_s: float = 30.0) -> None:
        """Refuse new work (QueueFull, limit_name "shutdown"), answer the work admitted (up to `drain_s` seconds;
        the server drained its requests before, so normally none is left), then cancel the collector and release
        the worker thread."""
        self._closing = True
        deadline = time.monotonic() + drain_s
        while self.waiting and time.monotonic() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def _cost(self) -> tuple[float, float]:
        """(seconds per call, seconds per item) of the recent model calls; (0, 0) before the first."""
        calls = list(self._calls)
        if not calls:
            return 0.0, 0.0
        mean_n = sum(n for _, n in calls) / len(calls)
        mean_t = sum(t for t, _ in calls) / len(calls)
        spread = sum((n - mean_n) ** 2 for _, n in calls)
        if spread == 0:  # one size seen: the whole call counts as fixed cost
            return mean_t, 0.0
        per_item = sum((n - mean_n) * (t - mean_t) for t, n in calls) / spread
        per_call = mean_t - per_item * mean_n
        if per_item < 0:  # noise (other work on the machine): no per-item cost to read, only the mean call
            return mean_t, 0.0
        if per_call < 0:
            return 0.0, sum(t for t, _ in calls) / sum(n for _, n in calls)
        return per_call, per_item

    def _drain_time(self, queued: int, running: tuple[int, float] | None) -> float:
        """Seconds until `queued` more items, behind the call `running` now (items, start), are answered."""
        per_call, per_item = self._cost()
        left = 0.0
        if running is not None:
            size, started = running
            left = max(0.0, per_call + per_item * size - (time.perf_counter() - started))
        return left + math.ceil(queued / self.max_batch_size) * per_call + per_item * queued

    def expected_wait(self, count: int = 1) -> float:
        """Seconds a new request of `count` items would wait for its answer, queue and its own call included."""
        running = self._running  # read once: the model thread replaces it
        queued = max(0, self.waiting - (running[0] if running is not None else 0))
        return self._drain_time(queued + count, running)

    def refusal(self, count: int = 1, ahead: int = 0) -> QueueFull | None:
        """Why a request of `count` items would be refused now (QueueFull: too many items, too long an expected
        wait, or stopping), or None; `ahead`: items of requests already let in but not yet counted (their bodies
        are being read), taken as queued before this one. Reads only counters and the recent calls' timings:
        cheap enough to ask of every request before its body is read (the server sheds a storm of requests
        without parsing them)."""
        if self._closing:
            return QueueFull(self.waiting, self.max_queue, 1, "the server is shutting down", "shutdown")
        waiting = self.waiting + ahead
        if not waiting:  # an empty queue takes any request (a larger one runs alone)
            return None
        running = self._running
        queued = max(0, waiting - (running[0] if running is not None else 0))
        if waiting + count > self.max_queue:
            return QueueFull(waiting, self.max_queue, self._retry_after(queued, running))
        if self.max_queue_wait_s is not None:
            expected = self._drain_time(queued + count, running)
            if expected > self.max_queue_wait_s:
                return QueueFull(waiting, self.max_queue, self._retry_after(queued, running),
                                 f"{waiting} items are waiting: a new request would wait about {expected:.2f} s, "
                                 f"more than max_queue_wait_s={self.max_queue_wait_s:g} s", "max_queue_wait_s")
        return None

    def _retry_after(self, queued: int, running: tuple[int, float] | None) -> int:
        """Whole seconds until the admitted work is drained (at least 1): the Retry-After of a refusal."""
        return max(1, math.ceil(self._drain_time(queued, running)))

    def _admit(self, count: int) -> None:
        """Count `count` items in, or raise the refusal."""
        refused = self.refusal(count)
        if refused is not None:
            self.shed += 1
            raise refused
        self.waiting += count

    async def _deadline(self, awaitable: Any) -> Any:
        if self.timeout_s is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise QueueTimeout(self.timeout_s) from None

    async def submit(self, items: list[Item]) -> list[Any]:
        """This request's results, in order; the model's exception is raised here; QueueFull when the queue is
        full, QueueTimeout past the deadline (the request is then dropped from its group if not yet run)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        items = list(items)
        self._admit(len(items))
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        try:
            await self._queue.put((items, future))
            return await self._deadline(asyncio.shield(future))
        finally:
            future.cancel()  # no-op when answered; else the collector skips it
            self.waiting -= len(items)

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the model's worker thread, between groups (for work that is not batched); held to the
        same queue bound (as one item) and deadline as `submit`."""
        self._admit(1)
        try:
            return await self._deadline(asyncio.get_running_loop().run_in_executor(self._executor, fn))
        finally:
            self.waiting -= 1

    # --- the collector ---------------------------------------------------------------------------------
    async def _next_group(self) -> list[Job]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry
        self._carry = None
        while first is None:
            if not self._trim_owed:
                first = await self._queue.get()
                break
            try:  # the last call's freed memory was not handed back (a trim was too recent): at the first quiet second
                first = await asyncio.wait_for(self._queue.get(), TRIM_EVERY_S)
            except (asyncio.TimeoutError, TimeoutError):
                self._trim_owed = False
                await loop.run_in_executor(self._executor, self._trim)
        group, count = [first], len(first[0])
        deadline = loop.time() + self.max_wait
        while count < self.max_batch_size:
            try:
                job = self._queue.get_nowait()  # already waiting: take it without sleeping
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            if count + len(job[0]) > self.max_batch_size:
                self._carry = job  # starts the next group
                break
            group.append(job)
            count += len(job[0])
        return group

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [job for job in await self._next_group() if not job[1].done()]  # a client gone: skip it
            if not group:
                continue
            flat = [item for items, _ in group for item in items]
            try:
                results = await loop.run_in_executor(self._executor, self._run, flat)
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], error=exc)
                else:  # one request's input broke the call: each alone, so it fails its own request only
                    await self._one_by_one(group)
                continue
            start = 0
            for items, future in group:
                _settle(future, results[start: start + len(items)])
                start += len(items)

    async def _one_by_one(self, group: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for items, future in group:
            if future.done():  # its client went away or its deadline passed meanwhile
                continue
            try:
                _settle(future, await loop.run_in_executor(self._executor, self._run, items))
            except Exception as exc:
                _settle(future, error=exc)

    def _trim(self) -> None:
        """Hand the freed heap back now (model thread)."""
        self._trimmed_at = time.perf_counter()
        self._trim_owed = False
        release_freed_memory()

    def _run(self, items: list[Item]) -> list[Any]:
        if self.on_batch is not None:
            self.on_batch(len(items))
        start = time.perf_counter()
        self._running = (len(items), start)
        try:
            results = self.fn(items)
        finally:
            self._running = None
        self._calls.append((time.perf_counter() - start, len(items)))
        now = time.perf_counter()
        if self.waiting <= len(items):  # nothing queued behind: idle
            if now - self._trimmed_at > TRIM_EVERY_S:
                self._trim()
            else:
                self._trim_owed = True  # done by the collector once a second passes without a call
        if len(results) != len(items):
            raise RuntimeError(f"model returned {len(results)} results for {len(items)} inputs")
        return results


def _settle(future: "asyncio.Future[list[Any]]", result: list[Any] | None = None,
            error: BaseException | None = None) -> None:
    """Answer a request unless it was answered or abandoned (a client gone, a deadline passed)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
