"""Clips longer than one window, end to end: windows, segments, aggregates, limits, every protocol.

The tests' tiny random AST has AudioSet's 1024 frames, so its windows are AudioSet's 10.24 s
(163,840 samples) while a window costs milliseconds. Every window is held to the transformers
pipeline on that window's sample slice alone. This server keeps the default limit of 600 s per
clip, with lower window and sample limits to test them.
"""

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import soundfile as sf
import tritonclient.http as triton_http
from transformers import ASTConfig
from tritonclient.utils import InferenceServerException

from predictor import audio

from .conftest import (TINY_LABELS, assert_same_predictions, encode, expected, metric, raw_http, run_triton_grpc,
                       start_server, stop_server, streamed_flac, tone)

RATE = 16000
WINDOW = 163_840
ALL = len(TINY_LABELS)
BUDGET = 600 * RATE  # the long server's samples per request: 10 minutes of 16 kHz mono


@pytest.fixture(scope="module")
def long_server(tiny_model_dir, tmp_path_factory):
    running = start_server(tiny_model_dir, tmp_path_factory.mktemp("long-server") / "server.log",
                           env={"AST_MAX_WINDOWS_PER_REQUEST": "100", "AST_MAX_REQUEST_SAMPLES": str(BUDGET),
                                "AST_PRECISION": "fp32"})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def three_parts(speech_16k) -> np.ndarray:
    """30.72 s: speech over quiet noise, a 440 Hz tone, loud noise; 10.24 s each."""
    rng = np.random.default_rng(7)
    speech = np.concatenate([speech_16k, np.zeros(WINDOW - len(speech_16k), np.float32)])
    speech += 0.01 * rng.standard_normal(WINDOW).astype(np.float32)
    return np.concatenate([speech, tone(440, WINDOW / RATE, RATE), 0.3 * rng.standard_normal(WINDOW)]).astype(np.float32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(server, clips: list[np.ndarray], **parameters) -> list:
    body = {"instances": [{"b64": b64(encode(c, RATE, "WAV", "FLOAT"))} for c in clips], "parameters": parameters}
    response = requests.post(server.predict_url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def logits_by_label(predictions: list[dict]) -> np.ndarray:
    """All labels' raw logits (function_to_apply none, top_k all) in label order."""
    scores = {p["label"]: p["score"] for p in predictions}
    return np.array([scores[label] for label in TINY_LABELS])


def test_three_windows_each_equal_the_pipeline_on_its_slice(long_server, tiny_pipeline, three_parts):
    [answer] = v1(long_server, [three_parts], hop_seconds=10.24, return_segments=True, top_k=ALL,
                  function_to_apply="none")
    segments = answer["segments"]
    assert [s["start"] for s in segments] == pytest.approx([0, 10.24, 20.48])
    assert [s["end"] for s in segments] == pytest.approx([10.24, 20.48, 30.72])
    for k, segment in enumerate(segments):
        assert_same_predictions(segment["labels"], expected(tiny_pipeline, three_parts[k * WINDOW : (k + 1) * WINDOW], ALL, "none"))
    window_logits = np.stack([logits_by_label(s["labels"]) for s in segments])
    np.testing.assert_allclose(logits_by_label(answer["labels"]), window_logits.max(axis=0), atol=1e-6)
    # The three parts differ, so the windows do: pooling is over different answers.
    assert np.abs(window_logits[0] - window_logits[1]).max() > 1e-3

    [mean] = v1(long_server, [three_parts], aggregate="mean", return_segments=True, top_k=ALL, function_to_apply="none")
    np.testing.assert_allclose(logits_by_label(mean["labels"]), window_logits.mean(axis=0), atol=1e-5)


def test_scores_are_the_function_of_the_pooled_logits(long_server, three_parts):
    """aggregate pools logits, then function_to_apply scores them: softmax of the max, not max of softmaxes."""
    [raw] = v1(long_server, [three_parts], top_k=ALL, function_to_apply="none")
    [scored] = v1(long_server, [three_parts], top_k=ALL, function_to_apply="softmax")
    logits = logits_by_label(raw)
    np.testing.assert_allclose(logits_by_label(scored), np.exp(logits) / np.exp(logits).sum(), atol=1e-6)


def test_a_hop_smaller_than_the_window(long_server, tiny_pipeline, three_parts):
    [answer] = v1(long_server, [three_parts], hop_seconds=5, return_segments=True, top_k=3)
    segments = answer["segments"]
    starts = [0, 5, 10, 15, 20, 25, 30]
    assert [s["start"] for s in segments] == starts
    assert [s["end"] for s in segments] == pytest.approx([min(s + 10.24, 30.72) for s in starts])
    for start, segment in zip(starts, segments):
        piece = three_parts[start * RATE : start * RATE + WINDOW]
        assert_same_predictions(segment["labels"], expected(tiny_pipeline, piece, 3, "softmax"))


@pytest.mark.parametrize("extra, windows", [(1, 1), (400, 2)])
def test_a_clip_just_over_a_window(long_server, tiny_pipeline, three_parts, extra, windows):
    """One sample more than a window holds no further frame: one window. A frame more makes a second."""
    clip = three_parts[: WINDOW + extra]
    [answer] = v1(long_server, [clip], return_segments=True, top_k=3)
    assert len(answer["segments"]) == windows
    assert_same_predictions(answer["segments"][0]["labels"], expected(tiny_pipeline, clip[:WINDOW], 3, "softmax"))
    last = answer["segments"][-1]
    assert last["end"] == pytest.approx(min(last["start"] + WINDOW / RATE, len(clip) / RATE))


def test_short_clips_answer_as_before(long_server, tiny_pipeline, speech_16k):
    """A clip no longer than a window is one window: today's response shape and the pipeline's answer."""
    short = tone(880, 0.1, RATE)
    plain = v1(long_server, [short, speech_16k], top_k=3)
    for clip, answer in zip([short, speech_16k], plain):
        assert_same_predictions(answer, expected(tiny_pipeline, clip, 3, "softmax"))
    [segmented] = v1(long_server, [short], return_segments=True, top_k=3)
    assert segmented["labels"] == plain[0]
    assert [s["start"] for s in segmented["segments"]] == [0.0]
    assert [s["end"] for s in segmented["segments"]] == [pytest.approx(0.1)]
    assert segmented["segments"][0]["labels"] == plain[0]


def check_v2_segments(outputs: dict, clips: list[np.ndarray], pipe, k: int) -> None:
    """[N, S] times and [N, S, k] labels/scores; a clip's missing windows are -1, -1, "" and 0."""
    count = max(-(-len(c) // WINDOW) for c in clips)
    start, end = np.asarray(outputs["segment_start"]), np.asarray(outputs["segment_end"])
    labels, scores = np.asarray(outputs["segment_label"], dtype=object), np.asarray(outputs["segment_score"])
    assert start.shape == end.shape == (len(clips), count)
    assert labels.shape == scores.shape == (len(clips), count, k)
    for i, clip in enumerate(clips):
        n = -(-len(clip) // WINDOW)
        np.testing.assert_allclose(start[i, :n], np.arange(n) * 10.24, rtol=1e-6)
        np.testing.assert_allclose(end[i, :n], np.minimum(np.arange(1, n + 1) * 10.24, len(clip) / RATE), rtol=1e-6)
        assert (start[i, n:] == -1).all() and (end[i, n:] == -1).all()
        assert (labels[i, n:] == "").all() and (scores[i, n:] == 0).all()
        for j in range(n):
            actual = [{"label": str(label), "score": float(score)} for label, score in zip(labels[i, j], scores[i, j])]
            assert_same_predictions(actual, expected(pipe, clip[j * WINDOW : (j + 1) * WINDOW], k, "softmax"))


@pytest.fixture(scope="module")
def uneven_clips(three_parts) -> list[np.ndarray]:
    return [three_parts, three_parts[:RATE * 3], three_parts[WINDOW : WINDOW + int(RATE * 15)]]


def test_v2_segments_over_rest_json(long_server, tiny_pipeline, uneven_clips):
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [3],
                        "data": [b64(encode(c, RATE, "WAV", "FLOAT")) for c in uneven_clips]}],
            "parameters": {"return_segments": True, "top_k": 2}}
    response = requests.post(long_server.infer_url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: np.reshape(o["data"], o["shape"]) for o in response.json()["outputs"]}
    assert set(outputs) == {"label", "score", "segment_start", "segment_end", "segment_label", "segment_score"}
    check_v2_segments(outputs, uneven_clips, tiny_pipeline, 2)


def test_v2_segments_over_binary_data_with_tritonclient(long_server, tiny_pipeline, uneven_clips):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{long_server.http_port}")
    tensor = triton_http.InferInput("audio", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([encode(c, RATE, "WAV", "FLOAT") for c in uneven_clips], dtype=object))
    wanted = ["segment_start", "segment_end", "segment_label", "segment_score"]
    # Asking for segment outputs by name is asking for segments: no parameter needed.
    result = client.infer("ast", [tensor], outputs=[triton_http.InferRequestedOutput(n) for n in wanted],
                          parameters={"top_k": 2})
    outputs = {n: result.as_numpy(n) for n in wanted}
    outputs["segment_label"] = np.vectorize(bytes.decode, otypes=[object])(outputs["segment_label"])
    assert result.as_numpy("label") is None
    check_v2_segments(outputs, uneven_clips, tiny_pipeline, 2)


def test_v2_segments_over_grpc_with_tritonclient(long_server, tiny_pipeline, uneven_clips):
    result = run_triton_grpc({"url": long_server.grpc_url, "model": "ast",
                              "clips": [b64(encode(c, RATE, "WAV", "FLOAT")) for c in uneven_clips],
                              "parameters": {"return_segments": True, "top_k": 2}})
    assert "error" not in result, result
    check_v2_segments(result, uneven_clips, tiny_pipeline, 2)


def test_a_fractional_hop_from_tritonclient_grpc(long_server, three_parts):
    """tritonclient.grpc sends a Python float as Triton's double_param, a field kserve's gRPC
    protocol lacks: it is read, not dropped (which answered at the default hop, saying nothing)."""
    result = run_triton_grpc({"url": long_server.grpc_url, "model": "ast",
                              "clips": [b64(encode(three_parts, RATE, "WAV", "FLOAT"))],
                              "parameters": {"return_segments": True, "hop_seconds": 2.5, "top_k": 3}})
    assert "error" not in result, result
    [answer] = v1(long_server, [three_parts], return_segments=True, hop_seconds=2.5, top_k=3)
    np.testing.assert_allclose(result["segment_start"][0], [s["start"] for s in answer["segments"]], rtol=1e-6)
    assert result["segment_label"][0] == [[p["label"] for p in s["labels"]] for s in answer["segments"]]


def test_v2_segments_padded_past_the_largest_unpadded_answer_are_refused(long_server, three_parts, tiny_model_dir):
    """V2 pads every clip's segments to the clip with most windows. One 30.72 s clip at a hop of
    0.5 s beside four 1 s clips is within the 100 windows a request may cost, but padded, at every
    label, it would hold more values than 100 unpadded segments at every label: refused from the
    headers, before decoding, over REST and gRPC. Fewer labels, or V1 (not padded), are answered."""
    clips = [three_parts, *(tone(300 + 100 * i, 1.0, RATE) for i in range(4))]
    encoded = [b64(encode(c, RATE, "WAV", "PCM_16")) for c in clips]
    [long, *_] = v1(long_server, clips, hop_seconds=0.5, return_segments=True, top_k=ALL)
    windows, most = len(long["segments"]), 100 * ALL
    fewer = most // (5 * windows)  # the most labels whose padded answer fits
    assert 1 <= fewer < ALL and windows + 4 <= 100

    def v2_json(top_k: int, **extra) -> requests.Response:
        body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [5], "data": encoded}],
                "parameters": {"return_segments": True, "hop_seconds": 0.5, "top_k": top_k, **extra}}
        return requests.post(long_server.infer_url, json=body, timeout=120)

    message = f"5 clips x {windows} segments x {ALL} values = {5 * windows * ALL}, and this server answers at most {most}"
    before = decodes_begun(long_server)
    refused = v2_json(ALL)
    assert refused.status_code == 400 and message in refused.json()["error"], refused.text
    over_grpc = run_triton_grpc({"url": long_server.grpc_url, "model": "ast", "clips": encoded,
                                 "parameters": {"return_segments": True, "hop_seconds": 0.5, "top_k": ALL}})
    assert over_grpc["error_code"] == "StatusCode.INVALID_ARGUMENT" and message in over_grpc["error"], over_grpc
    assert decodes_begun(long_server) == before
    # Each segment's embedding counts too, against 100 unpadded segments' labels and embeddings.
    hidden = ASTConfig.from_pretrained(tiny_model_dir).hidden_size
    assert 5 * windows * (1 + hidden) > 100 * (ALL + hidden)
    with_embeddings = v2_json(1, return_embedding=True)
    assert with_embeddings.status_code == 400, with_embeddings.text
    assert f"5 clips x {windows} segments x {1 + hidden} values" in with_embeddings.json()["error"]
    assert v2_json(fewer + 1).status_code == 400
    # One clip past the window limit is refused for its windows, not for padding it does not have.
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": encoded[:1]}],
            "parameters": {"return_segments": True, "return_embedding": True, "hop_seconds": 0.1, "top_k": ALL}}
    alone = requests.post(long_server.infer_url, json=body, timeout=120)
    needed = len(range(0, 3 * WINDOW - 400 + 1, 1600))
    assert alone.status_code == 400 and f"this request needs {needed} windows" in alone.json()["error"], alone.text
    answered = v2_json(fewer)
    assert answered.status_code == 200, answered.text
    shapes = {o["name"]: o["shape"] for o in answered.json()["outputs"]}
    assert shapes["segment_label"] == [5, windows, fewer]


