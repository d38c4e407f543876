"""Explanations by occlusion (`explain`, V1 :explain): each top label's drop in score when a cell
(a time span x a group of mel bands) of the clip's spectrogram is silenced.

The reference is the computation done by hand with transformers' own pieces: `ASTFeatureExtractor`
on the clip, each cell set to what digital silence gives, `ASTForAudioClassification` on every
masked copy, the label's score dropped. The grid is laid out here from the documented defaults (1 s
time cells, 4 band groups), not read from the answer. The clip is 10 s of silence with a 1 kHz tone
burst at 2-3 s: masking silence with silence changes nothing, so for any weights every cell outside
the burst must be 0 and the peak must lie in the burst's time and bands.
"""

import base64
import io
import json
import math
import weakref

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton_http
from PIL import Image
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

from predictor import rollout
from predictor.errors import Overloaded
from predictor.features import LogMelFilterbank
from predictor.occlusion import grid
from tools.local_server import serving

from .conftest import TEST_SERVER_ENV, assert_same_predictions, encode, expected, run_triton_grpc, streamed_flac, tone

RATE = 16000
TONE_HZ = 1000.0
CELL_FRAMES, BANDS = 100, 4  # the defaults: 1 s of 10 ms frames, 4 groups of mel bins


@pytest.fixture(scope="module")
def burst() -> np.ndarray:
    clip = np.zeros(10 * RATE, np.float32)
    clip[2 * RATE:3 * RATE] = tone(TONE_HZ, 1.0, RATE)
    return clip


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """(waveform, k) → the top-k labels and their drops, (k, times, bands), computed by hand."""
    model = ASTForAudioClassification.from_pretrained(tiny_model_dir).eval()
    extractor = ASTFeatureExtractor.from_pretrained(tiny_model_dir)
    silence = (math.log(np.finfo(np.float32).eps) - extractor.mean) / (2 * extractor.std)

    def drops(waveform: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        features = extractor(waveform, sampling_rate=RATE, return_tensors="pt").input_values
        frames, bins = 1 + (len(waveform) - 400) // 160, features.shape[2]
        times, edges = range(0, frames, CELL_FRAMES), np.linspace(0, bins, BANDS + 1).round().astype(int)
        masked = features.repeat(len(times) * BANDS, 1, 1)
        for index, (start, band) in enumerate((s, b) for s in times for b in range(BANDS)):
            masked[index, start:min(start + CELL_FRAMES, frames), edges[band]:edges[band + 1]] = silence
        with torch.inference_mode():
            scores = model(input_values=torch.cat([features, masked])).logits.softmax(-1)
        top = scores[0].topk(k).indices
        names = [model.config.id2label[int(i)] for i in top]
        return names, (scores[0, top] - scores[1:, top]).T.reshape(k, len(times), BANDS).numpy()

    return drops


def explain_v1(server, clip: np.ndarray, **parameters) -> requests.Response:
    body = {"instances": [{"b64": base64.b64encode(encode(clip, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": parameters}
    return requests.post(f"{server.url}/v1/models/ast:explain", json=body, timeout=120)


def test_silence_is_what_the_filterbank_makes_of_zeros(tiny_model_dir):
    filterbank = LogMelFilterbank.from_extractor(ASTFeatureExtractor.from_pretrained(tiny_model_dir))
    features = filterbank([np.zeros(RATE, np.float32)])[0, :98]
    assert torch.equal(features, torch.full_like(features, filterbank.silence))


def test_v1_explain_equals_the_occlusion_done_by_hand(server, tiny_pipeline, reference, burst):
    response = explain_v1(server, burst, top_k=3)
    assert response.status_code == 200, response.text
    answer = response.json()
    [labels] = answer["predictions"]
    assert_same_predictions(labels, expected(tiny_pipeline, burst, 3, "softmax"))
    [explained] = answer["explanations"]
    names, drops = reference(burst, 3)
    assert [e["label"] for e in explained] == names == [p["label"] for p in labels]
    for explanation, label, reference_drops in zip(explained, labels, drops):
        assert set(explanation) == {"label", "score", "method", "times", "bands_hz", "relevance"}
        assert explanation["method"] == "occlusion" and explanation["score"] == pytest.approx(label["score"], abs=1e-6)
        np.testing.assert_allclose(explanation["relevance"], reference_drops, atol=1e-4, rtol=0)
    relevance = np.array(explained[0]["relevance"])
    assert relevance.shape == (10, BANDS)
    # Cells in silence change nothing; the peak is the burst's second and the band holding 1 kHz.
    silent = np.ones(10, bool)
    silent[1:3] = False  # 1-2 s holds the burst's first 25 ms (its frames reach past 2 s)
    assert not relevance[silent].any()
    times, bands = np.array(explained[0]["times"]), explained[0]["bands_hz"]
    # each cell's centre: the middle of its first frame's start and its last frame's end (998 frames in 10 s)
    assert list(times) == pytest.approx([(t + (min(t * 100 + 100, 998) - 1) * 0.01 + 0.025) / 2 for t in range(10)])
    assert bands == sorted(bands) and bands[0] > 20 and bands[-1] < RATE / 2
    peak_time, peak_band = np.unravel_index(np.abs(relevance).argmax(), relevance.shape)
    assert 2 <= times[peak_time] <= 3
    mel = lambda hz: 1127 * math.log(1 + hz / 700)  # noqa: E731
    tone_bin = (mel(TONE_HZ) - mel(20)) / ((mel(RATE / 2) - mel(20)) / 65) - 1  # Kaldi's filter centres
    assert peak_band == int(tone_bin // (64 / BANDS))


def test_v2_explain_parameter_and_output(server, reference, burst):
    """`explain: true` on V2: an `explanation` BYTES output [N, k], each element that label's JSON;
    two clips in one request, each explained on its own grid."""
    short = np.concatenate([np.zeros(RATE // 2, np.float32), tone(300, 1.5, RATE)])
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    audio = triton_http.InferInput("audio", [2], "BYTES")
    audio.set_data_from_numpy(np.array([encode(c, RATE, "WAV", "FLOAT") for c in (burst, short)], dtype=np.object_))
    result = client.infer("ast", [audio], parameters={"explain": True, "top_k": 2})
    explanation = result.as_numpy("explanation")
    assert explanation.shape == (2, 2)
    for clip, row in zip((burst, short), explanation):
        names, drops = reference(clip, 2)
        parsed = [json.loads(element) for element in row]
        assert [e["label"] for e in parsed] == names
        np.testing.assert_allclose([e["relevance"] for e in parsed], drops, atol=1e-4, rtol=0)
    assert len(json.loads(explanation[1, 0])["times"]) == 2  # 2 s: two time cells


def test_grpc_explain(server, reference, burst):
    result = run_triton_grpc({"url": server.grpc_url, "model": "ast", "waveform": [burst.tolist()],
                              "parameters": {"explain": True, "top_k": 1}, "outputs": ["label", "explanation"]})
    names, drops = reference(burst, 1)
    [[element]] = result["explanation"]
    assert json.loads(element)["label"] == names[0] == result["label"][0][0]
    np.testing.assert_allclose(json.loads(element)["relevance"], drops[0], atol=1e-4, rtol=0)


def test_pictures_past_grpcs_8_mib_come_back_over_grpc_up_to_their_limit(tiny_model_dir, tmp_path):
    """Explanations' pictures of a few clips make an answer past kserve's default gRPC send limit
    (8 MiB): it comes back whole, as over REST, rather than refused once computed. A picture more
    than --explain_max_pictures is refused before anything is opened, naming the limit."""
    noise = [encode((0.1 * np.random.default_rng(seed).standard_normal(10 * RATE)).astype(np.float32), RATE, "WAV",
                    "FLOAT") for seed in range(11)]
    env = {**TEST_SERVER_ENV, "AST_MAX_CLIPS_PER_REQUEST": "11", "AST_EXPLAIN_MAX_PICTURES": "99"}
    with serving(tiny_model_dir, tmp_path / "server.log", env=env) as server:
        def explain(clips: list[bytes], top_k: int) -> dict:
            return run_triton_grpc({"url": server.grpc_url, "model": "ast",
                                    "clips": [base64.b64encode(clip).decode() for clip in clips],
                                    "parameters": {"explain": True, "explain_method": "rollout", "explain_format": "png",
                                                   "top_k": top_k}, "outputs": ["explanation"]})

        refused = explain([b"not audio"] * 11, 10)  # refused for its pictures: nothing was opened
        assert refused.get("error_code") == "StatusCode.INVALID_ARGUMENT", refused
        assert "11 clips x top_k 10 = 110, and this server draws at most 99 per request" in refused["error"]
        result = explain(noise, 9)
    assert "error" not in result, result
    pictures = [json.loads(element)["png"] for row in result["explanation"] for element in row]
    assert len(pictures) == 99 and sum(map(len, pictures)) > 8 << 20


def test_explain_answers_with_its_own_headers(server, burst):
    """A V1 :explain of raw audio, uploaded chunked: the answer is JSON with its own length, not
    the request's headers sent back (its audio content type, its chunked transfer-encoding beside
    the answer's content-length, which HTTP/1.1 forbids, and whatever else the client sent)."""
    wav = encode(burst, RATE, "WAV", "PCM_16")
    response = requests.post(f"{server.url}/v1/models/ast:explain", data=iter([wav[:1000], wav[1000:]]), timeout=120,
                             headers={"content-type": "audio/wav", "x-client-secret": "abc"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "x-client-secret" not in response.headers and "transfer-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["explanations"][0][0]["method"] == "occlusion"


def test_png_is_the_spectrogram_with_the_map_over_it(server, burst):
    response = explain_v1(server, burst, top_k=1, explain_format="png")
    assert response.status_code == 200, response.text
    [[explanation]] = response.json()["explanations"]
    picture = Image.open(io.BytesIO(base64.b64decode(explanation["png"])))
    assert picture.format == "PNG" and picture.size == (998, 64)  # a pixel per frame and mel bin
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    tinted = pixels[..., 0] - pixels[..., 1]  # red over grey where a cell's masking lowered the score
    columns = np.flatnonzero(tinted.max(axis=0) > 0)
    if np.array(explanation["relevance"]).max() > 0:
        assert 100 <= columns.min() and columns.max() < 300  # only cells of the burst's seconds
    else:
        assert not columns.size


@pytest.mark.parametrize("clip_seconds, parameters, message", [
    (12.0, {}, "an explanation covers one window (10.24 s) of a clip"),
    (300 / RATE, {}, "AST needs at least 400 (one 25 ms frame)"),
    (300 / RATE, {"explain_method": "rollout"}, "AST needs at least 400 (one 25 ms frame)"),
    (2.0, {"explain_format": "svg"}, "explain_format must be one of json, png"),
    (2.0, {"explain": "yes"}, "explain must be true or false"),
    (2.0, {"explain_method": "lime"}, "explain_method must be one of occlusion, rollout"),
    # once explained at the window's hop: 8 s at 5 s is two windows to :predict, and the answers differed
    (8.0, {"hop_seconds": 5}, "hop_seconds (5) spaces the windows of a longer clip: leave hop_seconds out"),
])
def test_what_cannot_be_explained_is_a_400(server, clip_seconds, parameters, message):
    response = explain_v1(server, tone(440, clip_seconds, RATE), **parameters)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_a_clip_of_unstated_length_is_decoded_for_one_window_at_most(server):
    """To explain, a clip whose header does not say how long it is stops decoding once it passes
    the one window an explanation covers (here 60 s at 1 kHz, upsampled to 16 kHz), saying so."""
    body = {"instances": [{"b64": base64.b64encode(streamed_flac(60, rate=1000)).decode()}]}
    response = requests.post(f"{server.url}/v1/models/ast:explain", json=body, timeout=60)
    assert response.status_code == 400
    assert ("an explanation covers one window (10.24 s) of a clip; this request has a clip longer than that: send the "
            "part to explain") in response.json()["error"], response.text


def test_a_clip_just_over_a_window_is_explained_over_its_window(server):
    """163,840 + 200 samples is one window of 1022 frames (the filterbank's last 2 are padding):
    the grid stops at the window's last frame."""
    response = explain_v1(server, tone(500, (163_840 + 200) / RATE, RATE), top_k=1, explain_method="rollout")
    assert response.status_code == 200, response.text
    times = response.json()["explanations"][0][0]["times"]
    assert len(times) == 11 and times[-1] == pytest.approx((10.0 + 1021 * 0.01 + 0.025) / 2)


def test_masked_copies_count_against_the_window_limit(server):
    """Six 10 s clips at 40 cells each are 246 windows, over the default 240 a request may cost:
    refused from the headers, before anything is decoded, saying why."""
    body = {"instances": [{"b64": base64.b64encode(encode(tone(300 + 100 * i, 10.0, RATE), RATE, "WAV", "PCM_16")).decode()}
                          for i in range(6)]}
    response = requests.post(f"{server.url}/v1/models/ast:explain", json=body, timeout=60)
    assert response.status_code == 400
    assert "246 windows" in response.text and "240 of them to explain its clips" in response.text, response.text


# ---- attention rollout ------------------------------------------------------------------------


def test_rollout_of_uniform_attention_spreads_evenly():
    """Two layers attending uniformly over n tokens: each is (J/n + I)/2 with the residual, their
    product (3J/n + I)/4, so each patch holds 3/(4n) of what the pooled tokens read."""
    n = 12
    uniform = torch.full((1, 3, n, n), 1 / n)
    np.testing.assert_allclose(rollout.rollout([uniform, uniform])[0].numpy(), 3 / (4 * n), rtol=1e-6)
    identity = torch.eye(n).expand(1, 2, n, n)
    assert not rollout.rollout([identity] * 3).any()  # the pooled tokens read only themselves


def test_a_rollout_that_runs_out_of_gpu_memory_is_a_503_that_holds_none_of_it(tiny_model_dir):
    """The encoder's frames (a GPU's activations) go with the failure, not with the 503's answer."""
    explainer = rollout.Rollout(str(tiny_model_dir), ASTConfig.from_pretrained(tiny_model_dir))
    kept = []

    def out_of_memory(**inputs):
        activations = torch.ones(4)
        kept.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    explainer.encoder = out_of_memory
    with pytest.raises(Overloaded, match="no memory left for an explanation by rollout now") as refused:
        explainer(torch.zeros(1, 300, 64))
    assert kept and kept[0]() is None and isinstance(refused.value.__cause__, torch.OutOfMemoryError)


def test_a_patchs_relevance_lands_in_the_cells_it_covers():
    config = ASTConfig(num_mel_bins=64, max_length=300)  # patches every 10 frames and bins: 5 x 29
    cells = grid(300, 64, cell_frames=100, bands=4, max_cells=48)
    one = torch.zeros(5 * 29)
    one[3 * 29 + 12] = 1.0  # bins 30-45, frames 120-135
    relevance = rollout.cell_relevance(one, config, cells)
    assert relevance.shape == (3, 4) and set(zip(*np.nonzero(relevance))) == {(1, 1), (1, 2)}
    np.testing.assert_allclose(rollout.cell_relevance(torch.full((5 * 29,), 0.25), config, cells), 0.25, rtol=1e-6)


def test_rollout_of_several_clips_is_each_clips_own(tiny_model_dir, burst):
    """Clips are rolled out one at a time (every layer's attentions of a clip are held at once):
    each clip's relevance is what its own pass of the encoder gives."""
    extractor = ASTFeatureExtractor.from_pretrained(tiny_model_dir)
    features = extractor([burst, tone(440, 3.0, RATE), burst[::-1].copy()], sampling_rate=RATE,
                         return_tensors="pt").input_values
    encoder = ASTModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    relevance = rollout.Rollout(str(tiny_model_dir), encoder.config)(features)
    with torch.inference_mode():
        for clip, row in zip(features, relevance):
            own = rollout.rollout(encoder(input_values=clip[None], output_attentions=True).attentions)[0]
            torch.testing.assert_close(row, own, atol=1e-6, rtol=0)


def test_v1_explain_by_rollout(server, tiny_model_dir, burst):
    """One pass of transformers' encoder with eager attention: the map equals rollout over its own
    attentions, the same for every label."""
    response = explain_v1(server, burst, top_k=2, explain_method="rollout")
    assert response.status_code == 200, response.text
    explained = response.json()["explanations"][0]
    assert [e["method"] for e in explained] == ["rollout", "rollout"]
    assert explained[0]["relevance"] == explained[1]["relevance"]
    extractor = ASTFeatureExtractor.from_pretrained(tiny_model_dir)
    encoder = ASTModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        attentions = encoder(input_values=extractor(burst, sampling_rate=RATE, return_tensors="pt").input_values,
                             output_attentions=True).attentions
    cells = grid(998, 64, CELL_FRAMES, BANDS, 48)
    expected_map = rollout.cell_relevance(rollout.rollout(attentions)[0], encoder.config, cells)
    np.testing.assert_allclose(explained[0]["relevance"], expected_map, atol=1e-5, rtol=0)
