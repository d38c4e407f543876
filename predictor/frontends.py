"""Several processes taking requests for one model (`--frontends N`, N > 1).

One Python process answers a few hundred requests a second at most: parsing, decoding and answering
hold its one GIL, however many cores the pod has, while one GPU classifies over a thousand windows a
second. So N frontend processes each run kserve's ModelServer (HTTP and gRPC, on the same ports) and
one model process holds the engine and the one window queue (`ipc`): batching and fairness still
span every request, and the GPU is one process's, with one copy of the weights.

This process (the container's PID 1) supervises. It binds the HTTP port once and hands the socket to
every frontend (the kernel gives each connection to whichever accepts first); gRPC's port each
frontend binds itself, with SO_REUSEPORT (gRPC's default on Linux): the kernel spreads connections by
hash, so one gRPC channel (one connection) stays on one frontend and many clients spread. The model
process loads and warms up first; the frontends start once it says it is ready, so the first ready
answer comes from a frontend with a model behind it. SIGTERM (or SIGINT) goes to the frontends,
which drain as one process does (kserve's grace period), then to the model process. A process that
ends on its own ends the server with exit status 1: the kubelet restarts the container, where a
restart in place would hide the fault. Metrics: prometheus_client's multiprocess mode (`metrics`).

Written here rather than taken from kserve's `--workers` (uvicorn workers): those are copies of the
whole server, each loading its own model, with gRPC left in the parent.
"""

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from . import logs
from .allocator import keep_freed_memory
from .checkpoint import ModelLoadError
from .config import Config
from .cpu import configure_torch_threads
from .ipc import ModelService, RemoteQueue
from .model import ASTModel
from .protocol.kserve import AudioModelServer
from .queue_state import QueueState

logger = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
POLL_S = 0.2
STOP_MARGIN_S = 10  # past the frontends' grace period, before a process that has not ended is killed


class Launch:
    """What every process of the server is started with."""

    def __init__(self, args: argparse.Namespace, config: Config, device: str, server_flags: dict[str, Any],
                 grace_period_s: int, frontends: int, threads: int):
        self.config = config
        self.device = device
        self.server_flags = server_flags
        self.grace_period_s = grace_period_s
        self.frontends = frontends
        self.threads = threads
        self.logging = (args.configure_logging, args.log_config_file)

    def configure_logging(self) -> None:
        configure, config_file = self.logging
        if configure:
            logs.configure(self.config.log_format, config_file, __package__)


def serve(launch: Launch) -> int:
    """The model process, then the frontends; until a signal or a process's end. The exit status."""
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: stopping.append(number))
    with tempfile.TemporaryDirectory(prefix="ast-server-") as work:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(work, "metrics"))
        Path(work, "metrics").mkdir()
        channel = str(Path(work, "model.sock"))
        memory = QueueState.shared_memory(launch.frontends)
        ready, told = SPAWN.Pipe(duplex=False)
        model = SPAWN.Process(target=run_model, args=(launch, channel, memory, told), name="ast-model")
        model.start()
        told.close()
        if not _model_ready(model, ready, stopping):
            return _stop([], model, failed=not stopping)
        frontends: list[multiprocessing.Process] = []
        try:
            listener = socket.create_server(("0.0.0.0", launch.server_flags["http_port"]), backlog=2048)
            for index in range(launch.frontends):
                frontends.append(SPAWN.Process(target=run_frontend, args=(launch, index, listener, channel, memory),
                                               name=f"ast-frontend-{index}"))
                frontends[-1].start()
        except BaseException:  # the port taken, say: the processes started must not outlive this one
            _stop([f for f in frontends if f.pid is not None], model, failed=True)
            raise
        listener.close()  # the frontends hold it now: once they close theirs, new connections are refused
        logger.info("Serving with %d frontend processes (pids %s) and the model's process (pid %d)",
                    len(frontends), ", ".join(str(f.pid) for f in frontends), model.pid)
        while not stopping:
            ended = [p for p in (model, *frontends) if p.exitcode is not None]
            if ended:
                logger.error("%s ended (exit status %s): stopping the server", ended[0].name, ended[0].exitcode)
                return _stop(frontends, model, failed=True)
            wait([p.sentinel for p in (model, *frontends)], timeout=POLL_S)
        logger.info("Signal %d: stopping the frontends, then the model's process", stopping[0])
        return _stop(frontends, model, failed=False, grace_s=launch.grace_period_s)


def _model_ready(model: multiprocessing.Process, ready: Connection, stopping: list[int]) -> bool:
    while not stopping:
        if ready.poll(POLL_S):
            try:
                return ready.recv()
            except EOFError:  # it ended without a word: its log says why
                return False
        if model.exitcode is not None:
            return False
    return False


def _stop(frontends: list, model: multiprocessing.Process, failed: bool, grace_s: float = 0) -> int:
    """Frontends first (they drain while the model still computes), then the model process."""
    for group, allowed in ((frontends, grace_s + STOP_MARGIN_S), ([model], STOP_MARGIN_S)):
        for process in group:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + allowed
        for process in group:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                logger.error("%s did not stop within %g s: killed", process.name, allowed)
                process.kill()
                process.join()
    return 1 if failed else 0


# ---- the model's process ------------------------------------------------------------------


def run_model(launch: Launch, channel: str, memory: Any, told: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches every process: the supervisor decides
    launch.configure_logging()
    keep_freed_memory()
    model = ASTModel(launch.config, threads=configure_torch_threads(launch.config.threads), device=launch.device,
                     state=QueueState.attach(memory))
    try:
        model.load()
    except ModelLoadError as exc:
        logger.error("%s", exc)
        told.send(False)
        sys.exit(1)
    asyncio.run(_serve_model(ModelService(model.queue, model.roll_out), channel, told))


async def _serve_model(service: ModelService, channel: str, told: Connection) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    accepting = await service.serve(channel)
    told.send(True)
    told.close()
    await stop.wait()
    accepting.cancel()


# ---- a frontend -----------------------------------------------------------------------------


def run_frontend(launch: Launch, index: int, listener: socket.socket, channel: str, memory: Any) -> None:
    launch.configure_logging()
    keep_freed_memory()
    configure_torch_threads(1)  # ranking a request's logits: the model's process has the cores
    config = launch.config
    model = ASTModel(config, threads=launch.threads, device=launch.device,
                     remote=RemoteQueue(channel, QueueState.attach(memory, index)))
    model.load()
    AudioModelServer(grace_period=launch.grace_period_s, max_message_bytes=config.max_request_bytes,
                     listener=listener, **launch.server_flags).start([model])
