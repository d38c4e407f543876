"""Windows of concurrent requests → forward passes on the model's own thread, fairly.

The unit of work is a window, not a request: a ten-minute clip is 59 windows and must not hold
back a five-second clip sent after it. Each request waiting for the model is a `Job`. A job that
has not had a window computed yet goes first (in order of arrival); after that, every pass takes
the next window of each job in turn (round robin, up to `max_batch_size` windows). So a short
request waits for the pass in flight and for the requests that arrived just before it, not for
anyone's long clip. A job whose caller has gone away (a cancelled gRPC call, a client that
disconnected) is dropped before its next window: what it had not started costs nothing.

What may enter is decided before a request is decoded (`admission`), from the windows waiting
here and the time a window has been taking (`seconds_per_window`, a running average of the
passes, per window, so batches count at their real cost).

One asyncio task owns the schedule and runs each pass (`passes`) on a single thread of its own, so
the event loop keeps answering health probes while AST computes. The next batch is taken when a
pass ends, so it holds every window that arrived meanwhile, except on a GPU when a full batch is
already waiting: then it is taken and staged (copied to the GPU) while the pass runs. On 2 cores
batches did not pay (`make bench`), so `max_batch_size` is 1 there by default, larger on a GPU.
"""

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import metrics
from .occlusion import Window
from .passes import Pass
from .queue_state import QueueState

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5

@dataclass(eq=False)  # a job is itself alone: equal fields would compare windows, which numpy refuses
class Job:
    windows: Sequence[Window]
    result: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    scheduled: int = 0
    """Windows handed to a forward pass so far."""
    logits: list = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return len(self.windows) - self.scheduled

    @property
    def abandoned(self) -> bool:
        return self.result.done()


