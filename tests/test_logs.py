"""--log_format json: the server's log is one JSON object per line, with the request id on a request's lines."""

import json

import pytest
import requests

from .conftest import TEST_SERVER_ENV, encode, start_server, stop_server, tone


@pytest.fixture(scope="module")
def json_server(tiny_model_dir, tmp_path_factory):
    running = start_server(tiny_model_dir, tmp_path_factory.mktemp("json-log") / "server.log",
                           env={**TEST_SERVER_ENV, "AST_LOG_FORMAT": "json"})
    yield running
    stop_server(running)


def test_every_line_is_json_and_a_requests_lines_carry_its_id(json_server):
    good = requests.post(json_server.predict_url, data=encode(tone(440, 1.0, 16000), 16000, "WAV", "PCM_16"),
                         headers={"x-request-id": "json-log-good"}, timeout=60)
    bad = requests.post(json_server.predict_url, data=b"RIFF....WAVE not audio", headers={"x-request-id": "json-log-bad"},
                        timeout=60)
    assert (good.status_code, bad.status_code) == (200, 400)
    stop_server(json_server)  # and the shutdown's lines too
    records = [json.loads(line) for line in json_server.log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records[:3]
    assert any(r["logger"].startswith("predictor") and "Loaded AST" in r["message"] for r in records)
    [refused] = [r for r in records if r.get("request_id") == "json-log-bad"]
    assert refused["level"] == "WARNING" and "could not decode audio" in refused["message"]
    assert "exc_info" not in refused
