"""The model's queue at AST's real geometry (768 wide, 12 layers, 128 mel bins x 1024 frames, 527
labels), where a window takes a second or two on 2 cores: fairness between a long and a short
clip, a client that goes away, overload. Parity at this geometry is checked on the deployed
server (`test_deploy.py`), which exports the model anyway.
"""

import base64
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
import requests

from .conftest import encode, metric, run_triton_grpc, start_server, stop_server

RATE = 16000


def windows_done(server) -> float:
    return metric(server, "ast_windows_total")


@pytest.fixture(scope="module")
def torch_server(full_size_dir, tmp_path_factory):
    """The full-size model on the torch engine (no ONNX export to wait for), at most 10 windows waiting."""
    server = start_server(full_size_dir, tmp_path_factory.mktemp("full-torch") / "server.log",
                          extra_args=("--backend", "torch", "--max_queued_windows", "10"))
    yield server
    stop_server(server)


def noise_wav(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode((0.1 * rng.standard_normal(int(RATE * seconds))).astype(np.float32), RATE, "WAV", "PCM_16")


def queued_windows(server) -> float:
    return metric(server, "ast_queued_windows")


def test_a_short_clip_is_answered_while_a_long_one_is_classified(torch_server):
    """Windows, not requests, take turns on the model: a 5 s clip posted while a 20 s clip (8
    windows at hop 2.5 s) is being classified is answered after at most a few windows, before the
    long one. Order and window counts come from the server, never from timings."""
    server, start = torch_server, windows_done(torch_server)
    long_clip, short_clip = noise_wav(20, 5), noise_wav(5, 6)
    with ThreadPoolExecutor(1) as pool:
        long_done = pool.submit(requests.post, server.predict_url, timeout=600, json={
            "instances": [{"b64": base64.b64encode(long_clip).decode()}], "parameters": {"hop_seconds": 2.5}})
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
    assert windows_done(server) == start + 8 + 1


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


def test_overload_is_refused_at_once_while_admitted_work_finishes(torch_server):
    """A 12-window request is admitted into an empty queue; a second one, which would make 20
    windows wait where the server takes 10, is refused with 503 and Retry-After (gRPC: UNAVAILABLE)
    while the first is still being classified; the probes answer and the first request succeeds."""
    server, begun = torch_server, windows_done(torch_server)
    body = {"instances": [{"b64": base64.b64encode(noise_wav(30, 9)).decode()}], "parameters": {"hop_seconds": 2.5}}
    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(requests.post, server.predict_url, json=body, timeout=600)
        while windows_done(server) < begun + 1:
            assert not admitted.done(), admitted.result().text
            time.sleep(0.05)
        refused = requests.post(server.predict_url, json=body, timeout=60)
        over_grpc = run_triton_grpc({"url": server.grpc_url, "model": "ast", "clips": [body["instances"][0]["b64"]], "parameters": {"hop_seconds": 2.5}})
        live = requests.get(f"{server.url}/v2/health/live", timeout=5)
        assert not admitted.done(), "the admitted request finished before the overload could be tested"
        assert admitted.result().status_code == 200, admitted.result().text
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "the model's queue is full" in refused.json()["error"]
    assert over_grpc["error_code"] == "StatusCode.UNAVAILABLE" and "queue is full" in over_grpc["error"], over_grpc
    assert live.status_code == 200
