"""Property tests (hypothesis): whatever a client sends, the request parsers and the decoder answer with a
client error that says what is wrong, or with a well-formed request / a finite float32 mono waveform within
the limits; never another exception, a crash or a hang. And the real server answers such requests with
200 or 4xx, never 5xx, and keeps serving.

The oracles are tools/fuzz_decoder.py's (`make fuzz` searches the same properties, coverage-guided, for
longer). The decoder runs in a child process (`IsolatedDecoder`): libsndfile and FFmpeg are native code,
and a segfault there must fail a test, not end the session. Every run draws the same examples
(`derandomize`, no example database), so CI is reproducible; raise HYPOTHESIS_EXAMPLES_SCALE (e.g. 10) for
a longer search.

Inputs the server once answered with a 500 or a crash have a regression test each at the end.
"""

import copy
import json
import os
import struct
import sys

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tools import fuzz_decoder as fz

SCALE = float(os.environ.get("HYPOTHESIS_EXAMPLES_SCALE", "1"))
BASE_SETTINGS = settings(
    derandomize=True, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)


def examples(count: int) -> settings:
    return settings(BASE_SETTINGS, max_examples=max(1, int(count * SCALE)))


pytestmark = pytest.mark.timeout(300)  # a hang in pure Python code fails the test instead of the session


@pytest.fixture(scope="module")
def decoder():
    isolated = fz.IsolatedDecoder(timeout=60)
    yield isolated
    isolated.close()


def decoded(decoder: fz.IsolatedDecoder, clip, max_seconds: float = fz.MAX_SECONDS) -> fz.Outcome:
    """The clip through the decoder (in its own process): refused or a good waveform, else the test fails."""
    outcome = decoder.decode(clip, max_seconds)
    event(f"decoder: {outcome.kind}")
    assert outcome.ok, f"{outcome.kind} ({outcome.reader}, {outcome.channels} channels):\n{outcome.detail}"
    return outcome


def parsed(kind: str, body, headers=None, decoder=None):
    """`fz.parse_or_refuse`, every clip decoded by `decoder` (if given)."""
    return fz.parse_or_refuse(kind, body, headers, None if decoder is None else (lambda clip: decoded(decoder, clip)))


# ---- strategies ----------------------------------------------------------------------------------

WAV = fz.small_wav(0.05)
SMALL_FILES = [WAV, fz.small_wav(0.03, 8000), fz.seed_files()["flac-16k-mono"], fz.seed_files()["ogg-opus-48k-mono"]]
VOCABULARY = ["instances", "parameters", "b64", "inputs", "outputs", "name", "shape", "datatype", "data", "id",
              "audio", "waveform", "label", "score", "segment_start", "segment_label", "logits", "BYTES", "FP32",
              "FP16", "FP64", "INT64", "UINT8", "BOOL", "binary_data_size", "binary_data_output",
              "sampling_rate", "top_k", "function_to_apply", "hop_seconds", "aggregate", "return_segments",
              "sigmoid", "softmax", "none", "max", "mean", "specversion", "type", "source", "time",
              "data_base64", "datacontenttype", ""]
NUMBERS = [0, -1, 1, 2, 5, 10, 11, 400, 999, 1000, 16000, 768000, 768001, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
           2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, 0.5, 1.0, 10.24, 10.25, 6.25e-05, 1e-300,
           5e-324, 1e308, -1e308, float("inf"), float("-inf"), float("nan")]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(NUMBERS), st.floats(),
    st.text(max_size=12), st.sampled_from(VOCABULARY),
    st.sampled_from([fz.b64(f) for f in SMALL_FILES] + ["", "!!", "AAAA", "AA==\n", " QUFB "]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(VOCABULARY) | st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)


def nested(depth: int, leaf) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


deep_values = st.builds(nested, st.integers(1, 3000), scalars)
any_json = st.one_of(json_values, deep_values)


