"""`--frontends N`: N processes take requests and feed one model process (`predictor.frontends`,
`predictor.ipc`). The server answers as one process does, over HTTP and gRPC, with every process's
metrics added up; a request that goes away is not computed; admission sees every frontend's
windows; SIGTERM drains, and a process that dies ends the server."""

import asyncio
import base64
import os
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import torch

from predictor.admission import Backlog
from predictor.batching import WindowQueue
from predictor.config import Config
from predictor.errors import Overloaded
from predictor.ipc import ModelService, RemoteQueue
from predictor.queue_state import QueueState

from .conftest import (TEST_SERVER_ENV, assert_every_logger_ended, assert_same_predictions, encode, expected, metric,
                       peak_rss_bytes, start_server, stop_server, tone)
from .test_batching import Passes, Recording, job, logits_of
from .test_grpc import kserve_grpc_infer, outputs_of

RATE = 16000
FRONTENDS = 2


HUB_ID = "test-org/tiny-ast"


@pytest.fixture(scope="module")
def fronted(tiny_model_dir, tmp_path_factory):
    """With `--backend auto` and a cache of its own: the model's process exports and times the
    engines in child processes at start, whose metrics must not join the server's. The model is a
    hub id, from a hub cache as `from_pretrained` leaves one (offline, as everywhere here)."""
    directory = tmp_path_factory.mktemp("frontends")
    snapshot = directory / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    server = start_server(HUB_ID, directory / "server.log", ("--frontends", str(FRONTENDS), "--backend", "auto",
                          "--onnx_cache_dir", str(directory / "cache")),
                          env={**TEST_SERVER_ENV, "HF_HUB_CACHE": str(directory / "hub"), "HF_HUB_OFFLINE": "1"})
    yield server
    stop_server(server)


def test_only_the_models_process_loads_a_hub_ids_weights(fronted):
    """A frontend runs no engine: it reads the config and feature extractor alone, where each once
    loaded the torch model too (a copy of the weights per frontend at every start)."""
    loads = [int(line.split()[2]) for line in fronted.log.read_text().splitlines()
             if f"Loading the torch model from {HUB_ID}" in line]
    [model] = [pid for pid, role in fronted.roles.items() if role == "model"]
    assert model in loads and not set(loads) & set(frontends_of(fronted)), (loads, fronted.roles)


def frontends_of(server) -> list[int]:
    frontends = [pid for pid, role in server.roles.items() if role == "frontend"]
    assert len(frontends) == FRONTENDS, server.roles
    return frontends


@contextmanager
def alone(server, frontend: int) -> Iterator[None]:
    """Only `frontend` accepts connections on the shared port meanwhile: the others are stopped."""
    others = [pid for pid in frontends_of(server) if pid != frontend]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def answered_by(server) -> Counter:
    """HTTP requests answered by each process (pid), from uvicorn's access lines (they carry the pid)."""
    return Counter(int(line.split()[5]) for line in server.log.read_text().splitlines() if "uvicorn.access" in line)


def test_answers_as_one_process_does_over_http_and_grpc(fronted, tiny_pipeline, speech_16k):
    from kserve import InferInput

    clips = [speech_16k, tone(2000, 1.0, RATE), tone(300, 25.0, RATE)]  # the last one is three windows
    for clip in clips:
        reference = expected(tiny_pipeline, clip, 5, "softmax") if len(clip) <= 10.24 * RATE else None
        answers = [requests.post(fronted.predict_url, data=encode(clip, RATE, "WAV", "PCM_16"), timeout=60).json()
                   ["predictions"][0] for _ in range(2 * FRONTENDS)]  # each on a connection of its own
        tensor = InferInput(name="audio", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([encode(clip, RATE, "WAV", "PCM_16")], dtype=np.object_))
        answers.append(outputs_of(kserve_grpc_infer(fronted, tensor))[0])
        for answer in answers:
            assert_same_predictions(answer, reference or answers[0])


