"""V1 and V2 (Open Inference Protocol) requests ↔ clips and parameters; results → responses.

Nothing numeric happens here. `parse` turns whatever a client sent (a V1 JSON body, a raw audio
body, a V2 request from REST JSON, REST binary data or gRPC) into an `AudioRequest`; `respond`
turns labels and scores back into the shape that client expects.

`AudioDataPlane` is kserve's own extension point (the `DataPlane` a `ModelServer` routes every
request through) and holds our workarounds for kserve 0.21, each tested end to end:
- `InferRequest.from_bytes` turns binary BYTES tensors into UTF-8 strings, so binary audio sent
  with the V2 binary data extension (tritonclient's default) fails there with a 500; we parse
  that extension ourselves and keep the bytes.
- kserve's V1 path decodes `application/octet-stream` as JSON, and leaves JSON sent with any
  content type not on its exact list (`application/json; charset=utf-8`, `text/plain`) undecoded;
  we read a V1 body as audio unless it is, or looks like, JSON.
- Our `ClientInputError` becomes kserve's `InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT).
The third obstacle, `InferResponse.to_grpc` failing on numpy outputs when raw outputs are due,
is avoided in `respond`: gRPC outputs are always serialised to raw bytes before kserve sees them.
"""

import base64
import binascii
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import numpy as np
import orjson
from cloudevents.sdk.converters.util import has_binary_headers
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER, PredictorProtocol
from kserve.errors import InvalidInput
from kserve.model_server import ModelServer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import (
    InferInput,
    InferOutput,
    InferRequest,
    InferResponse,
    deserialize_bytes_tensor,
    to_http_parameters,
)
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from kserve.utils.numpy_codec import to_np_dtype
from pydantic import ValidationError

from .errors import ClientInputError

AUDIO_INPUT = "audio"
WAVEFORM_INPUT = "waveform"
LABEL_OUTPUT = "label"
SCORE_OUTPUT = "score"
MODEL_PARAMETERS = ("top_k", "function_to_apply")
# sampling_rate belongs to the waveform input, but tritonclient.grpc cannot set input parameters,
# so it is taken from the request's parameters too (the input's wins).
RATE_PARAMETER = "sampling_rate"
# Set by V2 clients themselves (tritonclient, kserve's clients) and honoured by kserve's encoder.
PROTOCOL_PARAMETERS = ("binary_data_output",)
INPUT_PARAMETERS = {AUDIO_INPUT: ("binary_data_size",), WAVEFORM_INPUT: ("binary_data_size", RATE_PARAMETER)}
DEFAULT_SAMPLING_RATE = 16_000

INPUT_TYPES = [
    {"name": AUDIO_INPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": WAVEFORM_INPUT, "datatype": "FP32", "shape": [-1, -1]},
]
OUTPUT_TYPES = [
    {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1, -1]},
    {"name": SCORE_OUTPUT, "datatype": "FP32", "shape": [-1, -1]},
]

Clip = Union[bytes, tuple[np.ndarray, int]]
"""An encoded audio file, or a decoded mono waveform with its sampling rate."""


@dataclass
class AudioRequest:
    """What the model needs from a request, whichever protocol carried it."""

    clips: list[Clip]
    parameters: dict[str, Any] = field(default_factory=dict)
    v2: Optional[InferRequest] = None  # None: answer in V1's shape


def parse(payload: Union[dict, bytes, InferRequest]) -> AudioRequest:
    if isinstance(payload, InferRequest):
        return _parse_v2(payload)
    if isinstance(payload, (bytes, bytearray)):
        return AudioRequest(clips=[bytes(payload)])
    if isinstance(payload, dict):
        return _parse_v1(payload)
    raise ClientInputError(f"unsupported request body of type {type(payload).__name__}")


def _parse_v1(body: dict) -> AudioRequest:
    unknown = set(body) - {"instances", "parameters"}
    if unknown:
        raise ClientInputError(f"unknown field(s) {sorted(unknown)}; a V1 request has 'instances' and 'parameters'")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ClientInputError('"instances" must be a non-empty list of {"b64": "<base64 audio file>"}')
    clips: list[Clip] = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise ClientInputError(f'instances[{i}] must be {{"b64": "<base64 of an audio file>"}}')
        clips.append(_b64decode(instance["b64"], f"instances[{i}].b64"))
    parameters = body.get("parameters")
    return AudioRequest(clips=clips, parameters=_model_parameters({} if parameters is None else parameters, ()))