def _slots(value, parent=None, key=None, depth=0):
    """Every place in a document a mutation can change (not inside the deep nests themselves)."""
    yield parent, key
    if depth > 12:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _slots(v, value, k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _slots(v, value, i, depth + 1)


def to_json(value) -> bytes:
    """JSON text as a client would send it (NaN, huge integers, lone surrogates and 3000-deep nests too)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        return json.dumps(value, allow_nan=True).encode()
    finally:
        sys.setrecursionlimit(limit)


@st.composite
def mutated(draw, base):
    """A valid document with one to three changes anywhere in it: a value replaced by anything (a huge
    number, a deep list, the wrong type), a key or element dropped, an unknown one added."""
    document = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        parent, key = draw(st.sampled_from(list(_slots(document))))
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if parent is None:
            if action == "replace":
                document = draw(any_json)
            continue
        if action == "replace":
            parent[key] = draw(any_json)
        elif action == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(VOCABULARY))] = draw(any_json)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(any_json))
    return document


files = st.lists(st.sampled_from(SMALL_FILES), min_size=1, max_size=3)
parameters = st.fixed_dictionaries({}, optional={
    "top_k": st.integers(1, 10), "function_to_apply": st.sampled_from(["sigmoid", "softmax", "none"]),
    "hop_seconds": st.sampled_from([1, 2.5, 5, 10.24]), "aggregate": st.sampled_from(["max", "mean"]),
    "return_segments": st.booleans()})
valid_v1 = st.builds(lambda f, p: fz.v1_body(f, **p), files, parameters)
valid_v2_audio = st.builds(lambda f, p: fz.v2_audio_body(f, **p), files, parameters)
valid_v2_waveform = st.builds(lambda rows, n, rate: fz.v2_waveform_body(rows, n, rate),
                              st.integers(1, 3), st.integers(1, 900), st.sampled_from([8000, 16000, 44100]))
valid_v2 = st.one_of(valid_v2_audio, valid_v2_waveform).flatmap(
    lambda body: st.sampled_from([body, {**body, "outputs": [{"name": "label"}, {"name": "segment_start"}]}]))


@st.composite
def mutated_bytes(draw, data: bytes, header: int = 64) -> bytes:
    """Bytes changed as fuzzers change them: flips and overwrites (mostly in the header), 32-bit fields set
    to extremes, truncation, insertion, deletion, splicing."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "byte", "field", "field", "truncate", "insert", "delete", "splice"]))
        end = max(1, min(len(out), header) if draw(st.booleans()) else len(out))
        at = draw(st.integers(0, max(0, end - 1)))
        if action == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "byte" and out:
            out[at] = draw(st.integers(0, 255))
        elif action == "field" and len(out) >= 4:
            at = min(at, len(out) - 4)
            value = draw(st.sampled_from([0, 1, 2, 8, 9, 64, 65, 255, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
                         | st.integers(0, 2**32 - 1))
            out[at:at + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), value)
        elif action == "truncate":
            del out[draw(st.integers(0, len(out))):]
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif action == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        elif action == "splice":
            other = draw(st.sampled_from(sorted(fz.seed_files().values(), key=len)))
            start = draw(st.integers(0, len(other)))
            out[at:] = other[start:start + draw(st.integers(0, 4096))]
    return bytes(out)


seed_names = sorted(fz.seed_files())
mutated_files = st.sampled_from(seed_names).flatmap(lambda name: mutated_bytes(fz.seed_files()[name]))
MAGICS = [b"RIFF\x24\x00\x00\x00WAVEfmt ", b"RIFF\xff\xff\xff\xffWAVE", b"RF64\xff\xff\xff\xffWAVEds64", b"fLaC",
          b"OggS\x00\x02", b"ID3\x04\x00\x00", b"\xff\xfb\x90\x00", b"\xff\xf1\x50\x80", b"\x00\x00\x00\x1cftypM4A ",
          b"\x1aE\xdf\xa3", b"FORM\x00\x00\x00\x00AIFF", b"#EXTM3U\n", b"ffconcat version 1.0\n", b"#!AMR\n", b""]
random_bytes = st.one_of(st.binary(max_size=2048),
                         st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGICS), st.binary(max_size=2048)))


