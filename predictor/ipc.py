"""Windows from a frontend to the model's process and rows back, over a local socket (`frontends`).

`RemoteQueue` is what a frontend's model awaits in place of a `WindowQueue`: the same call (windows
in, (windows, labels) logits out) and the same numbers for admission (`queue_state`). `ModelService`
is its other end in the model's process: each request's windows go into the one `WindowQueue` there,
so fairness and batching span every frontend's requests. A request whose caller goes away is dropped
there too: the frontend says so and the model's process cancels its place in the queue. Clips to
explain by rollout go the same way (`RemoteQueue.roll_out`), to the encoder the model's process
holds (`rollout`), and their relevance comes back.

Our own protocol over a Unix socket rather than a library's: a frame is a small pickled header and
the raw float32 samples or rows, which the model's process receives straight into their array (a
clip's samples travel once, however many of its windows overlap them, and however many cells of
a window are masked: `occlusion`). gRPC or
multiprocessing's queues would serialise the samples again and add a thread hop each way; both ends
are this package, in one pod, on a socket in a directory only this server's user can reach.
"""

import asyncio
import itertools
import logging
import pickle
import struct
from typing import Awaitable, Callable, Optional, Sequence

import numpy as np
import torch

from .batching import WindowQueue
from .errors import Overloaded
from .occlusion import Occluded, Window
from .queue_state import QueueState

logger = logging.getLogger(__name__)

NOT_TAKING = "the model's process is not taking requests now"  # no connection to it: a 503

FRAME = struct.Struct("!II")  # header bytes, payload bytes
RUN, ROLL_OUT, DROP, LOGITS, FAILED = "run", "roll out", "drop", "logits", "failed"
Layout = list[tuple[int, int, int, Optional[tuple[tuple[int, int], tuple[int, int]]]]]
"""Each window: the index of the samples sent that hold its own, its first sample and its length
there, and its occluded cell (frames, bins) or None."""


def frame(header: tuple, payload: bytes = b"") -> bytes:
    encoded = pickle.dumps(header)
    return FRAME.pack(len(encoded), len(payload)) + encoded + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[tuple, bytes]:
    """A frame from a stream: the frontend's end, whose frames (logits) are small."""
    header_bytes, payload_bytes = FRAME.unpack(await reader.readexactly(FRAME.size))
    header = pickle.loads(await reader.readexactly(header_bytes))
    return header, (await reader.readexactly(payload_bytes) if payload_bytes else b"")


Compute = Callable[[Sequence[Window]], Awaitable[torch.Tensor]]


class ModelService:
    """The model's process end: one connection per frontend (`Frames`), each request a task
    awaiting the queue (or `roll_out`)."""

    def __init__(self, queue: WindowQueue, roll_out: Compute):
        self.queue = queue
        self.roll_out = roll_out

    async def serve(self, path: str) -> asyncio.Task:
        """Accepting connections on `path` until the task is cancelled, which closes them too."""
        connections: set[Frames] = set()
        server = await asyncio.get_running_loop().create_unix_server(lambda: Frames(self, connections), path)
        return asyncio.ensure_future(_until_cancelled(server, connections))

    async def answer(self, kind: str, job: int, lengths: Sequence[int], layout: Layout,
                     payload: bytearray) -> bytes:
        """A request's frame → the frame that answers it."""
        samples = np.frombuffer(payload, dtype=np.float32)
        sources = np.split(samples, np.cumsum(lengths)[:-1]) if len(lengths) > 1 else [samples]
        windows: list[Window] = []
        for source, start, length, cell in layout:
            samples = sources[source][start:start + length]
            windows.append(samples if cell is None else Occluded(samples, *cell))
        try:
            logits = (await (self.queue if kind == RUN else self.roll_out)(windows)).float().contiguous().numpy()
            return frame((LOGITS, job, logits.shape), logits.tobytes())
        except Overloaded as exc:
            return frame((FAILED, job, "overloaded", exc.reason, exc.retry_after_s))
        except Exception as exc:  # noqa: BLE001 - the frontend's request fails with it; the service goes on
            return frame((FAILED, job, "error", f"{type(exc).__name__}: {exc}", 0))


async def _until_cancelled(server: asyncio.AbstractServer, connections: set["Frames"]) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # done only by cancelling
    finally:
        server.close()
        for connection in list(connections):
            connection.transport.close()