def test_ten_minutes_over_grpc_and_v1(long_server, tiny_pipeline, tmp_path):
    """A 10-minute 16 kHz 16-bit WAV is 19 MB: past kserve's 8 MiB gRPC default, inside ours."""
    rng = np.random.default_rng(11)
    clip = (0.1 * rng.standard_normal(RATE * 600)).astype(np.float32)
    data = encode(clip, RATE, "WAV", "PCM_16")
    assert len(data) > 8 * 2**20
    decoded = np.frombuffer(data[44:], dtype="<i2").astype(np.float32) / 32768
    result = run_triton_grpc({"url": long_server.grpc_url, "model": "ast", "clips": [b64(data)],
                              "parameters": {"return_segments": True, "top_k": 1}})
    assert "error" not in result, result
    assert np.asarray(result["segment_start"]).shape == (1, 59)
    last = 58 * WINDOW
    assert result["segment_label"][0][58] == [expected(tiny_pipeline, decoded[last:], 1, "softmax")[0]["label"]]
    response = requests.post(long_server.predict_url, json={"instances": [{"b64": b64(data)}]}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0][0]["label"] == result["label"][0][0]


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"hop_seconds": 0}, "hop_seconds must be a number from one sample (6.25e-05 s) to the window, 10.24 s; got 0"),
        ({"hop_seconds": 11}, "hop_seconds must be a number from one sample (6.25e-05 s) to the window, 10.24 s; got 11"),
        ({"hop_seconds": 3e-5}, "hop_seconds must be a number from one sample"),
        ({"hop_seconds": [1]}, "hop_seconds must be a number"),
        ({"hop_seconds": "5"}, "hop_seconds must be a number"),
        ({"aggregate": "median"}, "aggregate must be one of max, mean; got 'median'"),
        ({"return_segments": "yes"}, "return_segments must be true or false; got 'yes'"),
        # Windows start every 1,600 samples while one 400-sample frame still fits: 307 of them.
        ({"hop_seconds": 0.1}, f"this request needs {len(range(0, 3 * WINDOW - 400 + 1, 1600))} windows"),
    ],
)
def test_bad_long_audio_parameters(long_server, three_parts, parameters, message):
    body = {"instances": [{"b64": b64(encode(three_parts, RATE, "WAV", "PCM_16"))}], "parameters": parameters}
    response = requests.post(long_server.predict_url, json=body, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def decodes_begun(server) -> float:
    return metric(server, "ast_stage_seconds_count", stage="decode")


def test_the_request_sample_budget_refuses_before_decoding(long_server):
    """8 channels at 96 kHz: 20 s of it is 15.36 million samples to decode, over the budget of 9.6
    million, though it is a short clip; its header alone says so (silence compresses to almost
    nothing in FLAC, so the request itself is small), and nothing is decoded."""
    silence = encode(np.zeros((96_000 * 20, 8), np.float32), 96_000, "FLAC", "PCM_16")
    before = decodes_begun(long_server)
    response = requests.post(long_server.predict_url, json={"instances": [{"b64": b64(silence)}]}, timeout=60)
    assert response.status_code == 400
    assert ("the request's audio holds 15,360,000 samples (20.0 s x 8 channel(s) at 96000 Hz): 5,760,000 more than "
            "this server decodes per request (9,600,000 samples, --max_request_samples)") in response.json()["error"]
    assert decodes_begun(long_server) == before


def test_the_request_sample_budget_is_enforced_while_decoding(long_server):
    """Two clips of 400 s whose headers say nothing: the second passes the budget while it is being
    decoded, and decoding stops there."""
    clip = streamed_flac(400)
    response = requests.post(long_server.predict_url, json={"instances": [{"b64": b64(clip)}] * 2}, timeout=60)
    assert response.status_code == 400
    assert ("the request's audio decodes to more than 9,600,000 samples (1 channel(s) at 16000 Hz in this clip, after "
            "6,400,000 samples before it)") in response.json()["error"], response.text


def test_an_mp3_is_admitted_for_the_length_its_container_estimates(tiny_model_dir, tmp_path):
    """An MP3 states no length the server trusts (a VBR file may carry none), so it is never refused
    for the length its bit rate suggests; admission counts that estimate, though, from before it is
    decoded. Two 9-minute MP3s at once (53 windows each) against --max_queued_windows 60: the one
    admitted first is counted for its 53 windows, and the other is refused before it is decoded.
    Before, each counted as one window until decoded: both were decoded, and the second refused only
    after (or queued past the bound's wait)."""
    server = start_server(tiny_model_dir, tmp_path / "server.log", env={"AST_MAX_QUEUED_WINDOWS": "60"})
    try:
        mp3 = encode(tone(440, 540.0, RATE, 0.3), RATE, "MP3", "MPEG_LAYER_III")
        before = decodes_begun(server)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: requests.post(server.predict_url, data=mp3, timeout=120), range(2)))
        assert sorted(answer.status_code for answer in answers) == [200, 503], [answer.text for answer in answers]
        refused = next(answer for answer in answers if answer.status_code == 503)
        assert re.search(r"this request's 53 windows would make \d+ waiting", refused.json()["error"]), refused.text
        assert decodes_begun(server) - before == 1  # the one answered
    finally:
        stop_server(server)


