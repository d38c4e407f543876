"""One audio file → one request, the cheapest way each protocol allows; the answer → labels.

- V1: the file as the raw body (no base64), unless parameters must ride along: V1 has no other
  place for them than a JSON body, so then `{"instances": [{"b64": ...}], "parameters": ...}`.
- V2 REST: the binary data extension (a JSON header, then the file's bytes), as tritonclient sends it.
- gRPC: the file in `raw_input_contents` (length-prefixed, as the V2 protocol lays out BYTES).

Each answer is kept as the server sent it (V1 and V2 REST JSON; gRPC's as the same V2 JSON), and
read into `Prediction`s for the table. Our own code rather than tritonclient (a dev dependency,
and it cannot share a process with kserve) or kserve's clients (async-only, a V2 REST client that
base64-encodes BYTES, and importing kserve parses the command line as a server's).
"""

import base64
import functools
import importlib.util
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import requests

from ..names import AUDIO_INPUT, EMBEDDING_OUTPUT, LABEL_OUTPUT, MODEL_NAME, SCORE_OUTPUT, retry_after

MAX_CONNECTIONS = 64
# The V2 binary data extension's header (tritonclient and kserve send and read the same).
HEADER_LENGTH = "Inference-Header-Content-Length"


class RequestFailed(Exception):
    """The server (or the way to it) refused a request: its own message, and a status when it gave one."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after_s: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class Prediction:
    """A file's labels, best first; its windows' when segments were asked for; its embedding when
    that was."""

    labels: list[dict]
    segments: Optional[list[dict]] = None
    embedding: Optional[list[float]] = None


@dataclass
class Endpoint:
    url: str
    model_name: str = MODEL_NAME
    timeout_s: float = 300.0
    host: Optional[str] = None  # the ingress's Host header, or the gRPC authority


class Rest:
    """A session per protocol object: connections are kept between a batch's requests."""

    base64_expansion = 1.0

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.session = requests.Session()
        # One connection per request in flight: a batch's threads share this session.
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=MAX_CONNECTIONS))
        self.session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=MAX_CONNECTIONS))
        self.headers = {"Host": endpoint.host} if endpoint.host else {}


class V1(Rest):
    name = "v1"
    base64_expansion = 4 / 3  # only when parameters force a JSON body

    def send(self, data: bytes, parameters: dict) -> dict:
        url = f"{self.endpoint.url.rstrip('/')}/v1/models/{self.endpoint.model_name}:predict"
        if parameters:
            body = {"instances": [{"b64": base64.b64encode(data).decode()}], "parameters": parameters}
            response = post(self.session, url, json.dumps(body).encode(),
                            {**self.headers, "Content-Type": "application/json"}, self.endpoint.timeout_s)
        else:
            response = post(self.session, url, data, {**self.headers, "Content-Type": "application/octet-stream"},
                            self.endpoint.timeout_s)
        return response

    @staticmethod
    def prediction(answer: Any) -> Prediction:
        (clip,) = answer["predictions"]
        if isinstance(clip, dict):
            return Prediction(clip["labels"], clip.get("segments"), clip.get("embedding"))
        return Prediction(clip)


class V2(Rest):
    name = "v2"

    def send(self, data: bytes, parameters: dict) -> dict:
        return self.send_clips([data], parameters)

    def send_clips(self, clips: list[bytes], parameters: dict) -> dict:
        """Several files in one request: one BYTES element each, all in the binary tail."""
        url = f"{self.endpoint.url.rstrip('/')}/v2/models/{self.endpoint.model_name}/infer"
        tail = b"".join(struct.pack("<I", len(data)) + data for data in clips)
        header = json.dumps({
            "inputs": [{"name": AUDIO_INPUT, "datatype": "BYTES", "shape": [len(clips)],
                        "parameters": {"binary_data_size": len(tail)}}],
            **({"parameters": parameters} if parameters else {}),
        }).encode()
        headers = {**self.headers, "Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
        return post(self.session, url, header + tail, headers, self.endpoint.timeout_s)

    @staticmethod
    def prediction(answer: dict) -> Prediction:
        return v2_prediction({o["name"]: o for o in answer["outputs"]})


class Grpc:
    name = "grpc"
    base64_expansion = 1.0

    def __init__(self, endpoint: Endpoint):
        try:
            import grpc
        except ImportError:
            raise RequestFailed(GRPC_EXTRA) from None
        self.grpc, self.pb, self.endpoint = grpc, v2_messages(), endpoint
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        if endpoint.host:
            options.append(("grpc.default_authority", endpoint.host))
        channel = grpc.insecure_channel(endpoint.url, options=options)
        self.infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                         request_serializer=self.pb.ModelInferRequest.SerializeToString,
                                         response_deserializer=self.pb.ModelInferResponse.FromString)

    def send(self, data: bytes, parameters: dict) -> dict:
        return self.send_clips([data], parameters)

    def send_clips(self, clips: list[bytes], parameters: dict) -> dict:
        """Several files in one request: one BYTES element each."""
        pb = self.pb
        request = pb.ModelInferRequest(
            model_name=self.endpoint.model_name,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=AUDIO_INPUT, datatype="BYTES", shape=[len(clips)])],
            raw_input_contents=[b"".join(struct.pack("<I", len(data)) + data for data in clips)],
        )
        for name, value in parameters.items():
            # No double in kserve's InferParameter: the server reads a number sent as text (hop_seconds).
            field = {bool: "bool_param", int: "int64_param"}.get(type(value), "string_param")
            setattr(request.parameters[name], field, value if field != "string_param" else str(value))
        try:
            response = self.infer(request, timeout=self.endpoint.timeout_s)
        except self.grpc.RpcError as error:
            status, details = error.code(), error.details() or ""
            # Only a full queue says when to come back; UNAVAILABLE from a refused connection does not.
            retry = retry_after(details) if status.name == "UNAVAILABLE" else None
            raise RequestFailed(f"{status.name}: {details}", grpc_http_status(status.name), retry) from None
        return grpc_answer(response)

    prediction = staticmethod(V2.prediction)


