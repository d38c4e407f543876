"""Shared fixtures: models the tests build themselves, real audio, and the real server.

No weights are committed: `tiny_model_dir` is a random-init AST small enough for every test to
afford (with AudioSet's 10.24 s windows); the full-size geometry is built only by the test that needs it. Audio is made with
espeak-ng (speech) and numpy (tones, noise), and written to each container by soundfile.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel, pipeline

from predictor import audio
from tools.local_server import Server, free_port, start_server, stop_server  # noqa: F401 (for the tests)
from tools.random_ast import TINY_LABELS, save_random_ast
from tools.signals import encode, tone  # noqa: F401 (for the tests)

REPO = Path(__file__).resolve().parent.parent
# The test server's limits, set through the environment to exercise that path too.
# The session's server runs ONNX Runtime by name (auto would pick by timings, so the parity tests
# would test whichever engine won); the other engines have parity tests of their own. Parity is
# fp32's promise: the parity tests ask for it (the default, auto, is bf16 on some CPUs).
TEST_SERVER_ENV = {"AST_MAX_AUDIO_SECONDS": "30", "AST_MAX_CLIPS_PER_REQUEST": "6", "AST_MAX_BATCH_SIZE": "4",
                   "AST_BACKEND": "onnxruntime", "AST_PRECISION": "fp32"}


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Iterator[Path]:
    """Every server the tests start exports its ONNX model into a cache of this session's own."""
    directory = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("AST_ONNX_CACHE_DIR")
    os.environ["AST_ONNX_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        del os.environ["AST_ONNX_CACHE_DIR"]
    else:
        os.environ["AST_ONNX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny, but with AudioSet's 1024 frames: its windows are AudioSet's 10.24 s, each costing milliseconds."""
    return save_random_ast(tmp_path_factory.mktemp("tiny-ast"), TINY_LABELS, tiny=True, max_length=1024)


@pytest.fixture(scope="session")
def full_size_dir(tmp_path_factory) -> Path:
    """AST's real geometry, for the few checks that need it: each of its windows takes a second or two."""
    directory = save_random_ast(tmp_path_factory.mktemp("ast-full"))
    config = ASTConfig.from_pretrained(directory)
    assert (config.hidden_size, config.num_hidden_layers, config.num_mel_bins, config.max_length,
            config.num_labels) == (768, 12, 128, 1024, 527)
    return directory


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    return pipeline("audio-classification", model=str(tiny_model_dir))


@pytest.fixture(scope="session")
def pooler_output(tiny_model_dir):
    """16 kHz waveform → transformers' pooled embedding of its features, (hidden,): the reference
    for `return_embedding`, as the pipeline is for labels."""
    model = ASTModel.from_pretrained(tiny_model_dir).eval()
    extractor = ASTFeatureExtractor.from_pretrained(tiny_model_dir)

    def embed(waveform: np.ndarray) -> np.ndarray:
        features = extractor(waveform, sampling_rate=16000, return_tensors="pt").input_values
        with torch.inference_mode():
            return model(input_values=features).pooler_output[0].numpy()

    return embed


# ---- audio --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def speech_16k(tmp_path_factory) -> np.ndarray:
    """About 3 s of espeak-ng speech, resampled to 16 kHz by sox (not by our resampler)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed (bash .ci/run installs them)")
    directory = tmp_path_factory.mktemp("speech")
    raw, wav = directory / "speech-22k.wav", directory / "speech-16k.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(raw), "The quick brown fox jumps over the lazy dog, twice, near the river bank."],
        check=True,
    )
    subprocess.run(["sox", str(raw), "-r", "16000", "-b", "16", str(wav)], check=True)
    samples, rate = sf.read(wav, dtype="float32")
    assert rate == 16000 and samples.ndim == 1 and len(samples) > 16000
    return samples


@pytest.fixture(scope="session")
def speech_wav(speech_16k) -> bytes:
    return encode(speech_16k, 16000, "WAV", "PCM_16")


# ---- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    running = start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log", env=TEST_SERVER_ENV)
    yield running
    still_alive = running.process.poll() is None
    stop_server(running)
    assert still_alive, f"the server died during the tests:\n{running.log.read_text()[-4000:]}"


def metric(server: Server, name: str, **labels: str) -> float:
    """One of the server's own series (Prometheus, on kserve's /metrics), by its name and labels:
    `metric(server, "ast_stage_seconds_count", stage="decode")`."""
    samples = server.samples()
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        raise AssertionError(f"no {name} {labels or ''} on /metrics")
    return samples[key]


def assert_every_logger_ended(logged: str) -> None:
    """Every process that wrote a line of this log (the server's format puts its pid third) has
    ended: none left behind holding memory or ports."""
    pids = {int(pid) for pid in re.findall(r"^\S+ \S+ (\d+) ", logged, re.MULTILINE)}
    assert pids and not [pid for pid in pids if Path(f"/proc/{pid}").exists()], pids


def raw_http(server, head: bytes, chunks=()) -> bytes:
    """A request written by hand on a socket (what requests cannot do: stop sending midway, or
    never send the body its headers announce), and the server's answer as it arrives."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as connection:
        connection.sendall(head)
        try:
            for chunk in chunks:
                connection.sendall(chunk)
            connection.shutdown(socket.SHUT_WR)  # done writing: a server reading the rest of a body stops
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the body was over
        answer = b""
        while (data := connection.recv(65536)):
            answer += data
        return answer


TRITON_GRPC_CLIENT = Path(__file__).parent / "clients" / "triton_grpc.py"


def run_triton_grpc(job: dict) -> dict:
    """tritonclient.grpc, in a process of its own (see tests/clients/triton_grpc.py)."""
    out = subprocess.run([sys.executable, str(TRITON_GRPC_CLIENT)], input=json.dumps(job), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def streamed_flac(seconds: float, rate: int = 16000, layout: str = "mono") -> bytes:
    """Silence as FLAC written to a pipe, as a recorder streaming to a server does: its header
    states no length, so only decoding finds out how long it is."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                          f"anullsrc=r={rate}:cl={layout}", "-t", str(seconds), "-f", "flac", "-"],
                         check=True, capture_output=True, timeout=60).stdout
    assert audio.open_clip(out, audio.Target(rate, max_seconds=seconds)).frames is None
    return out


def expected(pipe, waveform: np.ndarray, top_k: int, function: str) -> list[dict]:
    """What the transformers pipeline answers for a 16 kHz waveform: the reference for every test."""
    return pipe(waveform.copy(), top_k=top_k, function_to_apply=function)


def assert_same_predictions(actual: list[dict], reference: list[dict], tolerance: float = 1e-4) -> None:
    assert [p["label"] for p in actual] == [p["label"] for p in reference], (actual, reference)
    np.testing.assert_allclose([p["score"] for p in actual], [p["score"] for p in reference], atol=tolerance, rtol=0)


def assert_logits_within_precision(actual: list[dict], reference: list[dict], precision: str) -> None:
    """Every label's logit (`function_to_apply: none`): fp32 within 1e-4 of the reference, bf16 at a
    cosine of at least 0.9999, the bound the README gives."""
    ours, theirs = ({p["label"]: p["score"] for p in answer} for answer in (actual, reference))
    assert ours.keys() == theirs.keys()
    a, b = np.array([ours[k] for k in theirs]), np.array(list(theirs.values()))
    if precision == "fp32":
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    else:
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999, precision


def as_predictions(labels, scores) -> list[list[dict]]:
    """V2 outputs (label [N, k], score [N, k]) → V1's list of {label, score} per clip."""
    return [
        [{"label": label.decode() if isinstance(label, bytes) else str(label), "score": float(score)}
         for label, score in zip(row_labels, row_scores)]
        for row_labels, row_scores in zip(np.asarray(labels), np.asarray(scores))
    ]


def nested_boxes(name: bytes, depth: int) -> bytes:
    """MP4 boxes `depth` deep, each the one child of the box around it."""
    boxes = b""
    for _ in range(depth):
        boxes = (8 + len(boxes)).to_bytes(4, "big") + name + boxes
    return boxes


def peak_rss_bytes(pid: int) -> int:
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
