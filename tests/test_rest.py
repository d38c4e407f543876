"""The real server over HTTP, V1 and V2, from requests, curl, kserve's REST client and tritonclient.

Every answer is held to the transformers `audio-classification` pipeline on the same waveform.
"""

import asyncio
import base64
import json
import shutil
import subprocess

import numpy as np
import pytest
import requests
import soxr
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from .conftest import TINY_LABELS, as_predictions, assert_same_predictions, encode, expected, tone

RATE = 16000


def test_readiness_and_metadata(server):
    assert requests.get(f"{server.url}/v2/health/ready").status_code == 200
    assert requests.get(f"{server.url}/v1/models/ast").json() == {"name": "ast", "ready": True}
    metadata = requests.get(f"{server.url}/v2/models/ast").json()
    assert {(i["name"], i["datatype"]) for i in metadata["inputs"]} == {("audio", "BYTES"), ("waveform", "FP32")}
    assert {(o["name"], o["datatype"]) for o in metadata["outputs"]} >= {("label", "BYTES"), ("score", "FP32")}


def test_v1_base64_instances_match_the_pipeline(server, tiny_pipeline, speech_16k):
    clips = [speech_16k, tone(440, 1.5, RATE)]
    body = {
        "instances": [{"b64": base64.b64encode(encode(c, RATE, "WAV", "FLOAT")).decode()} for c in clips],
        "parameters": {"top_k": 3, "function_to_apply": "sigmoid"},
    }
    response = requests.post(server.predict_url, json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for clip, actual in zip(clips, predictions):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 3, "sigmoid"))


def test_top_k_above_the_label_count_is_clamped_as_the_pipeline_does(server, tiny_pipeline, speech_16k):
    body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"top_k": 50, "function_to_apply": "sigmoid"}}
    response = requests.post(server.predict_url, json=body)
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 50, "sigmoid"))


def test_v1_defaults_are_the_servers(server, tiny_pipeline, speech_16k):
    """No parameters: top 5, and the pipeline's own choice of function for a 10-label model (softmax)."""
    body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, RATE, "FLAC", "PCM_24")).decode()}]}
    predictions = requests.post(server.predict_url, json=body).json()["predictions"]
    assert_same_predictions(predictions[0], expected(tiny_pipeline, speech_16k, 5, "softmax"))


@pytest.mark.parametrize("content_type", ["audio/wav", "audio/x-flac", "application/octet-stream", None])
def test_v1_raw_audio_body(server, tiny_pipeline, speech_16k, content_type):
    data = encode(speech_16k, RATE, "FLAC" if content_type == "audio/x-flac" else "WAV", "PCM_24")
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(server.predict_url, data=data, headers=headers)
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 5, "softmax"))


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded"]
)
def test_v1_json_under_any_content_type(server, tiny_pipeline, speech_16k, content_type):
    body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"top_k": 2}}
    response = requests.post(server.predict_url, data=json.dumps(body), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 2, "softmax"))


def test_more_clips_than_one_forward_pass_holds(server, tiny_pipeline):
    """The test server runs at most 4 clips per forward pass (MAX_BATCH_SIZE) and takes 6 per request."""
    clips = [tone(200.0 * (i + 1), 1.0 + 0.25 * i, RATE) for i in range(6)]
    body = {"instances": [{"b64": base64.b64encode(encode(c, RATE, "WAV", "FLOAT")).decode()} for c in clips],
            "parameters": {"top_k": 3, "function_to_apply": "none"}}
    predictions = requests.post(server.predict_url, json=body).json()["predictions"]
    assert len(predictions) == 6
    for clip, actual in zip(clips, predictions):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 3, "none"))


def test_curl_data_binary(server, tiny_pipeline, speech_16k, tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(encode(speech_16k, RATE, "WAV", "PCM_16"))
    out = subprocess.run(
        ["curl", "-sf", "--data-binary", f"@{clip}", "-H", "Content-Type: audio/wav", server.predict_url],
        capture_output=True, check=True, text=True,
    ).stdout
    # speech_16k came from a 16-bit file, so PCM_16 gives back exactly the same samples.
    assert_same_predictions(json.loads(out)["predictions"][0], expected(tiny_pipeline, speech_16k, 5, "softmax"))


def test_v2_json_base64_audio(server, tiny_pipeline, speech_16k):
    clips = [speech_16k, tone(1000, 3.0, RATE)]
    body = {
        "id": "req-1",
        "inputs": [{
            "name": "audio", "datatype": "BYTES", "shape": [2],
            "data": [base64.b64encode(encode(c, RATE, "WAV", "FLOAT")).decode() for c in clips],
        }],
        "parameters": {"top_k": 4, "function_to_apply": "softmax"},
    }
    response = requests.post(server.infer_url, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"] == "req-1"
    outputs = {o["name"]: o for o in result["outputs"]}
    assert outputs["label"]["shape"] == outputs["score"]["shape"] == [2, 4]
    labels = np.array(outputs["label"]["data"]).reshape(2, 4)
    scores = np.array(outputs["score"]["data"]).reshape(2, 4)
    for clip, actual in zip(clips, as_predictions(labels, scores)):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 4, "softmax"))


