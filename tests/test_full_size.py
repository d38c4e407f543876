"""The model's queue at AST's real geometry (768 wide, 12 layers, 128 mel bins x 1024 frames, 527
labels), where a window takes a second or two on 2 cores: fairness between a long and a short
clip, a client that goes away, overload; and fp32 parity with the pipeline at this geometry (the
deployed server, `test_deploy.py`, checks the engine and precision the defaults pick).
"""

import base64
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
import requests
from transformers import pipeline

from predictor.config import Config
from predictor.names import retry_after

from .conftest import (assert_same_predictions, encode, expected, metric, run_triton_grpc, start_server,
                       stop_server, streamed_flac)

pytestmark = pytest.mark.serial  # a flood answered within its bound, window counts while a pass runs

RATE = 16000


def windows_done(server) -> float:
    return metric(server, "ast_windows_total")


@pytest.fixture(scope="module")
def torch_server(full_size_dir, tmp_path_factory):
    """The full-size model on the torch engine (no ONNX export to wait for), on the default limits."""
    server = start_server(full_size_dir, tmp_path_factory.mktemp("full-torch") / "server.log",
                          extra_args=("--backend", "torch", "--precision", "fp32"))
    yield server
    stop_server(server)


def test_full_size_fp32_matches_the_pipeline(torch_server, full_size_dir, speech_16k):
    """Parity at AST's real geometry, in fp32 (the deployed defaults' precision may be bf16: test_deploy)."""
    rng = np.random.default_rng(3)
    clip = np.concatenate([speech_16k, 0.05 * rng.standard_normal(RATE * 10 - len(speech_16k))]).astype(np.float32)
    body = {"instances": [{"b64": base64.b64encode(encode(clip, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"top_k": 10}}
    response = requests.post(torch_server.predict_url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    # 527 labels and no function_to_apply: the server's default is sigmoid (AudioSet is multi-label).
    reference = expected(pipeline("audio-classification", model=str(full_size_dir)), clip, 10, "sigmoid")
    assert_same_predictions(response.json()["predictions"][0], reference)


def noise_wav(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode((0.1 * rng.standard_normal(int(RATE * seconds))).astype(np.float32), RATE, "WAV", "PCM_16")


def queued_windows(server) -> float:
    return metric(server, "ast_queued_windows")


def test_a_short_clip_is_answered_while_a_long_one_is_classified(torch_server):
    """Windows, not requests, take turns on the model: a 5 s clip posted while a 20 s clip (4
    windows at hop 5 s) is being classified is answered after at most a few windows, before the
    long one. Order and window counts come from the server, never from timings."""
    server, start = torch_server, windows_done(torch_server)
    long_clip, short_clip = noise_wav(20, 5), noise_wav(5, 6)
    with ThreadPoolExecutor(1) as pool:
        long_done = pool.submit(requests.post, server.predict_url, timeout=600, json={
            "instances": [{"b64": base64.b64encode(long_clip).decode()}], "parameters": {"hop_seconds": 5}})
        while windows_done(server) < start + 1:  # the long clip's first window has been classified
            assert not long_done.done(), long_done.result().text
            time.sleep(0.05)
        before = windows_done(server)
        short = requests.post(server.predict_url, data=short_clip, timeout=600)
        after = windows_done(server)
        assert short.status_code == 200, short.text
        assert not long_done.done(), "the long clip was answered before the short one"
        long_answer = long_done.result()
    assert long_answer.status_code == 200, long_answer.text
    # The window in flight when the short clip arrived, its own, and one more of the long clip's
    # should the short clip have reached the queue only after that pass ended.
    assert after - before <= 3, (before, after)
    assert windows_done(server) == start + 4 + 1


def test_a_clip_of_unstated_length_is_admitted_again_for_the_windows_it_has(torch_server):
    """A request whose file does not state its length is admitted as one window (its header says
    no more); once decoded it has 240, and with windows still ahead of it they would take the queue
    past --max_queued_windows (240 on a CPU): 503 with Retry-After, before any of them is queued,
    while the request ahead is answered."""
    server = torch_server
    unstated = {"instances": [{"b64": base64.b64encode(streamed_flac(60)).decode()}], "parameters": {"hop_seconds": 0.25}}
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(requests.post, server.predict_url, timeout=600, json={
            "instances": [{"b64": base64.b64encode(noise_wav(20, 7)).decode()}], "parameters": {"hop_seconds": 7}})
        while queued_windows(server) < 2:  # 3 windows, the first being classified
            assert not ahead.done(), ahead.result().text
            time.sleep(0.05)
        refused = requests.post(server.predict_url, json=unstated, timeout=600)
        assert refused.status_code == 503, refused.text
        assert "this request's 240 windows would make" in refused.json()["error"]
        assert "(--max_queued_windows)" in refused.json()["error"] and int(refused.headers["Retry-After"]) >= 1
        assert ahead.result().status_code == 200


def test_a_client_that_goes_away_stops_using_the_model(torch_server):
    """A 30 s clip at hop 2.5 s is 12 windows; its client hangs up once the first has been
    classified: the server drops the rest at its next turn instead of computing them for nobody."""
    server, begun = torch_server, windows_done(torch_server)
    body = orjson.dumps({"instances": [{"b64": base64.b64encode(noise_wav(30, 8)).decode()}],
                         "parameters": {"hop_seconds": 2.5}})
    with socket.create_connection(("127.0.0.1", server.http_port)) as connection:
        connection.sendall(b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        while windows_done(server) < begun + 1:
            time.sleep(0.05)
    while queued_windows(server) > 0:  # dropped at the abandoned request's next turn
        time.sleep(0.05)
    # The first window, the one in flight when the client left, and at most one more.
    assert windows_done(server) - begun <= 3, (begun, windows_done(server))
    assert server.is_ready()


def test_a_client_that_goes_away_behind_requests_of_its_size_leaves_them_answered(torch_server):
    """Four one-window requests: while the first is classified, the last one's client hangs up,
    two requests of its size ahead of it in line. The others are answered and nothing stays
    queued. (Its removal from the line once compared its windows with theirs, which numpy refuses:
    the queue's worker died on it again and again, and every request hung.)"""
    server = torch_server
    body = orjson.dumps({"instances": [{"b64": base64.b64encode(noise_wav(5, 9)).decode()}]})
    head = (b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    post = lambda: requests.post(server.predict_url, data=body, headers={"Content-Type": "application/json"},
                                 timeout=120)
    submitted = lambda: metric(server, "ast_windows_submitted_total")
    begun, deadline = submitted(), time.monotonic() + 60

    def queued(windows: int) -> None:
        while submitted() < begun + windows:
            assert time.monotonic() < deadline, f"{windows} windows were never queued"
            time.sleep(0.01)

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post)
        queued(1)  # the model idle: its pass begins at once
        ahead = [pool.submit(post) for _ in range(2)]
        queued(3)
        with socket.create_connection(("127.0.0.1", server.http_port)) as connection:
            connection.sendall(head + body)
            queued(4)
        answers = [future.result() for future in (first, *ahead)]
    assert [answer.status_code for answer in answers] == [200, 200, 200], [answer.text for answer in answers]
    while queued_windows(server) > 0:  # dropped at its turn
        assert time.monotonic() < deadline, f"{queued_windows(server)} windows stay queued"
        time.sleep(0.05)
    assert server.is_ready()


def test_a_client_that_goes_away_while_its_file_decodes_stops_the_decoding(torch_server):
    """Ten minutes of 48 kHz stereo (the default budget, and a fraction of a second or more of
    decoding and resampling on any CPU): its client hangs up once the request is admitted. The
    decoding stops at its next block instead of running on for nobody, and the request's windows
    stay counted by admission until it has (then they are let go)."""
    server = torch_server
    body = orjson.dumps({"instances": [{"b64": base64.b64encode(streamed_flac(600, 48000, "stereo")).decode()}]})
    with socket.create_connection(("127.0.0.1", server.http_port)) as connection:
        connection.sendall(b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while not metric(server, "ast_queue_wait_seconds"):  # admitted, and counted while it decodes
            assert time.monotonic() < deadline, "the request was never admitted"
            time.sleep(0.01)
    stopped = wait_for_log(server, r"Decoding stopped after (\d+) frames: its request went away")
    assert int(stopped.group(1)) < 600 * 48000, stopped.group(0)
    while metric(server, "ast_queue_wait_seconds"):  # let go once the decoding has ended
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.is_ready()


def wait_for_log(server, pattern: str, timeout_s: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while not (found := re.search(pattern, server.log.read_text())):
        assert time.monotonic() < deadline, f"never logged: {pattern}"
        time.sleep(0.05)
    return found


CONTAINER_CONCURRENCY = 4  # inferenceservice.yaml's
# A third of the default bound: the same admission, a third of the windows to wait out.
MAX_QUEUE_SECONDS = Config().max_queue_seconds / 3


def model_seconds(server) -> tuple[float, float]:
    """The engine's passes so far: (seconds in all, count)."""
    return (metric(server, "ast_stage_seconds_sum", stage="model"), metric(server, "ast_stage_seconds_count", stage="model"))


def decodes(server) -> float:
    return metric(server, "ast_stage_seconds_count", stage="decode")


@pytest.fixture
def bounded_server(full_size_dir, tmp_path):
    """The full-size model on torch, admitting requests while the wait ahead is within MAX_QUEUE_SECONDS,
    after one clip (so that its series have a decode and a pass before the flood)."""
    server = start_server(full_size_dir, tmp_path / "server.log", extra_args=(
        "--backend", "torch", "--precision", "fp32", "--max_queue_seconds", f"{MAX_QUEUE_SECONDS:g}"))
    first = requests.post(server.predict_url, data=noise_wav(10, 8), timeout=120)
    assert first.status_code == 200, first.text
    yield server
    stop_server(server)


def test_a_flood_is_refused_before_decoding_and_admitted_requests_answer_within_the_bound(bounded_server):
    """12x containerConcurrency of 10 s clips at once: requests come in while
    the wait ahead of them is within --max_queue_seconds; the rest get 503 with Retry-After within
    a second, decided before their audio is decoded (gRPC: UNAVAILABLE, the retry time as a token);
    every admitted request answers within the bound plus its own window, and the probes answer.

    The bound holds at the time per window the server measured before the flood (its passes so far);
    passes slowed by the flood itself (48 requests parsed and decoded on the same 2 cores) stretch
    it in proportion, which the check allows for, measuring both from the server's own series."""
    server, clip, decoded_before = bounded_server, noise_wav(10, 9), decodes(bounded_server)
    passes_before = model_seconds(server)

    def post(_: int) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = requests.post(server.predict_url, data=clip, headers={"Content-Type": "audio/wav"}, timeout=600)
        return response, time.monotonic() - started

    flood = 12 * CONTAINER_CONCURRENCY
    with ThreadPoolExecutor(flood) as pool:
        answers = pool.map(post, range(flood))
        while queued_windows(server) < 2:
            time.sleep(0.05)
        waiting = metric(server, "ast_queue_wait_seconds")
        over_grpc = run_triton_grpc({"url": server.grpc_url, "model": "ast", "clips": [base64.b64encode(clip).decode()]})
        live = requests.get(f"{server.url}/v2/health/live", timeout=5)
        answers = list(answers)
    passes_after = model_seconds(server)
    estimated = passes_before[0] / passes_before[1]
    per_window = (passes_after[0] - passes_before[0]) / (passes_after[1] - passes_before[1])
    admitted = [seconds for response, seconds in answers if response.status_code == 200]
    refused = [(response, seconds) for response, seconds in answers if response.status_code == 503]
    assert len(admitted) + len(refused) == flood, [r.text for r, _ in answers if r.status_code not in (200, 503)]
    assert admitted and refused, (len(admitted), len(refused))
    assert decodes(server) - decoded_before == len(admitted)  # nothing refused was decoded
    for response, seconds in refused:
        assert seconds <= 1.0, (seconds, response.text)
        retry = int(response.headers["Retry-After"])
        assert retry >= 1 and f"(retry_after_s={retry})" in response.json()["error"], response.text
        assert "(--max_queue_seconds)" in response.json()["error"], response.text
    bound = MAX_QUEUE_SECONDS * max(1.0, per_window / estimated) + 2 * per_window + 2.0
    assert max(admitted) <= bound, (sorted(admitted), estimated, per_window)
    assert over_grpc["error_code"] == "StatusCode.UNAVAILABLE", over_grpc
    assert retry_after(over_grpc["error"]) >= 1, over_grpc
    assert live.status_code == 200
    assert waiting > 0
