"""Coverage-guided fuzzing of the audio decoder and the request parsers, with atheris (libFuzzer).

    python -m tools.fuzz_decoder --seconds 120                   # both targets, 2/3 of the time to the decoder
    python -m tools.fuzz_decoder --seconds 600 --target decoder   # one target
    python -m tools.fuzz_decoder --target decoder --reproduce .fuzz/crashes/decoder-....bin   # one input

Targets:
- `decoder`: bytes → `predictor.audio` as `ASTModel._decode` calls it (`open_clip`, then `Target.waveform`
  with the blocks closed): libsndfile first, then PyAV/FFmpeg.
- `requests`: bytes → one of the ways a body reaches `parse` (V1 raw or JSON through `AudioDataPlane.decode`,
  with or without CloudEvent headers; V2 JSON through kserve's pydantic model; V2 binary through
  `parse_binary_extension`), then the model's parameter checks (`ASTModel._options`), then every clip
  through the decoder.

Seeds are real small files made at start (soundfile: WAV/WAVEX/W64/AIFF/FLAC/OGG Vorbis/Opus/MP3; the ffmpeg
CLI: M4A AAC and ALAC, WebM Opus, Matroska Vorbis, ADTS AAC, VBR MP3 without a Xing header, MP2, streamed WAV
and FLAC, an MP4 with a video track) and, for `requests`, valid requests of each kind carrying such files.

The oracle: a client error (`ClientInputError`, kserve's `InvalidInput`, or the body parse / pydantic
validation FastAPI answers with a 4xx before our code runs), with a message; or a finite float32 mono
waveform within the clip limit, decoded from blocks of the channel count the file declares. Anything else
is a finding: the input is saved under `<out>/crashes/` with its traceback (at most 3 inputs per distinct
exception and place), fuzzing goes on, and the run exits 1. libFuzzer's own findings (a native crash, an
input slower than `--input-timeout` s, more than `--rss-limit-mb` MB) are saved there as crash-*, timeout-*,
oom-* and also fail the run. `<out>` defaults to `.fuzz/` in the repository (git-ignored); the corpus
libFuzzer grows stays in `<out>/corpus/<target>` for the next run.

Only Python code is instrumented for coverage (`predictor` and kserve's request handling); libsndfile and
FFmpeg come prebuilt in their wheels, so inside them the search is guided by the seeds, the dictionary and
mutation alone.

`seed_files`, `decode_or_refuse`, `parse_or_refuse` and the request builders are shared with
tests/test_properties.py, which checks the same oracles under hypothesis and decodes in an `IsolatedDecoder`
(a child process: a native crash there fails one test instead of ending the session).
"""

from __future__ import annotations

import argparse
import base64
import faulthandler
import hashlib
import io
import json
import os
import pickle
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".fuzz"
MAX_CLIPS = 6  # the test server's MAX_CLIPS_PER_REQUEST
MAX_SECONDS = 30.0  # the test server's MAX_AUDIO_SECONDS
MODEL_NAME = "ast"
SEED_SECONDS = 0.3
RESAMPLER_SLACK = 1024  # samples: soxr's flush and rounding
FINDINGS_PER_SIGNATURE = 3
TARGETS = ("decoder", "requests")

# ---- seeds ---------------------------------------------------------------------------------------


def signal(rate: int, channels: int, seconds: float = SEED_SECONDS) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    tones = [0.4 * np.sin(2 * np.pi * f * t) * (0.2 + t / seconds) for f in (440.0, 997.0, 3000.0)]
    return np.stack([tones[c % len(tones)] for c in range(channels)], axis=1).astype(np.float32)


def soundfile_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


