"""Bad input of every kind gets a 4xx naming the problem, and the server keeps serving."""

import base64
import http.server
import json
import struct
import threading

import numpy as np
import psutil
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from .conftest import encode, nested_boxes, peak_rss_bytes, tone

RATE = 16000
GOOD_WAV = encode(tone(440, 1.0, RATE), RATE, "WAV", "PCM_16")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(*files: bytes, **parameters) -> dict:
    body: dict = {"instances": [{"b64": b64(f)} for f in files]}
    if parameters:
        body["parameters"] = parameters
    return body


def v2_audio(*files: bytes, shape=None, datatype="BYTES", name="audio", **parameters) -> dict:
    return {
        "inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(files)], "data": [b64(f) for f in files]}],
        "parameters": parameters,
    }


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def wav_with_nan() -> bytes:
    samples = tone(440, 1.0, RATE)
    samples[10:20] = np.nan
    return encode(samples, RATE, "WAV", "FLOAT")


V1_CASES = {
    "not-audio": (v1(b"<html>not audio</html>"), "could not decode audio"),
    "empty-file": (v1(b""), "audio is empty"),
    "truncated-wav": (v1(truncated(encode(tone(440, 2.0, RATE), RATE, "WAV", "PCM_16"))), "truncated"),
    "truncated-flac": (v1(truncated(encode(tone(440, 2.0, RATE), RATE, "FLAC", "PCM_16"))), "could not decode audio"),
    "zero-length": (v1(encode(np.zeros(0, np.float32), RATE, "WAV", "PCM_16")), "no samples"),
    "too-short": (v1(encode(np.zeros(100, np.float32), RATE, "WAV", "PCM_16")), "at least 400"),
    "nan": (v1(wav_with_nan()), "NaN or infinite"),
    "too-long": (v1(encode(np.zeros(RATE * 31, np.float32), RATE, "WAV", "PCM_16")), "at most 30 s"),
    "too-many-clips": (v1(*[GOOD_WAV] * 7), "at most 6"),
    "too-many-channels": (v1(encode(np.zeros((RATE, 65), np.float32), RATE, "WAV", "FLOAT")),
                          "audio has 65 channels; this server accepts at most 64 (--max_channels)"),
    "rate-too-low": (v1(encode(np.zeros(4000, np.float32), 500, "WAV", "PCM_16")),
                     "audio is sampled at 500 Hz, outside 1000..768000 Hz"),
    "rate-too-high": (v1(encode(np.zeros(4000, np.float32), 900_000, "WAV", "PCM_16")),
                      "audio is sampled at 900000 Hz, outside 1000..768000 Hz"),
    "parameters-not-object": ({**v1(GOOD_WAV), "parameters": [1, 2]}, '"parameters" must be an object'),
    # Counted before anything is decoded: seven broken clips are refused for their number.
    "too-many-broken-clips": ({"instances": [{"b64": "!!"}] * 7}, "7 clips in one request; this server takes at most 6"),
    "huge-samples": (v1(encode(np.full(RATE, 1e30, np.float32), RATE, "WAV", "FLOAT")),
                     "waveform has samples as large as 1e+30; this server takes samples within ±1e+14"),
    "bad-base64": ({"instances": [{"b64": "not base64 !!"}]}, "not valid base64"),
    "mp4-boxes-nested-past-ffmpeg": (v1(nested_boxes(b"moov", 1500)), "the MP4 file nests 'moov' boxes more than 10 deep"),
    "instances-not-list": ({"instances": {"b64": b64(GOOD_WAV)}}, "non-empty list"),
    "no-instances": ({"instances": []}, "non-empty list"),
    "instance-not-b64": ({"instances": [b64(GOOD_WAV)]}, 'must be {"b64"'),
    "unknown-field": ({"instances": [{"b64": b64(GOOD_WAV)}], "inputs": []}, "unknown field"),
    "top_k-zero": (v1(GOOD_WAV, top_k=0), "top_k must be a positive integer"),
    "top_k-string": (v1(GOOD_WAV, top_k="5"), "top_k must be"),
    "function": (v1(GOOD_WAV, function_to_apply="relu"), "function_to_apply must be one of"),
    "unknown-parameter": (v1(GOOD_WAV, temperature=2), "unknown parameter(s) ['temperature']"),
}

