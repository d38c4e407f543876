"""Request bodies → `AudioRequest`: V1 JSON, raw audio, V2 from REST JSON, binary data or gRPC.

kserve 0.21's `InferRequest.from_bytes` turns binary BYTES tensors into UTF-8 strings, so binary
audio sent with the V2 binary data extension (tritonclient's default) fails there with a 500; we
parse that extension here and keep the bytes (`parse_binary_extension`).
"""

import base64
import binascii
import struct
from typing import Any, Mapping, Union

import numpy as np
import orjson
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from google.protobuf.unknown_fields import UnknownFieldSet
from kserve.protocol.grpc.grpc_predict_v2_pb2 import InferParameter
from kserve.protocol.infer_type import InferInput, InferRequest, to_http_parameters
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from kserve.utils.numpy_codec import to_np_dtype
from pydantic import ValidationError

from ..errors import ClientInputError, shown
from . import (AUDIO_INPUT, EMBEDDING_OUTPUTS, EXPLANATION_OUTPUT, MODEL_PARAMETERS, OUTPUT_TYPES, SEGMENT_OUTPUTS, WAVEFORM_INPUT,
               AudioRequest, Clip)

# sampling_rate belongs to the waveform input, but tritonclient.grpc cannot set input parameters,
# so it is taken from the request's parameters too (the input's wins).
RATE_PARAMETER = "sampling_rate"
# Set by V2 clients themselves (tritonclient, kserve's clients) and honoured by kserve's encoder.
PROTOCOL_PARAMETERS = ("binary_data_output",)
OUTPUT_PARAMETERS = ("binary_data",)
INPUT_PARAMETERS = {AUDIO_INPUT: ("binary_data_size",), WAVEFORM_INPUT: ("binary_data_size", RATE_PARAMETER)}
DEFAULT_SAMPLING_RATE = 16_000
WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")


def parse(payload: Union[dict, bytes, InferRequest], max_clips: int) -> AudioRequest:
    """The request's clips and parameters; more than `max_clips` clips are refused from their count,
    before any is decoded from base64."""
    if isinstance(payload, InferRequest):
        return _parse_v2(payload, max_clips)
    if isinstance(payload, (bytes, bytearray)):
        return AudioRequest(clips=[bytes(payload)])
    if isinstance(payload, dict):
        return _parse_v1(payload, max_clips)
    raise ClientInputError(f"unsupported request body of type {type(payload).__name__}")


def _parse_v1(body: dict, max_clips: int) -> AudioRequest:
    unknown = set(body) - {"instances", "parameters"}
    if unknown:
        raise ClientInputError(f"unknown field(s) {shown(sorted(unknown))}; a V1 request has 'instances' and 'parameters'")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ClientInputError('"instances" must be a non-empty list of {"b64": "<base64 audio file>"}')
    _check_count(len(instances), max_clips)
    clips: list[Clip] = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise ClientInputError(f'instances[{i}] must be {{"b64": "<base64 of an audio file>"}}')
        clips.append(_b64decode(instance["b64"], f"instances[{i}].b64"))
    parameters = body.get("parameters")
    return AudioRequest(clips=clips, parameters=_model_parameters({} if parameters is None else parameters, ()))


