"""Whether a new request may come in, decided before any of its audio is decoded.

A request's cost is its windows, and what a client feels is the wait before its windows run: the
windows admitted ahead of it (those still decoding and those queued for the model) times the time
a window has been taking on this node and engine (`WindowQueue.seconds_per_window`, which starts
from the warm-up pass). A bound in seconds means the same on a 2-core pod and on a GPU, where a
bound in windows would be minutes on one and milliseconds on the other. So a request is refused
with `Overloaded` (503 and `Retry-After`, gRPC UNAVAILABLE) when that wait passes
`--max_queue_seconds`, or when its windows would take the windows waiting past
`--max_queued_windows`, a memory bound (each waiting window holds its samples). Nothing is
refused while nothing is ahead, so one request up to the per-request limits always runs.

The check is made twice without decoding: before the request is parsed (a busy server spends
nothing on it), and once the files' headers say how many windows the request will cost. Then
`counted` counts those windows as ahead of every later request until the request's decoding has
ended (a request cancelled meanwhile stops decoding at its next block, and is counted until then),
so requests arriving together see each other before any of them is decoded. A file whose header
does not say how long it is counts for the length its container estimates (MP3, from its bit
rate: never a reason to refuse it, since a VBR file's estimate may be wrong), or as one window
where there is none (a FLAC written to a pipe), until decoded, so a request that turns out to have
more is checked a third time, with the windows it has, against the memory bound
(`--max_queued_windows`), before they are queued. When it ends (decoded, or failed), the caller
hands the windows to the queue without yielding to the event loop in between (kserve calls
`predict` or `explain` straight after `preprocess`), and the queue counts them from then on; a
request that never reaches the queue (a failure) leaves nothing counted behind.

With frontends (`frontends`), the windows ahead are those queued in the model's process and those
every frontend has admitted and is decoding (`queue_state`, in shared memory). A request's windows
leave its frontend's count when it hands them to the model's process, and join the queue's when
that process reads them: for that moment (a message on a local socket) they are counted nowhere.

The estimate counts every waiting window at the recent time per window. Round robin lets a short
request's first window pass ahead of longer requests' later windows, so for short requests it is
an upper bound; for requests of a clip or more it is what they wait. The time per window is what
passes took before: a burst that slows the passes it was admitted into (its own parsing and
decoding compete for the same cores) stretches their wait in proportion, until the running
average has caught up.
"""

import asyncio
import math
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from . import metrics
from .errors import Overloaded
from .queue_state import QueueState


class Admission:
    def __init__(self, state: QueueState, max_wait_s: float, max_windows: int):
        self.state = state
        self.max_wait_s = max_wait_s
        self.max_windows = max_windows
        metrics.LIVE.gauge(metrics.QUEUE_WAIT_SECONDS, lambda: self.wait_s)

    @property
    def windows_ahead(self) -> int:
        return self.state.windows_ahead

    @property
    def wait_s(self) -> float:
        return self.windows_ahead * self.state.seconds_per_window

    def check(self, windows: int = 0, wait: bool = True) -> None:
        """Refuse now if the wait a new request faces passes the bound, or if its `windows` would
        take the windows waiting past their bound. Without `wait`, the second alone: a request
        found to have more windows once decoded was admitted to its wait already, and the requests
        admitted since counted it as it was then."""
        ahead = self.windows_ahead
        if not ahead:
            return
        per_window, waiting = self.state.seconds_per_window, self.wait_s
        if wait and waiting > self.max_wait_s:
            retry = _seconds(waiting - self.max_wait_s)
            raise Overloaded(
                f"the server is busy: a new request would wait about {waiting:.1f} s for the {ahead} windows ahead of "
                f"it, and this server admits requests while that wait is at most {self.max_wait_s:g} s "
                "(--max_queue_seconds)", retry)
        if ahead + windows > self.max_windows:
            retry = _seconds((ahead + windows - self.max_windows) * per_window)
            raise Overloaded(
                f"the server is busy: this request's {windows} windows would make {ahead + windows} waiting for the "
                f"model, and this server holds at most {self.max_windows} (--max_queued_windows)", retry)

    def counted(self, windows: int) -> "Reserved":
        """An admitted request's windows, ahead of every later request until released (once its
        decoding has ended)."""
        self.state.reserved += windows
        return Reserved(self.state, "reserved", windows)


T = TypeVar("T")


@dataclass
class Reserved:
    """What a request holds in one of the counts of `QueueState` (`count`: its windows decoding,
    `reserved`, or its clips in the `Backlog`, `rollouts`), from its admission until released."""

    state: QueueState
    count: str
    items: int
    running: bool = False
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            setattr(self.state, self.count, getattr(self.state, self.count) - self.items)


class Backlog:
    """Explanations by rollout: an eager pass of the encoder for its attentions (no engine hands
    them out), one clip at a time, where the model runs (`rollout`, `ASTModel.roll_out`).
    Against a GPU's batched windows a clip of it costs dozens of them, so counting it in windows,
    as the queue's wait does, says little. So it has a wait of its own: every process's clips
    admitted and not yet run (`queue_state`) times the time a clip takes (two windows' time until
    one has been timed, then a running average), past `max_wait_s` refused with `Overloaded`, as
    the queue's wait is. Clips count from admission, so requests arriving together see each other,
    as `Admission.counted` does."""

    def __init__(self, what: str, max_wait_s: float, state: QueueState, untimed_windows: float):
        self.what = what
        self.max_wait_s = max_wait_s
        self.state = state
        self.untimed_windows = untimed_windows

    @property
    def seconds_per_item(self) -> float:
        return self.state.seconds_per_rollout or self.untimed_windows * self.state.seconds_per_window

    def reserve(self, items: int) -> Reserved:
        """`items` counted from now, unless the wait ahead of them passes the bound."""
        ahead = self.state.rollouts_ahead
        wait = ahead * self.seconds_per_item
        if ahead and wait > self.max_wait_s:
            raise Overloaded(
                f"the server is busy: {self.what} would wait about {wait:.1f} s for the {ahead} ahead of it, and "
                f"this server admits them while that wait is at most {self.max_wait_s:g} s (--max_queue_seconds)",
                _seconds(wait - self.max_wait_s))
        self.state.rollouts += items
        return Reserved(self.state, "rollouts", items)

    async def run(self, reserved: Reserved, work: Callable[[], Awaitable[T]]) -> T:
        """`await work()`; `reserved` stays counted until it has ended (a caller that stops
        waiting leaves it counted while it runs)."""
        def ended(task: asyncio.Task) -> None:
            reserved.release()
            if not task.cancelled():
                task.exception()  # seen: a caller that went away leaves no "never retrieved" behind

        reserved.running = True
        task = asyncio.ensure_future(work())
        task.add_done_callback(ended)
        return await asyncio.shield(task)

    def timed(self, seconds_per_item: float) -> None:
        """Where the items run: one run's time per item, into the running average (the first
        replaces the estimate)."""
        timed = self.state.seconds_per_rollout
        self.state.seconds_per_rollout = seconds_per_item + (0.8 * (timed - seconds_per_item) if timed else 0)


def _seconds(wait: float) -> int:
    """Retry-After is whole seconds, and at least one."""
    return max(1, math.ceil(wait))
