"""`predictor.batching`: windows of concurrent requests share passes, fairly, each request gets its
own rows back, and abandoned work is never computed. Passes wait on events, never on sleeps."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from predictor.batching import WindowQueue
from predictor.queue_state import QueueState
from predictor.admission import Admission, Backlog
from predictor.errors import Overloaded


def logits_of(windows: list[np.ndarray]) -> torch.Tensor:
    """A stand-in engine whose logits are a known function of each window: its sum, twice."""
    total = torch.tensor([float(w.sum()) for w in windows])
    return torch.stack([total, 2 * total], dim=1)


class Recording:
    """Records every pass; the first pass can be held until the test releases it."""

    def __init__(self, hold_first: bool = False):
        self.passes: list[list[float]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, windows: list[np.ndarray]) -> torch.Tensor:
        self.started.set()
        self.release.wait(timeout=30)
        self.passes.append([float(w[0]) for w in windows])
        return logits_of(windows)


@dataclass
class Passes:
    """The queue's `passes.Pass`, with `compute` for the filterbank and the engine; with `ahead`,
    as on a GPU, each batch is staged on the staging thread first, and recorded."""

    compute: Callable[[list[np.ndarray]], torch.Tensor]
    ahead: bool = False
    staged: list[list[float]] = field(default_factory=list)

    def stage(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        self.staged.append([float(w[0]) for w in windows])
        return windows

    def run(self, windows: list[np.ndarray]) -> torch.Tensor:
        return self.compute(windows)


def job(tag: float, count: int) -> list[np.ndarray]:
    """`count` windows whose first sample is `tag` (so passes say whose window they ran)."""
    rng = np.random.default_rng(int(tag * 10))
    windows = [rng.random(5).astype(np.float32) for _ in range(count)]
    for window in windows:
        window[0] = tag
    return windows


def run(coroutine):
    return asyncio.run(coroutine)


def serve_together(max_batch_size: int, sizes: list[int]) -> Recording:
    """Requests of these window counts sent at once; each must get exactly its own rows back."""
    compute = Recording()
    queue = WindowQueue(Passes(compute), max_batch_size=max_batch_size, max_wait_s=0.5)
    jobs = [job(tag, count) for tag, count in enumerate(sizes, start=1)]

    async def main():
        return await asyncio.gather(*(queue(windows) for windows in jobs))

    for windows, logits in zip(jobs, run(main())):
        torch.testing.assert_close(logits, logits_of(windows))
    return compute


def test_concurrent_requests_share_passes_and_get_their_own_rows():
    assert [len(p) for p in serve_together(8, [1, 2, 1]).passes] == [4]


def test_passes_stop_at_max_batch_size_and_take_turns():
    passes = serve_together(4, [3, 3, 5]).passes
    assert max(len(p) for p in passes) <= 4 and sum(len(p) for p in passes) == 11
    assert sorted(passes[0]) == [1, 1, 2, 3]  # one window of each, then round again


def test_a_full_batch_waiting_is_staged_while_a_pass_runs_and_the_rest_waits_for_the_pass():
    """On a GPU the copy of a full next batch overlaps the pass in flight; windows that do not fill
    one wait for the pass to end, to join as many others as arrive meanwhile. Same rows back."""
    compute = Recording(hold_first=True)
    passes = Passes(compute, ahead=True)
    queue = WindowQueue(passes, max_batch_size=2, max_wait_s=0.0)
    jobs = [job(1, 1), job(2, 2), job(3, 1)]

    async def main():
        first = asyncio.create_task(queue(jobs[0]))
        await asyncio.to_thread(compute.started.wait, 30)  # 1's pass runs, held
        rest = [asyncio.create_task(queue(windows)) for windows in jobs[1:]]
        await asyncio.sleep(0)
        while len(passes.staged) < 2:  # 2 and 3: a full batch, staged during 1's pass
            await asyncio.sleep(0.01)
        assert compute.passes == [] and queue.waiting == 1
        compute.release.set()
        return await asyncio.gather(first, *rest)

    for windows, logits in zip(jobs, run(main())):
        torch.testing.assert_close(logits, logits_of(windows))
    assert passes.staged == compute.passes == [[1], [2, 3], [2]]


@pytest.mark.parametrize("leave", ["before it is staged", "once it is staged"])
def test_requests_gone_while_a_pass_runs_are_neither_staged_nor_computed(leave):
    """A full batch arrives while a pass runs, and its callers leave: before it is staged, nothing is
    staged for them; after, the batch staged is not computed. Either way the GPU computes nothing
    for them, and a request after them is served."""
    compute = Recording(hold_first=True)
    passes = Passes(compute, ahead=True)
    queue = WindowQueue(passes, max_batch_size=2, max_wait_s=0.0)
    last = job(4, 1)

    async def main():
        first = asyncio.create_task(queue(job(1, 1)))
        await asyncio.to_thread(compute.started.wait, 30)
        gone = asyncio.create_task(queue(job(2, 2)))
        await asyncio.sleep(0)
        while leave == "once it is staged" and len(passes.staged) < 2:
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.05)
        compute.release.set()
        await first
        return await asyncio.wait_for(queue(last), 30)

    torch.testing.assert_close(run(main()), logits_of(last))
    assert [p[0] for p in compute.passes] == [1, 4] and queue.waiting == 0
    assert passes.staged == ([[1], [4]] if leave == "before it is staged" else [[1], [2, 2], [4]])


def test_a_short_request_is_not_held_back_by_a_long_one():
    """Batch size 1: a 1-window request sent while a 20-window request runs is computed right after
    the pass in flight, and answered first."""
    compute = Recording(hold_first=True)
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    answered: list[str] = []

    async def request(name: str, windows):
        logits = await queue(windows)
        answered.append(name)
        return logits

    async def main():
        long = asyncio.create_task(request("long", job(1, 20)))
        await asyncio.to_thread(compute.started.wait, 30)  # the long request's first pass is running
        short = asyncio.create_task(request("short", job(2, 1)))
        await asyncio.sleep(0)  # the short request is queued before the pass ends
        compute.release.set()
        await asyncio.gather(long, short)

    run(main())
    order = [p[0] for p in compute.passes]
    assert order.index(2) == 1, order
    assert answered == ["short", "long"]
    assert len(order) == 21


def test_a_failing_pass_fails_its_requests_and_the_queue_goes_on():
    calls = []

    def compute(windows):
        calls.append(len(windows))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return logits_of(windows)

    queue = WindowQueue(Passes(compute), max_batch_size=8, max_wait_s=0.0)
    second = job(2, 2)

    async def main():
        with pytest.raises(RuntimeError, match="out of memory"):
            await queue(job(1, 1))
        return await queue(second)

    torch.testing.assert_close(run(main()), logits_of(second))


def test_a_cancelled_request_is_not_computed():
    """A caller that goes away (a cancelled gRPC call, a disconnected client) frees its windows."""
    compute = Recording(hold_first=True)
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    third = job(3, 1)

    async def main():
        first = asyncio.create_task(queue(job(1, 1)))
        await asyncio.to_thread(compute.started.wait, 30)
        abandoned = asyncio.create_task(queue(job(2, 5)))
        await asyncio.sleep(0)  # queued behind the first pass
        abandoned.cancel()
        compute.release.set()
        await first
        return await queue(third)

    queued_before = REGISTRY.get_sample_value("ast_queued_windows")
    torch.testing.assert_close(run(main()), logits_of(third))
    assert [p[0] for p in compute.passes] == [1, 3]
    assert REGISTRY.get_sample_value("ast_queued_windows") == queued_before  # nothing left counted as waiting


class HeldAt(Recording):
    """Records every pass; the pass numbered `at` (from 0) is held until the test releases it."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.reached, self.go = at, threading.Event(), threading.Event()

    def __call__(self, windows: list[np.ndarray]) -> torch.Tensor:
        if len(self.passes) == self.at:
            self.reached.set()
            self.go.wait(timeout=30)
        return super().__call__(windows)