def _parse_v2(request: InferRequest) -> AudioRequest:
    if len(request.inputs) != 1:
        names = [i.name for i in request.inputs]
        raise ClientInputError(
            f"expected exactly one input, '{AUDIO_INPUT}' or '{WAVEFORM_INPUT}'; got {len(names)}: {names}"
        )
    tensor = request.inputs[0]
    if tensor.name not in INPUT_PARAMETERS:
        raise ClientInputError(f"unknown input '{tensor.name}'; inputs are '{AUDIO_INPUT}' and '{WAVEFORM_INPUT}'")
    input_parameters = to_http_parameters(tensor.parameters or {})
    unknown = set(input_parameters) - set(INPUT_PARAMETERS[tensor.name])
    if unknown:
        raise ClientInputError(f"unknown parameter(s) {sorted(unknown)} on input '{tensor.name}'")
    request_parameters = to_http_parameters(request.parameters or {})
    parameters = _model_parameters(request_parameters, PROTOCOL_PARAMETERS + (RATE_PARAMETER,))
    if tensor.name == AUDIO_INPUT:
        if RATE_PARAMETER in request_parameters:
            raise ClientInputError("sampling_rate applies to the 'waveform' input; an encoded file states its own")
        clips = _audio_clips(tensor)
    else:
        rate = input_parameters.get(RATE_PARAMETER, request_parameters.get(RATE_PARAMETER, DEFAULT_SAMPLING_RATE))
        clips = _waveform_clips(tensor, rate)
    return AudioRequest(clips=clips, parameters=parameters, v2=request)


def _audio_clips(tensor: InferInput) -> list[Clip]:
    _expect_datatype(tensor, "BYTES")
    elements = _as_numpy(tensor)
    if elements.ndim != 1 or elements.size == 0:
        raise ClientInputError(f"input '{AUDIO_INPUT}' must have shape [N] with N ≥ 1, got {list(elements.shape)}")
    return [_audio_file(element, f"{AUDIO_INPUT}[{i}]") for i, element in enumerate(elements)]


def _audio_file(element: Any, where: str) -> bytes:
    """JSON can only carry text, so there each element is base64; binary data and gRPC carry bytes."""
    if isinstance(element, str):
        return _b64decode(element, where)
    if isinstance(element, (bytes, bytearray)):
        return bytes(element)
    raise ClientInputError(
        f"{where} must be an audio file (a base64 string in JSON, bytes in binary data or gRPC), "
        f"got {type(element).__name__}"
    )


def _waveform_clips(tensor: InferInput, rate: Any) -> list[Clip]:
    _expect_datatype(tensor, "FP32")
    samples = _as_numpy(tensor)
    if samples.ndim == 1:
        samples = samples[None, :]
    if samples.ndim != 2 or samples.size == 0:
        raise ClientInputError(
            f"input '{WAVEFORM_INPUT}' must have shape [N, samples] (or [samples]), got {list(tensor.shape)}"
        )
    return [(row, rate) for row in samples]


def _expect_datatype(tensor: InferInput, datatype: str) -> None:
    if tensor.datatype != datatype:
        raise ClientInputError(f"input '{tensor.name}' must have datatype {datatype}, got {tensor.datatype}")


def _as_numpy(tensor: InferInput) -> np.ndarray:
    """kserve's conversion, with its plain ValueError (a 500) for a shape/data mismatch made a 400."""
    shape = list(tensor.shape)
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ClientInputError(f"input '{tensor.name}' has an invalid shape {shape}")
    try:
        return tensor.as_numpy()
    except (ValueError, TypeError, struct.error) as exc:
        count = int(np.prod(shape)) if shape else 1
        raise ClientInputError(
            f"input '{tensor.name}' declares shape {shape} ({count} elements) but its data does not fit it: {exc}"
        ) from None