def test_overlapping_windows_cross_once_and_answer_as_one_process_does(fronted, server):
    """At a 0.15 s hop, a 30 s clip is 200 windows of 10.24 s over 1.9 MB of samples: they cross to
    the model's process as that waveform, once (they once crossed window by window, 131 MB, copied
    several times on the way), and its segments are one process's."""
    clip = encode(tone(300, 30.0, RATE), RATE, "WAV", "FLOAT")
    body = {"instances": [{"b64": base64.b64encode(clip).decode()}],
            "parameters": {"hop_seconds": 0.15, "return_segments": True, "top_k": 3}}
    processes = [pid for pid, role in fronted.roles.items() if role != "supervisor"]
    before = {pid: peak_rss_bytes(pid) for pid in processes}
    answer = requests.post(fronted.predict_url, json=body, timeout=120)
    grown = {f"{fronted.roles[pid]} {pid}": (peak_rss_bytes(pid) - peak) / 2**20 for pid, peak in before.items()}
    reference = requests.post(server.predict_url, json=body, timeout=120)
    assert answer.status_code == reference.status_code == 200, answer.text
    segments, expected_segments = answer.json()["predictions"][0]["segments"], reference.json()["predictions"][0]["segments"]
    assert len(segments) == len(expected_segments) == 200
    for segment, expected_segment in zip(segments, expected_segments):
        assert (segment["start"], segment["end"]) == (expected_segment["start"], expected_segment["end"])
        assert_same_predictions(segment["labels"], expected_segment["labels"])
    assert max(grown.values()) < 64, f"peak memory grown, MiB: {grown}"


def test_every_frontend_takes_connections_on_the_shared_http_port(fronted):
    """The port is one socket, accepted from by whichever frontend is first: which one that is, is
    the scheduler's call (a busy machine may favour one for a while). So each frontend in turn is
    left alone to accept, the others stopped (SIGSTOP), and must answer."""
    clip = encode(tone(440, 1.0, RATE), RATE, "WAV", "PCM_16")
    for frontend in frontends_of(fronted):
        before = answered_by(fronted)[frontend]
        with alone(fronted, frontend):
            response = requests.post(fronted.predict_url, data=clip, timeout=60)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 10  # its access line may follow the answer by a moment
        while answered_by(fronted)[frontend] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered_by(fronted)[frontend] == before + 1, (frontend, answered_by(fronted))


def test_no_frontend_unloads_the_model(fronted):
    """Each frontend refuses the V2 repository API's unload as one process does: it would leave
    that frontend never ready again (and the others serving)."""
    for frontend in frontends_of(fronted):
        with alone(fronted, frontend):
            unload = requests.post(f"{fronted.url}/v2/repository/models/ast/unload", timeout=30)
            ready = requests.get(f"{fronted.url}/v2/health/ready", timeout=30)
        assert unload.status_code == 400 and "cannot be unloaded" in unload.text, (frontend, unload.text)
        assert ready.status_code == 200, (frontend, ready.text)


def test_embeddings_come_through_the_channel(fronted, pooler_output, speech_16k):
    """Each window's row crosses from the model's process whole: its logits and its embedding."""
    body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"return_embedding": True}}
    for _ in range(FRONTENDS):
        response = requests.post(fronted.predict_url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["predictions"][0]["embedding"], pooler_output(speech_16k),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["occlusion", "rollout"])
