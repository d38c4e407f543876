"""Request ids on responses and in the log; each error logged once, without its payload or a trace."""

import asyncio
import base64
import logging
import re
import uuid

import grpc
import pytest
import requests
from kserve import InferenceGRPCClient, InferInput, InferRequest

from predictor.protocol.asgi import RequestIds
from predictor.protocol.request_ids import RequestLog

from .conftest import encode, raw_http, tone

RATE = 16000
GOOD_WAV = encode(tone(440, 1.0, RATE), RATE, "WAV", "PCM_16")
GENERATED = re.compile(r"[0-9a-f]{32}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def log_lines(server, request_id: str) -> list[str]:
    return [line for line in server.log.read_text(errors="replace").splitlines() if request_id in line]


def test_the_callers_x_request_id_comes_back(server):
    request_id = unique("v1")
    response = requests.post(server.predict_url, data=GOOD_WAV, headers={"x-request-id": request_id}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id


def test_a_request_without_an_id_gets_a_generated_one(server):
    first, second = (requests.post(server.predict_url, data=GOOD_WAV, timeout=60) for _ in range(2))
    assert GENERATED.fullmatch(first.headers["x-request-id"]) and GENERATED.fullmatch(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 129, "tab\there"])
def test_an_unacceptable_header_is_replaced_not_logged(server, bad):
    response = requests.post(server.predict_url, data=b"not audio", headers={"x-request-id": bad}, timeout=60)
    assert response.status_code == 400
    assert GENERATED.fullmatch(response.headers["x-request-id"])
    assert log_lines(server, response.headers["x-request-id"]) and not log_lines(server, bad)


def v2_body(**extra) -> dict:
    return {**extra, "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                 "data": [base64.b64encode(GOOD_WAV).decode()]}]}


def test_v2_id_is_the_request_id_unless_a_header_says_otherwise(server):
    own = unique("v2")
    answer = requests.post(server.infer_url, json=v2_body(id=own), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == answer.headers["x-request-id"] == own
    unnamed = requests.post(server.infer_url, json=v2_body(), timeout=60)
    assert GENERATED.fullmatch(unnamed.headers["x-request-id"]) and unnamed.json()["id"] == unnamed.headers["x-request-id"]
    header = unique("hdr")
    both = requests.post(server.infer_url, json=v2_body(id=own), headers={"x-request-id": header}, timeout=60)
    assert both.headers["x-request-id"] == header and both.json()["id"] == own  # V2: a response echoes its request's id


def grpc_infer(server, clip: bytes, request_id=None, headers=None):
    tensor = InferInput(name="audio", shape=[1], datatype="BYTES")
    tensor.data = [clip]

    async def call():  # the aio channel belongs to the loop it is made in
        request = InferRequest(model_name="ast", infer_inputs=[tensor], request_id=request_id)
        return await InferenceGRPCClient(server.grpc_url).infer(request, headers=headers)

    return asyncio.run(call())


def test_grpc_request_ids(server):
    own = unique("grpc")
    assert grpc_infer(server, GOOD_WAV, request_id=own).id == own
    assert GENERATED.fullmatch(grpc_infer(server, GOOD_WAV).id)
    header = unique("grpc-bad")
    with pytest.raises(grpc.RpcError, match="could not decode audio"):
        grpc_infer(server, b"MARKER-GRPC not audio", headers=[("x-request-id", header)])
    assert_logged_once_without_payload(server, header, "MARKER-GRPC")


def assert_logged_once_without_payload(server, request_id: str, marker: str) -> None:
    (line,) = log_lines(server, request_id)
    assert "WARNING" in line and "could not decode audio" in line, line
    log = server.log.read_text(errors="replace")
    assert marker not in log
    following = log.split(line, 1)[1].splitlines()[:3]
    assert not any(text.startswith("Traceback") for text in following), following


def test_a_client_error_is_logged_once_on_one_line_without_payload(server):
    request_id = unique("bad")
    payload = b"MARKER-REST-PAYLOAD " * 100
    response = requests.post(server.predict_url, data=payload, headers={"x-request-id": request_id}, timeout=60)
    assert response.status_code == 400 and "could not decode audio" in response.json()["error"]
    assert response.headers["x-request-id"] == request_id
    assert_logged_once_without_payload(server, request_id, "MARKER-REST-PAYLOAD")


def test_a_refused_body_carries_its_request_id(server):
    request_id = unique("big")
    answer = raw_http(server, b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n"
                              b"x-request-id: %s\r\n\r\n" % (2**40, request_id.encode()))
    assert answer.startswith(b"HTTP/1.1 413") and b"\r\nx-request-id: %s\r\n" % request_id.encode() in answer, answer
    (line,) = log_lines(server, request_id)
    assert "413" in line


def test_an_unhandled_error_is_a_500_naming_the_request_and_logged_with_its_trace(caplog):
    """The server has no path to a 500 to test it through; the middleware that answers one is
    driven here with an app that fails."""
    async def failing_app(scope, receive, send):
        raise RuntimeError("secret internal detail")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/models/ast:predict",
             "headers": [(b"x-request-id", b"boom-1")]}
    logger = logging.getLogger("predictor.protocol.asgi")
    caplog.handler.addFilter(RequestLog())
    with caplog.at_level(logging.ERROR, logger=logger.name):
        asyncio.run(RequestIds(failing_app)(scope, receive, send))
    start, body = sent
    assert start["status"] == 500 and (b"x-request-id", b"boom-1") in start["headers"]
    assert b"boom-1" in body["body"] and b"secret" not in body["body"]
    (record,) = caplog.records
    assert record.exc_info and "secret internal detail" in caplog.text and "request boom-1" in caplog.text