PROTOCOLS = {"v1": V1, "v2": V2, "grpc": Grpc}
PB2 = "kserve.protocol.grpc.grpc_predict_v2_pb2"
GRPC_EXTRA = "--protocol grpc needs grpcio and the V2 protocol's messages: pip install './client[grpc]'"


@functools.cache
def v2_messages() -> Any:
    """The V2 protocol's protobuf messages: kserve's generated module, loaded without importing kserve
    (its import parses sys.argv as a server's command line, and takes a second), or where kserve is
    not installed (`pip install ./client[grpc]`), tritonclient's, generated from the same proto. One
    process cannot register both, so kserve's are taken wherever kserve is there."""
    if PB2 in sys.modules:  # kserve already imported here: its messages are registered once
        return sys.modules[PB2]
    spec = importlib.util.find_spec("kserve")
    if spec is None:
        try:
            from tritonclient.grpc import service_pb2
        except ImportError:
            raise RequestFailed(GRPC_EXTRA) from None
        return service_pb2
    path = Path(spec.submodule_search_locations[0]) / "protocol" / "grpc" / "grpc_predict_v2_pb2.py"
    module_spec = importlib.util.spec_from_file_location(PB2, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


RETRIED = {429, 503}
"""The refusals whose Retry-After says when to come back (a proxy may send one with any status)."""


def post(session: requests.Session, url: str, body: bytes, headers: dict, timeout_s: float) -> Any:
    try:
        response = session.post(url, data=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as error:
        raise RequestFailed(f"could not reach {url}: {error}") from None
    if response.status_code != 200:
        try:
            answer = response.json()
            message = answer.get("error", response.text) if isinstance(answer, dict) else response.text
        except ValueError:
            message = response.text.strip() or response.reason
        retry_after = response.headers.get("Retry-After") if response.status_code in RETRIED else None
        raise RequestFailed(f"HTTP {response.status_code}: {message}", response.status_code,
                            float(retry_after) if retry_after and retry_after.isdigit() else None)
    return response.json()


def grpc_http_status(code: str) -> Optional[int]:
    """The HTTP status the same refusal has over REST, so both are counted alike."""
    return {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413, "UNAVAILABLE": 503}.get(code)


def grpc_answer(response: Any) -> dict:
    """A ModelInferResponse as the V2 REST JSON answer it stands for. This server sends every output
    in `raw_output_contents` (as tritonclient expects), one entry per output, in order."""
    import numpy as np

    outputs = []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            data, offset = [], 0
            while offset < len(raw):
                (length,), offset = struct.unpack_from("<I", raw, offset), offset + 4
                data.append(raw[offset:offset + length].decode())
                offset += length
        else:
            data = np.frombuffer(raw, dtype={"FP32": "<f4", "INT64": "<i8"}[output.datatype]).tolist()
        outputs.append({"name": output.name, "datatype": output.datatype, "shape": list(output.shape), "data": data})
    return {"model_name": response.model_name, "id": response.id, "outputs": outputs}


def v2_prediction(outputs: dict[str, dict]) -> Prediction:
    """V2 outputs (flattened row-major, one file) → labels, and segments and embedding when they were sent."""
    labels = [{"label": label, "score": float(score)}
              for label, score in zip(outputs[LABEL_OUTPUT]["data"], outputs[SCORE_OUTPUT]["data"])]
    embedding = outputs[EMBEDDING_OUTPUT]["data"] if EMBEDDING_OUTPUT in outputs else None
    if "segment_start" not in outputs:
        return Prediction(labels, embedding=embedding)
    starts, ends = outputs["segment_start"]["data"], outputs["segment_end"]["data"]
    k = outputs["segment_label"]["shape"][-1]
    segments = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start < 0:  # padding: a shorter clip of the request has fewer windows
            continue
        names = outputs["segment_label"]["data"][index * k:(index + 1) * k]
        scores = outputs["segment_score"]["data"][index * k:(index + 1) * k]
        segments.append({"start": start, "end": end,
                         "labels": [{"label": n, "score": float(s)} for n, s in zip(names, scores)]})
    return Prediction(labels, segments, embedding)