def test_explanations_come_through_the_channel(fronted, server, method):
    """An explanation's masked copies share their window's samples (sent once) and each carries its
    cell; a rollout is computed by the model's process, which holds the one encoder with eager
    attention (asked of each frontend alone): the maps are those the one-process server draws."""
    clip = np.concatenate([np.zeros(RATE, np.float32), tone(880, 2.0, RATE)])
    body = {"instances": [{"b64": base64.b64encode(encode(clip, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"top_k": 2, "explain_method": method}}
    theirs = requests.post(f"{server.url}/v1/models/ast:explain", json=body, timeout=60)
    assert theirs.status_code == 200, theirs.text
    for frontend in frontends_of(fronted):
        with alone(fronted, frontend):
            ours = requests.post(f"{fronted.url}/v1/models/ast:explain", json=body, timeout=60)
        assert ours.status_code == 200, ours.text
        np.testing.assert_allclose(*([e["relevance"] for e in a.json()["explanations"][0]] for a in (ours, theirs)),
                                   atol=1e-4, rtol=0)
    assert np.abs([e["relevance"] for e in theirs.json()["explanations"][0]]).max() > 0
    if method == "rollout":
        assert fronted.log.read_text().count("Loading the encoder with eager attention") == 1


def test_metrics_add_every_process_up(fronted, speech_16k):
    clips_before, windows_before = metric(fronted, "ast_clips_total"), metric(fronted, "ast_windows_total")
    sent = 4 * FRONTENDS
    for _ in range(sent):
        requests.post(fronted.predict_url, data=encode(speech_16k, RATE, "WAV", "PCM_16"), timeout=60).raise_for_status()
    assert metric(fronted, "ast_clips_total") - clips_before == sent  # counted in the frontends
    assert metric(fronted, "ast_windows_total") - windows_before == sent  # counted in the model's process
    text = requests.get(f"{fronted.url}/metrics", timeout=10).text
    assert fronted.precision == "fp32"  # one ast_engine_info, the model process's, none of its children's
    assert "ast_queue_wait_seconds 0.0" in text and "ast_queued_windows 0.0" in text


def test_sigterm_drains_the_frontends_then_stops(tiny_model_dir, tmp_path):
    """In-flight requests finish, new connections are refused, every process ends, exit 0."""
    server = start_server(tiny_model_dir, tmp_path / "server.log", ("--frontends", str(FRONTENDS),
                          "--max_batch_wait_ms", "500"), env=TEST_SERVER_ENV)
    children = child_pids(server.process.pid)
    long_clip = encode(tone(440, 28.0, RATE), RATE, "WAV", "PCM_16")
    with ThreadPoolExecutor(2) as pool:
        inflight = [pool.submit(requests.post, server.predict_url, data=long_clip, timeout=60) for _ in range(2)]
        time.sleep(0.3)  # the requests are in (the pass waits up to 0.5 s for company)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0
        assert [f.result().status_code for f in inflight] == [200, 200]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/health/live", timeout=5)
    assert_outlived_by_none(children)
    stop_server(server)


@pytest.mark.parametrize("role, name", [("frontend", "ast-frontend"), ("model", "ast-model")])
def test_a_process_that_dies_ends_the_server(tiny_model_dir, tmp_path, role, name):
    server = start_server(tiny_model_dir, tmp_path / "server.log", ("--frontends", str(FRONTENDS)),
                          env=TEST_SERVER_ENV)
    children = child_pids(server.process.pid)
    os.kill(next(pid for pid, its_role in server.roles.items() if its_role == role), signal.SIGKILL)
    assert server.process.wait(timeout=40) == 1
    assert name in server.log.read_text().split("stopping the server")[0].splitlines()[-1]
    assert_outlived_by_none(children)
    stop_server(server)


def test_a_server_that_does_not_stop_is_killed_with_every_process_it_started(tiny_model_dir, tmp_path):
    """The harness's stop (tests, benchmarks, gpu-check): a supervisor that does not end on SIGTERM
    (stopped here) is killed with the model's and the frontends' processes, not alone, which would
    leave them running and holding their memory."""
    server = start_server(tiny_model_dir, tmp_path / "server.log", ("--frontends", str(FRONTENDS)),
                          env=TEST_SERVER_ENV)
    children = child_pids(server.process.pid)
    assert set(server.roles.values()) == {"supervisor", "model", "frontend"}
    os.kill(server.process.pid, signal.SIGSTOP)
    stop_server(server, timeout=1)
    assert server.process.returncode == -signal.SIGKILL
    assert_outlived_by_none(children)


def test_a_taken_http_port_ends_the_server_and_its_model_process(tiny_model_dir, tmp_path):
    """The supervisor binds the HTTP port once the model's process is ready: taken, the server says
    so and exits 1, the model's process with it, rather than waiting on it forever."""
    with socket.create_server(("0.0.0.0", 0)) as taken:
        with pytest.raises(RuntimeError, match="server exited with 1"):
            start_server(tiny_model_dir, tmp_path / "server.log", ("--frontends", str(FRONTENDS)), env=TEST_SERVER_ENV,
                         http_port=taken.getsockname()[1], timeout=90)
    logged = (tmp_path / "server.log").read_text()
    assert "Address already in use" in logged, logged[-2000:]
    assert_every_logger_ended(logged)  # the model's process logged


# ---- the channel between the processes, in one event loop ------------------------------------


async def no_rollout(windows) -> torch.Tensor:
    raise AssertionError("these requests explain nothing")



def test_a_remote_request_goes_through_the_model_queue_and_a_dropped_one_is_not_computed(tmp_path):
    compute = Recording(hold_first=True)
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    channel = str(tmp_path / "model.sock")

    async def main():
        accepting = await ModelService(queue, no_rollout).serve(channel)
        remote = RemoteQueue(channel, QueueState.local())
        first = asyncio.create_task(remote(job(1, 1)))
        await asyncio.to_thread(compute.started.wait, 30)  # the first pass runs, and is held
        dropped = asyncio.create_task(remote(job(2, 2)))
        while queue.waiting < 2:  # it has reached the model's queue
            await asyncio.sleep(0.01)
        dropped.cancel()
        kept = asyncio.create_task(remote(job(3, 1)))  # sent after the drop, so read after it
        while queue.waiting < 3:
            await asyncio.sleep(0.01)
        compute.release.set()
        results = await first, await kept
        accepting.cancel()
        return results

    first, kept = asyncio.run(main())
    torch.testing.assert_close(first, logits_of(job(1, 1)))
    torch.testing.assert_close(kept, logits_of(job(3, 1)))
    assert compute.passes == [[1.0], [3.0]]


def test_a_frontend_connects_again_once_the_model_process_has_closed_its_connection(tmp_path):
    """The channel closed under a frontend (the model's process ended one connection): while nothing
    listens, its requests are a 503 (retry), not a 500; once the model's process listens, the next
    request connects again and is answered."""
    compute = Recording()
    queue = WindowQueue(Passes(compute), max_batch_size=1, max_wait_s=0.0)
    channel = tmp_path / "model.sock"

    async def main():
        accepting = await ModelService(queue, no_rollout).serve(str(channel))
        remote = RemoteQueue(str(channel), QueueState.local())
        first = await remote(job(1, 1))
        accepting.cancel()  # its connections close, and it listens no more
        for _ in range(500):  # the frontend reads the end of its connection
            if remote._writer is None:
                break
            await asyncio.sleep(0.01)
        channel.unlink(missing_ok=True)  # Python 3.13 unlinks it as the server closes
        with pytest.raises(Overloaded, match="the model's process is not taking requests now"):
            await remote(job(2, 1))
        accepting = await ModelService(queue, no_rollout).serve(str(channel))
        again = await asyncio.wait_for(remote(job(3, 1)), 30)
        accepting.cancel()
        return first, again

    first, again = asyncio.run(main())
    torch.testing.assert_close(first, logits_of(job(1, 1)))
    torch.testing.assert_close(again, logits_of(job(3, 1)))


def test_admission_in_one_process_sees_what_another_has_reserved():
    """Windows being decoded and clips to explain by rollout, in another frontend; the queue's
    windows and the time a rollout takes, in the model's process (which runs them all)."""
    memory = QueueState.shared_memory(2)
    model, first, second = QueueState.attach(memory), QueueState.attach(memory, 0), QueueState.attach(memory, 1)
    model.waiting, model.seconds_per_window = 3, 0.5
    ready, done = threading.Event(), threading.Event()
    rollouts = Backlog("an explanation by rollout", max_wait_s=5.0, state=first, untimed_windows=2)

    def other_frontend():  # a writer of its own slot, as each frontend is
        second.reserved, second.rollouts = 4, 2
        ready.set()
        done.wait(10)
        second.reserved = second.rollouts = 0

    thread = threading.Thread(target=other_frontend)
    thread.start()
    ready.wait(10)
    assert (first.windows_ahead, first.seconds_per_window) == (7, 0.5)
    model.seconds_per_rollout = 3.0
    with pytest.raises(Overloaded, match="would wait about 6.0 s for the 2 ahead of it"):
        rollouts.reserve(1)
    done.set()
    thread.join()
    assert first.windows_ahead == 3
    assert rollouts.reserve(1).items == 1 and first.rollouts_ahead == 1


def test_frontends_default_to_one_on_a_cpu_and_the_spare_cores_on_a_gpu():
    assert Config().frontend_count(on_gpu=False, cpus=16) == 1
    assert Config().frontend_count(on_gpu=True, cpus=8) == 7
    assert Config().frontend_count(on_gpu=True, cpus=1) == 1
    assert Config(frontends=3).frontend_count(on_gpu=False, cpus=2) == 3


# ---- helpers ------------------------------------------------------------------------------------


def child_pids(parent: int) -> dict[int, str]:
    children = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
    return children


def assert_outlived_by_none(children: dict[int, str], within_s: float = 10) -> None:
    """No child of the server runs on once it has gone. multiprocessing's resource tracker ends on
    its own when its pipe from the server closes, a moment after the server: hence the wait."""
    deadline = time.monotonic() + within_s
    while (alive := {pid: line for pid, line in children.items() if not zombie(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