@pytest.mark.parametrize("line", ["fresh", "round robin"])
def test_a_request_that_goes_away_behind_others_of_its_size_leaves_them_served(line):
    """Dropped from behind requests with as many windows as it, in either line: they are answered,
    and nothing is left counted. (A job was once found in its line by equality, which compared its
    windows with those of the jobs ahead of it: numpy refused, and the worker died on it again and
    again, every request hanging.)"""
    # fresh: the first pass held, three jobs of one window queued behind it. round robin: jobs of
    # three windows, held in the pass of the first one's second window: the others wait in the
    # round robin, the last one's job behind the second's.
    windows, held_at = (1, 0) if line == "fresh" else (3, 4)
    compute = HeldAt(held_at)
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    kept = [job(2, windows), job(3, windows)]

    async def main():
        first = asyncio.create_task(queue(job(1, 1)))
        tasks = [asyncio.create_task(queue(sent)) for sent in (*kept, job(4, windows))]
        await asyncio.to_thread(compute.reached.wait, 30)
        tasks[-1].cancel()
        compute.go.set()
        await first
        return await asyncio.wait_for(asyncio.gather(*tasks[:-1]), 10)

    queued_before = REGISTRY.get_sample_value("ast_queued_windows")
    for answer, sent in zip(run(main()), kept):
        torch.testing.assert_close(answer, logits_of(sent))
    assert [p[0] for p in compute.passes].count(4) == (windows > 1)  # its first window was computed before it went
    assert REGISTRY.get_sample_value("ast_queued_windows") == queued_before


