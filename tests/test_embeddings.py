"""`return_embedding`: the pooled embedding the classifier head reads, over V1, V2 REST and gRPC.

The reference is transformers' own `ASTModel(features).pooler_output`, with the features from
`ASTFeatureExtractor` on the same waveform: what a user computing embeddings without us would get.
The session's server runs ONNX Runtime in fp32 (the other engines' parity is in `test_engines`).
"""

import base64

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from .conftest import as_predictions, assert_same_predictions, encode, expected, run_triton_grpc, tone

RATE = 16000
WINDOW = 163_840


@pytest.fixture(scope="module")
def clips(speech_16k) -> list[np.ndarray]:
    return [speech_16k, tone(440, 1.5, RATE)]


def wav(clip: np.ndarray) -> bytes:
    return encode(clip, RATE, "WAV", "FLOAT")


def test_v1_embedding_per_instance(server, tiny_pipeline, pooler_output, clips):
    body = {"instances": [{"b64": base64.b64encode(wav(c)).decode()} for c in clips],
            "parameters": {"return_embedding": True, "top_k": 3}}
    response = requests.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    for clip, prediction in zip(clips, predictions):
        assert set(prediction) == {"labels", "embedding"}
        assert_same_predictions(prediction["labels"], expected(tiny_pipeline, clip, 3, "softmax"))
        np.testing.assert_allclose(prediction["embedding"], pooler_output(clip), atol=1e-4, rtol=0)
    # The two clips differ, so their embeddings do: the comparison above is not of two constants.
    assert np.abs(np.subtract(*[p["embedding"] for p in predictions])).max() > 1e-3


def test_v1_without_the_parameter_answers_labels_only(server, clips):
    body = {"instances": [{"b64": base64.b64encode(wav(clips[0])).decode()}], "parameters": {"return_embedding": False}}
    [prediction] = requests.post(server.predict_url, json=body, timeout=60).json()["predictions"]
    assert isinstance(prediction, list) and set(prediction[0]) == {"label", "score"}


def test_v2_asking_for_the_embedding_output_turns_it_on(server, tiny_pipeline, pooler_output, clips):
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    audio = triton_http.InferInput("audio", [len(clips)], "BYTES")
    audio.set_data_from_numpy(np.array([wav(c) for c in clips], dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=True) for name in ("label", "score", "embedding")]
    result = client.infer("ast", [audio], outputs=outputs, parameters={"top_k": 2})
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32 and embedding.shape == (len(clips), len(pooler_output(clips[0])))
    for clip, labels, row in zip(clips, as_predictions(result.as_numpy("label"), result.as_numpy("score")), embedding):
        assert_same_predictions(labels, expected(tiny_pipeline, clip, 2, "softmax"))
        np.testing.assert_allclose(row, pooler_output(clip), atol=1e-4, rtol=0)

    with pytest.raises(InferenceServerException) as refused:
        client.infer("ast", [audio], outputs=outputs, parameters={"return_embedding": False})
    assert refused.value.status() == "400"
    assert "'embedding'" in refused.value.message() and "return_embedding is false" in refused.value.message()


def test_v2_json_parameter(server, pooler_output, clips):
    """Plain JSON (what curl and requests send): the embedding comes back as a [1, D] FP32 output."""
    body = {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, len(clips[1])], "data": clips[1].tolist()}],
            "parameters": {"return_embedding": True}}
    response = requests.post(f"{server.url}/v2/models/ast/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [output] = [o for o in response.json()["outputs"] if o["name"] == "embedding"]
    assert output["datatype"] == "FP32" and output["shape"] == [1, len(pooler_output(clips[1]))]
    np.testing.assert_allclose(output["data"], pooler_output(clips[1]), atol=1e-4, rtol=0)


def test_grpc_embedding(server, pooler_output, clips):
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast", "waveform": [clips[0].tolist()],
                              "outputs": ["label", "embedding"]})
    assert set(result) == {"ready", "label", "embedding"}
    np.testing.assert_allclose(result["embedding"][0], pooler_output(clips[0]), atol=1e-4, rtol=0)


def test_segment_embeddings_of_a_long_recording(server, pooler_output, speech_16k):
    """Two clips of three and one windows in one V2 request: each window's embedding is the
    reference on that window's samples alone, the clip's is their mean, and the shorter clip's
    missing windows are zeros, as its missing scores are."""
    rng = np.random.default_rng(5)
    long = np.concatenate([speech_16k, tone(440, 10, RATE), 0.2 * rng.standard_normal(12 * RATE)]).astype(np.float32)
    short = tone(880, 2, RATE)
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    audio = triton_http.InferInput("audio", [2], "BYTES")
    audio.set_data_from_numpy(np.array([wav(long), wav(short)], dtype=np.object_), binary_data=True)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=True)
               for name in ("embedding", "segment_start", "segment_embedding")]
    result = client.infer("ast", [audio], outputs=outputs)
    starts, segments = result.as_numpy("segment_start"), result.as_numpy("segment_embedding")
    windows = [long[int(start * RATE): int(start * RATE) + WINDOW] for start in starts[0]]
    assert len(windows) == 3 and segments.shape[:2] == (2, 3)
    references = np.stack([pooler_output(w) for w in windows])
    np.testing.assert_allclose(segments[0], references, atol=1e-4, rtol=0)
    np.testing.assert_allclose(segments[1, 0], pooler_output(short), atol=1e-4, rtol=0)
    assert list(starts[1]) == [0, -1, -1] and not segments[1, 1:].any()
    np.testing.assert_allclose(result.as_numpy("embedding"), [references.mean(axis=0), pooler_output(short)],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_return_embedding_must_be_a_bool(server, clips, value):
    body = {"instances": [{"b64": base64.b64encode(wav(clips[1])).decode()}], "parameters": {"return_embedding": value}}
    response = requests.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 400
    assert "return_embedding must be true or false" in response.text