# ---- the request parsers -------------------------------------------------------------------------


@examples(150)
@given(document=st.one_of(any_json, mutated(valid_v1)))
def test_v1_documents_parse_or_are_refused(document, decoder):
    """A decoded V1 body of any shape straight into `parse` (as kserve hands it over)."""
    parsed("v1-dict", document, decoder=decoder if isinstance(document, dict) else None)


V1_HEADERS = st.one_of(
    st.just({}), st.sampled_from([{"content-type": t} for t in fz.V1_CONTENT_TYPES if t]),
    st.builds(lambda t: {**fz.CLOUDEVENT, **({"content-type": t} if t else {})}, st.sampled_from(fz.V1_CONTENT_TYPES)),
    st.dictionaries(st.sampled_from(["content-type", "ce-specversion", "ce-id", "ce-source", "ce-type",
                                     "ce-datacontenttype", "inference-header-content-length"]),
                    st.text(max_size=30), max_size=5),
)


@st.composite
def v1_bodies(draw):
    kind = draw(st.sampled_from(["json", "json", "raw", "structured", "garbage"]))
    if kind == "json":
        return to_json(draw(st.one_of(mutated(valid_v1), json_values)))
    if kind == "structured":
        event = fz.structured_event({"datacontenttype": draw(st.sampled_from([fz.JSON_TYPE, "audio/wav", "text/plain"])),
                                     **draw(st.sampled_from([{"data": fz.v1_body([WAV])}, {"data_base64": fz.b64(WAV)},
                                                             {"data": "x"}, {}]))})
        return to_json(draw(mutated(st.just(event))))
    if kind == "raw":
        return draw(st.sampled_from(SMALL_FILES))
    return draw(random_bytes)


@examples(150)
@given(body=v1_bodies(), headers=V1_HEADERS)
def test_v1_http_bodies_through_the_dataplane(body, headers, decoder):
    """A V1 body as bytes with its headers, through `AudioDataPlane.decode` (raw audio, JSON in any
    content type, binary and structured CloudEvents) and on to `parse`."""
    parsed("v1", body, headers, decoder)


@examples(150)
@given(document=st.one_of(mutated(valid_v2), valid_v2, json_values, st.fixed_dictionaries(
    {"inputs": st.lists(st.dictionaries(st.sampled_from(VOCABULARY), any_json, max_size=6), max_size=2)})),
    as_text=st.booleans())
def test_v2_json_documents_parse_or_are_refused(document, as_text, decoder):
    """A V2 JSON body (as text, or as the parsed document) through kserve's pydantic model (its 422s are
    FastAPI's) and DataPlane to `parse`."""
    parsed("v2-json", to_json(document) if as_text else document, {"content-type": fz.JSON_TYPE}, decoder)


@st.composite
def binary_requests(draw):
    if draw(st.booleans()):
        body, headers = fz.binary_audio(draw(files), **draw(parameters))
    else:
        rate = draw(st.sampled_from([8000, 16000, 48000, 0, -1, 2**40, "x", 1.5]))
        body, headers = fz.binary_waveform(fz.signal(16000, 1, draw(st.integers(1, 600)) / 16000)[:, 0], rate)
    length = int(headers[fz.BINARY_HEADER])
    header, payload = json.loads(body[:length]), body[length:]
    if draw(st.booleans()):
        header = draw(mutated(st.just(header)))
    if draw(st.booleans()):
        payload = draw(mutated_bytes(payload, header=16))
    head = to_json(header)
    declared = draw(st.one_of(st.just(str(len(head))), st.integers(-5, len(head) + len(payload) + 5).map(str),
                              st.sampled_from(["", "x", "1e3", " 12", "0x10", "99999999999999999999"])))
    return head + payload, {"content-type": "application/octet-stream", fz.BINARY_HEADER: declared}


@examples(150)
@given(request=binary_requests())
def test_v2_binary_requests_parse_or_are_refused(request, decoder):
    """The V2 binary data extension: a (mutated) JSON header, (mutated) tensor bytes, any declared length."""
    body, headers = request
    parsed("v2-binary", body, headers, decoder)


