"""The client (`python -m predictor.client`, the `ast-classify` script) against the real server, every protocol."""

import contextlib
import http.server
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pytest
import requests
import soundfile as sf

from predictor.client import Client
from predictor.client.batch import final
from predictor.client.protocols import PROTOCOLS, RequestFailed

from .conftest import (REPO, TINY_LABELS, assert_same_predictions, encode, expected, metric, start_server,
                       stop_server, tone)

RATE = 16000


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.url


def classify(server, protocol: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "predictor.client", "--url", url_of(server, protocol),
                           "--protocol", protocol, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def predictions(protocol: str, answer) -> list[dict]:
    return PROTOCOLS[protocol].prediction(answer).labels


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory, speech_16k):
    path = tmp_path_factory.mktemp("client") / "speech.flac"
    sf.write(path, speech_16k, RATE, subtype="PCM_16")  # speech_16k came from a 16-bit file: exact
    return path


@pytest.mark.parametrize("protocol", ["v1", "v2", "grpc"])
def test_json_is_the_servers_answer_and_matches_the_pipeline(server, tiny_pipeline, speech_16k, speech_file, protocol):
    done = classify(server, protocol, speech_file, "--json", "--top-k", 3, "--function", "sigmoid")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    result = json.loads(line)
    assert result["file"] == str(speech_file)
    assert ("predictions" if protocol == "v1" else "outputs") in result["answer"]  # the whole answer
    assert_same_predictions(predictions(protocol, result["answer"]), expected(tiny_pipeline, speech_16k, 3, "sigmoid"))


@pytest.mark.parametrize("protocol", ["v1", "v2", "grpc"])
def test_table_lists_labels_best_first_with_bars(server, tiny_pipeline, speech_16k, speech_file, protocol):
    done = classify(server, protocol, speech_file, "--top-k", len(TINY_LABELS))
    assert done.returncode == 0, done.stderr
    name, *rows = done.stdout.splitlines()
    assert name == str(speech_file)
    reference = expected(tiny_pipeline, speech_16k, len(TINY_LABELS), "softmax")
    assert [row.split()[0] for row in rows] == [p["label"] for p in reference]
    np.testing.assert_allclose([float(row.split()[1]) for row in rows], [p["score"] for p in reference], atol=1e-4)
    # a bar as long as the score: the best label's is the longest
    bars = [len(row.split()[2]) if len(row.split()) > 2 else 0 for row in rows]
    assert bars == sorted(bars, reverse=True) and bars[0] > 0


def test_long_audio_parameters_reach_the_server_alike_on_every_protocol(server, tmp_path):
    """--hop 2.5 --segments: over gRPC the fraction travels as text (kserve's InferParameter has no double)."""
    path = tmp_path / "long.wav"
    sf.write(path, np.concatenate([tone(300, 6.0, RATE), tone(2000, 8.0, RATE)]), RATE, subtype="FLOAT")
    answers = {}
    for protocol in ("v1", "v2", "grpc"):
        done = classify(server, protocol, path, "--json", "--hop", 2.5, "--segments", "--aggregate", "mean")
        assert done.returncode == 0, done.stderr
        answers[protocol] = PROTOCOLS[protocol].prediction(json.loads(done.stdout)["answer"])
    for prediction in answers.values():
        assert [s["start"] for s in prediction.segments] == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]
        assert_same_predictions(prediction.labels, answers["v1"].labels)
        for segment, reference in zip(prediction.segments, answers["v1"].segments):
            assert_same_predictions(segment["labels"], reference["labels"])


@pytest.mark.parametrize("protocol", ["v1", "v2", "grpc"])
def test_embedding_in_the_results_file_and_the_table(server, pooler_output, speech_16k, speech_file, tmp_path, protocol):
    """--embedding: each record carries the file's embedding as one plain list whatever the protocol,
    equal to transformers' pooler_output; the table shows a line for it."""
    output = tmp_path / "embeddings.jsonl"
    done = classify(server, protocol, speech_file, "--embedding", "--output", output)
    assert done.returncode == 0, done.stderr
    [record] = read_lines(output)
    np.testing.assert_allclose(record["embedding"], pooler_output(speech_16k), atol=1e-4, rtol=0)
    table = classify(server, protocol, speech_file, "--embedding", "--top-k", 1)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[-1].startswith(f"  embedding ({len(record['embedding'])} numbers): [")