def _parse_v2(request: InferRequest, max_clips: int) -> AudioRequest:
    if len(request.inputs) != 1:
        names = [i.name for i in request.inputs]
        raise ClientInputError(
            f"expected exactly one input, '{AUDIO_INPUT}' or '{WAVEFORM_INPUT}'; got {len(names)}: {names}"
        )
    tensor = request.inputs[0]
    if tensor.shape and isinstance(tensor.shape[0], int):  # the rest of the shape is checked with the data
        _check_count(tensor.shape[0] if len(tensor.shape) > 1 or tensor.name == AUDIO_INPUT else 1, max_clips)
    if tensor.name not in INPUT_PARAMETERS:
        raise ClientInputError(f"unknown input {shown(tensor.name)}; inputs are '{AUDIO_INPUT}' and '{WAVEFORM_INPUT}'")
    input_parameters = _http_parameters(tensor.parameters or {})
    unknown = set(input_parameters) - set(INPUT_PARAMETERS[tensor.name])
    if unknown:
        raise ClientInputError(f"unknown parameter(s) {shown(sorted(unknown))} on input '{tensor.name}'")
    request_parameters = _http_parameters(request.parameters or {})
    parameters = _model_parameters(request_parameters, PROTOCOL_PARAMETERS + (RATE_PARAMETER,))
    if request.from_grpc:
        parameters = _grpc_numbers(parameters)
    if tensor.name == AUDIO_INPUT:
        if RATE_PARAMETER in request_parameters:
            raise ClientInputError("sampling_rate applies to the 'waveform' input; an encoded file states its own")
        clips = _audio_clips(tensor)
    else:
        rate = input_parameters.get(RATE_PARAMETER, request_parameters.get(RATE_PARAMETER, DEFAULT_SAMPLING_RATE))
        clips = _waveform_clips(tensor, rate)
    requested = _requested_outputs(request)
    for outputs, parameter, what in ((SEGMENT_OUTPUTS, "return_segments", "segments"),
                                     (EMBEDDING_OUTPUTS, "return_embedding", "embeddings"),
                                     ((EXPLANATION_OUTPUT,), "explain", "explanations")):
        asked = requested & set(outputs)  # asking for such an output is asking for what it holds
        if asked and parameters.setdefault(parameter, True) is False:
            raise ClientInputError(f"output(s) {shown(sorted(asked))} need {what}, but {parameter} is false")
    return AudioRequest(clips=clips, parameters=parameters, v2=request)


# Triton's InferParameter fields that kserve's lacks: (field number, protobuf wire type) → value.
TRITON_PARAMETERS = {(4, 1): lambda bits: struct.unpack("<d", struct.pack("<Q", bits))[0],  # double_param
                     (5, 0): lambda value: value}  # uint64_param


def _http_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """kserve's `to_http_parameters`, and the parameters it drops: tritonclient.grpc sends a
    Python float as Triton's double_param, which kserve's InferParameter (bool, int64, string) does
    not have, so it arrives as an unknown field and `hop_seconds=2.5` would vanish, answered at the
    default hop. Read from the unknown fields here."""
    converted = to_http_parameters(parameters)
    for key, value in parameters.items():
        if isinstance(value, InferParameter) and key not in converted:
            for unknown in UnknownFieldSet(value):
                read = TRITON_PARAMETERS.get((unknown.field_number, unknown.wire_type))
                if read is not None:
                    converted[key] = read(unknown.data)
            if key not in converted:
                raise ClientInputError(f"parameter {shown(key)} has no value (a gRPC InferParameter with none set)")
    return converted


def _grpc_numbers(parameters: dict) -> dict:
    """kserve's own gRPC client has no double either (it refuses a float): there a fractional
    hop_seconds comes as text ("2.5"), so it is read as a number."""
    hop = parameters.get("hop_seconds")
    if isinstance(hop, str):
        try:
            return {**parameters, "hop_seconds": float(hop)}
        except ValueError:
            pass  # refused with the usual message
    return parameters


def _requested_outputs(request: InferRequest) -> set[str]:
    """kserve's REST encoder checks requested names, its gRPC encoder ignores them: check here,
    once, before anything is computed."""
    wanted = {o.name for o in request.request_outputs or []}
    unknown = wanted - {o["name"] for o in OUTPUT_TYPES}
    if unknown:
        raise ClientInputError(
            f"unknown requested output(s) {shown(sorted(unknown))}; outputs are {', '.join(o['name'] for o in OUTPUT_TYPES)}"
        )
    for output in request.request_outputs or []:
        parameters = set(_http_parameters(output.parameters or {})) - set(OUTPUT_PARAMETERS)
        if "classification" in parameters:  # tritonclient's InferRequestedOutput(class_count=k)
            raise ClientInputError(
                f"requested output {shown(output.name)}: Triton's classification extension (class_count) is not "
                "served; the 'label' and 'score' outputs already hold each clip's top labels: set the top_k parameter")
        if parameters:
            raise ClientInputError(f"unknown parameter(s) {shown(sorted(parameters))} on requested output "
                                   f"{shown(output.name)}; an output takes binary_data")
    return wanted


def _audio_clips(tensor: InferInput) -> list[Clip]:
    _expect_datatype(tensor, "BYTES")
    # Checked before the data is read ([1, 8000000] would be read element by element); the data
    # comes back in that shape, so an empty tensor is the one thing left to refuse after.
    elements = _as_numpy(tensor) if len(tensor.shape) == 1 else None
    if elements is None or elements.size == 0:
        raise ClientInputError(f"input '{AUDIO_INPUT}' must have shape [N] with N ≥ 1, got {shown(list(tensor.shape))}")
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
        raise ClientInputError(f"input '{tensor.name}' must have datatype {datatype}, got {shown(tensor.datatype)}")


