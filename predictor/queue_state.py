"""The numbers admission reads (`admission`): windows waiting for the model, the time a window
takes, and the windows admitted but still decoding; and the same for explanations by rollout
(`admission.Backlog`): clips admitted and not yet run, and the time a clip takes. Kept where every
process of the server reads them.

In one process (`--frontends 1`) they are that process's own. With frontends (`frontends`), requests
are admitted in several processes and queued in another, and admission in each has to see the
windows queued in the model's process and those every other frontend is decoding, without a round
trip per request. So the numbers live in memory the processes share (`multiprocessing.RawArray`):
the model's process writes the queue's two and the time a rollout takes (it runs them), each
frontend its own slot of reserved windows and of rollouts. One writer per number, read without a
lock: a reader may see a number one write behind, which an estimate of the wait tolerates.
"""

import multiprocessing
from typing import Any, Optional

import numpy as np

WAITING, SECONDS_PER_WINDOW, SECONDS_PER_ROLLOUT = 0, 1, 2
SLOTS = 3  # then each process's slot: its reserved windows, its rollouts
RESERVED, ROLLOUTS = 0, 1


class Number:
    """One of `QueueState`'s numbers: at `index` of the values every process reads, or (`own`) at
    `index` of the reading process's own slot."""

    def __init__(self, index: int, kind: type, own: bool = False):
        self.index, self.kind, self.own = index, kind, own

    def __get__(self, state: Optional["QueueState"], owner: type) -> Any:
        return self if state is None else self.kind(state.values[self._at(state)])

    def __set__(self, state: "QueueState", value: float) -> None:
        state.values[self._at(state)] = value

    def _at(self, state: "QueueState") -> int:
        return state.slot + self.index if self.own else self.index


class QueueState:
    waiting = Number(WAITING, int)
    """Windows queued for the model, not yet handed to a pass."""
    seconds_per_window = Number(SECONDS_PER_WINDOW, float)
    """A running average of the passes, per window; 0 until the first queue's warm-up."""
    seconds_per_rollout = Number(SECONDS_PER_ROLLOUT, float)
    """A running average of the rollouts run, per clip; 0 until one has been timed."""
    reserved = Number(RESERVED, int, own=True)
    """Windows this process has admitted that are not queued yet (opening or decoding their files)."""
    rollouts = Number(ROLLOUTS, int, own=True)
    """Clips to explain by rollout that this process has admitted and that have not run yet."""

    def __init__(self, values: np.ndarray, slot: int = 0):
        self.values = values
        self.slot = SLOTS + 2 * slot

    @classmethod
    def local(cls) -> "QueueState":
        """This process's own numbers, nothing timed yet (`seconds_per_window` 0)."""
        return cls(np.zeros(SLOTS + 2))

    @staticmethod
    def shared_memory(frontends: int) -> Any:
        """The memory a model process and `frontends` frontends share, handed to each as it starts."""
        return multiprocessing.get_context("spawn").RawArray("d", SLOTS + 2 * frontends)

    @classmethod
    def attach(cls, memory: Any, slot: int = 0) -> "QueueState":
        """The state in shared memory; `slot` is the frontend writing its reserved windows there."""
        return cls(np.frombuffer(memory, dtype=np.float64), slot)

    @property
    def windows_ahead(self) -> int:
        """What a new request would wait for: queued windows and every process's reserved ones."""
        return int(self.values[WAITING] + self.values[SLOTS + RESERVED::2].sum())

    @property
    def rollouts_ahead(self) -> int:
        """Every process's rollouts admitted and not yet run: what a new one would wait for."""
        return int(self.values[SLOTS + ROLLOUTS::2].sum())
