"""The server's own Prometheus series (`predictor/metrics.py`) count what a few real requests did."""

import base64
import json
import re
from collections import Counter

import grpc
import pytest
import requests
from kserve import InferInput

from .conftest import REPO, encode, metric, raw_http, tone
from .test_grpc import kserve_grpc_infer

RATE = 16000


def delta(before: Counter, after: Counter, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before[key]


def test_a_few_requests_are_counted(server):
    """3 clips over HTTP (one request with two: 3 s and 12 s; one with a 1 s clip), one over gRPC,
    and refusals: a broken file over both, a body over the size limit."""
    before = server.samples()
    body = {"instances": [{"b64": base64.b64encode(encode(tone(440, s, RATE), RATE, "WAV", "PCM_16")).decode()}
                          for s in (3.0, 12.0)]}
    assert requests.post(server.predict_url, json=body, timeout=60).status_code == 200
    assert requests.post(server.predict_url, data=encode(tone(880, 1.0, RATE), RATE, "FLAC", "PCM_16"),
                         timeout=60).status_code == 200
    assert requests.post(server.predict_url, data=b"RIFF....WAVEnot audio", timeout=60).status_code == 400
    too_large = raw_http(server, b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    assert too_large.startswith(b"HTTP/1.1 413")
    kserve_grpc_infer(server, InferInput("audio", [1], "BYTES", data=[encode(tone(300, 2.0, RATE), RATE, "WAV", "PCM_16")]))
    with pytest.raises(grpc.RpcError):
        kserve_grpc_infer(server, InferInput("audio", [1], "BYTES", data=[b"RIFF....WAVEnot audio"]))
    after = server.samples()

    assert delta(before, after, "ast_clips_total") == 4
    assert delta(before, after, "ast_audio_seconds_total") == pytest.approx(3 + 12 + 1 + 2)
    # 12 s is two windows of 10.24 s: five windows in all, each in a pass of its own or with others
    assert delta(before, after, "ast_windows_total") == 5
    assert delta(before, after, "ast_batch_windows_sum") == 5
    assert delta(before, after, "ast_window_wait_seconds_count") == 5  # each window's wait for its pass
    assert 1 <= delta(before, after, "ast_batch_windows_count") <= 5
    # every request admitted: the two broken files were refused from their headers, before decoding
    # (the 413 never reached the model at all)
    assert delta(before, after, "ast_stage_seconds_count", stage="decode") == 3
    assert delta(before, after, "ast_stage_seconds_count", stage="features") == \
        delta(before, after, "ast_stage_seconds_count", stage="model") == delta(before, after, "ast_batch_windows_count")
    assert delta(before, after, "ast_stage_seconds_sum", stage="model") > 0
    assert delta(before, after, "ast_requests_total", protocol="http", code="200") == 2
    assert delta(before, after, "ast_requests_total", protocol="http", code="400") == 1
    assert delta(before, after, "ast_requests_total", protocol="http", code="413") == 1
    assert delta(before, after, "ast_requests_total", protocol="grpc", code="OK") == 1
    assert delta(before, after, "ast_requests_total", protocol="grpc", code="INVALID_ARGUMENT") == 1
    assert after[("ast_queued_windows", ())] == after[("ast_queue_wait_seconds", ())] == 0
    # the test server runs ONNX Runtime by name (conftest), in fp32
    assert after[("ast_engine_info", (("backend", "onnxruntime"), ("device", "cpu"), ("model", "ast"),
                                      ("precision", "fp32")))] == 1


def test_requests_that_never_reach_the_queue_leave_no_wait_behind(server):
    """An :explain of a clip longer than a window is refused from its header (an explanation covers
    one window): neither its windows nor the masked copies it would have needed stay counted as
    ahead of later requests."""
    clip = encode(tone(440, 12.0, RATE), RATE, "WAV", "PCM_16")
    for _ in range(3):
        assert requests.post(f"{server.url}/v1/models/ast:explain", data=clip, timeout=60).status_code == 400
    assert metric(server, "ast_queue_wait_seconds") == metric(server, "ast_queued_windows") == 0
    assert requests.post(server.predict_url, data=clip, timeout=60).status_code == 200


def test_the_dashboard_reads_series_the_server_has(server):
    """deploy/grafana-dashboard.json: every series its queries name is on /metrics, with the labels they select
    (after a request of its own: a labelled series appears with its first sample, whatever ran before)."""
    answer = requests.post(server.predict_url, data=encode(tone(440, 1.0, RATE), RATE, "WAV", "PCM_16"), timeout=60)
    assert answer.status_code == 200, answer.text
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 8
    named = {name for expr in expressions for name in re.findall(r"\b(ast_[a-z_]+)\b", expr)}
    served = {name for name, _ in server.samples()}
    assert named and named <= served, named - served
    stages = {dict(labels).get("stage") for name, labels in server.samples() if name == "ast_stage_seconds_count"}
    assert {"decode", "features", "model"} <= stages