def _as_numpy(tensor: InferInput) -> np.ndarray:
    """kserve's conversion, with its plain ValueError (a 500) for a shape/data mismatch made a 400."""
    shape = list(tensor.shape)
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ClientInputError(f"input '{tensor.name}' has an invalid shape {shown(shape)}")
    count = int(np.prod(shape)) if shape else 1
    try:
        raw = tensor._raw_data  # gRPC's raw_input_contents, or the binary extension's bytes (`parse_binary_extension`)
        if raw is not None and tensor.datatype == "BYTES":
            return _bytes_elements(raw, count).reshape(shape)
        return tensor.as_numpy()
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise ClientInputError(
            f"input '{tensor.name}' declares shape {shown(shape)} ({count} elements) but its data does not fit it: {exc}"
        ) from None


def _bytes_elements(raw: bytes, count: int) -> np.ndarray:
    """A BYTES tensor's elements, each a 4-byte little-endian length and its bytes: the `count` the
    shape declares and no more. kserve's `deserialize_bytes_tensor` reads every element there is, a
    Python step each, before the shape is compared: 32 MiB of zeros are 8 million empty elements,
    seconds of the event loop for a request that declares one."""
    elements, offset = [], 0
    for _ in range(count):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError(f"element {len(elements)} declares {length} bytes, {offset + length - len(raw)} more than follow")
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ValueError(f"{len(raw) - offset} bytes follow its last element")
    array = np.empty(count, dtype=np.object_)
    array[:] = elements
    return array


def _model_parameters(parameters: Any, tolerated: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        raise ClientInputError('"parameters" must be an object')
    unknown = set(parameters) - set(MODEL_PARAMETERS) - set(tolerated)
    if unknown:
        raise ClientInputError(f"unknown parameter(s) {shown(sorted(unknown))}; supported: {', '.join(MODEL_PARAMETERS)}")
    return {k: v for k, v in parameters.items() if k in MODEL_PARAMETERS}


def _check_count(count: int, max_clips: int) -> None:
    if count > max_clips:
        raise ClientInputError(f"{count} clips in one request; this server takes at most {max_clips}")


def _b64decode(text: str, where: str) -> bytes:
    """Strict base64, except that ASCII whitespace is skipped as RFC 2045 decoders skip it: the
    `base64` command, MIME encoders and many Java and .NET clients break their output into lines."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        unbroken = text.translate(WHITESPACE)
        if len(unbroken) < len(text):
            return _b64decode(unbroken, where)
        raise ClientInputError(f"{where} is not valid base64 (line breaks and spaces are allowed): {exc}") from None


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientInputError(f"request body is neither audio nor valid JSON: {exc}") from None


def parse_binary_extension(body: bytes, headers: dict, model_name: str) -> InferRequest:
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
        raise ClientInputError(f"'{INFERENCE_CONTENT_LENGTH_HEADER}' is not a number: {shown(header_length)}") from None
    if not 0 < json_length <= len(body):
        raise ClientInputError(f"'{INFERENCE_CONTENT_LENGTH_HEADER}' {json_length} does not fit the {len(body)}-byte body")
    header = load_json(body[:json_length])
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
            raise ClientInputError(f"'data' field is missing for input {shown(tensor.name)}, and no binary_data_size follows")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise ClientInputError(f"input '{tensor.name}': binary_data_size {shown(size)} does not fit the {len(body)}-byte body")
        raw = body[offset : offset + size]
        if tensor.datatype == "BYTES":
            tensor._raw_data = raw  # read once its shape is checked (`_as_numpy`), as gRPC's raw contents are
        else:
            tensor.data = _decode_binary_tensor(raw, tensor.datatype, tensor.name)
        offset += size
    return request


def _decode_binary_tensor(raw: bytes, datatype: str, name: str) -> np.ndarray:
    dtype = to_np_dtype(datatype)
    if dtype is None:
        raise ClientInputError(f"input '{name}' has unknown datatype {datatype}")
    try:
        return np.frombuffer(raw, dtype=dtype)
    except ValueError as exc:
        raise ClientInputError(f"input '{name}': binary data is not a valid {datatype} tensor: {exc}") from None