@examples(100)
@given(body=st.binary(max_size=512), json_length=st.integers(-2, 600).map(str))
def test_v2_binary_random_bytes_are_refused(body, json_length):
    parsed("v2-binary", body, {fz.BINARY_HEADER: json_length}, None)


INT64 = st.integers(-(2**63), 2**63 - 1)
GRPC_PARAMETER = INT64 | st.integers(-2, 20) | st.booleans() | st.text(max_size=8) | st.sampled_from(
    ["sigmoid", "max", "mean", "16000"])


@st.composite
def grpc_requests(draw):
    """A gRPC ModelInferRequest: a valid one (audio as bytes_contents or raw_input_contents, or a waveform
    as fp32_contents or raw) with some of its fields changed, or one made of random fields."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="ast", id=draw(st.text(max_size=8)))
    raw = draw(st.booleans())
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        audio = draw(st.booleans())
        clips = draw(st.lists(st.sampled_from(SMALL_FILES), min_size=1, max_size=3))
        samples = fz.signal(16000, 1, draw(st.integers(1, 900)) / 16000)[:, 0]
        tensor = request.inputs.add(name="audio" if audio else "waveform", datatype="BYTES" if audio else "FP32")
        tensor.shape.extend([len(clips)] if audio else [1, len(samples)])
        if draw(st.booleans()):
            tensor.name = draw(st.sampled_from(["audio", "waveform", "wav", ""]))
        if draw(st.booleans()):
            tensor.datatype = draw(st.sampled_from(["BYTES", "FP32", "FP16", "INT64", "BOOL", "x"]))
        if draw(st.booleans()):
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(INT64 | st.integers(-2, 4), max_size=3)))
        if not audio:
            _set_parameter(tensor.parameters["sampling_rate"], draw(st.sampled_from([8000, 16000]) | GRPC_PARAMETER))
        for name, value in draw(st.dictionaries(st.sampled_from(["sampling_rate", "binary_data_size", "x"]),
                                                GRPC_PARAMETER, max_size=1)).items():
            _set_parameter(tensor.parameters[name], value)
        if raw:
            content = fz.serialize_bytes(clips) if audio else samples.tobytes()
            request.raw_input_contents.append(draw(st.sampled_from([content, content[:-1], content + b"\x00"]) |
                                                   st.binary(max_size=256)))
        elif audio:
            tensor.contents.bytes_contents.extend(draw(st.just(clips) | st.lists(st.binary(max_size=64), max_size=3)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.just(samples.tolist()) |
                                                      st.lists(st.floats(width=32), max_size=64)))
    for name, value in draw(st.dictionaries(st.sampled_from(["top_k", "hop_seconds", "sampling_rate",
                                                             "return_segments", "aggregate", "function_to_apply",
                                                             "binary_data_output", "x"]),
                                            GRPC_PARAMETER, max_size=3)).items():
        _set_parameter(request.parameters[name], value)
    for name in draw(st.lists(st.sampled_from(["label", "score", "segment_label", "logits"]), max_size=2)):
        request.outputs.add(name=name)
    return request


def _set_parameter(parameter, value) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    else:
        parameter.string_param = value


@examples(150)
@given(message=grpc_requests())
def test_grpc_requests_parse_or_are_refused(message, decoder):
    """The gRPC path: kserve's request check and `InferRequest.from_grpc` (contents or raw_input_contents),
    then `parse` and every clip through the decoder."""
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest

    from predictor.protocol.requests import parse

    try:
        InferenceServicer.validate_grpc_request(message)
        request = parse(InferRequest.from_grpc(message), fz.MAX_CLIPS)
        fz.check_request(request, "v2-grpc")
        fz._options_model()._options(request.parameters)
    except fz.refusals() as exc:
        fz.check_refusal(exc)
        return
    for clip in request.clips:
        decoded(decoder, clip)


@examples(200)
@given(values=st.dictionaries(st.sampled_from(["top_k", "function_to_apply", "hop_seconds", "aggregate",
                                               "return_segments"]), any_json, max_size=5))
def test_model_parameters_are_checked_or_refused(values):
    """`ASTModel._options`: a client error, or options every later step can use."""
    from predictor.errors import ClientInputError

    try:
        options = fz._options_model()._options(values)
    except ClientInputError as exc:
        fz.check_refusal(exc)
        return
    assert isinstance(options.top_k, int) and 1 <= options.top_k <= 10
    assert options.function in ("sigmoid", "softmax", "none") and options.aggregate in ("max", "mean")
    assert isinstance(options.hop_seconds, float) and 1 / 16000 <= options.hop_seconds <= 10.24
    assert isinstance(options.return_segments, bool)


# ---- the decoder ---------------------------------------------------------------------------------


@examples(120)
@given(data=random_bytes)
def test_random_bytes_are_refused(data, decoder):
    decoded(decoder, data)


@examples(300)
@given(data=mutated_files)
def test_mutated_real_files_decode_or_are_refused(data, decoder):
    """Real WAV/FLAC/OGG/MP3/M4A/WebM/AAC/... files, bytes flipped, fields set to extremes, cut, spliced."""
    decoded(decoder, data, max_seconds=5.0)


U16_EXTREMES = st.sampled_from([0, 1, 2, 7, 8, 9, 64, 65, 255, 256, 1024, 0x7FFF, 0xFFFF]) | st.integers(0, 0xFFFF)
U32_EXTREMES = st.sampled_from([0, 1, 999, 1000, 8000, 16000, 768000, 768001, 0x7FFFFFFF, 0x80000000,
                                0xFFFFFFFF]) | st.integers(0, 2**32 - 1)


WAV_FIELDS = ("format", "channels", "rate", "byte_rate", "block_align", "bits", "data_size", "riff_size")


@st.composite
def wav_files(draw):
    """A WAV of real samples where up to three header fields lie (format tag, channels, rate, byte rate,
    block align, bits, the data and RIFF chunk sizes), set to extremes: zero, huge, past the file's end."""
    channels, rate, bits = draw(st.sampled_from([1, 2, 6])), draw(st.sampled_from([8000, 16000, 44100])), 16
    frames = draw(st.integers(0, 2000))
    data = (fz.signal(rate, channels, frames / rate) * 32767).astype("<i2").tobytes()
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]  # and the file may end early
    lies = draw(st.sets(st.sampled_from(WAV_FIELDS), min_size=1, max_size=3))
    field = {"format": 1, "channels": channels, "rate": rate, "byte_rate": rate * channels * 2,
             "block_align": channels * 2, "bits": bits, "data_size": len(data)}
    extremes = {"format": st.sampled_from([0, 2, 3, 6, 7, 17, 0x55, 0xFFFE]) | st.integers(0, 0xFFFF),
                "channels": U16_EXTREMES, "rate": U32_EXTREMES, "byte_rate": U32_EXTREMES,
                "block_align": U16_EXTREMES, "bits": st.sampled_from([0, 1, 8, 12, 24, 32, 64]) | U16_EXTREMES,
                "data_size": U32_EXTREMES, "riff_size": U32_EXTREMES}
    for name in lies:
        field[name] = draw(extremes[name])
    chunk = struct.pack("<HHIIHH", field["format"], field["channels"], field["rate"], field["byte_rate"],
                        field["block_align"], field["bits"])
    if field["format"] == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: valid bits, channel mask, sub-format GUID
        chunk += struct.pack("<HHI", 22, bits, draw(st.integers(0, 2**32 - 1))) + \
            draw(st.sampled_from([b"\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"]) |
                 st.binary(min_size=16, max_size=16))
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(chunk)) + chunk + b"data" + \
        struct.pack("<I", field["data_size"]) + data
    return b"RIFF" + struct.pack("<I", field.get("riff_size", len(body))) + body


