"""Micro-batching: concurrent requests answered by one call of a batch function.

Each request enqueues its item and awaits a future. One collector task on the event loop takes every waiting
item, gathers more for up to `wait_ms` (or until `max_batch` are in hand) and runs the batch on the given
executor, so one model pass and one index search serve every request in it. The collector waits only when
the previous batch held more than one item (and before the first batch): a lone client, whose requests never
overlap, is answered at once after its first request, as without batching.

Each future gets its own result or exception: when the batch call raises, its items are run again one by
one, so only a faulty item fails. Nothing here knows HTTP: a batch function maps a list of items to one
result per item.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

# The server's defaults. A few milliseconds cost a lone request little next to its encoder pass (tens of
# milliseconds on a CPU) and gather the requests that arrive together under load; 32 queries keep one
# batch's pass short, so the requests arriving meanwhile wait little for the next.
BATCH_WAIT_MS, MAX_BATCH = 5.0, 32

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


class MicroBatcher(Generic[Item, Result]):
    """Runs `run(items)` on `executor` for batches of concurrently submitted items. `wait_ms=0` (or
    `max_batch=1`) turns gathering off: each item is run alone as soon as it is submitted."""

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], executor: Executor,
                 wait_ms: float, max_batch: int) -> None:
        if not wait_ms >= 0:  # also refuses NaN
            raise ValueError(f"batch wait must be a number of milliseconds >= 0, got {wait_ms}")
        if max_batch < 1:
            raise ValueError(f"the batch size limit must be at least 1, got {max_batch}")
        self._run = run
        self._executor = executor
        self._wait = wait_ms / 1000
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending[Item, Result]] = asyncio.Queue()
        self._collector: asyncio.Task[None] | None = None  # started by the first submit, on the serving loop

    async def submit(self, item: Item) -> Result:
        """The result of `item`, or its own exception, once the batch it joined has run."""
        loop = asyncio.get_running_loop()
        if self._wait == 0 or self._max_batch == 1:
            return (await loop.run_in_executor(self._executor, self._run, [item]))[0]
        if self._collector is None:
            self._collector = loop.create_task(self._collect())
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put_nowait(_Pending(item, future))
        return await future

    async def close(self) -> None:
        """Stop collecting; requests still waiting are cancelled (a server closes after its requests end)."""
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        previous = 2  # the size of the last batch run; before any, company is expected
        while True:
            batch = [await self._queue.get()]
            # Company is waited for only when the last batch had some: a lone client soon stops waiting. The
            # wait starts now, not when the first item arrived: the clients the last batch just answered are
            # sending their next requests, and without waiting for them concurrent clients settle into
            # alternating half-size batches (4 clients: batches of 2, 62 requests/s at any wait).
            deadline = loop.time() + (self._wait if previous > 1 else 0.0)
            while len(batch) < self._max_batch:
                if not self._queue.empty():  # already waiting: taken even past the deadline
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [pending for pending in batch if not pending.future.done()]  # done: its client went away
            if not live:
                continue
            previous = len(live)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._answer, [p.item for p in live])
            except asyncio.CancelledError:
                for pending in live:
                    pending.future.cancel()
                raise
            except Exception as error:  # the executor itself failed (shut down): every request learns why
                outcomes = [error] * len(live)
            for pending, outcome in zip(live, outcomes, strict=True):
                if pending.future.done():
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    def _answer(self, items: list[Item]) -> list[Result | Exception]:
        """On the executor: the batch in one call; if that raises, each item alone, so that a bad item
        fails alone (a batch of one keeps its own exception)."""
        try:
            return list(self._run(items))
        except Exception as error:
            if len(items) == 1:
                return [error]
        return [self._answer([item])[0] for item in items]
