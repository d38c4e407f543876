"""One forward pass, on the device the model runs on: a batch of windows → the engine's rows (each
window's logits, then its embedding: `engines.options.split`). A window may be `occlusion.Occluded`:
its features get a cell of silence between the filterbank and the engine.

A pass has two steps, so that the queue (`batching`) can prepare one while another runs:
`stage` (on a thread of its own) and `run` (on the model's thread).

- `CpuPass`: staging is nothing; `run` computes the filterbank clip by clip, then the engine, both
  on the model's thread (beside each other, on threads of their own, their kernels fought over the
  same cores).
- `BatchedPass`, what a GPU runs: `stage` pads the windows into pinned host memory and copies them
  to the GPU on a stream of its own, so the copy overlaps the pass in flight; `run` computes the
  filterbank over the whole pass on the GPU (`features.LogMelFilterbank.batch`), then the engine.
  A pass that runs out of GPU memory is split in halves and retried (`in_parts`), and later passes
  keep the size that fitted: logged once, never a dead server or a hung request; a single window
  that does not fit is answered 503. A copy with no room beside the pass in flight is left on the
  host, and made part by part by its own pass. It is written against torch's device modules, so on a CPU
  (no pinned memory, no copy, streams and events that do nothing) the tests run it whole; the
  server uses it on GPUs only, since clip by clip measured faster on CPUs (`features`).
"""

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import torch

from . import metrics
from .engines import Engine
from .errors import Overloaded, released
from .features import LogMelFilterbank
from .occlusion import Window, samples_of, silence

logger = logging.getLogger(__name__)

Windows = Sequence[Window]


class Pass(Protocol):
    ahead: bool
    """Whether a full next batch is worth staging while a pass runs (a copy to overlap)."""

    def stage(self, windows: Windows) -> Any: ...

    def run(self, staged: Any) -> torch.Tensor: ...


@dataclass
class CpuPass:
    filterbank: LogMelFilterbank
    engine: Engine
    ahead: ClassVar[bool] = False

    def stage(self, windows: Windows) -> Windows:
        return windows

    def run(self, windows: Windows) -> torch.Tensor:
        with metrics.STAGE_SECONDS.labels("features").time():
            features = silence(self.filterbank(samples_of(windows)), windows, self.filterbank.silence)
        with metrics.STAGE_SECONDS.labels("model").time():
            return self.engine(features)


@dataclass
class Staged:
    samples: torch.Tensor  # (windows, samples) on the device, being copied on the copy stream; or on the host
    lengths: torch.Tensor  # each window's samples, on the host
    copied: Optional[torch.Event]  # None where nothing is copied (the CPU)
    windows: Windows  # for their occluded cells


class BatchedPass:
    ahead = True

    def __init__(self, filterbank: LogMelFilterbank, engine: Engine, device: torch.device, max_batch_size: int):
        self.filterbank, self.engine, self.device = filterbank.to(device), engine, device
        self.accelerator = torch.get_device_module(device)
        self.on_gpu = device.type == "cuda"
        self.copies = torch.cuda.Stream(device) if self.on_gpu else torch.cpu.Stream()
        # Two pinned buffers, taken in turn: one being copied from while the next pass is padded.
        self.buffers: deque[tuple[torch.Tensor, Optional[torch.Event]]] = deque(
            (torch.empty(max_batch_size * filterbank.max_samples, pin_memory=self.on_gpu), None) for _ in range(2))
        self.part = max_batch_size
        """The most windows a pass computes at once: lowered when a pass runs out of memory."""
        self.ran_out_before = False

    def stage(self, windows: Windows) -> Staged:
        buffer, last_copy = self.buffers.popleft()
        try:
            if last_copy is not None:
                last_copy.synchronize()  # the copy out of this buffer has finished before it is refilled
            samples, lengths = self.filterbank.padded(samples_of(windows), out=buffer)
            try:
                with self.accelerator.stream(self.copies):
                    on_device = samples.to(self.device, non_blocking=True)
                    copied = self.copies.record_event()
            except torch.OutOfMemoryError:
                # No room beside the pass in flight: `run` copies them itself, part by part, once
                # that pass has let its memory go. The buffer is for the next pass's padding.
                staged = Staged(samples.clone(), lengths, None, windows)
                self.buffers.appendleft((buffer, None))
                return staged
        except BaseException:
            self.buffers.appendleft((buffer, last_copy))  # whatever failed, the buffer stays in turn
            raise
        self.buffers.append((buffer, copied))
        return Staged(on_device, lengths, copied, windows)

    def run(self, staged: Staged) -> torch.Tensor:
        if staged.copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.copied)
            staged.samples.record_stream(stream)  # made on the copy stream, used on this one
        with metrics.STAGE_SECONDS.labels("model").time():  # the filterbank included: the GPU runs both
            logits, self.part = in_parts(
                lambda start, end: self.engine(silence(
                    self.filterbank.batch(staged.samples[start:end].to(self.device), staged.lengths[start:end]),
                    staged.windows[start:end], self.filterbank.silence)),
                len(staged.lengths), self.part, self._ran_out)
        return logits

    def _ran_out(self, windows: int, part: int) -> None:
        self.part = part  # kept even if a later part of this pass fails
        if self.on_gpu:
            torch.cuda.empty_cache()
        log = logger.info if self.ran_out_before else logger.warning
        log("A pass of %d windows ran out of GPU memory: split and retried; passes now take at most %d windows "
            "(lower --max_batch_size to that)", windows, part)
        self.ran_out_before = True


def in_parts(compute: Callable[[int, int], torch.Tensor], rows: int, part: int,
             ran_out: Callable[[int, int], None]) -> tuple[torch.Tensor, int]:
    """`compute(start, end)` over rows [0, rows) in parts of at most `part` rows, concatenated; a part
    that runs out of memory is halved and retried (`ran_out(its rows, the new part)` first). Returns
    the logits and the part size that fitted. One row that does not fit is `Overloaded`."""
    outputs, start = [], 0
    while start < rows:
        end = min(rows, start + part)
        try:
            outputs.append(compute(start, end))
        except torch.OutOfMemoryError as exc:
            released(exc)
            if end - start == 1:
                raise Overloaded("the GPU has no memory left for one window now", 1) from exc
            part = (end - start) // 2
            ran_out(end - start, part)
            continue
        start = end
    return torch.cat(outputs), part