@examples(150)
@given(data=wav_files())
def test_wav_headers_that_lie_decode_or_are_refused(data, decoder):
    """Huge or zero channel counts and rates, sizes past the end of the file, unknown formats."""
    decoded(decoder, data, max_seconds=5.0)


FLAC_FIELDS = ("min_block", "max_block", "min_frame", "max_frame", "rate", "channels", "bits", "total")


@st.composite
def flac_files(draw):
    """A real FLAC file where up to three STREAMINFO fields lie: block and frame sizes, rate (20 bits),
    channels (3 bits), bits per sample (5 bits), total samples (36 bits)."""
    data = bytearray(fz.seed_files()[draw(st.sampled_from(["flac-16k-mono", "flac-24bit-44k-stereo",
                                                           "streamed-flac-16k.flac"]))])
    info = 8  # "fLaC", then the STREAMINFO block header
    blocks = struct.unpack(">HH", data[info:info + 4])
    frames = int.from_bytes(data[info + 4:info + 7], "big"), int.from_bytes(data[info + 7:info + 10], "big")
    packed = int.from_bytes(data[info + 10:info + 18], "big")
    field = {"min_block": blocks[0], "max_block": blocks[1], "min_frame": frames[0], "max_frame": frames[1],
             "rate": packed >> 44, "channels": (packed >> 41) & 7, "bits": (packed >> 36) & 31,
             "total": packed & (2**36 - 1)}
    extremes = {"min_block": U16_EXTREMES, "max_block": U16_EXTREMES, "min_frame": st.integers(0, 2**24 - 1),
                "max_frame": st.integers(0, 2**24 - 1),
                "rate": st.sampled_from([0, 1, 999, 8000, 655350, 768000, 2**20 - 1]) | st.integers(0, 2**20 - 1),
                "channels": st.integers(0, 7), "bits": st.integers(0, 31),
                "total": st.sampled_from([0, 1, 4800, 10**9, 2**32, 2**36 - 1]) | st.integers(0, 2**36 - 1)}
    for name in draw(st.sets(st.sampled_from(FLAC_FIELDS), min_size=1, max_size=3)):
        field[name] = draw(extremes[name])
    packed = (field["rate"] << 44) | (field["channels"] << 41) | (field["bits"] << 36) | field["total"]
    data[info:info + 18] = struct.pack(">HH", field["min_block"], field["max_block"]) + \
        field["min_frame"].to_bytes(3, "big") + field["max_frame"].to_bytes(3, "big") + packed.to_bytes(8, "big")
    return bytes(data)


