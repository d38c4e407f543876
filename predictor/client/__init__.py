"""The client: classify audio files with a running server, from Python or the command line.

    from predictor.client import Client
    client = Client("http://localhost:8080")                        # V2 REST; protocol="v1" or "grpc"
    result = client.classify("clip.wav", top_k=3)
    result.prediction.labels                                        # [{"label": ..., "score": ...}, ...]
    client.classify("clip.wav", return_embedding=True).prediction.embedding   # [768 floats]
    result.answer                                                   # the server's answer, unchanged

`python -m predictor.client --help` (also installed as `ast-classify`) runs the same over many files.
It imports neither torch nor kserve (gRPC aside), so it starts in a fraction of a second.
"""

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..names import GRPC_PORT, HTTP_PORT, MAX_REQUEST_MB, MODEL_NAME
from .protocols import PROTOCOLS, Endpoint, Prediction, RequestFailed

log = logging.getLogger(__name__)

DEFAULT_URLS = {"v1": f"http://localhost:{HTTP_PORT}", "v2": f"http://localhost:{HTTP_PORT}", "grpc": f"localhost:{GRPC_PORT}"}
# Room for the request around the file: JSON, headers, gRPC framing.
REQUEST_OVERHEAD_BYTES = 64 * 1024
MAX_RETRY_AFTER_S = 120.0
MIN_RETRY_AFTER_S = 1.0  # a Retry-After of 0 (a proxy's) is no reason to send again at once, and again


@dataclass
class Result:
    """One file's outcome: the server's answer and its labels, and what the client did on the way."""

    answer: object
    prediction: Prediction
    reencoded_bytes: Optional[int] = None  # the FLAC's size, when the file was over the limit


class Client:
    def __init__(self, url: Optional[str] = None, protocol: str = "v2", model_name: str = MODEL_NAME,
                 timeout_s: float = 300.0, host: Optional[str] = None,
                 max_request_mb: float = MAX_REQUEST_MB):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        endpoint = Endpoint(url or DEFAULT_URLS[protocol], model_name, timeout_s, host)
        self.protocol = PROTOCOLS[protocol](endpoint)
        self.timeout_s = timeout_s
        self.max_request_bytes = int(max_request_mb * 2**20)

    def classify(self, audio: Union[str, Path, bytes], top_k: Optional[int] = None,
                 function_to_apply: Optional[str] = None, hop_seconds: Optional[float] = None,
                 aggregate: Optional[str] = None, return_segments: bool = False,
                 return_embedding: bool = False) -> Result:
        """One file (a path or its bytes); raises `RequestFailed` with the server's message."""
        data = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
        parameters = {name: value for name, value in (("top_k", top_k), ("function_to_apply", function_to_apply),
                                                       ("hop_seconds", hop_seconds), ("aggregate", aggregate))
                      if value is not None}
        parameters.update({name: True for name, asked in (("return_segments", return_segments),
                                                           ("return_embedding", return_embedding)) if asked})
        reencoded = None
        if self.request_bytes(data, parameters) > self.max_request_bytes:
            from .reencode import TooLarge, as_model_flac  # decoding needs the server's audio libraries

            room = int((self.max_request_bytes - REQUEST_OVERHEAD_BYTES) / self.expansion(parameters))
            try:
                data = as_model_flac(data, room)
            except ValueError as error:  # the server's own ClientInputError: what it would have answered
                raise RequestFailed(f"over the {self.max_request_bytes / 2**20:g} MB limit, and not readable "
                                    f"as audio to re-encode: {error}", 400) from None
            except TooLarge as error:
                raise RequestFailed(f"over the server's {self.max_request_bytes / 2**20:g} MB limit (--max_request_mb) "
                                    f"even as 16 kHz mono FLAC: {error}", 413) from None
            reencoded = len(data)
            if self.request_bytes(data, parameters) > self.max_request_bytes:
                raise RequestFailed(f"still {len(data) / 2**20:.1f} MB as 16 kHz mono FLAC: over the server's "
                                    f"{self.max_request_bytes / 2**20:g} MB limit (--max_request_mb)", 413)
        answer = self.send(data, parameters)
        return Result(answer, self.protocol.prediction(answer), reencoded)

    def request_bytes(self, data: bytes, parameters: dict) -> float:
        return len(data) * self.expansion(parameters) + REQUEST_OVERHEAD_BYTES

    def expansion(self, parameters: dict) -> float:
        """How much larger than the file its request's body is (base64 where V1 must send JSON)."""
        return self.protocol.base64_expansion if parameters else 1.0

    def send(self, data: bytes, parameters: dict) -> object:
        """A busy server's refusal (503 or 429 with Retry-After; gRPC UNAVAILABLE with its
        retry_after_s token) is retried after the time the server asked for (at least a second,
        whatever a proxy says), with a little jitter so a batch's
        requests do not all return at once, for as long as the timeout allows: the server asks for
        the earliest moment it could admit the request, which under a crowd may come round several
        times, and an autoscaled service sheds load while it adds pods."""
        deadline, attempt = time.monotonic() + self.timeout_s, 0
        while True:
            try:
                return self.protocol.send(data, parameters)
            except RequestFailed as error:
                if error.retry_after_s is None:
                    raise
                wait = min(max(error.retry_after_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S) * random.uniform(1.0, 1.2)
                if time.monotonic() + wait > deadline:
                    raise
                attempt += 1
                log.warning("server busy (%s); retry %d in %.1f s", error, attempt, wait)
                time.sleep(wait)


__all__ = ["Client", "Prediction", "RequestFailed", "Result"]