SOUNDFILE_SEEDS = {  # name: (rate, channels, format, subtype)
    "wav-pcm16-16k-mono": (16000, 1, "WAV", "PCM_16"),
    "wav-float-48k-stereo": (48000, 2, "WAV", "FLOAT"),
    "wav-u8-8k-mono": (8000, 1, "WAV", "PCM_U8"),
    "wav-pcm24-22k-6ch": (22050, 6, "WAV", "PCM_24"),
    "wav-ulaw-8k": (8000, 1, "WAV", "ULAW"),
    "wav-ima-adpcm-16k": (16000, 1, "WAV", "IMA_ADPCM"),
    "wavex-pcm32-16k-3ch": (16000, 3, "WAVEX", "PCM_32"),
    "w64-double-11k": (11025, 1, "W64", "DOUBLE"),
    "aiff-pcm16-44k-stereo": (44100, 2, "AIFF", "PCM_16"),
    "flac-16k-mono": (16000, 1, "FLAC", "PCM_16"),
    "flac-24bit-44k-stereo": (44100, 2, "FLAC", "PCM_24"),
    "ogg-vorbis-22k-stereo": (22050, 2, "OGG", "VORBIS"),
    "ogg-opus-48k-mono": (48000, 1, "OGG", "OPUS"),
    "mp3-cbr-44k-mono": (44100, 1, "MP3", "MPEG_LAYER_III"),
}
FFMPEG_SEEDS = {  # name: (rate, channels, ffmpeg output arguments)
    "m4a-aac-44k-stereo.m4a": (44100, 2, ["-c:a", "aac", "-b:a", "48k"]),
    "m4a-alac-16k-mono.m4a": (16000, 1, ["-c:a", "alac"]),
    "webm-opus-48k-mono.webm": (48000, 1, ["-c:a", "libopus", "-b:a", "24k"]),
    "mka-vorbis-22k-stereo.mka": (22050, 2, ["-c:a", "libvorbis"]),
    "adts-aac-16k-mono.aac": (16000, 1, ["-c:a", "aac", "-f", "adts"]),
    "mp3-vbr-noxing-22k.mp3": (22050, 1, ["-c:a", "libmp3lame", "-q:a", "6", "-write_xing", "0"]),
    "mp2-32k-stereo.mp2": (32000, 2, ["-c:a", "mp2"]),
    "streamed-wav-16k.wav": (16000, 1, ["-f", "wav", "pipe:"]),
    "streamed-flac-16k.flac": (16000, 1, ["-f", "flac", "pipe:"]),
}


def ffmpeg_file(directory: Path, name: str, rate: int, channels: int, args: list[str]) -> bytes:
    """The seed signal as a WAV, turned by the ffmpeg CLI into `name` with `args`."""
    source = directory / f"{name}.in.wav"
    source.write_bytes(soundfile_bytes(signal(rate, channels), rate))
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source)]
    if args[-1] == "pipe:":  # written to a pipe: the header cannot state the length
        return subprocess.run(command + args, check=True, capture_output=True).stdout
    out = directory / name
    subprocess.run(command + args + [str(out)], check=True, capture_output=True)
    return out.read_bytes()


def _mp4_with_video(directory: Path) -> bytes:
    out = directory / "video.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc=size=32x32:rate=5:d={SEED_SECONDS}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:d={SEED_SECONDS}",
                    "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(out)], check=True, capture_output=True)
    return out.read_bytes()


@lru_cache(maxsize=1)
def seed_files() -> dict[str, bytes]:
    """Small real files of every format the server reads, made now (FFmpeg's only where its CLI is)."""
    files = {name: soundfile_bytes(signal(rate, ch), rate, fmt, sub)
             for name, (rate, ch, fmt, sub) in SOUNDFILE_SEEDS.items()}
    if shutil.which("ffmpeg"):
        with tempfile.TemporaryDirectory() as tmp:
            for name, (rate, channels, args) in FFMPEG_SEEDS.items():
                files[name] = ffmpeg_file(Path(tmp), name, rate, channels, args)
            files["mp4-video-aac.mp4"] = _mp4_with_video(Path(tmp))
    return files


def small_wav(seconds: float = 0.05, rate: int = 16000) -> bytes:
    return soundfile_bytes(signal(rate, 1, seconds), rate)


# ---- the decoder's oracle ------------------------------------------------------------------------