@examples(80)
@given(data=flac_files())
def test_flac_streaminfo_that_lies_decodes_or_is_refused(data, decoder):
    decoded(decoder, data, max_seconds=5.0)


@examples(80)
@given(samples=st.one_of(
    st.lists(st.floats(width=32), min_size=0, max_size=2000).map(lambda v: np.asarray(v, np.float32)),
    st.integers(0, 3).map(lambda n: np.full((n, 3), 0.1, np.float32)),
    st.sampled_from([np.zeros(0, np.float32), np.full(16000, 1e30, np.float32), np.full(400, np.nan, np.float32)])),
    rate=st.one_of(st.sampled_from([1000, 8000, 16000, 44100, 768000, np.int64(16000), np.float64(8000.0)]),
                   scalars, st.sampled_from([16000.5, 999, 768001, 2**70])))
def test_waveform_clips_decode_or_are_refused(samples, rate, decoder):
    """A client's waveform with any rate: what V2 `waveform` inputs become after `parse`."""
    decoded(decoder, (samples, rate))


# ---- the real server -----------------------------------------------------------------------------


@st.composite
def http_requests(draw):
    """(path, body, headers, kind) for the server: the bodies above."""
    protocol = draw(st.sampled_from(["v1", "v1", "v2-json", "v2-binary"]))
    if protocol == "v1":
        headers = {k: v for k, v in draw(V1_HEADERS).items() if _sendable(v)}
        return "predict", draw(v1_bodies()), headers, "v1"
    if protocol == "v2-json":
        document = draw(st.one_of(mutated(valid_v2), valid_v2))
        return "infer", to_json(document), {"content-type": fz.JSON_TYPE}, "v2-json"
    body, headers = draw(binary_requests())
    return "infer", body, {k: v for k, v in headers.items() if _sendable(v)}, "v2-binary"