def _model_parameters(parameters: Any, tolerated: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        raise ClientInputError('"parameters" must be an object')
    unknown = set(parameters) - set(MODEL_PARAMETERS) - set(tolerated)
    if unknown:
        raise ClientInputError(f"unknown parameter(s) {sorted(unknown)}; supported: {', '.join(MODEL_PARAMETERS)}")
    return {k: v for k, v in parameters.items() if k in MODEL_PARAMETERS}


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientInputError(f"{where} is not valid base64: {exc}") from None


def respond(request: AudioRequest, model_name: str, labels: list[list[str]], scores: np.ndarray) -> Union[dict, InferResponse]:
    """Labels and (batch, k) float32 scores → the response the request's protocol expects."""
    if request.v2 is None:
        return {
            "predictions": [
                [{"label": label, "score": float(score)} for label, score in zip(row_labels, row_scores)]
                for row_labels, row_scores in zip(labels, scores)
            ]
        }
    label_array = np.array(labels, dtype=np.object_).reshape(scores.shape)
    outputs = [
        InferOutput(name=LABEL_OUTPUT, shape=list(label_array.shape), datatype="BYTES", data=label_array),
        InferOutput(name=SCORE_OUTPUT, shape=list(scores.shape), datatype="FP32", data=scores),
    ]
    if request.v2.request_outputs:
        # kserve's REST encoder checks requested names, its gRPC encoder ignores them: check here, once.
        wanted = [o.name for o in request.v2.request_outputs]
        unknown = set(wanted) - {o.name for o in outputs}
        if unknown:
            raise ClientInputError(f"unknown requested output(s) {sorted(unknown)}; outputs are '{LABEL_OUTPUT}' and '{SCORE_OUTPUT}'")
        outputs = [o for o in outputs if o.name in wanted]
    if request.v2.from_grpc:
        # tritonclient's as_numpy reads raw_output_contents only; raw bytes suit kserve's clients too.
        for output in outputs:
            output.set_data_from_numpy(output.data, binary_data=True)
    return InferResponse(
        response_id=request.v2.id or "",
        model_name=model_name,
        infer_outputs=outputs,
        use_binary_outputs=request.v2.use_binary_outputs,
        requested_outputs=request.v2.request_outputs,
    )


class AudioDataPlane(DataPlane):
    """kserve's DataPlane with raw audio bodies, binary BYTES inputs and our client errors."""

    def decode(self, body, headers, protocol_version: str = PredictorProtocol.REST_V1.value, model_name=None):
        headers = headers or {}
        with _as_invalid_input():
            if protocol_version == PredictorProtocol.REST_V1.value and isinstance(body, (bytes, bytearray)):
                if _is_raw_audio(body, headers):
                    return body, {}
                if not has_binary_headers(headers):
                    # kserve parses JSON only for an exact list of content types; clients also send
                    # "application/json; charset=utf-8", text/plain, or curl's form-urlencoded default.
                    body = _load_json(body)
            return super().decode(body, headers, protocol_version, model_name)

    def decode_inference_request(self, body, headers: dict, model_name: str) -> InferRequest:
        if isinstance(body, bytes):
            with _as_invalid_input():
                return _parse_binary_extension(body, headers, model_name)
        return super().decode_inference_request(body, headers, model_name)

    async def infer(self, model_name: str, request, headers=None):
        with _as_invalid_input():
            return await super().infer(model_name, request, headers)


class AudioModelServer(ModelServer):
    """kserve's ModelServer, routing requests through `AudioDataPlane`."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.dataplane = AudioDataPlane(model_registry=self.registered_models)


@contextmanager
def _as_invalid_input() -> Iterator[None]:
    """Our client errors become kserve's InvalidInput: HTTP 400, gRPC INVALID_ARGUMENT."""
    try:
        yield
    except ClientInputError as exc:
        raise InvalidInput(str(exc)) from exc


def _is_raw_audio(body: bytes, headers: dict) -> bool:
    """A V1 body is audio unless it says (or looks like) JSON: curl's --data-binary needs no header."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("audio/"):
        return True
    if content_type in ("application/json", "application/cloudevents+json", "application/ld+json"):
        return False
    if has_binary_headers(headers):
        return False
    return body[:1024].lstrip()[:1] != b"{"


def _load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientInputError(f"request body is neither audio nor valid JSON: {exc}") from None


def _parse_binary_extension(body: bytes, headers: dict, model_name: str) -> InferRequest:
    """The V2 binary data extension: a JSON header, then each binary input's bytes in order.

    The header is validated by kserve's own V2 request model, with an empty `data` standing in
    for each binary input until its bytes are attached.
    """
    header_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
    if header_length is None:
        raise ClientInputError(f"a binary V2 request needs the '{INFERENCE_CONTENT_LENGTH_HEADER}' header")
    try:
        json_length = int(header_length)
    except ValueError:
        raise ClientInputError(f"'{INFERENCE_CONTENT_LENGTH_HEADER}' is not a number: {header_length!r}") from None
    if not 0 < json_length <= len(body):
        raise ClientInputError(f"'{INFERENCE_CONTENT_LENGTH_HEADER}' {json_length} does not fit the {len(body)}-byte body")
    header = _load_json(body[:json_length])
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ClientInputError('malformed binary V2 request header: "inputs" must be a list')
    binary = [isinstance(t, dict) and "data" not in t for t in header["inputs"]]
    for tensor, is_binary in zip(header["inputs"], binary):
        if is_binary:
            tensor["data"] = []
    try:
        request = InferRequest.from_inference_request(InferenceRequest.model_validate(header), model_name)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ClientInputError(f"malformed binary V2 request header: {problems}") from None
    offset = json_length
    for tensor, is_binary in zip(request.inputs, binary):
        if not is_binary:
            continue
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            raise ClientInputError(f"'data' field is missing for input '{tensor.name}', and no binary_data_size follows")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise ClientInputError(f"input '{tensor.name}': binary_data_size {size!r} does not fit the {len(body)}-byte body")
        tensor.data = _decode_binary_tensor(body[offset : offset + size], tensor.datatype, tensor.name)
        offset += size
    return request


def _decode_binary_tensor(raw: bytes, datatype: str, name: str) -> np.ndarray:
    dtype = to_np_dtype(datatype)
    if dtype is None:
        raise ClientInputError(f"input '{name}' has unknown datatype {datatype}")
    try:
        if datatype == "BYTES":
            return deserialize_bytes_tensor(raw)
        return np.frombuffer(raw, dtype=dtype)
    except (struct.error, ValueError) as exc:
        raise ClientInputError(f"input '{name}': binary data is not a valid {datatype} tensor: {exc}") from None