def test_a_bad_file_exits_non_zero_with_the_servers_message(server, tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    for protocol in ("v1", "v2", "grpc"):
        done = classify(server, protocol, path)
        assert done.returncode == 1
        assert "could not decode audio" in done.stderr, done.stderr
        assert done.stdout == ""


@pytest.fixture()
def bucket(tmp_path, speech_16k):
    """Two clips in nested folders, a broken one, and a file that is not audio by its name."""
    root = tmp_path / "bucket"
    (root / "day1").mkdir(parents=True)
    sf.write(root / "day1" / "speech.flac", speech_16k, RATE, subtype="PCM_16")
    sf.write(root / "tone.wav", tone(440, 2.0, RATE), RATE, subtype="FLOAT")
    (root / "day1" / "cut.wav").write_bytes(encode(tone(440, 2.0, RATE), RATE, "WAV", "PCM_16")[:30])
    (root / "notes.txt").write_text("not audio")
    return root


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_in_batch_with_a_broken_file_then_resumed(server, tiny_pipeline, speech_16k, bucket, tmp_path):
    output = tmp_path / "results.jsonl"
    done = classify(server, "v2", bucket, "--concurrency", 3, "--output", output, "--top-k", 2)
    assert done.returncode == 1, done.stderr
    assert "2 classified, 1 failed" in done.stderr
    lines = {line["file"]: line for line in read_lines(output)}
    assert set(lines) == {str(bucket / "day1" / "speech.flac"), str(bucket / "tone.wav"), str(bucket / "day1" / "cut.wav")}
    broken = lines[str(bucket / "day1" / "cut.wav")]
    assert broken["status"] == 400 and broken["error"].startswith("HTTP 400: "), broken
    assert_same_predictions(predictions("v2", lines[str(bucket / "day1" / "speech.flac")]["answer"]),
                            expected(tiny_pipeline, speech_16k, 2, "softmax"))
    assert_same_predictions(predictions("v2", lines[str(bucket / "tone.wav")]["answer"]),
                            expected(tiny_pipeline, tone(440, 2.0, RATE), 2, "softmax"))

    # A file refused for a busy server is worth another try, and a run stopped mid-line leaves half a
    # record. The rerun, started elsewhere with a relative path, classifies nothing twice: the answered
    # files and the one refused as sent (400) are skipped, the busy one is tried again, and the results
    # keep one record per file. The file refused is still a failure: exit 1.
    tone_file = str(bucket / "tone.wav")
    busy = {"file": tone_file, "error": "HTTP 503: the server is busy (retry_after_s=1)", "status": 503}
    output.write_text("".join(json.dumps(busy if r["file"] == tone_file else r) + "\n" for r in read_lines(output))
                      + '{"file": "' + tone_file[:10])
    for _ in range(2):  # and a third run changes nothing
        again = subprocess.run([sys.executable, "-m", "predictor.client", "--url", server.url, bucket.name,
                                "--output", output, "--top-k", "2"], cwd=bucket.parent, capture_output=True,
                               text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert again.returncode == 1, again.stderr
        rerun = {line["file"]: line for line in read_lines(output)}
        assert len(rerun) == len(read_lines(output)) == 3, output.read_text()
        assert rerun[str(bucket / "day1" / "cut.wav")] == broken
        assert_same_predictions(predictions("v2", rerun[tone_file]["answer"]),
                                expected(tiny_pipeline, tone(440, 2.0, RATE), 2, "softmax"))
    assert "0 classified, 0 failed, 3 skipped (already in the results, 1 of them refused)" in again.stderr, again.stderr


@pytest.mark.parametrize("hop", [20, 0])
def test_a_rerun_that_asks_something_else_tries_again(server, speech_file, tmp_path, hop):
    """A 400 for the flags (a hop past the window, or of 0), not the file: the corrected rerun
    classifies it; a rerun that adds --embedding gets the embedding rather than skipping the file
    answered; and the record of a file these runs do not send stays as it was."""
    other = tmp_path / "tone.wav"
    sf.write(other, tone(440, 2.0, RATE), RATE, subtype="FLOAT")
    output = tmp_path / "results.jsonl"
    assert classify(server, "v2", other, "--output", output).returncode == 0
    [untouched] = read_lines(output)
    refused = classify(server, "v2", speech_file, "--hop", hop, "--output", output)
    assert refused.returncode == 1 and "hop_seconds" in refused.stderr, refused.stderr
    for flags in (("--hop", 5), ("--hop", 5, "--embedding")):
        done = classify(server, "v2", speech_file, *flags, "--output", output)
        assert done.returncode == 0 and "1 classified, 0 failed" in done.stderr, done.stderr
    records = {record["file"]: record for record in read_lines(output)}
    assert len(records) == len(read_lines(output)) == 2 and records[str(other)] == untouched
    record = records[str(speech_file)]
    assert record["embedding"] and record["request"]["hop_seconds"] == 5.0 and record["request"]["return_embedding"]


def test_ctrl_c_stops_at_once_with_requests_in_flight(speech_file, tmp_path):
    """A server that takes the connection and never answers: Ctrl-C ends the run now (130), not
    when the request in flight reaches --timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        client = subprocess.Popen([sys.executable, "-m", "predictor.client", "--url",
                                   f"http://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "120", speech_file],
                                  cwd=REPO, stderr=subprocess.PIPE, text=True)
        silent.settimeout(30)
        silent.accept()  # the request is in flight
        client.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, stderr = client.communicate(timeout=60)
    assert client.returncode == 130 and time.monotonic() - started < 30, stderr
    assert "stopped: rerun with the same --output" in stderr


@pytest.mark.parametrize("record, kept", [
    ({"answer": {}}, True), ({"error": "not audio", "status": 400}, True), ({"error": "too large", "status": 413}, True),
    ({"error": "AU", "status": 415}, True), ({"error": "busy", "status": 503}, False),
    ({"error": "no model 'typo'", "status": 404}, False), ({"error": "unauthorized", "status": 401}, False),
    ({"error": "connection refused", "status": None}, False)])
def test_a_rerun_keeps_only_what_says_something_about_the_file(record, kept):
    """A mistyped model name or URL, or a busy server, fails every file alike: a corrected rerun
    tries them again; so does one that asks something else (a record with no request is an
    earlier client's, which kept it on the same terms)."""
    asked = {"model": "ast", "protocol": "v2", "max_request_mb": 32.0, "top_k": 2}
    assert final({"file": "/data/clip.wav", **record, "request": asked}, asked) is kept
    assert not final({"file": "/data/clip.wav", **record, "request": {**asked, "hop_seconds": 5.0}}, asked)
    assert final({"file": "/data/clip.wav", **record}, asked) is kept  # written by an earlier client: as it did


def test_a_file_named_twice_or_by_another_path_is_one_record(server, bucket, tmp_path):
    """Named again, or through '..', a file is sent once and has one record; a rerun from inside
    the folder, naming it by '..', skips them all."""
    (bucket / "day1" / "cut.wav").unlink()
    output = tmp_path / "results.jsonl"
    done = classify(server, "v2", bucket, bucket / "tone.wav", bucket / "day1" / ".." / "tone.wav", "--output", output)
    assert done.returncode == 0 and "2 classified, 0 failed" in done.stderr, done.stderr
    assert sorted(r["file"] for r in read_lines(output)) == [str(bucket / "day1" / "speech.flac"), str(bucket / "tone.wav")]
    again = subprocess.run([sys.executable, "-m", "predictor.client", "--url", server.url, "../../bucket",
                            "--output", output], cwd=bucket / "day1", capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0 and "0 classified, 0 failed, 2 skipped" in again.stderr, again.stderr
    assert len(read_lines(output)) == 2


def test_a_folder_is_searched_for_the_containers_phones_and_cameras_write(server, tmp_path):
    """A camera's .mov and a .mkv (FFmpeg's containers, which the server reads) are found in a folder
    as when named."""
    wav = tmp_path / "tone.wav"
    sf.write(wav, tone(440, 2.0, RATE), RATE, subtype="PCM_16")
    folder = tmp_path / "phone"
    folder.mkdir()
    for name, codec in (("camera.mov", "aac"), ("screen.mkv", "libopus")):
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), "-c:a", codec, str(folder / name)],
                       check=True, timeout=60)
    done = classify(server, "v2", folder, "--json")
    assert done.returncode == 0 and "2 classified, 0 failed" in done.stderr, done.stderr
    assert sorted(json.loads(line)["file"] for line in done.stdout.splitlines()) == \
        [str(folder / "camera.mov"), str(folder / "screen.mkv")]


def test_an_output_that_cannot_be_a_results_file_is_a_message_and_left_alone(speech_file, tmp_path):
    """Notes, a JSON array, a folder, a missing folder, bytes: exit 2 with a line that says so (once
    tracebacks), the file untouched (notes and arrays were once replaced by the run's records)."""
    notes, array, binary = tmp_path / "notes.txt", tmp_path / "results.json", tmp_path / "results.bin"
    notes.write_text("my notes\nmore notes\n")
    array.write_text(json.dumps([{"file": "a.wav", "answer": {}}]))
    binary.write_bytes(bytes(range(256)))
    for output in (notes, array, tmp_path, tmp_path / "missing" / "results.jsonl", binary):
        before = output.read_bytes() if output.is_file() else None
        done = subprocess.run([sys.executable, "-m", "predictor.client", "--url", "http://127.0.0.1:9", str(speech_file),
                               "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("ast-classify: ") and "Traceback" not in done.stderr, \
            (output, done.stderr)
        assert before is None or output.read_bytes() == before


def test_grpc_without_grpcio_is_a_message_that_says_what_to_install(speech_file):
    """The client installed without its [grpc] extra: no traceback, exit 2, the pip command."""
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['grpc'] = None  # not installed\n"
                           "from predictor.client.__main__ import main; sys.exit(main())",
                           "--protocol", "grpc", str(speech_file)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install './client[grpc]'" in done.stderr and "Traceback" not in done.stderr, \
        done.stderr


def test_output_read_by_head_ends_quietly(server, speech_file, bucket):
    """`ast-classify ... --json | head -1`: the reader goes, the client ends without a traceback."""
    done = subprocess.run(f"{sys.executable} -m predictor.client --url {server.url} --json {bucket} {speech_file} "
                          f"{speech_file.parent} | head -c 1", shell=True, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout == "{" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


class Proxy(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the server that refuses every request with `answer` (status, Retry-After)."""

    answer: tuple[int, str] = (503, "0")
    seen: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Proxy.seen.append(time.monotonic())
        self.send_response(self.answer[0])
        self.send_header("Retry-After", self.answer[1])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, retry_after, tries", [(503, "0", (2, 3)), (429, "1", (2, 3)), (400, "1", (1, 1)),
                                                        (413, "0", (1, 1))])
def test_a_proxys_retry_after_is_heeded_for_503_and_429_alone_and_never_at_once(status, retry_after, tries):
    """A proxy (not this server, which asks at least a second, with 503s alone) may send Retry-After
    with any status, and 0: the client once retried a 400 or 413, and a 0 as fast as it could, without
    a pause. Within a 2.5 s timeout: 503 and 429 are retried after a second or more; the rest not at
    all."""
    Proxy.answer, Proxy.seen = (status, retry_after), []
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        with pytest.raises(RequestFailed, match=f"HTTP {status}"):
            Client(f"http://127.0.0.1:{proxy.server_address[1]}", timeout_s=2.5).classify(b"RIFF")
        proxy.shutdown()
    assert tries[0] <= len(Proxy.seen) <= tries[1], Proxy.seen
    assert all(later - earlier >= 1.0 for earlier, later in zip(Proxy.seen, Proxy.seen[1:])), Proxy.seen


def test_a_folder_without_audio_is_an_error(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not audio")
    done = classify(server, "v2", tmp_path)
    assert done.returncode == 2 and "no audio files in" in done.stderr, done.stderr


def test_a_file_over_the_limit_is_reencoded_and_answered_the_same(server, tmp_path):
    """48 kHz stereo float (1.5 MB) against a 1 MB limit: sent as 16 kHz mono FLAC, same answer."""
    rng = np.random.default_rng(0)
    stereo = np.stack([tone(440, 4.0, 48000), 0.3 * rng.standard_normal(4 * 48000).astype(np.float32)], axis=1)
    path = tmp_path / "big.wav"
    sf.write(path, stereo, 48000, subtype="FLOAT")
    assert path.stat().st_size > 2**20
    for protocol in ("v1", "v2", "grpc"):
        whole = classify(server, protocol, path, "--json", "--top-k", len(TINY_LABELS))
        reencoded = classify(server, protocol, path, "--json", "--top-k", len(TINY_LABELS), "--max-request-mb", 1)
        assert whole.returncode == reencoded.returncode == 0, whole.stderr + reencoded.stderr
        assert "sent as 16 kHz mono FLAC" in reencoded.stderr and "sent as" not in whole.stderr
        assert_same_predictions(predictions(protocol, json.loads(reencoded.stdout)["answer"]),
                                predictions(protocol, json.loads(whole.stdout)["answer"]))


def test_a_file_that_cannot_fit_stops_being_reencoded_once_it_is_past_the_limit(server, tmp_path):
    """Two minutes of noise (which FLAC cannot compress much) against a 1 MB limit: the re-encoding
    stops once its FLAC passes the limit, a fraction of the way in, and nothing is sent."""
    path = tmp_path / "noise.wav"
    sf.write(path, 0.1 * np.random.default_rng(5).standard_normal(120 * RATE), RATE, subtype="PCM_16")
    def requests_answered() -> float:
        return sum(value for (name, _), value in server.samples().items() if name == "ast_requests_total")

    answered = requests_answered()
    done = classify(server, "v2", path, "--max-request-mb", 1)
    assert done.returncode == 1, done.stderr
    found = re.search(r"over the server's 1 MB limit \(--max_request_mb\) even as 16 kHz mono FLAC: past it after "
                      r"([\d.]+) s of the audio", done.stderr)
    assert found and 5 < float(found.group(1)) < 60, done.stderr
    assert requests_answered() == answered


def test_the_python_api(server, tiny_pipeline, speech_16k):
    data = encode(speech_16k, RATE, "WAV", "PCM_16")
    for protocol in ("v1", "v2", "grpc"):
        result = Client(url_of(server, protocol), protocol=protocol).classify(data, top_k=4)
        assert_same_predictions(result.prediction.labels, expected(tiny_pipeline, speech_16k, 4, "softmax"))
        assert result.reencoded_bytes is None


def test_the_client_installs_alone_and_classifies_over_v2_and_grpc(server, tiny_pipeline, speech_16k, speech_file,
                                                                    tmp_path):
    """`pip install './client[grpc]'` into a virtualenv of its own (from a copy: setuptools leaves
    build/ and *.egg-info behind): none of the server's stack comes along, and the ast-classify it
    installs answers as the server does, over V2 REST and gRPC (tritonclient's messages there)."""
    source, venv = tmp_path / "source", tmp_path / "venv"
    for folder in ("predictor", "client"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                                f"{source / 'client'}[grpc]"], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; print([m for m in "
                            "('torch', 'transformers', 'kserve', 'openvino', 'onnxruntime') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == "[]", found
    for protocol in ("v2", "grpc"):
        done = subprocess.run([str(venv / "bin" / "ast-classify"), "--url", url_of(server, protocol), "--protocol",
                               protocol, "--json", "--top-k", "3", str(speech_file)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert_same_predictions(predictions(protocol, json.loads(done.stdout)["answer"]),
                                expected(tiny_pipeline, speech_16k, 3, "softmax"))


def requirement_pins(lines) -> set[str]:
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


def test_pyproject_and_requirements_pin_the_same_packages():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) == requirement_pins((REPO / "requirements.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def busy_server(tiny_model_dir, tmp_path_factory):
    """A queue of one window: while a long request is being classified, any other is refused with 503."""
    running = start_server(tiny_model_dir, tmp_path_factory.mktemp("busy") / "server.log",
                           env={"AST_BACKEND": "onnxruntime", "AST_MAX_QUEUED_WINDOWS": "1"})
    yield running
    stop_server(running)


@contextlib.contextmanager
def holding_the_queue(server) -> Iterator[None]:
    """Two minutes at a hop of 0.5 s (239 windows) held in the queue, from once some 40 of them have
    been classified (so that the wait the server names comes from its passes, not from its
    warm-up's first estimate) until the request is answered."""
    long_clip = encode(tone(220, 120.0, RATE, 0.1), RATE, "WAV", "PCM_16")
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(Client(server.url).classify, long_clip, hop_seconds=0.5)
        deadline = time.monotonic() + 60
        while not 50 <= metric(server, "ast_queued_windows") <= 200:
            assert time.monotonic() < deadline and not holding.done(), "the long request never queued"
            time.sleep(0.05)
        yield
        assert holding.result().prediction.labels


@pytest.mark.parametrize("protocol", ["v2", "grpc"])
def test_a_full_queue_is_retried_after_the_time_the_server_asks(busy_server, tiny_pipeline, protocol, caplog):
    """A short clip sent while the queue is held gets 503 (gRPC UNAVAILABLE), waits as told, and is
    answered."""
    short = tone(440, 2.0, RATE)
    with holding_the_queue(busy_server):
        with caplog.at_level(logging.WARNING, logger="predictor.client"):
            result = Client(url_of(busy_server, protocol), protocol=protocol).classify(encode(short, RATE, "WAV", "FLOAT"))
    assert any("server busy" in r.getMessage() and "retry 1 in" in r.getMessage() for r in caplog.records), caplog.text
    assert_same_predictions(result.prediction.labels, expected(tiny_pipeline, short, 5, "softmax"))


def test_a_busy_server_refuses_a_request_before_parsing_it(busy_server):
    """Refused for the wait before its base64 is decoded: a body that could not be parsed gets the
    busy server's 503, as a good one would, and its 400 once the queue has room."""
    body = {"instances": [{"b64": "not base64 !!"}]}
    with holding_the_queue(busy_server):
        refused = requests.post(busy_server.predict_url, json=body)
    assert refused.status_code == 503 and "the server is busy" in refused.json()["error"], refused.text
    bad = requests.post(busy_server.predict_url, json=body)
    assert bad.status_code == 400 and "not valid base64" in bad.json()["error"], bad.text