def _sendable(value: str) -> bool:
    """What an HTTP client can put in a header value: visible ASCII and inner spaces."""
    return value == value.strip() and all(0x20 <= ord(c) <= 0x7E for c in value)


@examples(30)
@given(request=http_requests())
def test_the_server_answers_200_or_4xx(request, server, decoder):
    path, body, headers, kind = request
    parsed(kind, body, headers, decoder)  # a finding fails here, with its traceback, before the server sees it
    url = server.predict_url if path == "predict" else server.infer_url
    response = requests.post(url, data=body, headers=headers, timeout=120)
    note(response.text[:500])
    event(f"HTTP {response.status_code}")
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)


def test_the_server_still_serves_after_the_properties(server):
    assert server.process.poll() is None, "the server died"
    response = requests.post(server.predict_url, data=WAV, headers={"content-type": "audio/wav"}, timeout=60)
    assert response.status_code == 200 and len(response.json()["predictions"][0]) == 5, response.text


# ---- inputs the server once answered with a 500 or a crash -----------------------------------------


@pytest.mark.parametrize("name, channels, args", [
    ("7.1.m4a", 8, ["-c:a", "aac"]),
    ("16ch.webm", 16, ["-c:a", "libopus", "-mapping_family", "255"]),
], ids=["aac-7.1-m4a", "opus-16ch-webm"])
def test_ffmpeg_audio_of_8_or_more_channels_decodes_to_its_mono_mix(tmp_path, decoder, name, channels, args):
    """PyAV's `AudioFrame.planes` reads past the end of planar frames of 8+ channels (garbage samples, or a
    segfault of the server); the decoder converts every frame to packed float first. The decoded waveform
    is the mean of the channels' tones, give or take the codec's padding (an AAC frame is 1024 samples)."""
    outcome = decoder.decode(fz.ffmpeg_file(tmp_path, name, 48000, channels, args))
    assert outcome.kind == "waveform" and outcome.channels == channels, outcome
    waveform, expected = outcome.waveform, fz.signal(16000, channels).mean(axis=1)
    assert abs(len(waveform) - len(expected)) <= 2 * 1024 * 16000 // 48000, len(waveform)
    assert np.corrcoef(waveform[:len(expected)], expected[:len(waveform)])[0, 1] > 0.95


@pytest.mark.parametrize("path, body, headers, message", [
    ("infer", to_json({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1], "data": [10**400]}]}),
     {"content-type": fz.JSON_TYPE}, "does not fit"),
    ("predict", to_json(fz.v1_body([WAV], top_k=nested(1000, 1))), {"content-type": fz.JSON_TYPE},
     "top_k must be a positive integer"),
    ("predict", b"\x80", {"content-type": fz.STRUCTURED}, "not a valid CloudEvent"),
    ("predict", b"3", {**fz.CLOUDEVENT, "content-type": fz.STRUCTURED}, "not a valid CloudEvent"),
    ("predict", b"x", {**fz.CLOUDEVENT, "content-type": fz.STRUCTURED}, "not a valid CloudEvent"),
    ("predict", json.dumps(fz.structured_event({"datacontenttype": 5, "data": "x"})).encode(),
     {"content-type": fz.STRUCTURED}, "datacontenttype must be a string"),
], ids=["v2-json-integer-beyond-float-range", "parameter-nested-1000-deep", "structured-cloudevent-not-utf8",
        "ce-headers-and-structured-int", "ce-headers-and-structured-not-json",
        "structured-cloudevent-datacontenttype-not-a-string"])
def test_malformed_requests_get_a_400_that_says_what_is_wrong(server, path, body, headers, message):
    """Each once escaped the parsers' client errors as another exception: a 500."""
    url = server.predict_url if path == "predict" else server.infer_url
    response = requests.post(url, data=body, headers=headers, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"], response.text
    assert len(response.text) < 2000, "the message quotes the client's value in full"