class Crash(BaseException):
    """Not an Exception: what a plain `except Exception` would let through."""


def test_a_pass_that_dies_of_anything_fails_only_its_requests():
    def compute(windows):
        if float(windows[0][0]) == 1:
            raise Crash("the engine fell over")
        if float(windows[0][0]) == 2:
            return logits_of(windows)[:0]  # an engine answering with no rows at all
        return logits_of(windows)

    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    third = job(3, 2)

    async def main():
        with pytest.raises(Crash):
            await queue(job(1, 1))
        with pytest.raises(RuntimeError, match="returned 0 rows of logits for 1 windows"):
            await queue(job(2, 1))
        return await queue(third)

    torch.testing.assert_close(run(main()), logits_of(third))


class BrokenWindows(list):
    """Windows whose count cannot be read once queued (the queue counts them twice as they come):
    the queue's own bookkeeping fails on them."""

    def __init__(self, windows):
        super().__init__(windows)
        self.counted = 0

    def __len__(self):
        self.counted += 1
        if self.counted > 2:
            raise Crash("bookkeeping failed")
        return super().__len__()


def test_a_worker_that_dies_fails_its_requests_and_is_replaced():
    """A failure outside any pass (here in the queue's own bookkeeping) ends the worker task: the
    requests it held get the failure, where they once waited forever, and a new worker takes over,
    so later requests are served."""
    queue = WindowQueue(Passes(logits_of), max_batch_size=1, max_wait_s=0.0)
    later = job(2, 2)

    async def main():
        with pytest.raises(RuntimeError, match=r"the model's queue failed: Crash\('bookkeeping failed'\)"):
            await asyncio.wait_for(queue(BrokenWindows(job(1, 1))), 30)
        return await asyncio.wait_for(queue(later), 30)

    queued_before = REGISTRY.get_sample_value("ast_queued_windows")
    torch.testing.assert_close(run(main()), logits_of(later))
    assert REGISTRY.get_sample_value("ast_queued_windows") == queued_before


def test_a_batch_with_no_thread_to_stage_on_fails_its_requests_and_the_queue_goes_on(monkeypatch):
    """At the process's thread limit (a pod's pids limit), the staging thread cannot start: the
    batch's request gets that failure (a 500), where it once waited forever; once threads start
    again, requests are served."""
    start = threading.Thread.start

    def at_the_thread_limit(thread):
        if thread.name.startswith("ast-stage"):
            raise RuntimeError("can't start new thread")
        start(thread)

    queue = WindowQueue(Passes(logits_of, ahead=True), max_batch_size=2, max_wait_s=0.0)
    later = job(2, 3)

    async def main():
        monkeypatch.setattr(threading.Thread, "start", at_the_thread_limit)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await asyncio.wait_for(queue(job(1, 1)), 10)
        monkeypatch.undo()
        return await asyncio.wait_for(queue(later), 10)

    torch.testing.assert_close(run(main()), logits_of(later))