def test_a_clip_of_unstated_length_stops_decoding_at_the_window_limit(long_server):
    """600 s at 1 kHz whose header says nothing: 600,000 samples, well within the sample budget
    (counted at the file's rate), but 9.6 million at the model's 16 kHz, 600 windows at a hop of
    1 s. Decoding stops once the clip passes the 100 windows a request may cost, rather than
    upsampling all of it and counting after."""
    clip = streamed_flac(600, rate=1000)
    response = requests.post(long_server.predict_url, json={"instances": [{"b64": b64(clip)}],
                                                            "parameters": {"hop_seconds": 1.0}}, timeout=60)
    assert response.status_code == 400
    assert ("this request needs more than 100 windows of 10.24 s at hop_seconds 1; this server computes at most 100 "
            "per request (--max_windows_per_request)") in response.json()["error"], response.text
    within = requests.post(long_server.predict_url, json={"instances": [{"b64": b64(clip)}]}, timeout=60)
    assert within.status_code == 200, within.text  # 59 windows at the default hop


def test_asking_for_segment_outputs_with_return_segments_false_is_refused(long_server, three_parts):
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [b64(encode(three_parts, RATE, "WAV", "PCM_16"))]}],
            "outputs": [{"name": "segment_start"}], "parameters": {"return_segments": False}}
    response = requests.post(long_server.infer_url, json=body, timeout=60)
    assert response.status_code == 400
    assert "output(s) ['segment_start'] need segments, but return_segments is false" in response.json()["error"]