class Finding(AssertionError):
    """The server would answer with something other than a client error or a good waveform."""


def target(max_seconds: float = MAX_SECONDS):
    from predictor import audio

    return audio.Target(16000, max_seconds)


def check_refusal(exc: BaseException) -> None:
    if not str(exc).strip():
        raise Finding(f"{type(exc).__name__} without a message: the client is not told what to fix")


def check_waveform(waveform: Any, limit: Any) -> None:
    if not isinstance(waveform, np.ndarray) or waveform.dtype != np.float32 or waveform.ndim != 1:
        raise Finding(f"decoded to {type(waveform).__name__} {getattr(waveform, 'dtype', '')} "
                      f"{getattr(waveform, 'shape', '')}, not a float32 mono waveform")
    if not np.isfinite(waveform).all():
        raise Finding(f"decoded waveform holds {np.count_nonzero(~np.isfinite(waveform))} NaN or infinite samples")
    longest = limit.max_seconds * limit.rate + RESAMPLER_SLACK
    if len(waveform) > longest:
        raise Finding(f"decoded {len(waveform)} samples, past the {limit.max_seconds:g} s limit ({longest})")


def _checked_blocks(blocks: Iterator[np.ndarray], channels: int, reader: str) -> Iterator[np.ndarray]:
    """`Source.blocks`' contract: float32 (frames, channels) blocks, `channels` as opened."""
    with closing(blocks):
        for block in blocks:
            if not isinstance(block, np.ndarray) or block.ndim != 2 or block.shape[1] != channels \
                    or block.dtype != np.float32:
                raise Finding(f"{reader} gave a block of {getattr(block, 'shape', '?')} "
                              f"{getattr(block, 'dtype', '')} for a {channels}-channel source")
            yield block


@lru_cache(maxsize=1)
def _bounded_as_the_server_bounds() -> None:
    """FFmpeg's allocations in this process bounded as a server's are at the default request size."""
    from predictor import audio, names

    audio.cap_allocations(int(names.MAX_REQUEST_MB * 2**20))


def decode_or_refuse(clip: Any, limit: Any = None, on_open: Optional[Callable[[Any], None]] = None):
    """A clip as `ASTModel._decode` decodes it: its waveform (checked), or None if refused with a client
    error (checked for a message). `on_open(source)` runs once the header is read. Any other exception
    propagates: that is a finding."""
    from predictor import audio
    from predictor.errors import ClientInputError

    _bounded_as_the_server_bounds()
    limit = limit or target()
    try:
        source = audio.open_clip(clip, limit)
        with closing(source.blocks):
            if on_open is not None:
                on_open(source)
            source.blocks = _checked_blocks(source.blocks, source.channels, source.reader)
            waveform = limit.waveform(source)
    except ClientInputError as exc:
        check_refusal(exc)
        return None
    check_waveform(waveform, limit)
    return waveform


# ---- the decoder in a process of its own ---------------------------------------------------------


@dataclass
class Outcome:
    """What decoding one clip came to, seen from outside the process that decoded it."""

    kind: str  # "waveform", "refused", "finding" (an exception or a bad waveform), "crash", "hang"
    detail: str = ""
    waveform: Optional[np.ndarray] = None
    reader: str = ""
    channels: int = 0

    @property
    def ok(self) -> bool:
        return self.kind in ("waveform", "refused")


