"""What `benchmarks.load`, `benchmarks.soak` and tests/test_load.py share: the server, the requests
they send, how answers are checked, and the statistics and results they report.

Requests come from threads with one `requests.Session` each: closed loop (N users, each sending its
next request when the last is answered) or open loop (arrivals on a schedule, whatever the server
does). Not locust: importing locust runs gevent's `monkey.patch_all()`, and in a process that has
already imported ssl (requests, transformers: every pytest session here, through conftest) that
fails with a RecursionError inside `ssl` (gevent issue 1016), so the short versions in the test
suite could not call the same code; locust is also closed-loop only, and counts failures rather
than statuses per request kind.

Every valid request's answer is compared with the answer the same request got once, alone, before
the load (labels exactly, every number within 1e-4): the server is deterministic per request
(`--max_batch_size 1`), so under load it must answer exactly as it does idle.
"""

import base64
import itertools
import json
import math
import os
import random
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import requests

from benchmarks.bench import cpu_model
from predictor.cpu import cpu_limit
from tools.local_server import Server, process_cpu_s
from tools.random_ast import TINY_LABELS, save_random_ast
from tools.signals import encode, tone

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FULL_MODEL_CACHE = REPO / "models" / "load-ast-full"  # /models/ is git-ignored
RATE = 16000
TOLERANCE = 1e-4
LIVENESS_INTERVAL_S = 0.25
LIVENESS_BAR_S = 1.0
V1 = "/v1/models/ast:predict"
V2 = "/v2/models/ast/infer"

Criterion = dict[str, Any]
"""{"name": what is required, "passed": bool, "detail": what was measured}."""


# ---- models and the server ----------------------------------------------------------------


def tiny_model(directory: Path) -> Path:
    """The test suite's tiny model (tests/conftest.py): AudioSet's 10.24 s windows, milliseconds each."""
    return save_random_ast(directory, TINY_LABELS, tiny=True, max_length=1024)


def full_model(directory: Path = FULL_MODEL_CACHE) -> Path:
    """AST's real geometry (768 wide, 12 layers, 128 mel bins x 1024 frames, 527 labels), random
    init, seed 0: built once, then reused from `directory`."""
    if not all((directory / name).exists() for name in ("config.json", "model.safetensors", "preprocessor_config.json")):
        partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        save_random_ast(partial)
        partial.rename(directory)
    return directory


@dataclass(frozen=True)
class Limits:
    """The server limits the invalid requests are built against (small, so they are cheap to pass)."""

    max_request_mb: float = 2.0
    max_clips_per_request: int = 4
    max_audio_seconds: float = 30.0

    def flags(self) -> tuple[str, ...]:
        return ("--max_request_mb", f"{self.max_request_mb:g}", "--max_clips_per_request", str(self.max_clips_per_request),
                "--max_audio_seconds", f"{self.max_audio_seconds:g}")


def server_health(server: Server) -> list[Criterion]:
    """After a run: the process still serves, and its log holds no traceback."""
    alive = server.process.poll() is None and server.is_ready()
    tracebacks = server.log.read_text(errors="replace").count("Traceback")
    return [criterion("server still alive and ready afterwards", alive, f"exit code {server.process.poll()}"),
            criterion("no traceback in the server's log", tracebacks == 0, f"{tracebacks} in {server.log}")]


# ---- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of request: sent as is (the body is built once), answered with `status`."""

    name: str
    path: str
    body: bytes
    headers: dict
    status: int
    weight: int = 1

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "status": self.status, "weight": self.weight,
                "body_bytes": len(self.body)}


