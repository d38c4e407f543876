"""Concurrent requests' clips → shared forward passes, run off the event loop.

One task owns the model: it takes the first waiting request, gathers whatever else arrives within
`max_wait` (by default nothing more than is already queued) up to `max_batch_size` clips, and runs
them on a single thread of its own, so the event loop keeps answering health probes and accepting
requests while AST computes. Requests that arrive during a forward pass wait in the queue and form
the next batch. On 2 cores batches did not pay (a server with batches of up to 4 served 8-15 %
fewer clips/s than one without), so the server's default `max_batch_size` is 1: this is then a
queue in front of the model's thread, which is also where the filterbank runs (`on_model_thread`).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


class Batcher:
    def __init__(self, forward: Forward, max_batch_size: int, max_wait_s: float):
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        # Made on first use: the queue and the task belong to the server's event loop, which does not
        # exist yet when the model loads.
        self._thread: Optional[ThreadPoolExecutor] = None

    async def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for these clips, computed alone or alongside other requests' clips."""
        self._start()
        result = asyncio.get_running_loop().create_future()
        await self._queue.put((features, result))
        return await result

    async def on_model_thread(self, work: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """Run other torch work on the model's thread, between forward passes: beside them, on
        threads of its own, its kernels and the model's would fight over the same cores."""
        self._start()
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def _start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ast-forward")
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            waiting = await self._gather()
            try:
                # Clients that went away (a cancelled gRPC call, a timed-out caller) cost nothing more.
                waiting = [(features, result) for features, result in waiting if not result.done()]
                if not waiting:
                    continue
                logits = await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._run, torch.cat([f for f, _ in waiting])
                )
                for (features, result), rows in zip(waiting, logits.split([len(f) for f, _ in waiting])):
                    if not result.done():
                        result.set_result(rows)
            except Exception as exc:  # noqa: BLE001 - the waiting requests get the failure, the loop goes on
                for _, result in waiting:
                    if not result.done():
                        result.set_exception(exc)

    async def _gather(self) -> list:
        """The first waiting request, then whatever arrives within max_wait, up to max_batch_size clips."""
        loop = asyncio.get_running_loop()
        waiting = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while sum(len(f) for f, _ in waiting) < self.max_batch_size:
            try:
                remaining = deadline - loop.time()
                waiting.append(self._queue.get_nowait() if remaining <= 0
                               else await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return waiting

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.forward(chunk) for chunk in batch.split(self.max_batch_size)])
