"""Dynamic micro-batching: concurrent requests are grouped into one model call, run on a worker thread.

Each request submits its items (texts) and awaits its own results. One collector task on the event loop
takes the first waiting request, then keeps taking requests until the group holds `max_batch_size` items
or `max_wait_ms` has passed, and runs the model once on the whole group in a single worker thread (the
model is never called on the event loop, and never from two threads at once). While the model works,
new requests queue up, so under load the next group fills without waiting: throughput grows with
concurrency. A request with more items than `max_batch_size` runs alone (the model chunks it).
`max_batch_size=1` is batch-1 serving: one request per model call.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

Item = Any
Job = tuple[list[Item], "asyncio.Future[list[Any]]"]


class MicroBatcher:
    """Groups `submit` calls into calls of `fn(items) -> results` (same length, same order)."""

    def __init__(self, fn: Callable[[list[Item]], list[Any]], max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self.on_batch = on_batch  # called on the worker thread with each group's item count (metrics)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._carry: Job | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        """Cancel the collector (after the server drained its requests) and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, items: list[Item]) -> list[Any]:
        """This request's results, in order; the model's exception is raised here."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        await self._queue.put((list(items), future))
        return await future

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the model's worker thread, between groups (for work that is not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- the collector ---------------------------------------------------------------------------------
    async def _next_group(self) -> list[Job]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
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
            except Exception as exc:  # every request of the group gets the error; the collector goes on
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in group:
                if not future.done():
                    future.set_result(results[start: start + len(items)])
                start += len(items)

    def _run(self, items: list[Item]) -> list[Any]:
        if self.on_batch is not None:
            self.on_batch(len(items))
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"model returned {len(results)} results for {len(items)} inputs")
        return results