def clip(seconds: float, rate: int = RATE, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone over noise, different per `freq` and `seed`."""
    noise = 0.05 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels))
    return (tone(freq, seconds, rate, 0.3)[:, None] + noise).astype(np.float32).squeeze()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def json_kind(name: str, path: str, body: Any, status: int, weight: int = 1) -> Kind:
    return Kind(name, path, json.dumps(body).encode(), {"Content-Type": "application/json"}, status, weight)


def v2_binary(name: str, audio: bytes, weight: int) -> Kind:
    """The V2 binary data extension, as tritonclient sends it: a JSON header, then the raw BYTES tensor."""
    header = json.dumps({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(audio) + 4}}]}).encode()
    return Kind(name, V2, header + struct.pack("<I", len(audio)) + audio,
                {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}, 200, weight)


def mixed_kinds(limits: Limits, valid_weight: int = 3) -> list[Kind]:
    """Valid requests over every protocol path (short clips, plus one of 5 windows with segments)
    and invalid ones of each class, each with the status it must get."""
    wav = encode(clip(3.0), RATE, "WAV", "PCM_16")
    flac = encode(clip(3.0, freq=880, seed=1), RATE, "FLAC", "PCM_16")
    stereo_44k = encode(clip(3.0, 44100, 330, channels=2, seed=2), 44100, "WAV", "PCM_16")
    waveform = clip(1.5, 22050, 550, seed=3)
    long_flac = encode(clip(25.0, freq=660, seed=4), RATE, "FLAC", "PCM_16")
    clips = [encode(clip(2.0, freq=200 + 100 * i, seed=10 + i), RATE, "WAV", "PCM_16") for i in range(3)]
    too_long = encode(np.zeros(round((limits.max_audio_seconds + 5) * RATE), np.float32), RATE, "FLAC", "PCM_16")
    w = valid_weight
    return [
        Kind("v1-raw-wav", V1, wav, {"Content-Type": "audio/wav"}, 200, w),
        json_kind("v1-json-b64", V1, {"instances": [{"b64": b64(flac)}],
                                      "parameters": {"top_k": 3, "function_to_apply": "softmax"}}, 200, w),
        json_kind("v2-json-bytes", V2, {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                                    "data": [b64(stereo_44k)]}]}, 200, w),
        v2_binary("v2-binary-bytes", wav, w),
        json_kind("v2-waveform-fp32", V2, {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, len(waveform)],
                                                       "data": waveform.tolist(), "parameters": {"sampling_rate": 22050}}]},
                  200, w),
        json_kind("v2-multi-clip", V2, {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [len(clips)],
                                                    "data": [b64(c) for c in clips]}], "parameters": {"top_k": 2}}, 200, w),
        json_kind("v1-long-segments", V1, {"instances": [{"b64": b64(long_flac)}],
                                           "parameters": {"hop_seconds": 5, "return_segments": True, "top_k": 2}}, 200, w),
        Kind("bad-not-audio", V1, b"<html>not audio</html>", {"Content-Type": "audio/wav"}, 400),
        Kind("bad-malformed-json", V1, b'{"instances": [{"b64": ', {"Content-Type": "application/json"}, 400),
        json_kind("bad-unknown-parameter", V1, {"instances": [{"b64": b64(wav)}], "parameters": {"temperature": 2}}, 400),
        json_kind("bad-too-many-clips", V1, {"instances": [{"b64": b64(wav)}] * (limits.max_clips_per_request + 1)}, 400),
        json_kind("bad-clip-too-long", V1, {"instances": [{"b64": b64(too_long)}]}, 400),
        json_kind("bad-v2-shape", V2, {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [3],
                                                   "data": [b64(wav)]}]}, 400),
        json_kind("bad-v2-schema", V2, {"id": 5, "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                                             "data": [b64(wav)]}]}, 422),
        Kind("bad-body-too-large", V1, b"\0" * round((limits.max_request_mb + 1) * 2**20), {"Content-Type": "audio/wav"}, 413),
    ]


def ten_second_kinds() -> list[Kind]:
    """One 10 s clip (one window), as a V1 raw WAV body and as V2 JSON: the overload run's requests."""
    wav = encode(clip(10.0), RATE, "WAV", "PCM_16")
    return [Kind("v1-raw-wav-10s", V1, wav, {"Content-Type": "audio/wav"}, 200),
            json_kind("v2-json-bytes-10s", V2, {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                                            "data": [b64(wav)]}]}, 200)]


# ---- sending and checking -----------------------------------------------------------------