V2_CASES = {
    "not-audio": (v2_audio(b"GIF89a"), "could not decode audio"),
    "shape-mismatch": (v2_audio(GOOD_WAV, shape=[3]), "declares shape [3]"),
    "shape-2d": (v2_audio(GOOD_WAV, GOOD_WAV, shape=[1, 2]), "must have shape [N]"),
    "negative-shape": (v2_audio(GOOD_WAV, shape=[-1]), "invalid shape"),
    "wrong-datatype": (v2_audio(GOOD_WAV, datatype="FP32"), "must have datatype BYTES"),
    "unknown-input": (v2_audio(GOOD_WAV, name="wav"), "unknown input 'wav'"),
    "no-input": ({"inputs": []}, "expected exactly one input"),
    "two-inputs": ({"inputs": v2_audio(GOOD_WAV)["inputs"] * 2}, "expected exactly one input"),
    "bad-base64": ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "not valid base64"),
    "top_k": (v2_audio(GOOD_WAV, top_k=-1), "top_k must be"),
    "function": (v2_audio(GOOD_WAV, function_to_apply="tanh"), "function_to_apply must be one of"),
    "unknown-parameter": (v2_audio(GOOD_WAV, beam_size=4), "unknown parameter"),
    "rate-on-audio": (v2_audio(GOOD_WAV, sampling_rate=8000), "sampling_rate applies to the 'waveform' input"),
    "waveform-wrong-datatype": (
        {"inputs": [{"name": "waveform", "datatype": "INT16", "shape": [1, 3], "data": [1, 2, 3]}]}, "must have datatype FP32"),
    "waveform-shape": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [2, 1000], "data": [0.0] * 1000}]},
                       "declares shape [2, 1000]"),
    "waveform-strings": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 2], "data": ["a", "b"]}]},
                         "does not fit"),
    "waveform-rate-zero": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1000], "data": [0.0] * 1000,
                                        "parameters": {"sampling_rate": 0}}]}, "sampling_rate 0 Hz"),
    "waveform-rate-huge": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1000], "data": [0.0] * 1000,
                                        "parameters": {"sampling_rate": 1e300}}]},
                           "sampling_rate 100000000000000005...6386865459400540160 Hz, outside"),  # not 301 digits
    "waveform-rate-string": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1000],
                                          "data": [0.0] * 1000, "parameters": {"sampling_rate": "fast"}}]},
                             "sampling_rate must be an integer"),
    "waveform-unknown-input-parameter": (
        {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1000], "data": [0.0] * 1000,
                     "parameters": {"channels": 2}}]}, "unknown parameter(s) ['channels'] on input 'waveform'"),
    "waveform-empty": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 0], "data": []}]}, "shape"),
    "unknown-output": ({**v2_audio(GOOD_WAV), "outputs": [{"name": "logits"}]}, "unknown requested output(s) ['logits']"),
    "too-many-broken-clips": ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [7], "data": ["!!"] * 7}]},
                              "7 clips in one request; this server takes at most 6"),
    "huge-waveform": ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 1000], "data": [3e20] * 1000}]},
                      "waveform has samples as large as 3e+20"),
    **{
        f"bytes-element-{kind}": ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": [value]}]},
                                  f"audio[0] must be an audio file (a base64 string in JSON, bytes in binary data or gRPC), got {kind}")
        for kind, value in [("int", 2_000_000_000), ("float", 1.5), ("NoneType", None), ("bool", True)]
    },
}


def assert_client_error(response: requests.Response, message: str) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert message in response.json()["error"], response.text


