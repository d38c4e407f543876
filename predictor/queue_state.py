"""The numbers admission reads (`admission`): windows waiting for the model, the time a window
takes, and the windows admitted but still decoding, kept where every process of the server reads them.

In one process (`--frontends 1`) they are that process's own. With frontends (`frontends`), requests
are admitted in several processes and queued in another, and admission in each has to see the
windows queued in the model's process and those every other frontend is decoding, without a round
trip per request. So the numbers live in memory the processes share (`multiprocessing.RawArray`):
the model's process writes the queue's two, each frontend its own slot of reserved windows. One
writer per number, read without a lock: a reader may see a number one write behind, which an
estimate of the wait tolerates.
"""

import multiprocessing
from typing import Any

import numpy as np

WAITING, SECONDS_PER_WINDOW, RESERVED = 0, 1, 2


class QueueState:
    def __init__(self, values: np.ndarray, slot: int = 0):
        self.values = values
        self.slot = RESERVED + slot

    @classmethod
    def local(cls) -> "QueueState":
        """This process's own numbers, no window timed yet (`seconds_per_window` 0)."""
        return cls(np.zeros(RESERVED + 1))

    @staticmethod
    def shared_memory(frontends: int) -> Any:
        """The memory a model process and `frontends` frontends share, handed to each as it starts."""
        return multiprocessing.get_context("spawn").RawArray("d", RESERVED + frontends)

    @classmethod
    def attach(cls, memory: Any, slot: int = 0) -> "QueueState":
        """The state in shared memory; `slot` is the frontend writing its reserved windows there."""
        return cls(np.frombuffer(memory, dtype=np.float64), slot)

    @property
    def waiting(self) -> int:
        """Windows queued for the model, not yet handed to a pass."""
        return int(self.values[WAITING])

    @waiting.setter
    def waiting(self, windows: int) -> None:
        self.values[WAITING] = windows

    @property
    def seconds_per_window(self) -> float:
        """A running average of the passes, per window; 0 until the first queue's warm-up."""
        return float(self.values[SECONDS_PER_WINDOW])

    @seconds_per_window.setter
    def seconds_per_window(self, seconds: float) -> None:
        self.values[SECONDS_PER_WINDOW] = seconds

    @property
    def reserved(self) -> int:
        """Windows this process has admitted that are not queued yet (opening or decoding their files)."""
        return int(self.values[self.slot])

    @reserved.setter
    def reserved(self, windows: int) -> None:
        self.values[self.slot] = windows

    @property
    def windows_ahead(self) -> int:
        """What a new request would wait for: queued windows and every process's reserved ones."""
        return int(self.values[WAITING] + self.values[RESERVED:].sum())
