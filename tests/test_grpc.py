"""The real server over gRPC, from kserve's InferenceGRPCClient and from tritonclient.grpc."""

import asyncio
import base64
import io
import struct

import grpc
import numpy as np
import pytest
import soundfile as sf
import soxr
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc.grpc_predict_v2_pb2 import InferParameter
from kserve.protocol.infer_type import RequestedOutput

from .conftest import as_predictions, assert_same_predictions, encode, expected, run_triton_grpc, tone

RATE = 16000


def kserve_grpc(server, request: InferRequest):
    async def call():  # the aio channel belongs to the loop it is made in
        return await InferenceGRPCClient(server.grpc_url, retries=2).infer(request)

    return asyncio.run(call())


def kserve_grpc_infer(server, tensor: InferInput, parameters=None):
    return kserve_grpc(server, InferRequest(model_name="ast", infer_inputs=[tensor], parameters=parameters))


def outputs_of(response) -> list[list[dict]]:
    return as_predictions(response.get_output_by_name("label").as_numpy(), response.get_output_by_name("score").as_numpy())


@pytest.mark.parametrize("raw", [False, True], ids=["bytes_contents", "raw_input_contents"])
def test_kserve_grpc_client_audio(server, tiny_pipeline, speech_16k, raw):
    clips = [speech_16k, tone(2000, 1.0, RATE)]
    files = [encode(c, RATE, "WAV", "FLOAT") for c in clips]
    tensor = InferInput(name="audio", shape=[2], datatype="BYTES")
    if raw:
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    else:
        tensor.data = files
    response = kserve_grpc_infer(server, tensor, {"top_k": 3, "function_to_apply": "sigmoid"})
    for clip, actual in zip(clips, outputs_of(response)):
        assert_same_predictions(actual, expected(tiny_pipeline, clip, 3, "sigmoid"))


def test_kserve_grpc_client_waveform(server, tiny_pipeline, speech_16k):
    tensor = InferInput(name="waveform", shape=[1, len(speech_16k)], datatype="FP32",
                        parameters={"sampling_rate": RATE})
    tensor.set_data_from_numpy(speech_16k[None, :], binary_data=True)
    response = kserve_grpc_infer(server, tensor)
    assert_same_predictions(outputs_of(response)[0], expected(tiny_pipeline, speech_16k, 5, "softmax"))


def test_tritonclient_grpc_audio(server, tiny_pipeline, speech_16k):
    clips = [speech_16k, tone(500, 2.0, RATE)]
    result = run_triton_grpc({
        "url": server.grpc_url, "model": "ast",
        "clips": [base64.b64encode(encode(c, RATE, "OGG", "VORBIS")).decode() for c in clips[:1]]
        + [base64.b64encode(encode(clips[1], RATE, "WAV", "FLOAT")).decode()],
        "parameters": {"top_k": 4, "function_to_apply": "softmax"},
    })
    assert result["ready"] is True
    # The Vorbis clip is lossy, so its reference is what soundfile decodes from the same bytes.
    vorbis, _ = sf.read(io.BytesIO(encode(clips[0], RATE, "OGG", "VORBIS")), dtype="float32")
    references = [expected(tiny_pipeline, vorbis, 4, "softmax"), expected(tiny_pipeline, clips[1], 4, "softmax")]
    for actual, reference in zip(as_predictions(result["label"], result["score"]), references):
        assert_same_predictions(actual, reference)


def test_tritonclient_grpc_waveform(server, tiny_pipeline, speech_16k):
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast", "waveform": [speech_16k.tolist()],
                              "parameters": {"top_k": 2, "function_to_apply": "none"}})
    assert_same_predictions(as_predictions(result["label"], result["score"])[0],
                            expected(tiny_pipeline, speech_16k, 2, "none"))


def test_tritonclient_grpc_bad_input_is_invalid_argument(server):
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast",
                              "clips": [base64.b64encode(b"definitely not audio").decode()]})
    assert result["error_code"] == "StatusCode.INVALID_ARGUMENT"
    assert "could not decode audio" in result["error"]


@pytest.mark.parametrize(
    "tensor, parameters, message",
    [
        (InferInput("audio", [1], "BYTES", data=[b"RIFF....WAVEfmt "]), None, "could not decode audio"),
        (InferInput("audio", [3], "BYTES", data=[b"x"]), None, "declares shape"),
        (InferInput("audio", [1], "FP32", data=[1.0]), None, "must have datatype BYTES"),
        (InferInput("clip", [1], "BYTES", data=[b"x"]), None, "unknown input 'clip'"),
        (InferInput("audio", [1], "BYTES", data=[b"x"]), {"top_k": 0}, "top_k must be"),
        (InferInput("audio", [1], "BYTES", data=[b"x"]), {"function_to_apply": "relu"}, "function_to_apply"),
        (InferInput("audio", [1], "BYTES", data=[b"x"]), {"temperature": "1"}, "unknown parameter"),
        (InferInput("audio", [1], "BYTES", data=[b"x"]), {"hop_seconds": "soon"}, "hop_seconds must be a number"),
        (InferInput("audio", [1], "BYTES", data=[b"x"]), {"top_k": InferParameter()}, "parameter 'top_k' has no value"),
    ],
    ids=["not-audio", "shape", "dtype", "input-name", "top_k", "function", "parameter", "hop-text", "no-value"],
)
def test_kserve_grpc_bad_input(server, tensor, parameters, message):
    with pytest.raises(grpc.RpcError) as error:
        kserve_grpc_infer(server, tensor, parameters)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_tritonclient_grpc_waveform_at_another_rate(server, tiny_pipeline, speech_16k):
    """tritonclient.grpc cannot set input parameters; the request's sampling_rate serves instead."""
    at_48k = soxr.resample(speech_16k, RATE, 48000, quality="HQ").astype(np.float32)
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast", "waveform": [at_48k.tolist()],
                              "parameters": {"top_k": 3, "function_to_apply": "none", "sampling_rate": 48000}})
    reference = expected(tiny_pipeline, soxr.resample(at_48k, 48000, RATE, quality="HQ"), 3, "none")
    assert_same_predictions(as_predictions(result["label"], result["score"])[0], reference)


def test_grpc_raw_bytes_with_a_broken_length_prefix(server):
    tensor = InferInput(name="audio", shape=[1], datatype="BYTES")
    request = InferRequest(model_name="ast", infer_inputs=[tensor], raw_inputs=[struct.pack("<I", 10_000) + b"RIFF"])
    with pytest.raises(grpc.RpcError) as error:
        kserve_grpc(server, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares shape [1]" in error.value.details()


def test_grpc_requested_outputs(server, speech_16k):
    """Only the requested output comes back; an unknown name is refused, as over REST."""
    def infer(names):
        tensor = InferInput(name="audio", shape=[1], datatype="BYTES", data=[encode(speech_16k, RATE, "WAV", "FLOAT")])
        request = InferRequest(model_name="ast", infer_inputs=[tensor],
                               request_outputs=[RequestedOutput(name) for name in names])
        return kserve_grpc(server, request)

    response = infer(["score"])
    assert [o.name for o in response.outputs] == ["score"] and response.outputs[0].as_numpy().shape == (1, 5)
    with pytest.raises(grpc.RpcError) as error:
        infer(["logits"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown requested output(s) ['logits']" in error.value.details()