class IsolatedDecoder:
    """`decode_or_refuse` in a long-lived child process: a native crash or a hang in libsndfile or FFmpeg
    is reported as an `Outcome` (and the child restarted) instead of taking the caller down with it."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.process: Optional[subprocess.Popen] = None
        self.stderr = tempfile.TemporaryFile()

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.process = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-m", "tools.fuzz_decoder", "--decoder-worker"],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        return self.process

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def decode(self, clip: Any, max_seconds: float = MAX_SECONDS) -> Outcome:
        process = self._start()
        _send(process.stdin, {"clip": clip, "max_seconds": max_seconds})
        deadline = time.monotonic() + self.timeout
        opened: dict = {}
        while True:
            message = _receive(process.stdout, deadline)
            if message is None:
                return self._dead(process, opened, deadline)
            if "opened" in message:
                opened = message
                continue
            return Outcome(**message)

    def _dead(self, process: subprocess.Popen, opened: dict, deadline: float) -> Outcome:
        hung = time.monotonic() >= deadline
        if hung:
            process.kill()
        code = process.wait()
        self.process = None
        self.stderr.seek(0)
        tail = self.stderr.read()[-3000:].decode(errors="replace")
        reader, channels = opened.get("reader", ""), opened.get("channels", 0)
        if hung:
            return Outcome("hang", f"no answer within {self.timeout:g} s\n{tail}", reader=reader, channels=channels)
        return Outcome("crash", f"the decoding process died with {code}\n{tail}", reader=reader, channels=channels)


def _send(stream, message: Any) -> None:
    data = pickle.dumps(message, protocol=5)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream, deadline: float) -> Optional[Any]:
    header = _read_exact(stream, 8, deadline)
    if header is None:
        return None
    body = _read_exact(stream, struct.unpack("<Q", header)[0], deadline)
    return None if body is None else pickle.loads(body)


def _read_exact(stream, size: int, deadline: float) -> Optional[bytes]:
    chunks, left = [], size
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            return None
        chunk = os.read(stream.fileno(), left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _decoder_worker() -> None:
    """The child of `IsolatedDecoder`: requests on stdin, outcomes on the original stdout; what libraries
    print goes to stderr."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests_in = sys.stdin.buffer
    while True:
        header = requests_in.read(8)
        if len(header) < 8:
            return
        request = pickle.loads(requests_in.read(struct.unpack("<Q", header)[0]))
        opened: dict = {}

        def on_open(source: Any) -> None:
            opened.update(reader=source.reader, channels=source.channels)
            _send(channel, {"opened": True, **opened})

        try:
            waveform = decode_or_refuse(request["clip"], target(request["max_seconds"]), on_open)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            outcome = Outcome("finding", "".join(traceback.format_exception(exc)), **opened)
        else:
            outcome = Outcome("refused" if waveform is None else "waveform", waveform=waveform, **opened)
        _send(channel, outcome.__dict__)


# ---- the request parsers' oracle -----------------------------------------------------------------

JSON_TYPE = "application/json"
BINARY_HEADER = "inference-header-content-length"


@lru_cache(maxsize=1)
def _dataplane():
    from kserve.model_repository import ModelRepository

    from predictor.protocol.kserve import AudioDataPlane

    return AudioDataPlane(model_registry=ModelRepository())


@lru_cache(maxsize=1)
def _options_model():
    """A real `ASTModel` with what `load` sets for its parameter checks (AudioSet's 10.24 s window, the
    test model's 10 labels), so that `_options` is the server's own; no weights are loaded."""
    from predictor import windows
    from predictor.config import Config
    from predictor.model import ASTModel

    model = ASTModel(Config(model_name=MODEL_NAME, model_dir="unused"))
    model.windowing = windows.Windowing(16000, 163840, 400)
    model.num_labels, model.default_top_k, model.default_function = 10, 5, "sigmoid"
    return model


def refusals() -> tuple[type[BaseException], ...]:
    """What a 4xx comes from: ours, kserve's InvalidInput (400), and pydantic's validation of a V2 JSON
    body, which FastAPI answers with a 422 before our code runs."""
    from kserve.errors import InvalidInput
    from pydantic import ValidationError

    from predictor.errors import ClientInputError

    return ClientInputError, InvalidInput, ValidationError