class Frames(asyncio.BufferedProtocol):
    """One frontend's connection, read as the socket delivers it: each part of a frame (its sizes,
    its header, then its payload) is received straight into a buffer of its own, the payload's
    the array its samples are read from, with no read awaited (`make bench`'s section 11 times
    the event loop this runs on: a stream, or a read awaited per chunk, cost several times more
    per request there). A frame's answer is written whole, so frames never interleave."""

    def __init__(self, service: ModelService, connections: set["Frames"]):
        self.service, self.connections = service, connections
        self.jobs: dict[int, asyncio.Task] = {}
        self.transport: Optional[asyncio.Transport] = None
        self._expect(FRAME.size, self._sizes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """The frontend has gone, and with it every caller of its requests."""
        self.connections.discard(self)
        for task in list(self.jobs.values()):
            task.cancel()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        try:
            while self.filled == len(self.buffer):  # a part complete (an empty payload at once)
                self.then(self.buffer)
        except Exception:  # noqa: BLE001 - this connection ends (its frontend connects again); the others go on
            logger.exception("A frontend's connection failed; closing it")
            self.transport.close()

    def _expect(self, size: int, then: Callable[[bytearray], None]) -> None:
        self.buffer, self.filled, self.then = bytearray(size), 0, then
        self.view = memoryview(self.buffer)

    def _sizes(self, part: bytearray) -> None:
        header_bytes, payload_bytes = FRAME.unpack(part)
        self._expect(header_bytes, lambda header: self._header(header, payload_bytes))

    def _header(self, part: bytearray, payload_bytes: int) -> None:
        header = pickle.loads(part)
        self._expect(payload_bytes, lambda payload: self._frame(header, payload))

    def _frame(self, header: tuple, payload: bytearray) -> None:
        kind, job, *detail = header
        self._expect(FRAME.size, self._sizes)
        if kind in (RUN, ROLL_OUT):
            self.jobs[job] = asyncio.ensure_future(self._run(kind, job, *detail, payload))
            self.jobs[job].add_done_callback(lambda _, job=job: self.jobs.pop(job, None))
        elif kind == DROP and job in self.jobs:
            self.jobs[job].cancel()

    async def _run(self, kind: str, job: int, lengths: Sequence[int], layout: Layout, payload: bytearray) -> None:
        answer = await self.service.answer(kind, job, lengths, layout, payload)
        if not self.transport.is_closing():
            self.transport.write(answer)


class RemoteQueue:
    """A frontend's end: a `WindowQueue` in another process."""

    def __init__(self, path: str, state: QueueState):
        self.path = path
        self.state = state
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: Optional[asyncio.StreamWriter] = None
        self._connecting: Optional[asyncio.Task] = None

    async def __call__(self, windows: Sequence[Window]) -> torch.Tensor:
        """The windows' rows. The frame is written before this first awaits once connected, so
        the windows leave admission's count (`Admission.counted`) as they are sent."""
        return await self._request(RUN, windows)

    async def roll_out(self, windows: Sequence[Window]) -> torch.Tensor:
        """Each clip's window's relevance (`rollout`), computed in the model's process."""
        return await self._request(ROLL_OUT, windows)

    async def _request(self, kind: str, windows: Sequence[Window]) -> torch.Tensor:
        writer = self._writer or await self._connect()
        job = next(self._ids)
        sources, layout = _layout(windows)
        request = frame((kind, job, [len(s) for s in sources], layout),
                        np.concatenate(sources).astype(np.float32, copy=False).tobytes())
        result = self._pending[job] = asyncio.get_running_loop().create_future()  # once nothing can fail before the try
        writer.write(request)
        try:
            try:
                await writer.drain()
            except ConnectionError as exc:  # closed under it: the next request connects again
                raise Overloaded(NOT_TAKING, 1) from exc
            return await result
        except asyncio.CancelledError:
            if not writer.is_closing():
                writer.write(frame((DROP, job)))
            raise
        finally:
            self._pending.pop(job, None)

    async def _connect(self) -> asyncio.StreamWriter:
        """One connection per frontend, made by the first request (the event loop is the server's),
        and again by the first after it closed."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(asyncio.open_unix_connection(self.path))
        try:
            reader, writer = await asyncio.shield(self._connecting)
        except OSError as exc:
            self._connecting = None  # the next request tries again
            raise Overloaded(NOT_TAKING, 1) from exc
        if self._writer is None:
            self._writer = writer
            asyncio.ensure_future(self._read(reader))
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (kind, job, *detail), payload = await read_frame(reader)
                result = self._pending.get(job)
                if result is None or result.done():
                    continue  # dropped by its caller
                if kind == LOGITS:
                    result.set_result(torch.frombuffer(bytearray(payload), dtype=torch.float32).reshape(detail[0]))
                else:
                    result.set_exception(_failure(*detail))
        except (asyncio.IncompleteReadError, ConnectionError):
            logger.error("The model's process has closed its connection; failing the %d requests waiting for it",
                         len(self._pending))
        finally:
            self._writer = self._connecting = None  # a later request connects again
            for result in self._pending.values():
                if not result.done():
                    result.set_exception(Overloaded("the server is stopping: its model's process has ended", 1))


def _layout(windows: Sequence[Window]) -> tuple[list[np.ndarray], Layout]:
    """The samples to send, each once, and the layout. A clip's windows are views of its waveform
    (`windows.slices`), which overlap wherever the hop is shorter than the window, and an occluded
    copy shares its window's samples: so what is sent is the span of each waveform its windows
    cover, where each window is found. Sent window by window, a clip at a 0.1 s hop would travel
    about a hundred times over."""
    spans: dict[int, list] = {}  # id of a waveform → [the waveform, first sample, end] of its windows
    placed = []
    for window in windows:
        samples = window.samples if isinstance(window, Occluded) else window
        waveform, start = _within(samples)
        span = spans.setdefault(id(waveform), [waveform, start, start + len(samples)])
        span[1], span[2] = min(span[1], start), max(span[2], start + len(samples))
        placed.append((id(waveform), start, len(samples), (window.frames, window.bins) if isinstance(window, Occluded) else None))
    index = {key: position for position, key in enumerate(spans)}
    sources = [waveform[first:end] for waveform, first, end in spans.values()]
    layout = [(index[key], start - spans[key][1], length, cell) for key, start, length, cell in placed]
    return sources, layout


def _within(samples: np.ndarray) -> tuple[np.ndarray, int]:
    """The waveform `samples` is a view of (one-dimensional, contiguous, of its type), and where in
    it they start; else `samples` itself, at 0."""
    base = samples.base
    if isinstance(base, np.ndarray) and base.ndim == 1 and base.dtype == samples.dtype and base.flags.c_contiguous \
            and samples.ndim == 1 and samples.flags.c_contiguous:
        start, remainder = divmod(samples.ctypes.data - base.ctypes.data, samples.itemsize)
        if not remainder and 0 <= start and start + len(samples) <= len(base):
            return base, start
    return samples, 0


def _failure(kind: str, message: str, retry_after_s: int) -> Exception:
    return Overloaded(message, retry_after_s) if kind == "overloaded" else RuntimeError(message)