def test_admission_refuses_past_the_wait_or_the_windows_and_admitted_requests_finish():
    """Past the wait bound, or past 3 windows waiting, a new request is refused with a retry time,
    the windows reserved for requests still decoding counted as ahead of it; an empty queue admits
    even a request bigger than the window bound, and once the queue drains requests come in again."""
    compute = Recording(hold_first=True)
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0, seconds_per_window=1.0)
    by_time, by_windows = (Admission(queue.state, max_wait_s=4.5, max_windows=100),
                           Admission(queue.state, max_wait_s=100, max_windows=3))
    big, second = job(1, 5), job(2, 2)

    async def main():
        by_windows.check(5)  # 5 windows > 3, but nothing is ahead
        first = asyncio.create_task(queue(big))
        await asyncio.to_thread(compute.started.wait, 30)  # 1 window in the pass, 4 waiting
        with pytest.raises(Overloaded, match=r"would make 5 waiting for the model, and this server holds at most 3 "
                                             r"\(--max_queued_windows\)") as refused:
            by_windows.check(1)
        assert refused.value.retry_after_s >= 1
        by_time.check(1)  # 4 windows at 1 s: within 4.5 s
        decoding = by_time.counted(1)  # while it decodes, it is ahead of the next request
        with pytest.raises(Overloaded, match=r"wait about 5.0 s for the 5 windows ahead of it, and this server "
                                             r"admits requests while that wait is at most 4.5 s "
                                             r"\(--max_queue_seconds\); retry in about 1 s") as refused:
            by_time.check()
        decoding.release()
        decoding.release()  # once only
        assert refused.value.retry_after_s == 1
        assert by_time.windows_ahead == 4
        compute.release.set()
        await first
        by_windows.check(2)  # room again once the queue has drained
        return first.result(), await queue(second)

    big_logits, second_logits = run(main())
    torch.testing.assert_close(big_logits, logits_of(big))
    torch.testing.assert_close(second_logits, logits_of(second))


def test_a_backlog_counts_from_admission_until_run_and_takes_its_first_timing():
    """Rollouts beside the queue: 3 clips admitted at an estimate of 1 s each (two windows of
    0.5 s, until one is timed) are a wait of 3 s, past a bound of 2 s, from their admission on,
    before they run: the next request is refused with a retry time. A request that ends before
    running lets its clips go; one whose caller stops waiting while they run keeps them counted
    until they have run. The first timing replaces the estimate, later ones join a running
    average, and the backlog admits again."""
    state = QueueState.local()
    state.seconds_per_window = 0.5
    backlog = Backlog("an explanation by rollout", max_wait_s=2.0, state=state, untimed_windows=2)
    release = threading.Event()

    def refused() -> Overloaded:
        with pytest.raises(Overloaded, match=r"an explanation by rollout would wait about 3.0 s for the 3 ahead of "
                                             r"it, and this server admits them while that wait is at most 2 s "
                                             r"\(--max_queue_seconds\)") as refusal:
            backlog.reserve(1)
        return refusal.value

    async def done() -> str:
        return "done"

    async def main():
        never_run = backlog.reserve(3)  # nothing ahead
        assert refused().retry_after_s == 1
        never_run.release()  # its request failed before its rollout
        first = backlog.reserve(3)
        running = asyncio.create_task(backlog.run(first, lambda: asyncio.to_thread(release.wait, 30)))
        await asyncio.sleep(0.05)
        refused()
        running.cancel()  # its client left: the pass runs on, and is counted until it ends
        await asyncio.sleep(0.05)
        assert first.running and state.rollouts == 3  # a request that ends now leaves them (ASTModel.__call__)
        release.set()
        while state.rollouts:
            await asyncio.sleep(0.01)
        backlog.timed(0.05)
        assert backlog.seconds_per_item == 0.05
        backlog.timed(0.15)
        assert backlog.seconds_per_item == pytest.approx(0.07)
        return await backlog.run(backlog.reserve(2), done)

    assert run(main()) == "done"
    assert state.rollouts == 0


def test_a_model_loaded_beside_others_joins_their_time_per_window():
    """A repository's models share one running average of the time per window (admission's): the
    first model's warm-up starts it; a model loaded later, while others serve, leaves it as their
    passes made it rather than resetting it to its own warm-up."""
    state = QueueState.local()
    first = WindowQueue(Passes(logits_of), max_batch_size=1, max_wait_s=0.0, seconds_per_window=2.0, state=state)
    assert state.seconds_per_window == 2.0
    run(first(job(1, 3)))  # passes that take far less than 2 s a window
    measured = state.seconds_per_window
    assert measured < 2.0
    WindowQueue(Passes(logits_of), max_batch_size=1, max_wait_s=0.0, seconds_per_window=5.0, state=state)
    assert state.seconds_per_window == measured