@pytest.mark.parametrize("case", V1_CASES, ids=list(V1_CASES))
def test_v1_bad_input(server, case):
    body, message = V1_CASES[case]
    assert_client_error(requests.post(server.predict_url, json=body), message)


@pytest.mark.parametrize("case", V2_CASES, ids=list(V2_CASES))
def test_v2_bad_input(server, case):
    body, message = V2_CASES[case]
    assert_client_error(requests.post(server.infer_url, json=body), message)


@pytest.mark.parametrize(
    "data, content_type, message",
    [
        (b"", "audio/wav", "audio is empty"),
        (b"\x00\x01\x02\x03" * 100, "application/octet-stream", "could not decode audio"),
        (b"{not json", "application/json", "neither audio nor valid JSON"),
        (b"{not json", "text/plain", "neither audio nor valid JSON"),
        (truncated(GOOD_WAV), None, "truncated"),
    ],
    ids=["empty", "octet-garbage", "broken-json", "broken-json-text-plain", "truncated-raw"],
)
def test_v1_bad_raw_body(server, data, content_type, message):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_client_error(requests.post(server.predict_url, data=data, headers=headers), message)


def binary_request(header: dict, payload: bytes, json_length=None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + payload, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head) if json_length is None else json_length),
    }


@pytest.mark.parametrize(
    "header, payload, message",
    [
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 999}}]},
         b"\x00" * 10, "binary_data_size 999 does not fit"),
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
         struct.pack("<I", 1000) + b"abcd", "element 0 declares 1000 bytes, 996 more than follow"),
        # A MiB of zeros is 262,144 empty elements: read up to the one declared, not each of them.
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 1 << 20}}]},
         b"\x00" * (1 << 20), f"declares shape [1] (1 elements) but its data does not fit it: {(1 << 20) - 4} bytes follow"),
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1, 2], "parameters": {"binary_data_size": 1 << 20}}]},
         b"\x00" * (1 << 20), "input 'audio' must have shape [N] with N ≥ 1, got [1, 2]"),  # before the data is read
        ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 7}}]},
         b"\x00" * 7, "not a valid FP32 tensor"),
        ({"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 8}}]},
         b"\x00" * 8, "declares shape [1, 3]"),
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1]}]}, b"", "'data' field is missing"),
        ({"inputs": "audio"}, b"", "malformed binary V2 request header"),
        ({"parameters": [1], "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, b"",
         "malformed binary V2 request header: parameters"),
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": 1, "data": ["x"]}]}, b"",
         "malformed binary V2 request header: inputs.0.shape"),
        ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": "big"}]}, b"",
         "malformed binary V2 request header: inputs.0.parameters"),
        ({"id": 5, "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, b"",
         "malformed binary V2 request header: id"),
    ],
    ids=["size-overflow", "bytes-length", "bytes-past-the-shape", "bytes-2d", "fp32-size", "shape", "no-data", "inputs-not-list", "parameters-list",
         "shape-int", "input-parameters-str", "id-int"],
)
def test_v2_bad_binary_request(server, header, payload, message):
    body, headers = binary_request(header, payload)
    assert_client_error(requests.post(server.infer_url, data=body, headers=headers), message)