class WindowQueue:
    def __init__(self, passes: Pass, max_batch_size: int, max_wait_s: float, seconds_per_window: float = 1.0,
                 state: Optional[QueueState] = None, forward_thread: Optional[ThreadPoolExecutor] = None):
        """`forward_thread`: the one thread the passes run on, where several models share it
        (`repository`): their passes take turns there. By default the queue makes its own."""
        self.passes = passes
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.state = state or QueueState.local()
        """The windows waiting and the time per window, where admission reads them (`queue_state`)."""
        if not self.state.seconds_per_window:  # the model's warm-up pass: the first request's estimate. A model
            # loaded beside others (`repository`) joins their running average rather than resetting it
            self.state.seconds_per_window = seconds_per_window
        self._waiting = 0  # this queue's own windows waiting: `state` counts every model's (`repository`)
        self._fresh: deque[Job] = deque()  # no window taken yet: first in line
        self._jobs: deque[Job] = deque()  # the round robin of jobs that have had a window
        self._open: set[Job] = set()  # not answered yet: in a line, or every window taken
        # Made on first use: the event, the task and the thread belong to the server's event loop,
        # which does not exist yet when the model loads.
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self._thread: Optional[ThreadPoolExecutor] = forward_thread
        self._closing = False
        self._stager: Optional[ThreadPoolExecutor] = None

    async def __call__(self, windows: Sequence[Window]) -> torch.Tensor:
        """The engine's rows for these windows (logits, then embedding), computed in turn with every
        other request's windows. The job is queued before this first awaits (`admission` counts on that)."""
        self._start()
        job = Job(windows, asyncio.get_running_loop().create_future())
        self._open.add(job)
        job.result.add_done_callback(lambda _: self._open.discard(job))
        self._fresh.append(job)
        metrics.SUBMITTED.inc(len(windows))
        self._count_waiting(len(windows))
        self._arrived.set()
        return await job.result  # a cancelled caller cancels the future too: dropped at its next turn

    @property
    def waiting(self) -> int:
        """Windows of admitted requests not yet handed to a pass, in this queue (those of every model
        of a repository are `state.waiting`, what admission reads)."""
        return self._waiting

    @property
    def seconds_per_window(self) -> float:
        """A running average of the passes, per window."""
        return self.state.seconds_per_window

    def _start(self) -> None:
        if self._worker is None:
            self._arrived = self._arrived or asyncio.Event()
            self._thread = self._thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ast-forward")
            self._stager = self._stager or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ast-stage")
            self._spawn()

    def close(self) -> None:
        """A model unloaded (or the server stopping): the worker finishes the windows queued, then
        ends, letting the engine go. A request that still arrives (one that was decoding) starts
        it again, until that request is answered: nothing admitted is left waiting, and nothing
        is left holding the engine."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()

    def _spawn(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())
        self._worker.add_done_callback(self._supervise)

    def _supervise(self, worker: asyncio.Task) -> None:
        """The worker only ends by dying (or on shutdown, cancelled): then every request that waits
        for the model would wait forever. So each gets the failure (a 500), since whatever killed
        the worker may be in the queue it left (a job it cannot take), and a new worker takes over
        the emptied queue, after a pause that keeps a fault outside the queue from spinning."""
        if worker.cancelled():
            return
        if worker.exception() is None:  # it returned: closed, with nothing left then
            if self._worker is worker:
                self._worker = None
            if self._fresh or self._jobs:  # a request came in as it ended
                self._spawn()
            return
        logger.error("The model queue's worker died: its %d requests fail; starting a new one", len(self._open),
                     exc_info=worker.exception())
        failure = RuntimeError(f"the model's queue failed: {worker.exception()!r}")
        for job in self._open:
            if not job.result.done():  # answered just now: its callback that forgets it has not run yet
                job.result.set_exception(failure)
        self._fresh.clear()
        self._jobs.clear()
        self._count_waiting(-self._waiting)
        asyncio.get_running_loop().call_later(RESTART_DELAY_S, self._spawn)

    async def _serve(self) -> None:
        ahead: Optional[tuple[list[tuple[Job, int]], asyncio.Future]] = None  # taken while the last pass ran
        while True:
            if ahead is None:
                taken = await self._next_batch()
                if not taken:
                    return  # closed, and nothing was waiting
                ahead = (taken, self._stage(taken))
            (batch, staging), ahead = ahead, None
            try:
                staged = await staging
                if all(job.abandoned for job, _ in batch):
                    continue  # every request of it went away while it was staged: nothing to compute
                running = asyncio.get_running_loop().run_in_executor(self._thread, self._run, staged, len(batch))
                if self.passes.ahead:
                    ahead = await self._full_batch_during(running)
                logits = await running
                if len(logits) != len(batch):
                    raise RuntimeError(f"the engine returned {len(logits)} rows of logits for {len(batch)} windows")
                metrics.WINDOWS.inc(len(batch))
                metrics.BATCH_WINDOWS.observe(len(batch))
                for (job, _), row in zip(batch, logits):
                    job.logits.append(row)
                    if len(job.logits) == len(job.windows) and not job.result.done():
                        job.result.set_result(torch.stack(job.logits))
            except asyncio.CancelledError:  # the server is shutting down: so are its requests
                for job, _ in batch + (ahead[0] if ahead else []):
                    job.result.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - the batch's requests get the failure, the loop goes on
                for job, _ in batch:
                    if not job.result.done():
                        job.result.set_exception(exc)
                logger.exception("forward pass failed")

    async def _full_batch_during(self, running: asyncio.Future) -> Optional[tuple[list[tuple[Job, int]], asyncio.Future]]:
        """A full batch, taken and staged as soon as one waits while the pass runs (its copy
        overlaps the pass); None if the pass ends first."""
        while not running.done():
            if self.waiting >= self.max_batch_size:
                taken = self._take(self.max_batch_size)  # empty if every waiting window's request has gone
                if taken:
                    return taken, self._stage(taken)
                continue
            self._arrived.clear()
            arrival = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait((running, arrival), return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()
        return None

    def _stage(self, batch: list[tuple[Job, int]]) -> asyncio.Future:
        """The pass's first step for these windows: on the staging thread, or done at once where
        it is nothing (the CPU). Never raises: the batch is taken, so a failure here (no thread to
        stage on, at the process's thread limit) is the future's, which its requests get, where
        the worker would die with their windows and leave them waiting forever."""
        loop, windows = asyncio.get_running_loop(), [job.windows[index] for job, index in batch]
        staged = loop.create_future()
        try:
            if self.passes.ahead:
                return loop.run_in_executor(self._stager, self.passes.stage, windows)
            staged.set_result(windows)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the batch's requests get it
            staged.set_exception(exc)
        return staged

    def _run(self, staged: Any, windows: int) -> torch.Tensor:
        """On the model's thread: the pass, timed into the running average of a window's cost."""
        started = time.monotonic()
        logits = self.passes.run(staged)
        per_window = self.state.seconds_per_window
        self.state.seconds_per_window = per_window + 0.2 * ((time.monotonic() - started) / windows - per_window)
        return logits

    async def _next_batch(self) -> list[tuple[Job, int]]:
        """The next window of each job in turn, up to max_batch_size; waits for work if there is none.

        With max_wait > 0, a batch that is not full waits that long for more requests to join it.
        """
        loop = asyncio.get_running_loop()
        batch = self._take(self.max_batch_size)
        while not batch:
            if self._closing:
                return batch  # nothing left: the worker ends (`close`)
            self._arrived.clear()
            await self._arrived.wait()
            batch = self._take(self.max_batch_size)
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
            batch += self._take(self.max_batch_size - len(batch))
        return batch

    def _take(self, room: int) -> list[tuple[Job, int]]:
        """Up to `room` windows: fresh jobs' first windows, then the next window of each job in the
        round robin, again and again; a job served goes to the back of the round robin, a job with
        nothing left leaves it."""
        for line in (self._fresh, self._jobs):
            for job in [job for job in line if job.abandoned]:
                line.remove(job)
                self._count_waiting(-job.waiting)
        taken: list[tuple[Job, int]] = []
        now = time.monotonic()
        while len(taken) < room and (self._fresh or self._jobs):
            job = (self._fresh or self._jobs).popleft()
            metrics.WINDOW_WAIT_SECONDS.observe(now - job.arrived)
            taken.append((job, job.scheduled))
            job.scheduled += 1
            if job.waiting:
                self._jobs.append(job)
        self._count_waiting(-len(taken))
        return taken

    def _count_waiting(self, change: int) -> None:
        self._waiting += change
        self.state.waiting += change
        metrics.QUEUED_WINDOWS.inc(change)