def test_two_models_sharing_the_forward_thread_take_turns_pass_by_pass():
    """A repository's models (`predictor.repository`): each has its own queue, all run their passes
    on one thread. A model's long request does not hold back another model's short one: while the
    first pass of the long one runs, the short one arrives, and runs next."""
    shared = ThreadPoolExecutor(max_workers=1)
    long_model, short_model = Recording(hold_first=True), Recording()
    order: list[str] = []
    queues = {name: WindowQueue(Passes(lambda windows, compute=compute, name=name: (order.append(name), compute(windows))[1]),
                                max_batch_size=1, max_wait_s=0.0, forward_thread=shared)
              for name, compute in (("long", long_model), ("short", short_model))}

    async def main():
        long = asyncio.create_task(queues["long"](job(1, 4)))
        await asyncio.to_thread(long_model.started.wait, 30)  # its first pass runs, and is held
        short = asyncio.create_task(queues["short"](job(2, 1)))
        await asyncio.sleep(0.05)  # the short request is queued on its model, waiting for the thread
        long_model.release.set()
        return await long, await short

    long_rows, short_rows = run(main())
    assert order[:3] == ["long", "short", "long"] and order.count("long") == 4
    torch.testing.assert_close(long_rows, logits_of(job(1, 4)))
    torch.testing.assert_close(short_rows, logits_of(job(2, 1)))


def test_a_model_unloaded_mid_pass_while_another_has_a_full_batch_waiting_keeps_the_loop_turning():
    """A repository on a GPU: every model's queue counts into one state (admission's), and stages a
    full batch ahead while its pass runs. A model closed (unloaded) during its pass, while another
    model has a full batch of its own waiting, must neither take that batch nor spin on it: the
    event loop keeps serving, and every request gets its rows."""
    shared, state = ThreadPoolExecutor(max_workers=1), QueueState.local()
    held, other = Recording(hold_first=True), Recording()
    closing = WindowQueue(Passes(held, ahead=True), max_batch_size=2, max_wait_s=0.0, state=state,
                          forward_thread=shared)
    busy_passes = Passes(other, ahead=True)
    busy = WindowQueue(busy_passes, max_batch_size=2, max_wait_s=0.0, state=state, forward_thread=shared)
    jobs = [job(tag, 2) for tag in (2, 3, 4)]

    async def main():
        first = asyncio.create_task(closing(job(1, 1)))
        await asyncio.to_thread(held.started.wait, 30)  # its pass runs, held, holding the shared thread
        try:
            rest = []
            for staged, windows in enumerate(jobs, start=1):  # the first is staged, the second staged ahead
                rest.append(asyncio.create_task(busy(windows)))
                while len(busy_passes.staged) < min(staged, 2) or busy.waiting < 2 * (staged == 3):
                    await asyncio.sleep(0.01)  # and the third waits
            assert busy.waiting == 2 and closing.waiting == 0 and state.waiting == 2
            closing.close()
            await asyncio.sleep(0.05)  # the loop turns: a queue spinning on the other's windows would hold it
        finally:
            held.release.set()
        return await first, await asyncio.gather(*rest)

    outcome: list = []

    def serve() -> None:
        try:
            outcome.append(run(main()))
        except BaseException as failure:  # noqa: BLE001 - handed to the test's thread
            outcome.append(failure)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    loop.join(timeout=60)
    assert not loop.is_alive(), "the event loop is stuck"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    first, rest = outcome[0]
    torch.testing.assert_close(first, logits_of(job(1, 1)))
    for windows, rows in zip(jobs, rest):
        torch.testing.assert_close(rows, logits_of(windows))
    assert state.waiting == 0


def test_a_closed_queue_finishes_its_work_then_serves_again_if_asked():
    compute = Recording()
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)

    async def main():
        first = asyncio.create_task(queue(job(1, 3)))
        await asyncio.sleep(0)
        queue.close()  # unloaded while a request is in: it still gets its rows
        rows = await first
        while queue._worker is not None:  # the worker ends once nothing is left
            await asyncio.sleep(0.01)
        late = await queue(job(2, 1))  # a late request starts it again
        for _ in range(500):  # and it ends again: an unloaded model's engine is let go
            if queue._worker is None:
                break
            await asyncio.sleep(0.01)
        return rows, late, queue._worker

    rows, late, worker = run(main())
    assert worker is None, "the worker of a closed queue outlived its last request"
    torch.testing.assert_close(rows, logits_of(job(1, 3)))
    torch.testing.assert_close(late, logits_of(job(2, 1)))