def parse_or_refuse(kind: str, body: Any, headers: Optional[dict] = None,
                    decode: Optional[Callable[[Any], Any]] = decode_or_refuse):
    """A request body the way the server takes it up to the model, then every clip through `decode`
    (None: no decoding). Returns the `AudioRequest`, or None if refused with a client error.

    `kind`: 'v1' (bytes, through AudioDataPlane.decode), 'v1-dict' (a decoded V1 body straight into
    `parse`), 'v2-json' (bytes or a decoded body, through kserve's pydantic model and DataPlane),
    'v2-binary' (bytes and the header-length header, through AudioDataPlane)."""
    from kserve.constants.constants import PredictorProtocol
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    from predictor.protocol.requests import parse

    headers = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        if kind == "v1":
            payload, _ = _dataplane().decode(body, dict(headers))
        elif kind == "v1-dict":
            payload = body
        elif kind == "v2-json":
            if isinstance(body, (bytes, str)):
                try:
                    body = json.loads(body)  # what Starlette does; FastAPI answers any failure with a 4xx
                except Exception:  # noqa: BLE001
                    return None
            validated = InferenceRequest.model_validate(body)
            payload, _ = _dataplane().decode(validated, headers, PredictorProtocol.REST_V2.value, MODEL_NAME)
        elif kind == "v2-binary":
            payload, _ = _dataplane().decode(body, headers, PredictorProtocol.REST_V2.value, MODEL_NAME)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        request = parse(payload, MAX_CLIPS)
        check_request(request, kind)
        _options_model()._options(request.parameters)
    except refusals() as exc:
        check_refusal(exc)
        return None
    if decode is not None:
        for clip in request.clips:
            decode(clip)
    return request


def check_request(request: Any, kind: str) -> None:
    from kserve.protocol.infer_type import InferRequest

    from predictor.protocol import MODEL_PARAMETERS, AudioRequest

    if not isinstance(request, AudioRequest):
        raise Finding(f"parse returned {type(request).__name__}")
    if not 1 <= len(request.clips) <= MAX_CLIPS:
        raise Finding(f"{len(request.clips)} clips accepted; the limit is 1..{MAX_CLIPS}")
    for clip in request.clips:
        if isinstance(clip, bytes):
            continue
        if not (isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[0], np.ndarray)
                and clip[0].ndim == 1 and clip[0].dtype == np.float32):
            raise Finding(f"a clip that is neither bytes nor a float32 (waveform, rate): {clip!r:.200}")
    if not isinstance(request.parameters, dict) or not set(request.parameters) <= set(MODEL_PARAMETERS):
        raise Finding(f"parameters {request.parameters!r:.200} passed on to the model")
    if kind.startswith("v2") != isinstance(request.v2, InferRequest):
        raise Finding(f"a {kind} request answered as {'V2' if request.v2 is not None else 'V1'}")


# ---- valid requests, to seed and to mutate -------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1_body(files: list[bytes], **parameters: Any) -> dict:
    body: dict = {"instances": [{"b64": b64(f)} for f in files]}
    if parameters:
        body["parameters"] = parameters
    return body


def v2_audio_body(files: list[bytes], **parameters: Any) -> dict:
    return {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [len(files)], "data": [b64(f) for f in files]}],
            "parameters": parameters}


def v2_waveform_body(rows: int = 1, samples: int = 800, rate: Any = 16000, **parameters: Any) -> dict:
    data = signal(16000, 1, samples / 16000)[:, 0]
    return {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [rows, len(data)],
                        "data": np.tile(data, rows).tolist(), "parameters": {"sampling_rate": rate}}],
            "parameters": parameters}


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_request(header: dict, payload: bytes, json_length: Any = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    length = len(head) if json_length is None else json_length
    return head + payload, {"content-type": "application/octet-stream", BINARY_HEADER: str(length)}


def binary_audio(files: list[bytes], **parameters: Any) -> tuple[bytes, dict]:
    payload = serialize_bytes(files)
    header = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [len(files)],
                          "parameters": {"binary_data_size": len(payload)}}], "parameters": parameters}
    return binary_request(header, payload)


def binary_waveform(samples: np.ndarray, rate: Any = 16000) -> tuple[bytes, dict]:
    payload = np.asarray(samples, np.float32).tobytes()
    header = {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, int(np.size(samples))],
                          "parameters": {"binary_data_size": len(payload), "sampling_rate": rate}}]}
    return binary_request(header, payload)