@dataclass
class Sample:
    kind: str
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency_s: float
    problem: Optional[str] = None  # None: the answer is what it must be
    lag_s: float = 0.0  # open loop: how late the request left after its scheduled time
    retry_after: Optional[str] = None  # the Retry-After header, if any


def send(session: requests.Session, url: str, kind: Kind, reference: Any, also_allowed: Sequence[int] = (),
         timeout: float = 300.0) -> Sample:
    start = time.perf_counter()
    try:
        response = session.post(url + kind.path, data=kind.body, headers=kind.headers, timeout=timeout)
    except requests.RequestException as exc:
        return Sample(kind.name, 0, time.perf_counter() - start, f"no answer: {exc!r}")
    latency = time.perf_counter() - start
    return Sample(kind.name, response.status_code, latency, answer_problem(kind, response, reference, also_allowed),
                  retry_after=response.headers.get("Retry-After"))


def answer_problem(kind: Kind, response: requests.Response, reference: Any, also_allowed: Sequence[int]) -> Optional[str]:
    """What is wrong with the answer, or None: the expected status (or one of `also_allowed`), a JSON
    body, the reference answer for a 200, an error message otherwise, Retry-After on a 503."""
    status = response.status_code
    if status != kind.status and status not in also_allowed:
        return f"status {status}, expected {kind.status}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"status {status} with a body that is not JSON: {response.text[:300]!r}"
    if status == 200:
        return different(body, reference, ignore=("id",))
    if status == 503:
        retry_after = response.headers.get("Retry-After", "")
        if not (retry_after.isdigit() and int(retry_after) >= 1):
            return f"503 without a Retry-After of whole seconds (got {retry_after!r})"
    if not isinstance(body, dict) or not (body.get("error") or body.get("detail")):
        return f"status {status} without an error message: {response.text[:300]}"
    return None


def different(actual: Any, reference: Any, path: str = "$", ignore: Sequence[str] = ()) -> Optional[str]:
    """Where `actual` differs from `reference`: strings and structure exactly, numbers within TOLERANCE.
    `ignore`: top-level keys left out (a V2 answer's `id` is new on every request)."""
    if isinstance(reference, dict):
        if not isinstance(actual, dict) or set(actual) - set(ignore) != set(reference) - set(ignore):
            return f"{path}: keys {sorted(actual) if isinstance(actual, dict) else type(actual).__name__}, " \
                   f"expected {sorted(reference)}"
        return next((d for key in reference if key not in ignore
                     if (d := different(actual[key], reference[key], f"{path}.{key}"))), None)
    if isinstance(reference, list):
        if not isinstance(actual, list) or len(actual) != len(reference):
            return f"{path}: {actual!r:.200}, expected {len(reference)} items"
        return next((d for i, (a, r) in enumerate(zip(actual, reference)) if (d := different(a, r, f"{path}[{i}]"))), None)
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if isinstance(actual, (int, float)) and not isinstance(actual, bool) and abs(actual - reference) <= TOLERANCE:
            return None
        return f"{path}: {actual!r}, expected {reference!r} (within {TOLERANCE:g})"
    return None if actual == reference else f"{path}: {actual!r:.200}, expected {reference!r:.200}"


def fetch_references(url: str, kinds: Sequence[Kind]) -> dict[str, Any]:
    """Each valid kind's answer, one request at a time on an idle server: what it must answer under load."""
    references = {}
    with requests.Session() as session:
        for kind in kinds:
            if kind.status == 200:
                response = session.post(url + kind.path, data=kind.body, headers=kind.headers, timeout=300)
                if response.status_code != 200:
                    raise RuntimeError(f"reference request {kind.name}: {response.status_code} {response.text[:500]}")
                references[kind.name] = response.json()
    return references


# ---- load ---------------------------------------------------------------------------------


