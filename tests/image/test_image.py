"""The image users deploy, served and stopped as a pod would be (`make image-test`, after `make image`).

The image runs as its own user (the Dockerfile's uid 1000) with a tiny random model mounted read-only
at /mnt/models, as KServe's storage initializer leaves it, and is called by the same clients as the
local server in the rest of the suite, against the same reference: the transformers pipeline.
"""

import base64
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http

from ..conftest import (TINY_LABELS, Server, as_predictions, assert_same_predictions, encode, expected,
                            free_port, run_triton_grpc, tone)
from tools.image import TAG, Running, find_runtime

pytestmark = pytest.mark.image

RATE = 16000
IMAGE = os.environ.get("IMAGE", TAG)


@pytest.fixture(scope="module")
def runtime():
    found = find_runtime()
    assert found.has_image(IMAGE), f"no image {IMAGE}: make image builds it"
    return found


def readable_copy(model_dir: Path, destination: Path) -> Path:
    """save_pretrained writes the weights with mode 600; a storage initializer's files are world-readable."""
    shutil.copytree(model_dir, destination)
    for path in [destination, *destination.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination


def wait_ready(server: Server, running: Running, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not server.is_ready():
        assert running.process.poll() is None, f"the container exited:\n{running.log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{running.log.read_text()[-4000:]}"
        time.sleep(0.5)


@contextmanager
def served(runtime, model: Path, log: Path, args: tuple[str, ...] = ()) -> Iterator[tuple[Server, Running]]:
    """The image serving `model` until the block ends (or stopped in it), ready when the block begins."""
    http_port, grpc_port = free_port(), free_port()
    running = runtime.start(IMAGE, model, http_port, grpc_port, log, args)
    server = Server(running.process, http_port, grpc_port, running.log)
    try:
        wait_ready(server, running)
        yield server, running
    finally:
        if running.process.poll() is None:
            running.stop()
        else:  # stopped in the block, or exited by itself: its working container goes too
            running.wait(timeout=10)


@pytest.fixture(scope="module")
def container(runtime, tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("image")
    # fp32: the parity tests' precision (the default, auto, is bf16 on CPUs that multiply it natively)
    with served(runtime, readable_copy(tiny_model_dir, directory / "model"), directory / "container.log",
                ("--precision", "fp32")) as running:
        yield running


def test_v1_raw_audio_matches_the_pipeline(container, tiny_pipeline, speech_16k):
    server, _ = container
    # speech_16k came from a 16-bit file: 16-bit FLAC holds it exactly.
    response = requests.post(server.predict_url, data=encode(speech_16k, RATE, "FLAC", "PCM_16"),
                             headers={"Content-Type": "audio/flac"}, timeout=60)
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 5, "softmax"))


def test_v2_binary_audio_matches_the_pipeline(container, tiny_pipeline, speech_16k):
    server, _ = container
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    clips = [speech_16k, tone(440, 2.0, RATE)]
    audio = triton_http.InferInput("audio", [2], "BYTES")
    audio.set_data_from_numpy(np.array([encode(c, RATE, "WAV", "FLOAT") for c in clips], dtype=np.object_),
                              binary_data=True)
    result = client.infer("ast", [audio], parameters={"top_k": 3, "function_to_apply": "sigmoid"})
    for clip, actual in zip(clips, as_predictions(result.as_numpy("label"), result.as_numpy("score"))):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 3, "sigmoid"))


def test_grpc_matches_the_pipeline(container, tiny_pipeline, speech_16k):
    server, _ = container
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast",
                              "clips": [base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()],
                              "parameters": {"top_k": len(TINY_LABELS)}})
    assert result["ready"] is True
    actual = as_predictions(result["label"], result["score"])[0]
    assert_same_predictions(actual, expected(tiny_pipeline, speech_16k, len(TINY_LABELS), "softmax"))


def test_bad_input_is_a_4xx_in_the_image_too(container):
    server, _ = container
    response = requests.post(server.predict_url, data=b"RIFF....WAVEnot really", timeout=60)
    assert response.status_code == 400, response.text
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200


def test_sigterm_ends_it_with_exit_zero(container):
    """Runs last: it stops the container."""
    server, running = container
    assert running.stop(timeout=60) == 0, running.log.read_text()[-4000:]
    assert not server.is_ready()


def test_frontends_serve_in_the_image_and_stop_with_exit_zero(runtime, tiny_model_dir, tmp_path, tiny_pipeline,
                                                              speech_16k):
    """--frontends 2 as uid 1000 in the image: spawned processes, their socket and metrics under /tmp."""
    with served(runtime, readable_copy(tiny_model_dir, tmp_path / "model"), tmp_path / "container.log",
                ("--precision", "fp32", "--frontends", "2")) as (server, running):
        for _ in range(4):
            response = requests.post(server.predict_url, data=encode(speech_16k, RATE, "WAV", "PCM_16"), timeout=60)
            assert response.status_code == 200, response.text
            assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 5, "softmax"))
        assert "ast_clips_total 4.0" in requests.get(f"{server.url}/metrics", timeout=10).text
        assert running.stop(timeout=60) == 0, running.log.read_text()[-4000:]


@pytest.mark.skipif(os.getuid() != 0, reason="a root-owned file needs a test run as root (CI's is)")
def test_weights_uid_1000_cannot_read_are_named(runtime, tiny_model_dir, tmp_path):
    """A weights file left root-owned with mode 600 (a copy from a root-owned volume): the server says so and exits."""
    model = readable_copy(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").chmod(0o600)
    running = runtime.start(IMAGE, model, free_port(), free_port(), tmp_path / "container.log")
    assert running.wait(timeout=120) != 0
    assert "model.safetensors exists, but this server's user (uid 1000, gid 1000) may not read it" in running.log.read_text()


@pytest.mark.skipif(os.environ.get("VARIANT") == "cuda", reason="the CUDA image leaves OpenVINO out")
def test_openvino_int8_quantizes_in_the_image(runtime, tiny_model_dir, tmp_path, speech_wav):
    """NNCF's int8 (a child process quantizing the export) runs in the trimmed image too."""
    model = readable_copy(tiny_model_dir, tmp_path / "model")
    with served(runtime, model, tmp_path / "container.log", ("--precision", "int8", "--backend", "openvino")) as (server, running):
        response = requests.post(server.predict_url, data=speech_wav, timeout=60)
        assert response.status_code == 200 and len(response.json()["predictions"][0]) == 5, response.text
        assert "Engine: openvino, int8" in running.log.read_text()
