"""Clients that misbehave on the wire: one that hangs up mid-upload, forty that hold connections
open while trickling bytes (slowloris). The server keeps serving everyone else."""

import socket
import threading
import time
import uuid

import pytest
import requests

from .conftest import encode, tone

pytestmark = pytest.mark.serial  # a normal client served in time beside forty slow ones

RATE = 16000
WAV = encode(tone(440, 2.0, RATE), RATE, "WAV", "PCM_16")


def test_a_client_that_hangs_up_mid_upload_costs_nothing(server):
    request_id = f"gone-{uuid.uuid4().hex[:8]}"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as connection:
        connection.sendall(b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: audio/wav\r\n"
                           b"Content-Length: %d\r\nx-request-id: %s\r\n\r\n" % (len(WAV), request_id.encode()))
        connection.sendall(WAV[: len(WAV) // 3])
    answer = requests.post(server.predict_url, data=WAV, timeout=60)
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 30  # the server notices the hang-up on its own time
    while not (lines := [line for line in server.log.read_text().splitlines() if request_id in line]):
        assert time.monotonic() < deadline, "the hang-up was never noticed"
        time.sleep(0.1)
    assert all("ERROR" not in line and "500" not in line for line in lines), lines
    assert any("disconnected" in line for line in lines), lines


class Slowloris(threading.Thread):
    """Opens a connection and sends a request one byte at a time, never finishing it."""

    def __init__(self, port: int, head: bytes, stop: threading.Event):
        super().__init__(daemon=True)
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.head, self.stop, self.sent = head, stop, 0

    def run(self) -> None:
        try:
            while not self.stop.wait(0.5) and self.sent < len(self.head) - 1:
                self.connection.sendall(self.head[self.sent:self.sent + 1])
                self.sent += 1
        except OSError:
            pass

    def still_open(self) -> bool:
        self.connection.setblocking(False)
        try:
            return self.connection.recv(1) != b""  # data (unexpected) or ...
        except BlockingIOError:
            return True  # ... nothing to read, and not closed
        except OSError:
            return False
        finally:
            self.connection.setblocking(True)


def test_forty_slowloris_clients_do_not_starve_a_normal_one(server):
    stop = threading.Event()
    slow_headers = b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    slow_body = (b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: audio/wav\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(WAV)) + WAV
    clients = [Slowloris(server.http_port, slow_headers if i % 2 else slow_body, stop) for i in range(40)]
    try:
        for client in clients:
            client.start()
        time.sleep(1.0)  # every slow client has its connection and is trickling
        for _ in range(3):
            answer = requests.post(server.predict_url, data=WAV, timeout=30)
            assert answer.status_code == 200, answer.text
            assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        assert sum(client.still_open() for client in clients) == 40  # they were there all along
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=5)
            client.connection.close()
