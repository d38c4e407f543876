"""`make gpu-check` where torch sees no GPU (CI, and most of our machines): it says so and passes;
its rehearsal on the CPU runs every step of the GPU's run; the bench clients it sends load with."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.clients import Load, timed_clients
from benchmarks.gpu import gpu_memory_mib
from predictor.config import GPU_BATCH
from tools.local_server import Server

from .conftest import REPO, assert_every_logger_ended, metric


def scratch(tmp_path: Path) -> Path:
    """A temporary directory of the run's own (TMPDIR), to find what it leaves there."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    return temp


def ours(temp: Path) -> list[Path]:
    """What the run and its servers left in the temporary directory (torch keeps a cache folder of its
    own there, created as some of its modules are imported)."""
    return [path for path in temp.iterdir() if path.name.startswith("ast-")]


def on_device(run: str, out: Path, temp: Path) -> subprocess.CompletedProcess:
    """`tools/on_device.sh`, the command a lent GPU machine runs, rehearsed on the CPU: this Python
    has the packages, so no wheels are installed (and none that an earlier run left are imported)."""
    site = temp / "site"
    return subprocess.run(["bash", "tools/on_device.sh", run, "--rehearse"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(temp),
                                            "AST_DEVICE_SITE": str(site)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: run make gpu-check itself")
def test_gpu_check_says_there_is_no_gpu_and_passes():
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"gpu-check: torch {torch.__version__} (" in done.stdout and "sees no GPU here; nothing to check" in done.stdout


@pytest.mark.rehearsal
def test_gpu_check_rehearses_its_whole_run_on_the_cpu(tmp_path):
    """A session has minutes of a GPU: every server of the run starts, every check and bench step
    answers, and the results and logs are written, before a GPU is ever lent; through the command
    that machine runs."""
    temp = scratch(tmp_path)
    done = on_device("check", tmp_path, temp)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not ours(temp), "the model and engine files are left behind"
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    assert results["device"].startswith("rehearsal on the CPU") and results["complete"] is True, results
    checks = [check["check"] for check in results["checks"] if check["passed"]]
    assert len(checks) == len(results["checks"]) == 7 and "10-minute recording: same windows and top labels" in checks
    assert "rollout map (the model's process, on the GPU) vs the CPU's" in checks
    assert set(results["model_alone_clips_per_s"]) == {f"{p} batch {GPU_BATCH}" for p in ("fp32", "bf16")}, results
    bench = results["bench"]
    answered = [bench[name] for name in ("single_clips_per_s", "half_load_clips_per_s", "multi_clips_per_s")]
    assert min(answered) > 0 and bench["one_process"]["single_clips_per_s"] > 0 and bench["failed"] == 0, bench
    assert bench["ready_s"] > 0 and bench["rollout_ms"] > 0, bench  # recorded: the 20 s is a GPU's target
    assert sorted(log.name for log in tmp_path.glob("*.log")) == ["cpu.log", "default.log", "gpu.log", "one-process.log"]


@pytest.mark.rehearsal
def test_gpu_check_stopped_by_sigterm_stops_its_servers_and_keeps_their_logs(tmp_path):
    """`timeout` ends a run ahead of a lent machine's own limit (which kills outright), here with
    one server serving and the next starting: what the servers logged until then comes back, the
    results so far are marked incomplete, and no server or file of theirs is left behind."""
    temp = scratch(tmp_path)
    run = subprocess.Popen([sys.executable, "-m", "tools.gpu_check", "--rehearse", "--out", str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(temp)})
    assert run.stdout.readline().startswith("rehearsal on the CPU")
    deadline = time.monotonic() + 300
    while not list(temp.glob("*/gpu.log")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the CPU's server is serving, the GPU's (rehearsed) is being started
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    assert (tmp_path / "cpu.log").stat().st_size > 0 and (tmp_path / "gpu.log").exists()
    partial = tmp_path / "gpu-check.json"  # what was checked before the stop, if anything was
    assert not partial.exists() or json.loads(partial.read_text())["complete"] is False
    assert_every_logger_ended("".join(log.read_text() for log in tmp_path.glob("*.log")))  # every server until then
    assert not serving_from(temp), "a server started from the run's model is still running"
    assert not ours(temp), "the model and engine files are left behind"


def serving_from(folder: Path) -> list[str]:
    """The command lines of the processes running with a path under `folder` in theirs (a server
    just started has logged no pid yet)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if str(folder) in command:
            found.append(command)
    return found


@pytest.mark.rehearsal
def test_the_gpu_bench_section_rehearses_on_the_cpu(tmp_path):
    """The bench's GPU section (a second call on a lent machine) goes through on the CPU: the pipeline
    peer, the model alone, the server over both protocols and every load, a results file."""
    temp = scratch(tmp_path)
    done = on_device("bench", tmp_path, temp)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not ours(temp), "the model and engine files are left behind"
    assert "Engine ready" in (tmp_path / "server-gpu.log").read_text()
    [written] = tmp_path.glob("*.json")
    rows = json.loads(written.read_text())["rows"]
    sections = [row["section"] for row in rows]
    assert [sections.count(s) for s in ("gpu peer", "gpu model alone", "gpu precision")] == [3, 4, 2], rows
    assert all(row["value"] > 0 for row in rows if row["section"] in ("gpu peer", "gpu model alone")), rows
    assert all(row["value"] >= 0.999 for row in rows if row["section"] == "gpu precision"), rows
    served = [row for row in rows if row["section"] == "gpu server" and "failed" in row["extra"]]
    assert len(served) == 8 and all(row["value"] > 0 and row["extra"]["failed"] == 0 for row in served), served


def test_the_gpu_memory_a_server_holds_is_its_processes_as_nvidia_smi_lists_them(tmp_path, monkeypatch):
    """With frontends, the model's process holds the GPU, not the one started: the memory reported is
    that of every process of the server that nvidia-smi lists (here a stand-in nvidia-smi, as a
    container shows it, with another process's too); none listed, the GPU's whole use, said so."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    smi = bin_ / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in --query-compute-apps*) printf "%s" "$APPS";; *) echo 9000;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    log = tmp_path / "server.log"
    log.write_text("Serving with 2 frontend processes (pids 11, 12) and the model's process (pid 13)\n")
    started = subprocess.Popen(["true"])
    started.wait()
    server = Server(started, 0, 0, log)
    monkeypatch.setenv("APPS", "13, 2000\n99, 7000\n")
    assert gpu_memory_mib(server) == "2000"
    monkeypatch.setenv("APPS", f"{started.pid}, 500\n13, 2000\n")
    assert gpu_memory_mib(server) == "2500"
    monkeypatch.setenv("APPS", "99, 7000\n")
    assert gpu_memory_mib(server) == "9000 (all processes)"
    monkeypatch.setenv("APPS", "13, [N/A]\n")  # as some MIG and vGPU set-ups list it
    assert gpu_memory_mib(server) == "9000 (all processes)"


def test_the_bench_clients_in_several_processes_count_what_the_server_answered(server, speech_wav):
    """The load `make gpu-check` and the GPU bench send (benchmarks/clients.py), short, on the CPU."""
    before = metric(server, "ast_clips_total")
    result = timed_clients(Load("v2", server.url, (speech_wav,), concurrency=4, seconds=2.0), processes=2)
    answered = metric(server, "ast_clips_total") - before
    assert result["failed"] == 0 and result["client_processes"] == 2, result
    # answers that came after the window closed are the server's, not the window's
    assert 0 < result["requests"] <= answered and result["p50_ms"] <= result["p99_ms"], (result, answered)


def test_open_loop_sends_on_its_schedule_whatever_the_answers(server, speech_wav):
    """Open loop (the latency at half load): 10 requests a second for 2 s from 4 clients in 2
    processes is 20 requests, however fast the server answers; a closed loop would send hundreds."""
    before = metric(server, "ast_clips_total")
    load = Load("v2", server.url, (speech_wav,), concurrency=4, seconds=2.0, rate=10.0)
    result = timed_clients(load, processes=2)
    answered = metric(server, "ast_clips_total") - before
    assert result["failed"] == 0 and result["offered_per_s"] == 10.0, result
    assert 0 < result["requests"] <= answered <= load.rate * load.seconds, (result, answered)
    assert result["p50_ms"] <= result["p99_ms"], result
