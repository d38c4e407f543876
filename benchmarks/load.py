"""`make load` (python -m benchmarks.load): under load, does the server still answer every request
right, refuse what it cannot take quickly and cleanly, and keep answering its liveness probe?

1. Mixed load, on the tests' tiny random model: --users concurrent users for --duration s, each
   sending requests drawn from valid kinds (V1 raw WAV, V1 JSON base64, V2 JSON BYTES, V2 binary
   BYTES, V2 FP32 waveform, three clips in one request, a 25 s clip of 5 windows with segments) and
   invalid ones (not audio, malformed JSON, an unknown parameter, too many clips, a clip too long,
   a V2 shape and a V2 schema error, a body over --max_request_mb), each with the status it must get.
   Every 200 must equal that kind's answer fetched once before the load (labels exactly, numbers
   within 1e-4).
2. Overload, on a full-size random AST (768 x 12, 128 mel bins x 1024 frames, 527 labels; built once
   into models/load-ast-full) served with a small --max_queued_windows: first its capacity
   (sequential requests of one 10 s clip), then --overload_factor times that rate, open loop, for
   --overload_duration s. Every admitted request (200) must be answered right; every other one must
   be a 503 with Retry-After, quickly (p99 under 1 s); nothing else (no other status, no connection
   error).
In both, a liveness poller hits /v2/health/live every 0.25 s: it must never fail nor take 1 s.

Prints a summary, writes benchmarks/results/load-<UTC time>.json (the CPU as bench.py records it,
every parameter, every measurement) and exits 1 if any criterion failed.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import requests

from benchmarks.loadgen import (FULL_MODEL_CACHE, LIVENESS_BAR_S, CpuShare, Criterion, Limits, LivenessPoller, Server,
                                answer_criteria, closed_loop, criterion, environment, failed, fetch_references,
                                format_cpu_share, format_latency, full_model, latency_stats, mixed_kinds, open_loop,
                                print_criteria, send, server_health, summarize, ten_second_kinds, tiny_model,
                                write_results)
from tools.local_server import serving

REFUSAL_BAR_S = LIVENESS_BAR_S  # a 503 must come as fast as a probe: it is refused before any work
LAG_BAR_S = 1.0  # open loop: a request leaving later than this after its time means the generator fell behind


def mixed_load(server: Server, users: int, duration_s: float, limits: Limits = Limits()) -> dict:
    """Closed-loop load of every kind of request against a server started with `limits.flags()`."""
    kinds = mixed_kinds(limits)
    references = fetch_references(server.url, kinds)
    with LivenessPoller(server.url) as liveness, CpuShare(server.process.pid) as cpu:
        samples, wall = closed_loop(server.url, kinds, references, users, duration_s=duration_s)
    criteria = answer_criteria(samples, kinds) + liveness.criteria() + server_health(server)
    return {"parameters": {"users": users, "duration_s": duration_s, "limits": asdict(limits),
                           "kinds": [k.describe() for k in kinds]},
            "summary": summarize(samples, wall), "liveness": liveness.summary(), "cpu_share": cpu.summary(),
            "criteria": criteria, "passed": not failed(criteria)}


def overload(server: Server, max_queued_windows: int, factor: float, duration_s: float, capacity_requests: int) -> dict:
    """Capacity, then `factor` times it open loop, against a server started with `max_queued_windows`."""
    kinds = ten_second_kinds()
    references = fetch_references(server.url, kinds)  # also the warm-up
    with requests.Session() as session:
        start = time.perf_counter()
        sequential = [send(session, server.url, kinds[0], references[kinds[0].name]) for _ in range(capacity_requests)]
        capacity = capacity_requests / (time.perf_counter() - start)
    rate = factor * capacity
    with LivenessPoller(server.url) as liveness, CpuShare(server.process.pid) as cpu:
        samples, wall = open_loop(server.url, kinds, references, rate, duration_s)
    admitted = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status == 503]
    refusals = latency_stats([s.latency_s for s in refused])
    lag = max((s.lag_s for s in samples), default=0.0)
    bad_capacity = [s for s in sequential if s.problem]
    criteria: list[Criterion] = [
        criterion("capacity run answered right", not bad_capacity, bad_capacity[0].problem if bad_capacity else ""),
        *answer_criteria(samples, kinds),
        criterion("overloaded: some requests admitted (200), some refused (503)", bool(admitted and refused),
                  f"{len(admitted)} admitted, {len(refused)} refused"),
        criterion(f"503s answered quickly (p99 under {REFUSAL_BAR_S:g} s)",
                  bool(refused) and refusals["p99_ms"] < 1000 * REFUSAL_BAR_S, format_latency(refusals)),
        criterion(f"open loop kept its schedule (every request left within {LAG_BAR_S:g} s of its time)",
                  lag < LAG_BAR_S, f"latest {lag * 1000:.0f} ms late"),
        *liveness.criteria(), *server_health(server),
    ]
    return {"parameters": {"max_queued_windows": max_queued_windows, "factor": factor, "duration_s": duration_s,
                           "capacity_requests": capacity_requests, "kinds": [k.describe() for k in kinds]},
            "capacity_rps": capacity, "capacity_latency": latency_stats([s.latency_s for s in sequential]),
            "offered_rps": rate, "summary": summarize(samples, wall),
            "admitted": latency_stats([s.latency_s for s in admitted]), "refused": refusals,
            "retry_after_s": sorted({int(s.retry_after) for s in refused if (s.retry_after or "").isdigit()}),
            "max_lag_ms": 1000 * lag, "liveness": liveness.summary(), "cpu_share": cpu.summary(),
            "criteria": criteria, "passed": not failed(criteria)}


def print_mixed(result: dict) -> None:
    p, s = result["parameters"], result["summary"]
    print(f"\nMixed load: {p['users']} users for {p['duration_s']:g} s (tiny model, {len(p['kinds'])} kinds): "
          f"{s['requests']} requests, {s['throughput_rps']:.1f} req/s; latency {format_latency(s['latency'])}")
    print(f"  by status: {s['by_status']}")
    for kind, k in s["by_kind"].items():
        print(f"  {kind:22s} {k['by_status']}  {format_latency(k)}")
    print(f"  liveness: {format_latency(result['liveness'])}, {result['liveness']['failures']} failures")
    print(f"  {format_cpu_share(result['cpu_share'])}")
    print_criteria(result["criteria"])


def print_overload(result: dict) -> None:
    p, s = result["parameters"], result["summary"]
    print(f"\nOverload (full-size model, --max_queued_windows {p['max_queued_windows']}): capacity "
          f"{result['capacity_rps']:.2f} req/s (one 10 s clip, {p['capacity_requests']} sequential); offered "
          f"{result['offered_rps']:.2f} req/s ({p['factor']:g}x) open loop for {p['duration_s']:g} s: {s['requests']} requests")
    print(f"  by status: {s['by_status']}")
    print(f"  admitted (200): {format_latency(result['admitted'])}")
    print(f"  refused (503): {format_latency(result['refused'])}; Retry-After seen: {result['retry_after_s']} s")
    print(f"  liveness: {format_latency(result['liveness'])}, {result['liveness']['failures']} failures; "
          f"generator's latest departure {result['max_lag_ms']:.0f} ms")
    print(f"  during the open loop, {format_cpu_share(result['cpu_share'])}")
    print_criteria(result["criteria"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32, help="mixed load: concurrent users")
    parser.add_argument("--duration", type=float, default=60.0, help="mixed load: seconds")
    parser.add_argument("--overload_duration", type=float, default=40.0, help="overload: seconds of open-loop arrivals")
    parser.add_argument("--overload_factor", type=float, default=4.0, help="overload: offered rate / measured capacity")
    parser.add_argument("--max_queued_windows", type=int, default=4, help="overload: the server's --max_queued_windows")
    parser.add_argument("--capacity_requests", type=int, default=5, help="overload: sequential requests measuring capacity")
    parser.add_argument("--full_model_dir", type=Path, default=FULL_MODEL_CACHE,
                        help="overload: where the full-size random model is built once and reused")
    parser.add_argument("--only", choices=("mixed", "overload"), default=None, help="run one part (default: both)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ast-load-"))
    result: dict = {"environment": environment(), "parameters": vars(args), "server_logs": str(work)}
    if args.only in (None, "mixed"):
        limits = Limits()
        with serving(tiny_model(work / "tiny"), work / "mixed-server.log", limits.flags(), timeout=600) as server:
            result["mixed"] = mixed_load(server, args.users, args.duration, limits)
        print_mixed(result["mixed"])
    if args.only in (None, "overload"):
        model = full_model(args.full_model_dir)
        with serving(model, work / "overload-server.log", ("--max_queued_windows", str(args.max_queued_windows)),
                     timeout=600) as server:
            result["overload"] = overload(server, args.max_queued_windows, args.overload_factor, args.overload_duration,
                                          args.capacity_requests)
        print_overload(result["overload"])
    result["load_average_after"] = os.getloadavg()
    passed = all(result[part]["passed"] for part in ("mixed", "overload") if part in result)
    result["passed"] = passed
    path = write_results("load", result)
    print(f"\nCPU: {result['environment']['cpu']}\nserver logs in {work}\nwrote {path}\n{'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