GOOD_BINARY = ({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
               struct.pack("<I", 4) + b"abcd")


@pytest.mark.parametrize(
    "json_length, message",
    [(None, "a binary V2 request needs the 'inference-header-content-length' header"),
     ("twelve", "'inference-header-content-length' is not a number: 'twelve'"),
     ("0", "'inference-header-content-length' 0 does not fit"), ("-5", "'inference-header-content-length' -5 does not fit"),
     ("99999", "'inference-header-content-length' 99999 does not fit")],
    ids=["missing", "not-a-number", "zero", "negative", "past-the-body"],
)
def test_v2_binary_header_length_must_fit(server, json_length, message):
    body, headers = binary_request(*GOOD_BINARY, json_length=json_length)
    if json_length is None:
        del headers["Inference-Header-Content-Length"]
    assert_client_error(requests.post(server.infer_url, data=body, headers=headers), message)


def test_v2_binary_unknown_datatype(server):
    header = {"inputs": [{"name": "audio", "datatype": "COMPLEX64", "shape": [1], "parameters": {"binary_data_size": 8}}]}
    body, headers = binary_request(header, b"\x00" * 8)
    assert_client_error(requests.post(server.infer_url, data=body, headers=headers), "unknown datatype COMPLEX64")


def test_a_one_dimensional_waveform_is_one_clip(server):
    samples = tone(440, 1.0, RATE)
    flat = requests.post(server.infer_url, json={"inputs": [
        {"name": "waveform", "datatype": "FP32", "shape": [len(samples)], "data": samples.tolist()}]})
    rows = requests.post(server.infer_url, json={"inputs": [
        {"name": "waveform", "datatype": "FP32", "shape": [1, len(samples)], "data": samples.tolist()}]})
    assert flat.status_code == rows.status_code == 200, flat.text
    assert flat.json()["outputs"] == rows.json()["outputs"]


def test_v2_binary_nan_waveform_from_tritonclient(server):
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    samples = tone(440, 1.0, RATE)[None, :]
    samples[0, 5] = np.inf
    tensor = triton_http.InferInput("waveform", list(samples.shape), "FP32")
    tensor.set_data_from_numpy(samples, binary_data=True)
    with pytest.raises(InferenceServerException, match="NaN or infinite") as error:
        client.infer("ast", [tensor])
    assert error.value.status() == "400"


def test_a_header_that_declares_a_gigabyte_costs_the_server_no_gigabyte(server):
    """A WAV of 60 bytes whose INFO chunk declares a 1 GiB tag: libsndfile turns it down, and
    FFmpeg's WAV demuxer allocated (and zeroed) the size declared before reading the tag. Refused,
    and no process of the server's grew its peak by a tenth of that."""
    fmt = struct.pack("<4sI2H2I2H", b"fmt ", 16, 1, 1, RATE, 2 * RATE, 2, 16)
    declared = 1 << 30
    info = b"INFO" + struct.pack("<4sI", b"INAM", declared) + b"name"
    wave = b"WAVE" + fmt + struct.pack("<4sI", b"LIST", declared + 64) + info
    data = struct.pack("<4sI", b"RIFF", len(wave)) + wave
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    before = {p.pid: peak_rss_bytes(p.pid) for p in processes}
    assert_client_error(requests.post(server.predict_url, data=data, headers={"Content-Type": "audio/wav"}),
                        "could not decode audio (60 bytes)")
    grown = {pid: peak_rss_bytes(pid) - peak for pid, peak in before.items()}
    assert max(grown.values()) < declared / 10, {pid: f"{g / 2**20:.0f} MiB" for pid, g in grown.items()}


def test_server_still_serves_after_all_of_that(server):
    assert requests.get(f"{server.url}/v2/health/live").status_code == 200
    response = requests.post(server.predict_url, json=v1(GOOD_WAV))
    assert response.status_code == 200 and len(response.json()["predictions"][0]) == 5


def test_base64_broken_into_lines_is_accepted(server):
    """What `base64` (76-column lines), MIME encoders and many Java/.NET clients write by default:
    answered exactly as the same file in one line."""
    one_line = requests.post(server.predict_url, json=v1(GOOD_WAV), timeout=60)
    lines = base64.encodebytes(GOOD_WAV).decode().replace("\n", "\r\n")
    assert "\r\n" in lines.strip()
    broken = requests.post(server.predict_url, json={"instances": [{"b64": lines}]}, timeout=60)
    v2 = requests.post(server.infer_url, timeout=60, json={"inputs": [
        {"name": "audio", "datatype": "BYTES", "shape": [1], "data": [lines]}]})
    assert one_line.status_code == broken.status_code == v2.status_code == 200, (broken.text, v2.text)
    assert broken.json() == one_line.json()
    assert [o["data"] for o in v2.json()["outputs"] if o["name"] == "label"][0] == \
        [p["label"] for p in one_line.json()["predictions"][0]]


def test_request_fields_are_data_never_paths_or_urls(server, tmp_path):
    """The transformers pipeline opens a string input as a file path or fetches it as a URL; here
    every field is data: a path or URL where audio belongs is bytes that are not audio (a 400), and
    nothing is opened or fetched (a loopback server that would serve real audio sees no request)."""
    requested = []

    class Audio(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            requested.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(GOOD_WAV)

        def log_message(self, *args):
            pass

    local_file = tmp_path / "clip.wav"
    local_file.write_bytes(GOOD_WAV)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Audio) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        for text in [str(local_file), f"file://{local_file}", f"http://127.0.0.1:{web.server_address[1]}/clip.wav"]:
            raw = requests.post(server.predict_url, data=text.encode(), headers={"Content-Type": "audio/wav"})
            assert_client_error(raw, "could not decode audio")
            as_b64 = requests.post(server.predict_url, json={"instances": [{"b64": b64(text.encode())}]})
            assert_client_error(as_b64, "could not decode audio")
            as_v2_string = requests.post(server.infer_url, json={"inputs": [
                {"name": "audio", "datatype": "BYTES", "shape": [1], "data": [text]}]})
            assert_client_error(as_v2_string, "not valid base64")
        web.shutdown()
    assert requested == []


REFUSED_FORMATS = {  # libsndfile parses each; the server decodes none of them (415, naming what it takes)
    "paf": ("PAF", "PCM_16"), "voc": ("VOC", "PCM_16"), "nist": ("NIST", "PCM_16"), "mat5": ("MAT5", "PCM_16"),
    "ircam": ("IRCAM", "PCM_16"), "htk": ("HTK", "PCM_16"), "svx": ("SVX", "PCM_16"), "mpc2k": ("MPC2K", "PCM_16"),
    "wve": ("WVE", "ALAW"), "avr": ("AVR", "PCM_16"), "xi": ("XI", "DPCM_16"), "g721-wav": ("WAV", "G721_32"),
    "au": ("AU", "PCM_16"), "gsm-wav": ("WAV", "GSM610"), "alac-caf": ("CAF", "ALAC_16"),
}


@pytest.mark.parametrize("name", REFUSED_FORMATS)
def test_formats_off_the_allowlist_are_refused_with_415(server, name):
    fmt, subtype = REFUSED_FORMATS[name]
    response = requests.post(server.predict_url, data=encode(tone(440, 1.0, 8000), 8000, fmt, subtype),
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 415, response.text
    assert "is not a format this server decodes; it takes WAV/WAVEX/RF64/W64" in response.json()["error"], response.text


ALLOWED_FORMATS = [("AIFF", "PCM_24"), ("AIFF", "ULAW"), ("CAF", "FLOAT"), ("W64", "PCM_16"), ("RF64", "PCM_32"),
                   ("WAVEX", "PCM_16"), ("WAV", "ALAW"), ("WAV", "IMA_ADPCM"), ("WAV", "MS_ADPCM"),
                   ("OGG", "OPUS"), ("FLAC", "PCM_S8")]


@pytest.mark.parametrize("fmt, subtype", ALLOWED_FORMATS, ids=["-".join(f) for f in ALLOWED_FORMATS])
def test_formats_on_the_allowlist_match_the_pipeline_on_their_samples(server, tiny_pipeline, fmt, subtype):
    import io

    import soundfile as sf

    from .conftest import assert_same_predictions, expected

    data = encode(tone(440, 1.0, RATE), RATE, fmt, subtype)
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    if rate != RATE:  # Opus is 48 kHz inside: compared where it is decoded at the model's rate
        pytest.skip("compared at 16 kHz only")
    response = requests.post(server.predict_url, data=data, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, samples, 5, "softmax"))