def test_v2_json_waveform_any_rate(server, tiny_pipeline, speech_16k):
    body = {
        "inputs": [{
            "name": "waveform", "datatype": "FP32", "shape": [1, len(speech_16k)],
            "data": speech_16k.tolist(), "parameters": {"sampling_rate": RATE},
        }],
        "parameters": {"top_k": 2, "function_to_apply": "none"},
    }
    response = requests.post(server.infer_url, json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    actual = as_predictions(np.array(outputs["label"]["data"]).reshape(1, 2), np.array(outputs["score"]["data"]).reshape(1, 2))
    assert_same_predictions(actual[0], expected(tiny_pipeline, speech_16k, 2, "none"))
    # 44.1 kHz audio is resampled: the pipeline's answer for the soxr-resampled waveform, every score.
    at_44k = speech_16k_at(speech_16k, 44100)
    body["inputs"][0].update(shape=[1, len(at_44k)], data=at_44k.tolist(), parameters={"sampling_rate": 44100})
    response = requests.post(server.infer_url, json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    actual = as_predictions(np.array(outputs["label"]["data"]).reshape(1, 2), np.array(outputs["score"]["data"]).reshape(1, 2))
    reference = expected(tiny_pipeline, soxr.resample(at_44k, 44100, RATE, quality="HQ"), 2, "none")
    assert_same_predictions(actual[0], reference)
    # ... and it is not the answer for the same samples taken as 16 kHz.
    assert [p["score"] for p in actual[0]] != pytest.approx([p["score"] for p in expected(tiny_pipeline, at_44k, 2, "none")], abs=1e-3)


def speech_16k_at(speech: np.ndarray, rate: int) -> np.ndarray:
    return soxr.resample(speech, RATE, rate, quality="HQ").astype(np.float32)


def test_tritonclient_http_binary_audio_and_waveform(server, tiny_pipeline, speech_16k):
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    assert client.is_model_ready("ast")
    clips = [speech_16k, tone(300, 1.0, RATE)]
    audio = triton_http.InferInput("audio", [2], "BYTES")
    audio.set_data_from_numpy(np.array([encode(c, RATE, "WAV", "FLOAT") for c in clips], dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=True) for name in ("label", "score")]
    result = client.infer("ast", [audio], outputs=outputs, parameters={"top_k": 3, "function_to_apply": "sigmoid"})
    for clip, actual in zip(clips, as_predictions(result.as_numpy("label"), result.as_numpy("score"))):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 3, "sigmoid"))

    waveform = triton_http.InferInput("waveform", [1, len(speech_16k)], "FP32")
    waveform.set_data_from_numpy(speech_16k[None, :], binary_data=True)
    result = client.infer("ast", [waveform], parameters={"top_k": 3, "function_to_apply": "sigmoid"})
    actual = as_predictions(result.as_numpy("label"), result.as_numpy("score"))[0]
    assert_same_predictions(actual, expected(tiny_pipeline, speech_16k, 3, "sigmoid"))


def test_tritonclient_http_json_outputs(server, tiny_pipeline, speech_16k):
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    audio = triton_http.InferInput("audio", [1], "BYTES")
    audio.set_data_from_numpy(np.array([encode(speech_16k, RATE, "WAV", "FLOAT")], dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=False) for name in ("label", "score")]
    result = client.infer("ast", [audio], outputs=outputs)
    actual = as_predictions(result.as_numpy("label"), result.as_numpy("score"))[0]
    assert_same_predictions(actual, expected(tiny_pipeline, speech_16k, 5, "softmax"))


def test_tritonclient_classification_extension_is_refused_naming_top_k(server, speech_16k):
    """tritonclient's class_count asks for Triton's classification extension; served silently as
    plain outputs it would not be what the client parses. A 400 that says where the top labels are."""
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    audio = triton_http.InferInput("audio", [1], "BYTES")
    audio.set_data_from_numpy(np.array([encode(speech_16k, RATE, "WAV", "FLOAT")], dtype=np.object_))
    with pytest.raises(InferenceServerException) as error:
        client.infer("ast", [audio], outputs=[triton_http.InferRequestedOutput("score", class_count=3)])
    assert error.value.status() == "400"
    assert "Triton's classification extension (class_count) is not served" in error.value.message()
    assert "set the top_k parameter" in error.value.message()
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()]}],
            "outputs": [{"name": "label", "parameters": {"colour": "red"}}]}
    response = requests.post(server.infer_url, json=body, timeout=60)
    assert response.status_code == 400 and "unknown parameter(s) ['colour'] on requested output 'label'" in response.text


def test_kserve_rest_client_v1_and_v2(server, tiny_pipeline, speech_16k):
    wav = encode(speech_16k, RATE, "WAV", "FLOAT")
    reference = expected(tiny_pipeline, speech_16k, 5, "softmax")

    async def call():
        v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
        v1_result = await v1.infer(server.url, {"instances": [{"b64": base64.b64encode(wav).decode()}]}, model_name="ast")
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        tensor = InferInput(name="audio", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([wav], dtype=np.object_), binary_data=True)
        v2_result = await v2.infer(server.url, InferRequest(model_name="ast", infer_inputs=[tensor]), model_name="ast")
        return v1_result, v2_result

    v1_result, v2_result = asyncio.run(call())
    assert_same_predictions(v1_result["predictions"][0], reference)
    labels = v2_result.get_output_by_name("label").as_numpy()
    scores = v2_result.get_output_by_name("score").as_numpy()
    assert_same_predictions(as_predictions(labels, scores)[0], reference)


def test_every_label_is_reachable(server, speech_16k):
    body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": {"top_k": len(TINY_LABELS)}}
    predictions = requests.post(server.predict_url, json=body).json()["predictions"][0]
    assert sorted(p["label"] for p in predictions) == sorted(TINY_LABELS)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)


def test_the_parity_tests_run_onnx_runtime(server):
    """Every parity test in this session talks to `server`: it must really run ONNX Runtime."""
    log = server.log.read_text()
    assert "Engine: onnxruntime, fp32" in log, log[-3000:]