def closed_loop(url: str, kinds: Sequence[Kind], references: dict, users: int, duration_s: Optional[float] = None,
                total: Optional[int] = None, seed: int = 0) -> tuple[list[Sample], float]:
    """`users` threads, each sending a request drawn by weight as soon as its last is answered, until
    `duration_s` has passed or `total` requests have been sent. Returns the samples and the wall time."""
    deadline = time.monotonic() + duration_s if duration_s is not None else math.inf
    tickets = itertools.count()  # next() on it is atomic under the GIL
    samples: list[Sample] = []
    weights = [kind.weight for kind in kinds]

    first_round, lock = list(kinds), threading.Lock()  # every kind once first, however short the run

    def user(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        with requests.Session() as session:
            while time.monotonic() < deadline and (total is None or next(tickets) < total):
                with lock:
                    kind = first_round.pop() if first_round else rng.choices(kinds, weights)[0]
                samples.append(send(session, url, kind, references.get(kind.name)))

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,), name=f"user-{i}") for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples, time.perf_counter() - start


def open_loop(url: str, kinds: Sequence[Kind], references: dict, rate: float, duration_s: float,
              also_allowed: Sequence[int] = (503,)) -> tuple[list[Sample], float]:
    """Requests leave every 1/`rate` s for `duration_s` (kinds in turn), whether or not earlier ones
    were answered: what clients do to a server that cannot keep up. Each sample records how late it
    left (`lag_s`); a large lag would mean the generator, not the server, set the pace."""
    count = max(1, round(rate * duration_s))
    local = threading.local()
    samples: list[Sample] = []

    def one(kind: Kind, due: float) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        lag = time.perf_counter() - due
        sample = send(local.session, url, kind, references.get(kind.name), also_allowed)
        sample.lag_s = lag
        samples.append(sample)

    # Enough threads for every request in flight: admitted ones wait for the queue, refused ones are quick.
    with ThreadPoolExecutor(max_workers=max(32, math.ceil(rate * 30)), thread_name_prefix="arrival") as pool:
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(one, kinds[i % len(kinds)], due)
    return samples, time.perf_counter() - start