# ---- the atheris harness -------------------------------------------------------------------------
# A request input is one byte choosing how the rest is sent, then the body: for V1 a second byte picks
# the content type; for V2 binary two bytes give the JSON header's length (little-endian).

V1_CONTENT_TYPES = (None, "audio/wav", "application/octet-stream", JSON_TYPE, "text/plain",
                    "application/json; charset=utf-8", "application/x-www-form-urlencoded",
                    "application/cloudevents+json", "application/cloudevents+json; charset=utf-8")
CLOUDEVENT = {"ce-specversion": "1.0", "ce-source": "fuzz", "ce-type": "fuzz", "ce-id": "1"}
STRUCTURED = "application/cloudevents+json"


def structured_event(fields: dict) -> dict:
    """A structured-mode CloudEvent (its body is JSON, `application/cloudevents+json`)."""
    return {"specversion": "1.0", "type": "fuzz", "source": "fuzz", "id": "1", **fields}


REQUEST_KINDS = ("v1", "v1-cloudevent", "v2-json", "v2-binary")


def request_input(kind: str, body: bytes, content_type: int = 0, json_length: int = 0) -> bytes:
    """The fuzz input that `run_request` reads back as this request."""
    code = REQUEST_KINDS.index(kind)
    if kind in ("v1", "v1-cloudevent"):
        return bytes([code, content_type]) + body
    if kind == "v2-binary":
        return bytes([code]) + struct.pack("<H", json_length) + body
    return bytes([code]) + body


def run_request(data: bytes, decode: Callable[[Any], Any]) -> None:
    if not data:
        return
    kind = REQUEST_KINDS[data[0] % len(REQUEST_KINDS)]
    rest = data[1:]
    if kind in ("v1", "v1-cloudevent"):
        content_type = V1_CONTENT_TYPES[rest[0] % len(V1_CONTENT_TYPES)] if rest else None
        headers = {"content-type": content_type} if content_type else {}
        if kind == "v1-cloudevent":
            headers.update(CLOUDEVENT)
        parse_or_refuse("v1", rest[1:], headers, decode)
    elif kind == "v2-json":
        parse_or_refuse("v2-json", rest, {"content-type": JSON_TYPE}, decode)
    else:
        json_length = struct.unpack("<H", rest[:2])[0] if len(rest) >= 2 else 0
        parse_or_refuse("v2-binary", rest[2:], {"content-type": "application/octet-stream",
                                                BINARY_HEADER: str(json_length)}, decode)


def request_seeds() -> dict[str, bytes]:
    wav, files = small_wav(), seed_files()
    flac, m4a = files["flac-16k-mono"], files.get("m4a-aac-44k-stereo.m4a", wav)
    seeds = {
        "v1-raw-wav": request_input("v1", wav, V1_CONTENT_TYPES.index("audio/wav")),
        "v1-raw-m4a-no-type": request_input("v1", m4a, 0),
        "v1-json": request_input("v1", json.dumps(v1_body([wav, flac], top_k=3, hop_seconds=5)).encode(),
                                 V1_CONTENT_TYPES.index(JSON_TYPE)),
        "v1-cloudevent-json": request_input("v1-cloudevent", json.dumps(v1_body([wav])).encode(),
                                            V1_CONTENT_TYPES.index(JSON_TYPE)),
        "v1-cloudevent-audio": request_input("v1-cloudevent", wav, V1_CONTENT_TYPES.index("audio/wav")),
        "v1-structured-json": request_input("v1", json.dumps(structured_event(
            {"datacontenttype": JSON_TYPE, "data": v1_body([wav])})).encode(), V1_CONTENT_TYPES.index(STRUCTURED)),
        "v1-structured-base64": request_input("v1", json.dumps(structured_event(
            {"datacontenttype": "audio/wav", "data_base64": b64(wav)})).encode(), V1_CONTENT_TYPES.index(STRUCTURED)),
        "v2-json-audio": request_input("v2-json", json.dumps(v2_audio_body([wav], return_segments=True)).encode()),
        "v2-json-waveform": request_input("v2-json", json.dumps(v2_waveform_body(2, 500, 8000)).encode()),
    }
    body, headers = binary_audio([wav, flac], function_to_apply="softmax")
    seeds["v2-binary-audio"] = request_input("v2-binary", body, json_length=int(headers[BINARY_HEADER]))
    body, headers = binary_waveform(signal(22050, 1, 0.05)[:, 0], 22050)
    seeds["v2-binary-waveform"] = request_input("v2-binary", body, json_length=int(headers[BINARY_HEADER]))
    return seeds


