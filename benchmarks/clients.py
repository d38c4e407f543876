"""Clients for a timed run against the server, spread over several processes: one Python process
sending requests is bound by its own GIL (a request costs a client a millisecond or more of CPU),
so a single one cannot offer the thousand requests a second a GPU server is measured at. Each
process runs `concurrency / processes` threads, each with a connection of its own, all sending for
the same wall-clock window; latencies and failures come back to be merged.

The processes are `python -m benchmarks.clients`, each handed its share on stdin and answering on
a pipe of its own (whatever a library prints on its stdout stays there), rather than a
multiprocessing pool: a spawned pool worker imports the caller's main module first (the bench's
and gpu-check's: torch and transformers, seconds on a small host), and this module imports no
torch, so they start in a moment. The window opens once every one of them says it is ready, its
clients made.

Closed loop (the default), each client sends its next request when its last is answered: the
server's throughput at that concurrency. Open loop (`rate`), requests leave on a fixed schedule
whatever the answers, and a request's latency counts from its scheduled time, so one that left late
because every client was still waiting counts its wait too: the latency a given load sees.
"""

import itertools
import os
import pickle
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np

from predictor.client.protocols import V2, Endpoint, Grpc, RequestFailed

SECONDS = 20  # per measurement
START_DELAY_S = 0.5  # from when every process is ready, for their threads to be up before the window opens
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Load:
    protocol: str  # "v2" (binary REST) or "grpc"
    address: str  # http://host:port for v2, host:port for gRPC
    clips: tuple[bytes, ...]  # one clip: single-clip requests; several: each request carries them all
    concurrency: int  # clients; open loop, the most requests in flight
    seconds: float = SECONDS
    rate: float = 0.0  # open loop: requests a second, from every client together; 0: closed loop


def timed_clients(load: Load, processes: int = 0) -> dict:
    """Requests answered per second and their latency. A 503 (the server full) is counted and
    retried after the time it names, as a client should; any other failure is counted, and the run
    goes on. `processes`: default, one per 8 clients, at most half the host's cores."""
    processes = processes or max(1, min(-(-load.concurrency // 8), (os.cpu_count() or 2) // 2))
    shares = [load.concurrency // processes + (i < load.concurrency % processes) for i in range(processes)]
    children = [_spawn() for _ in shares]
    try:
        for (child, _), share in zip(children, shares):
            pickle.dump((load, share), child.stdin)
            child.stdin.flush()
        for child, answers in children:
            if answers.readline() != b"ready\n":  # the end of the pipe: the process ended
                raise RuntimeError(f"a client process ended before it was ready (exit {child.poll()})")
        start = time.time() + START_DELAY_S
        for child, _ in children:
            pickle.dump(start, child.stdin)
            child.stdin.flush()
        parts = [pickle.load(answers) for _, answers in children]
    finally:
        for child, answers in children:
            child.kill()
            child.wait()
            child.stdin.close()
            answers.close()
    latencies = np.concatenate([part["latencies"] for part in parts])
    failed = [failure for part in parts for failure in part["failed"]]
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"), float("nan"))
    return {"requests_per_s": len(latencies) / load.seconds, "offered_per_s": load.rate or None,
            "p50_ms": 1000 * float(p50), "p99_ms": 1000 * float(p99),
            "requests": len(latencies), "refused_503": sum(part["refused"] for part in parts), "failed": len(failed),
            "first_failure": failed[0] if failed else None, "client_processes": processes}


def single_clips(protocol: str, address: str, clip: bytes, concurrency: int, seconds: float,
                 half_load: bool = True) -> list[dict]:
    """Single-clip requests, closed loop at `concurrency`; then (`half_load`) offered open loop at
    half the rate answered: the latency a server sees at half its load. Nothing answered, there is
    no half of it to offer."""
    runs = [timed_clients(Load(protocol, address, (clip,), concurrency, seconds))]
    if half_load and runs[0]["requests"]:
        runs.append(timed_clients(Load(protocol, address, (clip,), concurrency, seconds,
                                       rate=runs[0]["requests_per_s"] / 2)))
    return runs


def _spawn() -> tuple[subprocess.Popen, BinaryIO]:
    """A client process, and the pipe it answers on."""
    read, write = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.clients", str(write)], cwd=REPO,
                             stdin=subprocess.PIPE, pass_fds=(write,))
    os.close(write)
    return child, os.fdopen(read, "rb")


def _clients(load: Load, protocols: list[Union[V2, Grpc]], start: float) -> dict:
    """One process's share: a client per protocol (each its own connection) from `start` for `load.seconds`."""
    threads, deadline = len(protocols), start + load.seconds
    latencies: list[float] = []
    failed: list[str] = []
    refused = [0]

    def client(index: int) -> None:
        protocol = protocols[index]
        time.sleep(max(0.0, start - time.time()))
        for scheduled in _schedule(load, threads, index, start):
            if scheduled >= deadline:
                break
            time.sleep(max(0.0, scheduled - time.time()))
            started = min(scheduled, time.time())
            try:
                protocol.send(load.clips[0], {}) if len(load.clips) == 1 else protocol.send_clips(list(load.clips), {})
            except RequestFailed as failure:
                if failure.status != 503:
                    failed.append(str(failure)[:200])
                    continue
                refused[0] += 1
                time.sleep(failure.retry_after_s or 1)
                continue
            except Exception as failure:  # noqa: BLE001 - a timeout, a reset: counted, not fatal to the run
                failed.append(repr(failure)[:200])
                continue
            if time.time() <= deadline:  # an answer after the window closed is not the window's
                latencies.append(time.time() - started)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))
    return {"latencies": np.array(latencies), "failed": failed, "refused": refused[0]}


def _schedule(load: Load, threads: int, index: int, start: float) -> Iterator[float]:
    """When client `index` of a process sends each request: closed loop, now (as soon as its last
    answer came); open loop, every `threads`-th slot of the process's share of the rate (each
    process's share is its share of the clients), offset so that the processes interleave."""
    if not load.rate:
        while True:
            yield time.time()
    interval = load.concurrency / (load.rate * threads)  # between two of this process's requests
    offset = (index + random.random()) * interval
    for slot in itertools.count():
        yield start + offset + slot * threads * interval


def _protocol(load: Load) -> Union[V2, Grpc]:
    endpoint = Endpoint(load.address, timeout_s=300)
    return V2(endpoint) if load.protocol == "v2" else Grpc(endpoint)


def _client_process(answers_fd: int) -> None:
    """`python -m benchmarks.clients FD`: its share (a pickled Load and a thread count) on stdin;
    `ready` on FD once its clients are made (gRPC's import and channels too: not in the window),
    then the start time on stdin, and its results pickled on FD."""
    with os.fdopen(answers_fd, "wb") as answers:
        load, threads = pickle.load(sys.stdin.buffer)
        protocols = [_protocol(load) for _ in range(threads)]
        answers.write(b"ready\n")
        answers.flush()
        start = pickle.load(sys.stdin.buffer)
        pickle.dump(_clients(load, protocols, start), answers)


if __name__ == "__main__":
    _client_process(int(sys.argv[1]))
