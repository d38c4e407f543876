"""Clients for a timed run against the server, spread over several processes: one Python process
sending requests is bound by its own GIL (a request costs a client a millisecond or more of CPU),
so a single one cannot offer the thousand requests a second a GPU server is measured at. Each
process runs `concurrency / processes` threads, each with a connection of its own, all sending for
the same wall-clock window; latencies and failures come back to be merged. This module imports no
torch, so the processes start in a moment.

Closed loop (the default), each client sends its next request when its last is answered: the
server's throughput at that concurrency. Open loop (`rate`), requests leave on a fixed schedule
whatever the answers, and a request's latency counts from its scheduled time, so one that left late
because every client was still waiting counts its wait too: the latency a given load sees.
"""

import itertools
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np

from predictor.client.protocols import V2, Endpoint, Grpc, RequestFailed

SECONDS = 20  # per measurement
START_DELAY_S = 3.0  # for every process to be up before the window opens


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
    start = time.time() + START_DELAY_S
    shares = [load.concurrency // processes + (i < load.concurrency % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_clients, [load] * processes, shares, [start] * processes))
    latencies = np.concatenate([part["latencies"] for part in parts])
    failed = [failure for part in parts for failure in part["failed"]]
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"), float("nan"))
    return {"requests_per_s": len(latencies) / load.seconds, "offered_per_s": load.rate or None,
            "p50_ms": 1000 * float(p50), "p99_ms": 1000 * float(p99),
            "requests": len(latencies), "refused_503": sum(part["refused"] for part in parts), "failed": len(failed),
            "first_failure": failed[0] if failed else None, "client_processes": processes}


def _clients(load: Load, threads: int, start: float) -> dict:
    """One process's share: `threads` clients from `start` for `load.seconds`."""
    deadline = start + load.seconds
    latencies: list[float] = []
    failed: list[str] = []
    refused = [0]

    def client(index: int) -> None:
        protocol = _protocol(load)
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