def test_metadata_lists_the_optional_outputs(long_server):
    metadata = requests.get(f"{long_server.url}/v2/models/ast").json()
    assert {o["name"] for o in metadata["outputs"]} == {"label", "score", "segment_start", "segment_end",
                                                        "segment_label", "segment_score", "embedding",
                                                        "segment_embedding", "explanation"}


@pytest.mark.parametrize("suffix, codec", [(".m4a", ["-c:a", "aac"]), (".webm", ["-c:a", "libopus"]),
                                           (".aac", ["-c:a", "aac", "-f", "adts"])])
def test_phone_and_browser_recordings_through_the_server(long_server, tiny_pipeline, speech_16k, tmp_path,
                                                         suffix, codec):
    """M4A (voice recorders), WebM (MediaRecorder) and ADTS AAC, 25 s of 48 kHz stereo made by the
    ffmpeg CLI, sent as a raw body and over V2 binary data: answered as the pipeline answers the
    waveform our decoder gives (so the server path adds nothing), with three windows."""
    rng = np.random.default_rng(3)
    mono = np.concatenate([speech_16k, tone(660, 25 - len(speech_16k) / RATE, RATE)])
    stereo = np.stack([mono, 0.05 * rng.standard_normal(len(mono)).astype(np.float32)], axis=1)
    wav, out = tmp_path / "in.wav", tmp_path / f"out{suffix}"
    sf.write(wav, stereo, RATE, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-ar", "48000", *codec, str(out)],
                   check=True, timeout=60)
    data = out.read_bytes()
    waveform = audio.decode(data, audio.Target(RATE, max_seconds=600))
    response = requests.post(long_server.predict_url, data=data, timeout=60,
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    starts = [0, WINDOW, 2 * WINDOW]
    reference = [expected(tiny_pipeline, waveform[s : s + WINDOW], ALL, "none") for s in starts]
    pooled = np.max([logits_by_label(r) for r in reference], axis=0)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{long_server.http_port}")
    tensor = triton_http.InferInput("audio", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    result = client.infer("ast", [tensor], parameters={"top_k": ALL, "function_to_apply": "none",
                                                       "return_segments": True})
    assert result.as_numpy("segment_start").shape == (1, 3)
    answer = [{"label": label.decode(), "score": float(score)}
              for label, score in zip(result.as_numpy("label")[0], result.as_numpy("score")[0])]
    np.testing.assert_allclose(logits_by_label(answer), pooled, atol=1e-4)
    assert response.json()["predictions"][0][0]["label"] == TINY_LABELS[int(np.argmax(pooled))]


def test_grpc_messages_past_the_limit_are_refused(long_server):
    """--max_request_mb (32 MiB by default) bounds a gRPC message; past it gRPC itself refuses."""
    result = run_triton_grpc({"url": long_server.grpc_url, "model": "ast", "clips": [b64(bytes(33 * 2**20))]})
    assert result["error_code"] == "StatusCode.RESOURCE_EXHAUSTED", result
    assert long_server.is_ready()


def test_a_body_past_the_limit_is_refused_before_it_is_read(long_server):
    """Content-Length past --max_request_mb (32 MiB): 413 at once, with not a byte of the body sent."""
    answer = raw_http(long_server, b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\n"
                                   b"Content-Type: audio/wav\r\nContent-Length: 41943040\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request body is 41943040 bytes; this server accepts at most 33554432 bytes (32 MiB" in answer


def test_a_chunked_body_is_refused_once_it_passes_the_limit(long_server):
    """No length stated: the server counts what it reads and answers 413 past 32 MiB; the rest is
    read and thrown away, so that the client sees the answer once it has written its body."""
    chunk = b"%x\r\n%s\r\n" % (2**20, bytes(2**20))
    answer = raw_http(long_server, b"POST /v1/models/ast:predict HTTP/1.1\r\nHost: test\r\nContent-Type: audio/wav\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 64 + [b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request body is more than 33554432 bytes" in answer and b"\r\nconnection: close\r\n" in answer.lower()
    assert long_server.is_ready()


TOO_LARGE = 40 * 2**20
TOO_LARGE_MESSAGE = f"request body is {TOO_LARGE} bytes; this server accepts at most 33554432 bytes (32 MiB"


def test_a_body_past_the_limit_gets_its_413_in_every_client(long_server, tmp_path):
    """The 413 is sent at once, then the body read and discarded before the connection closes, so
    clients that write the whole body before reading (urllib on http.client) read the answer too."""
    body = bytes(TOO_LARGE)
    request = urllib.request.Request(long_server.predict_url, data=body, headers={"Content-Type": "audio/wav"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and TOO_LARGE_MESSAGE in json.loads(refused.value.read())["error"]

    response = requests.post(long_server.predict_url, data=body, headers={"Content-Type": "audio/wav"}, timeout=60)
    assert response.status_code == 413 and TOO_LARGE_MESSAGE in response.json()["error"]

    client = triton_http.InferenceServerClient(long_server.url.removeprefix("http://"), network_timeout=60)
    tensor = triton_http.InferInput("audio", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([body], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException, match="this server accepts at most 33554432 bytes"):
        client.infer("ast", [tensor])

    (tmp_path / "big.wav").write_bytes(body)
    curl = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "answer"), "-w", "%{http_code}", "--data-binary",
                           f"@{tmp_path / 'big.wav'}", "-H", "Content-Type: audio/wav", long_server.predict_url],
                          capture_output=True, text=True, timeout=60)
    assert curl.stdout == "413", (curl.stdout, curl.stderr)
    assert TOO_LARGE_MESSAGE in json.loads((tmp_path / "answer").read_text())["error"]
    assert long_server.is_ready()


def test_an_answer_sent_before_the_body_was_read_lingers_too(long_server):
    """A 404 for a model that is not there, its body unread: written, then the body drained."""
    request = urllib.request.Request(f"{long_server.url}/v1/models/nope:predict", data=bytes(8 * 2**20),
                                     headers={"Content-Type": "audio/wav"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 404, refused.value.read()
