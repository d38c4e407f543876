"""`python -m predictor` on loopback ports, waited for until ready: the one way the tests, the
benchmarks and the tools start the real server, so that each goes through the same command line,
the same readiness check (`/v2/models/NAME/ready`) and the same stop (SIGTERM, as the kubelet sends).
"""

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from predictor.names import MODEL_NAME

REPO = Path(__file__).resolve().parent.parent
WORKER_PORTS_FROM, WORKER_PORTS, WORKER_BLOCKS = 20000, 500, 25  # per pytest-xdist worker, below 32768
_worker_turn = itertools.count()


def free_port() -> int:
    """A port nothing holds now. The kernel's pick (port 0) may be handed to another process again
    before the server binds it, and gRPC binds with SO_REUSEPORT, so two servers could share a port
    unnoticed; so each pytest-xdist worker takes its own block of ports below the kernel's ephemeral
    range, in turn, and skips those still held."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    first = WORKER_PORTS_FROM + int(worker[2:]) % WORKER_BLOCKS * WORKER_PORTS
    for _ in range(WORKER_PORTS):
        port = first + next(_worker_turn) % WORKER_PORTS
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # where the server binds
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + WORKER_PORTS - 1}")


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path
    model_name: str = MODEL_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.model_name}:predict"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def samples(self) -> Counter:
        """Every sample on /metrics (prometheus_client's parser), keyed by its name and labels."""
        found: Counter = Counter()
        for family in text_string_to_metric_families(requests.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
        return found

    @property
    def precision(self) -> str:
        """The precision a server of one model resolved (`--precision auto` by default), from `ast_engine_info`."""
        info = [dict(labels)["precision"] for name, labels in self.samples() if name == "ast_engine_info"]
        if len(info) != 1:
            raise RuntimeError(f"/metrics has {len(info)} ast_engine_info series")
        return info[0]

    @property
    def roles(self) -> dict[int, str]:
        """Each of its processes and its role, from the supervisor's start line under `--frontends`
        (supervisor, model, frontend); one process ("server") without."""
        started = re.search(r"Serving with \d+ frontend processes \(pids ([\d, ]+)\) and the model's process "
                            r"\(pid (\d+)\)", self.log.read_text())
        if not started:
            return {self.process.pid: "server"}
        return {self.process.pid: "supervisor", int(started[2]): "model",
                **{int(pid): "frontend" for pid in started[1].split(",")}}

    def is_ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/v2/models/{self.model_name}/ready", timeout=2).status_code == 200
        except requests.RequestException:  # not listening yet, or too busy loading to answer in time
            return False


def process_cpu_s(pid: int, main_thread_only: bool = False) -> float:
    """CPU seconds process `pid` has used (user and system), from /proc: all its threads, or its main one."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat").read_text()
    fields = fields.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model_dir: Path, log: Path, extra_args: Sequence[str] = (), env: Optional[dict] = None,
                 model_name: str = MODEL_NAME, timeout: float = 180, http_port: Optional[int] = None,
                 grpc_port: Optional[int] = None) -> Server:
    """The server on free ports (or those given), its output in `log`, once it answers ready;
    `RuntimeError` with the log's end if it exits or is not ready in time."""
    http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    command = [sys.executable, "-m", "predictor", "--model_dir", str(model_dir), "--model_name", model_name,
               "--http_port", str(http_port), "--grpc_port", str(grpc_port), *extra_args]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(process, http_port, grpc_port, log, model_name)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            if server.is_ready():
                return server
            time.sleep(0.1)  # time to ready is measured through this (benchmarks/bench.py)
        raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
    except BaseException:  # not ready in time, or the caller stopped while waiting (SIGTERM, Ctrl-C): no orphan
        stop_server(server)
        raise


def unwind_on_sigterm() -> None:
    """SIGTERM (`timeout`'s, ahead of a lent machine's own limit, which kills outright) ends this
    process by SystemExit, so that its `finally` blocks run: the servers it started stop, their logs
    are kept, its temporary folders go."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop_server(server: Server, timeout: float = 30) -> None:
    """SIGTERM, as the kubelet sends; a server not stopped after `timeout` s gets SIGKILL, with every
    process it started (under --frontends, the supervisor killed alone would leave the model's
    process holding its memory). Servers stay in their caller's process group, so that a signal to
    the group (`timeout`'s, a terminal's Ctrl-C) reaches them however the caller ends."""
    server.process.terminate()
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            started = psutil.Process(server.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # it ended just now
            started = []
        for process in [server.process, *started]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
        server.process.wait()


@contextlib.contextmanager
def serving(model_dir: Path, log: Path, extra_args: Sequence[str] = (), **options) -> Iterator[Server]:
    """`start_server` for the length of a `with` block."""
    server = start_server(model_dir, log, extra_args, **options)
    try:
        yield server
    finally:
        stop_server(server)
