"""`make soak` (python -m benchmarks.soak): does the server leak memory, file descriptors or threads
over many requests?

--requests (10,000) requests from --clients (4) concurrent clients against the tests' tiny random
model, drawn from the same valid and invalid kinds as `benchmarks.load`'s mixed load (each must get
its status; every 200 must equal the answer fetched before the soak). The load pauses every
--sample_every requests, and once every client connection is closed and the server's fd and thread
counts have held still, its VmRSS (/proc/<pid>/status), open fds (/proc/<pid>/fd) and threads
(/proc/<pid>/task) are read. The first reading, after --warmup (1,000) requests, is the baseline:
by then the allocator's arenas and the libraries' caches have settled, and the thread pools have
(nearly) reached the size this load gives them. Against it, the reading after the last request must show:
- RSS within 5 % (either way);
- no more open fds, with zero tolerance: both readings are taken at rest, with every client
  connection closed and nothing in flight, when the server holds only its fixed descriptors (every
  kind of request, so every code path that opens something, has run during the warm-up);
- threads: at most THREAD_TOLERANCE (2) more than the baseline. Pools start threads on demand up
  to a fixed bound (asyncio's default executor, which decodes audio, up to min(32, CPUs + 4): 6
  here), and may still add one after the warm-up whenever more requests than before happen to
  decode at once: both full runs here saw 19 -> 20, once between requests 1,000 and 2,000, once
  between 5,000 and 6,000, flat otherwise: the moment is chance, so no "flat from mid-run" rule
  holds. A leak grows with the requests: any leaking a thread per 3,000 requests or faster ends past 2.
The readings between give the trend. Prints a summary, writes benchmarks/results/soak-<UTC time>.json,
exits 1 if any criterion failed.
"""

import argparse
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchmarks.loadgen import (CpuShare, Limits, Sample, Server, answer_criteria, closed_loop, criterion, environment,
                                failed, fetch_references, format_cpu_share, format_latency, mixed_kinds, print_criteria,
                                server_health, settled_usage, summarize, tiny_model, write_results)
from tools.local_server import serving

RSS_TOLERANCE = 0.05
THREAD_TOLERANCE = 2


def soak(server: Server, total: int = 10_000, clients: int = 4, warmup: int = 1_000, sample_every: int = 1_000,
         limits: Limits = Limits()) -> dict:
    """`total` requests against a server started with `limits.flags()`, its usage read after `warmup`
    requests, then every `sample_every`, and after the last."""
    kinds = mixed_kinds(limits)
    references = fetch_references(server.url, kinds)
    marks = sorted({min(warmup, total), *range(warmup + sample_every, total, sample_every), total})
    samples: list[Sample] = []
    readings: list[dict] = []
    wall = 0.0
    with CpuShare(server.process.pid) as cpu:
        for mark in marks:
            batch, seconds = closed_loop(server.url, kinds, references, clients, total=mark - len(samples), seed=len(readings))
            samples += batch
            wall += seconds
            readings.append({"after_requests": len(samples), **settled_usage(server.process.pid)})
    first, last = readings[0], readings[-1]
    rss_change = (last["rss_kib"] - first["rss_kib"]) / first["rss_kib"]
    criteria = answer_criteria(samples, kinds) + [
        criterion(f"RSS within {RSS_TOLERANCE:.0%} of the reading after {first['after_requests']} requests",
                  abs(rss_change) < RSS_TOLERANCE,
                  f"{first['rss_kib'] / 1024:.1f} -> {last['rss_kib'] / 1024:.1f} MiB ({rss_change:+.2%})"),
        criterion("open fds did not grow", last["fds"] <= first["fds"], f"{first['fds']} -> {last['fds']}"),
        criterion(f"threads did not grow (at most +{THREAD_TOLERANCE}: pools that start threads on demand)",
                  last["threads"] <= first["threads"] + THREAD_TOLERANCE,
                  " -> ".join(str(r["threads"]) for r in readings)),
        *server_health(server),
    ]
    return {"parameters": {"requests": total, "clients": clients, "warmup": warmup, "sample_every": sample_every,
                           "rss_tolerance": RSS_TOLERANCE, "fd_tolerance": 0, "thread_tolerance": THREAD_TOLERANCE,
                           "limits": asdict(limits), "kinds": [k.describe() for k in kinds]},
            "summary": summarize(samples, wall), "readings": readings, "rss_change": rss_change, "cpu_share": cpu.summary(),
            "criteria": criteria, "passed": not failed(criteria)}


def print_soak(result: dict) -> None:
    p, s = result["parameters"], result["summary"]
    print(f"\nSoak: {s['requests']} requests from {p['clients']} clients (tiny model), {s['throughput_rps']:.1f} req/s; "
          f"latency {format_latency(s['latency'])}\n  by status: {s['by_status']}\n  {format_cpu_share(result['cpu_share'])}")
    print("  after requests   RSS MiB   peak RSS MiB   fds   threads")
    for r in result["readings"]:
        print(f"  {r['after_requests']:>14}   {r['rss_kib'] / 1024:7.1f}   {r['peak_rss_kib'] / 1024:12.1f}   "
              f"{r['fds']:3d}   {r['threads']:7d}")
    print_criteria(result["criteria"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=1_000, help="requests before the baseline reading")
    parser.add_argument("--sample_every", type=int, default=1_000, help="requests between readings after the baseline")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ast-soak-"))
    limits = Limits()
    before = environment()
    with serving(tiny_model(work / "tiny"), work / "soak-server.log", limits.flags(), timeout=600) as server:
        result = soak(server, args.requests, args.clients, args.warmup, args.sample_every, limits)
    result.update(environment=before, parameters={**result["parameters"], **vars(args)}, server_log=str(work),
                  load_average_after=os.getloadavg())
    print_soak(result)
    path = write_results("soak", result)
    print(f"\nCPU: {before['cpu']}\nserver log in {work}\nwrote {path}\n{'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