DICTIONARY = [b"RIFF", b"RIFX", b"RF64", b"WAVE", b"fmt ", b"data", b"fact", b"LIST", b"ds64", b"FORM", b"AIFF",
              b"AIFC", b"COMM", b"SSND", b"fLaC", b"OggS", b"OpusHead", b"\x01vorbis", b"ID3", b"\xff\xfb",
              b"\xff\xf1", b"ftyp", b"moov", b"mdat", b"trak", b"mdia", b"stsd", b"mp4a", b"esds", b"\x1aE\xdf\xa3",
              b"webm", b"matroska", b"#EXTM3U", b"ffconcat version 1.0", b"file:", b"http://",
              b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
              b'"instances"', b'"b64"', b'"parameters"', b'"inputs"', b'"outputs"', b'"name"', b'"shape"',
              b'"datatype"', b'"data"', b'"audio"', b'"waveform"', b'"BYTES"', b'"FP32"', b'"FP16"',
              b'"binary_data_size"', b'"sampling_rate"', b'"top_k"', b'"hop_seconds"', b'"aggregate"',
              b'"return_segments"', b'"function_to_apply"', b'"segment_label"', b'"specversion"', b"1e400",
              b"18446744073709551616", b"NaN", b"Infinity", b"-1", b"null", b"true"]


def _dictionary_entry(token: bytes) -> str:
    """One libFuzzer dictionary line, every byte escaped."""
    return '"' + "".join("\\x%02x" % b for b in token) + '"\n'