class LivenessPoller:
    """GET /v2/health/live every LIVENESS_INTERVAL_S on a new connection each time, as the kubelet probes."""

    def __init__(self, url: str, interval_s: float = LIVENESS_INTERVAL_S, timeout_s: float = 5.0):
        self.url, self.interval_s, self.timeout_s = url, interval_s, timeout_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def __enter__(self) -> "LivenessPoller":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.perf_counter()
        while not self._stop.wait(max(0.0, due - time.perf_counter())):
            due += self.interval_s
            start = time.perf_counter()
            try:
                response = requests.get(f"{self.url}/v2/health/live", timeout=self.timeout_s, headers={"Connection": "close"})
                if response.status_code != 200:
                    self.failures.append(f"status {response.status_code}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - start)

    def summary(self) -> dict:
        return {"interval_s": self.interval_s, "polls": len(self.latencies), "failures": len(self.failures),
                "failure_examples": self.failures[:5], **latency_stats(self.latencies)}

    def criteria(self) -> list[Criterion]:
        worst = max(self.latencies, default=math.nan)
        return [criterion("liveness polled and never failed", bool(self.latencies) and not self.failures,
                          f"{len(self.latencies)} polls, {len(self.failures)} failed {self.failures[:3]}"),
                criterion(f"liveness always answered within {LIVENESS_BAR_S:g} s", worst < LIVENESS_BAR_S,
                          f"slowest {worst * 1000:.1f} ms")]


# ---- the server process -------------------------------------------------------------------


def process_usage(pid: int) -> dict[str, int]:
    """The process's resident memory (VmRSS, and its peak VmHWM), open fds and threads, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kib": int(status["VmRSS"].split()[0]), "peak_rss_kib": int(status["VmHWM"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task"))}


def settled_usage(pid: int, reads: int = 4, interval_s: float = 0.25, timeout_s: float = 10.0) -> dict[str, int]:
    """`process_usage` once fds and threads have held still for `reads` reads (sockets the clients
    just closed take a moment to be closed on the server's side too)."""
    deadline = time.monotonic() + timeout_s
    history = [process_usage(pid)]
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        history.append(process_usage(pid))
        last = history[-reads:]
        if len(last) == reads and len({(u["fds"], u["threads"]) for u in last}) == 1:
            break
    return history[-1]


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait; guest is in user


class CpuShare:
    """Cores used during a run: the machine's, the server's, this load generator's, and the rest,
    i.e. other jobs on a shared machine, which slow the server and so every throughput figure."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def _read(self) -> tuple[float, ...]:
        return time.monotonic(), machine_busy_s(), process_cpu_s(self.pid), process_cpu_s(os.getpid())

    def __enter__(self) -> "CpuShare":
        self.start = self._read()
        return self

    def __exit__(self, *_: object) -> None:
        self.end = self._read()

    def summary(self) -> dict:
        wall, machine, server, generator = (b - a for a, b in zip(self.start, self.end))
        cores = {"machine_cores": machine / wall, "server_cores": server / wall, "generator_cores": generator / wall}
        return {**cores, "other_processes_cores": max(0.0, (machine - server - generator) / wall), "cpus": os.cpu_count()}


def format_cpu_share(share: dict) -> str:
    text = (f"cores busy {share['machine_cores']:.2f} of {share['cpus']}: server {share['server_cores']:.2f}, "
            f"load generator {share['generator_cores']:.2f}, other processes {share['other_processes_cores']:.2f}")
    if share["other_processes_cores"] > 0.2:
        text += " (a shared machine: throughput and latency here are not the server's alone)"
    return text


# ---- statistics and results ---------------------------------------------------------------


def latency_stats(latencies: Sequence[float]) -> dict:
    if not latencies:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"count": len(latencies), "p50_ms": 1000 * p50, "p99_ms": 1000 * p99, "max_ms": 1000 * max(latencies)}


def summarize(samples: Sequence[Sample], wall_s: float) -> dict:
    """Throughput, latency, counts per status and per kind, and the problems found (with examples)."""
    by_kind: dict[str, list[Sample]] = {}
    for sample in samples:
        by_kind.setdefault(sample.kind, []).append(sample)
    problems = [s for s in samples if s.problem]
    return {
        "requests": len(samples), "wall_s": wall_s, "throughput_rps": len(samples) / wall_s if wall_s else math.nan,
        "latency": latency_stats([s.latency_s for s in samples]),
        "by_status": status_counts(samples),
        "by_kind": {kind: {"by_status": status_counts(group), **latency_stats([s.latency_s for s in group])}
                    for kind, group in sorted(by_kind.items())},
        "problems": len(problems),
        "problem_examples": [asdict(s) for s in problems[:10]],
    }


def status_counts(samples: Sequence[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(str(s.status) for s in samples).items()))


def answer_criteria(samples: Sequence[Sample], kinds: Sequence[Kind]) -> list[Criterion]:
    problems = [s for s in samples if s.problem]
    unsent = sorted({k.name for k in kinds} - {s.kind for s in samples})
    return [criterion("every request got its expected status and a right answer (no connection errors)", not problems,
                      f"{len(problems)} of {len(samples)} wrong; first: {problems[0].kind}: {problems[0].problem}"
                      if problems else f"{len(samples)} requests"),
            criterion("every kind of request was sent", not unsent, f"never sent: {unsent}" if unsent else f"{len(kinds)} kinds")]


def criterion(name: str, passed: bool, detail: str = "") -> Criterion:
    return {"name": name, "passed": bool(passed), "detail": detail}


def failed(criteria: Sequence[Criterion]) -> list[Criterion]:
    return [c for c in criteria if not c["passed"]]


def environment() -> dict:
    """The machine as bench.py records it, and the code measured (commit, and files changed since)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_model(), "cpus": cpu_limit(),
            "node_cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "git_commit": git("rev-parse", "HEAD"), "git_changed_files": git("status", "--porcelain").splitlines()}


def write_results(prefix: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{prefix}-{result['environment']['time'].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def print_criteria(criteria: Sequence[Criterion]) -> None:
    for c in criteria:
        print(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}")


def format_latency(stats: dict) -> str:
    if not stats["count"]:
        return "none"
    return f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, max {stats['max_ms']:.1f} ms (n={stats['count']})"