def signature(exc: BaseException) -> str:
    """The exception's type and the innermost frame in our code (or else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/predictor/" in f.filename] or frames[-1:]
    where = f"{Path(ours[-1].filename).stem}-{ours[-1].lineno}" if ours else "unknown"
    return f"{type(exc).__name__}-{where}"


def _run(target_name: str) -> Callable[[bytes], Any]:
    if target_name == "decoder":
        return decode_or_refuse
    return lambda data: run_request(data, decode_or_refuse)


def _instrumented_runner(target_name: str, crashes: Path) -> Callable[[bytes], None]:
    import atheris

    report = os.fdopen(os.dup(2), "w")  # -close_fd_mask=2 silences the libraries' stderr, not our reports
    with atheris.instrument_imports(include=["predictor", "kserve.protocol", "kserve.utils", "kserve.model"]):
        import predictor.audio  # noqa: F401
        import predictor.model  # noqa: F401
        import predictor.protocol.kserve  # noqa: F401
        import predictor.protocol.requests  # noqa: F401
    run, seen = _run(target_name), {}

    def one_input(data: bytes) -> None:
        try:
            run(bytes(data))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every other exception is what we are looking for
            key = signature(exc)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > FINDINGS_PER_SIGNATURE:
                return
            stem = crashes / f"{target_name}-{key}-{hashlib.sha1(data).hexdigest()[:12]}"
            stem.with_suffix(".bin").write_bytes(bytes(data))
            stem.with_suffix(".txt").write_text(
                f"{key}\nreproduce: python -m tools.fuzz_decoder --target {target_name} "
                f"--reproduce {stem.with_suffix('.bin')}\n\n{''.join(traceback.format_exception(exc))}")
            print(f"\n=== FINDING {key} ({len(data)} bytes) → {stem}.bin", file=report, flush=True)

    return one_input


def _worker(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    import atheris

    runner = _instrumented_runner(args.target, Path(args.crashes))
    atheris.Setup([sys.argv[0], *libfuzzer_args], runner)
    atheris.Fuzz()


def _fuzz(target_name: str, seconds: int, out: Path, args: argparse.Namespace) -> list[Path]:
    seeds_dir, corpus_dir, crashes = out / "seeds" / target_name, out / "corpus" / target_name, out / "crashes"
    for directory in (seeds_dir, corpus_dir, crashes):
        directory.mkdir(parents=True, exist_ok=True)
    for name, data in (seed_files() if target_name == "decoder" else request_seeds()).items():
        (seeds_dir / name).write_bytes(data)
    dictionary = out / "fuzz.dict"
    dictionary.write_text("".join(_dictionary_entry(token) for token in DICTIONARY))
    before = set(crashes.iterdir())
    libfuzzer = [f"-max_total_time={seconds}", f"-timeout={args.input_timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
                 f"-max_len={args.max_len}", f"-dict={dictionary}", f"-artifact_prefix={crashes}/{target_name}-",
                 "-print_final_stats=1", "-close_fd_mask=2", str(corpus_dir), str(seeds_dir)]
    if args.seed is not None:
        libfuzzer.insert(0, f"-seed={args.seed}")
    command = [sys.executable, "-m", "tools.fuzz_decoder", "--worker", "--target", target_name,
               "--crashes", str(crashes), "--", *libfuzzer]
    print(f"fuzzing {target_name} for {seconds} s: {len(list(seeds_dir.iterdir()))} seeds, "
          f"{len(list(corpus_dir.iterdir()))} inputs in {corpus_dir}", flush=True)
    started = time.monotonic()
    try:
        code: Any = subprocess.run(command, cwd=REPO, timeout=seconds + 120).returncode
    except subprocess.TimeoutExpired:
        code = "nothing: it did not stop on time"
    found = sorted(f for f in set(crashes.iterdir()) - before if f.suffix != ".txt")
    print(f"{target_name}: libFuzzer exited {code} after {time.monotonic() - started:.0f} s; "
          f"{len(found)} new finding(s)", flush=True)
    if code != 0 and not found:
        marker = crashes / f"{target_name}-worker-exit-{int(time.time())}.txt"
        marker.write_text(f"the fuzzing worker exited with {code} and saved no input\n")
        found.append(marker)
    return found


def reproduce(target_name: str, path: Path) -> int:
    """One saved input, in this process (faulthandler shows where a native crash happens)."""
    faulthandler.enable()
    try:
        _run(target_name)(path.read_bytes())
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exception(exc)
        print("FINDING")
        return 1
    print("no finding: refused with a client error, or parsed and decoded")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    libfuzzer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=120, help="total fuzzing time (default 120)")
    parser.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus, seeds and crashes (default .fuzz/)")
    parser.add_argument("--seed", type=int, default=None, help="libFuzzer's random seed (default: random)")
    parser.add_argument("--input-timeout", type=int, default=20, help="seconds one input may take (else a hang)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=131072, help="bytes per input")
    parser.add_argument("--reproduce", type=Path, help="run one saved input and report")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decoder-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crashes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve.model_server parses the command line when imported: ours is not for it
    if args.decoder_worker:
        _decoder_worker()
        return 0
    if args.reproduce:
        return reproduce(args.target if args.target != "all" else "decoder", args.reproduce)
    if args.worker:
        _worker(args, libfuzzer_args)
        return 0
    targets = TARGETS if args.target == "all" else (args.target,)
    shares = {"decoder": 2 / 3, "requests": 1 / 3} if len(targets) == 2 else {targets[0]: 1.0}
    found = [f for name in targets for f in _fuzz(name, max(1, round(args.seconds * shares[name])), args.out, args)]
    if found:
        print(f"\n{len(found)} new finding(s) in {args.out / 'crashes'}:", *(f"  {f}" for f in found), sep="\n")
        return 1
    print("no new findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
