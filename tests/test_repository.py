"""Several models in one server (`predictor.repository`): a --model_dir of model directories, each
served under its directory's name, answering exactly as that model served alone does (and as its
own pipeline does); KServe's V2 repository API (index, load, unload) working on it."""

import base64
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from kserve.protocol.grpc.grpc_predict_v2_pb2 import RepositoryModelLoadRequest, RepositoryModelUnloadRequest
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from transformers import pipeline

from predictor.__main__ import main
from predictor.config import Config
from predictor.model import ASTModel, Threads
from tools.random_ast import save_random_ast
from tritonclient.utils import InferenceServerException

from .conftest import TEST_SERVER_ENV, as_predictions, assert_same_predictions, encode, expected, start_server, \
    stop_server, tone

RATE = 16000
BIRDS = ["Bird", "Crow", "Owl", "Gull"]
MACHINES = ["Engine", "Drill", "Saw", "Fan", "Pump", "Siren"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    save_random_ast(root / "birds", BIRDS, tiny=True, seed=1, max_length=1024)
    save_random_ast(root / "machines", MACHINES, tiny=True, seed=2, max_length=1024)
    (root / "notes").mkdir()  # a directory with no config.json is not a model
    return root


# Eager torch: these models' own ONNX exports would cost the suite seconds and test nothing here.
ENV = {**TEST_SERVER_ENV, "AST_BACKEND": "torch"}


@pytest.fixture(scope="module")
def served(repository, tmp_path_factory):
    server = start_server(repository, tmp_path_factory.mktemp("repository-server") / "server.log", env=ENV,
                          model_name="birds")
    yield server
    stop_server(server)


def v1(server, name: str, clip: np.ndarray, **parameters) -> requests.Response:
    body = {"instances": [{"b64": base64.b64encode(encode(clip, RATE, "WAV", "FLOAT")).decode()}],
            "parameters": parameters}
    return requests.post(f"{server.url}/v1/models/{name}:predict", json=body, timeout=60)


def test_each_model_answers_as_its_own_pipeline(served, repository, speech_16k):
    clips = [speech_16k, tone(700, 1.5, RATE)]
    for name, labels in (("birds", BIRDS), ("machines", MACHINES)):
        reference = pipeline("audio-classification", model=str(repository / name))
        for clip in clips:
            response = v1(served, name, clip, top_k=len(labels), function_to_apply="none")
            assert response.status_code == 200, response.text
            [answer] = response.json()["predictions"]
            assert {p["label"] for p in answer} == set(labels)
            assert_same_predictions(answer, expected(reference, clip, len(labels), "none"))
        client = triton_http.InferenceServerClient(url=f"127.0.0.1:{served.http_port}")
        assert client.is_model_ready(name)
        assert [o["name"] for o in client.get_model_metadata(name)["outputs"]][:2] == ["label", "score"]
    assert requests.get(f"{served.url}/v2/models/notes/ready", timeout=10).status_code == 404


def test_two_models_answer_exactly_as_each_alone_does(served, repository, tmp_path, speech_16k):
    """The same V2 request to the repository's model and to a server of that model alone."""
    alone = start_server(repository / "machines", tmp_path / "alone.log", env=ENV, model_name="machines")
    try:
        answers = []
        for server in (served, alone):
            client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
            audio = triton_http.InferInput("audio", [1], "BYTES")
            audio.set_data_from_numpy(np.array([encode(speech_16k, RATE, "WAV", "FLOAT")], dtype=np.object_))
            result = client.infer("machines", [audio], parameters={"top_k": 3, "return_embedding": True})
            answers.append((as_predictions(result.as_numpy("label"), result.as_numpy("score"))[0],
                            result.as_numpy("embedding")))
    finally:
        stop_server(alone)
    assert_same_predictions(answers[0][0], answers[1][0], tolerance=1e-6)
    np.testing.assert_allclose(answers[0][1], answers[1][1], atol=1e-6, rtol=0)


def index_of(server, **query) -> list[dict]:
    response = requests.post(f"{server.url}/v2/repository/index", params=query, timeout=10)
    response.raise_for_status()
    return response.json()


def engines_of(server) -> list[str]:
    """The model of each `ast_engine_info` series, in name order."""
    return sorted(dict(labels)["model"] for name, labels in server.samples() if name == "ast_engine_info")


def test_the_repository_api_indexes_loads_and_unloads(served, repository, tmp_path):
    index = index_of(served)
    assert index == [{"name": "birds", "state": "Ready", "reason": ""},
                     {"name": "machines", "state": "Ready", "reason": ""}]
    # A third model copied onto the volume while the server runs: loaded without a restart.
    owls = save_random_ast(tmp_path / "owls", ["Owl", "Hoot"], tiny=True, seed=3, max_length=1024)
    shutil.copytree(owls, repository / "owls")
    try:
        # listed as there to load, not served; the ready ones alone without it
        assert index_of(served) == [*index, {"name": "owls", "state": "NotReady", "reason": "not loaded"}]
        assert index_of(served, filter_ready=True) == index
        assert requests.post(f"{served.url}/v2/repository/models/owls/load", timeout=120).status_code == 200
        assert index_of(served)[-1] == {"name": "owls", "state": "Ready", "reason": ""}
        assert engines_of(served) == ["birds", "machines", "owls"]
        response = v1(served, "owls", tone(400, 1.0, RATE), top_k=2)
        assert response.status_code == 200 and {p["label"] for p in response.json()["predictions"][0]} == {"Owl", "Hoot"}
        # kserve's latency line, as for the models loaded at the start (kserve hands its flag to those alone)
        assert f"requestId: {response.headers['x-request-id']}, preprocess_ms" in served.log.read_text()
        assert requests.post(f"{served.url}/v2/repository/models/owls/unload", timeout=30).status_code == 200
        assert v1(served, "owls", tone(400, 1.0, RATE)).status_code == 404
        assert index_of(served)[-1] == {"name": "owls", "state": "NotReady", "reason": "not loaded"}
        assert engines_of(served) == ["birds", "machines"]
        assert requests.post(f"{served.url}/v2/repository/models/owls/load", timeout=120).status_code == 200
        assert v1(served, "owls", tone(400, 1.0, RATE)).status_code == 200  # loaded again after an unload
    finally:
        requests.post(f"{served.url}/v2/repository/models/owls/unload", timeout=30)
        shutil.rmtree(repository / "owls")
    for name in ("bats", ".cache"):  # no such directory; a hidden one is never a model
        missing = requests.post(f"{served.url}/v2/repository/models/{name}/load", timeout=30)
        assert missing.status_code == 404 and f"no model directory '{name}'" in missing.text
    assert v1(served, "birds", tone(400, 1.0, RATE)).status_code == 200  # the others serve on


def test_a_load_its_client_stopped_waiting_for_is_served_once_done(served, repository, full_size_dir):
    """A load can take minutes (an engine exported and timed), past a client's deadline, which over
    gRPC cancels the call: the load goes on, once, and the model serves when it is done, without a
    second load asked for it."""
    (repository / "big").symlink_to(full_size_dir)
    try:
        with grpc.insecure_channel(served.grpc_url) as channel, pytest.raises(grpc.RpcError) as gone:
            GRPCInferenceServiceStub(channel).RepositoryModelLoad(RepositoryModelLoadRequest(model_name="big"),
                                                                  timeout=0.5)  # AST's whole geometry: seconds
        assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 120
        while {"name": "big", "state": "Ready", "reason": ""} not in index_of(served) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {"name": "big", "state": "Ready", "reason": ""} in index_of(served)
        assert requests.post(f"{served.url}/v2/repository/models/big/load", timeout=30).status_code == 200
        assert served.log.read_text().count("Loaded model big from the repository") == 1
    finally:
        requests.post(f"{served.url}/v2/repository/models/big/unload", timeout=30)
        (repository / "big").unlink()


def test_a_model_loaded_beside_others_warms_up_in_turn_with_their_passes(repository):
    """A V2 load while the repository's other models serve: the new model's warm-up pass waits its
    turn on the thread their passes share (another model's pass holds it here), rather than running
    beside it, timing the contention (and, on a GPU, perhaps not fitting)."""
    shared, release, order = Threads.make(1), threading.Event(), []
    shared.forward.submit(lambda: (release.wait(30), order.append("another model's pass")))
    model = ASTModel(replace(Config(), model_dir=str(repository / "birds"), model_name="birds", backend="torch"),
                     shared=shared)
    loading = threading.Thread(target=lambda: (model.load(), order.append("loaded")))
    loading.start()
    while loading.is_alive() and not shared.forward._work_queue.qsize():  # its warm-up waits its turn, or it loaded
        time.sleep(0.01)
    release.set()
    loading.join(timeout=60)
    try:
        assert order == ["another model's pass", "loaded"] and model.ready, order
        assert model.pools is shared
    finally:
        model.stop()
        shared.forward.shutdown()


def test_frontends_serve_one_model(repository, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--model_dir", str(repository), "--frontends", "2", "--configure_logging", "false"])
    assert refused.value.code == 2 and "a model repository" in capsys.readouterr().err


def test_a_directory_whose_name_is_no_model_name_is_not_counted_as_a_model(repository, tmp_path):
    """One model directory beside one whose name a URL path cannot carry (a space): the second is
    not a model, for the one-model-one-level-down rule as for a repository, so the first is served
    as the one model. Before, the repository left it out and the rule counted it: two, so neither,
    and the start failed saying there was no config.json."""
    shutil.copytree(repository / "birds", tmp_path / "birds")
    shutil.copytree(repository / "machines", tmp_path / "machine sounds")
    model = ASTModel(Config(model_dir=str(tmp_path), backend="torch"))
    assert model.load() and model.id2label == dict(enumerate(BIRDS))


def test_a_model_served_from_the_start_is_let_go_of_once_unloaded(repository, tmp_path):
    """Unloading is how a user makes room for another model, so what the model held must go with it.
    One loaded at the start was still held by the start's own frames (kserve's among them): its
    engine stayed for the server's life. It is let go of now once unloaded, which the server logs,
    and it serves again once loaded again."""
    server = start_server(repository, tmp_path / "server.log", env=ENV, model_name="birds")
    try:
        assert requests.post(f"{server.url}/v2/repository/models/machines/unload", timeout=30).status_code == 200
        deadline = time.monotonic() + 10
        while "Model machines released" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.1)
        assert "Model birds released" not in server.log.read_text()
        assert requests.post(f"{server.url}/v2/repository/models/machines/load", timeout=120).status_code == 200
        assert v1(server, "machines", tone(400, 1.0, RATE)).status_code == 200
    finally:
        stop_server(server)


def test_an_unload_during_a_load_waits_for_it_and_the_index_says_loading(served, repository, full_size_dir):
    """AST's whole geometry loads for seconds: meanwhile the index says so, and an unload sent then
    waits for the load and unloads the model (it was a 404, and the model was served a moment later)."""
    (repository / "big").symlink_to(full_size_dir)
    try:
        with ThreadPoolExecutor(1) as pool:
            loading = pool.submit(requests.post, f"{served.url}/v2/repository/models/big/load", timeout=120)
            deadline = time.monotonic() + 60
            while {"name": "big", "state": "NotReady", "reason": "loading"} not in index_of(served):
                assert time.monotonic() < deadline and not loading.done(), "the index never said it was loading"
                time.sleep(0.02)
            unloaded = requests.post(f"{served.url}/v2/repository/models/big/unload", timeout=120)
            assert loading.result().status_code == unloaded.status_code == 200, (loading.result().text, unloaded.text)
        assert v1(served, "big", tone(400, 1.0, RATE)).status_code == 404
        assert {"name": "big", "state": "NotReady", "reason": "not loaded"} in index_of(served)
    finally:
        requests.post(f"{served.url}/v2/repository/models/big/unload", timeout=30)
        (repository / "big").unlink()


def test_a_model_that_cannot_be_loaded_is_a_400_that_says_why_and_the_index_keeps_the_reason(served, repository):
    """Its weights cut short: no retry could load it (kserve answered 503, "not ready"). Once its
    files are whole, it loads."""
    broken = repository / "cut-short"
    shutil.copytree(repository / "birds", broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    try:
        refused = requests.post(f"{served.url}/v2/repository/models/cut-short/load", timeout=120)
        assert refused.status_code == 400, refused.text
        assert f"could not load the weights of '{broken}' (model.safetensors)" in refused.json()["error"]
        [entry] = [entry for entry in index_of(served) if entry["name"] == "cut-short"]
        assert entry["state"] == "NotReady" and entry["reason"].startswith("load failed: could not load the weights")
        (broken / "model.safetensors").write_bytes(weights)
        assert requests.post(f"{served.url}/v2/repository/models/cut-short/load", timeout=120).status_code == 200
        assert {"name": "cut-short", "state": "Ready", "reason": ""} in index_of(served)
    finally:
        requests.post(f"{served.url}/v2/repository/models/cut-short/unload", timeout=30)
        shutil.rmtree(broken)
    assert v1(served, "birds", tone(400, 1.0, RATE)).status_code == 200


def test_a_server_of_one_model_refuses_to_unload_it_and_serves_on(server):
    """Its repository API over REST (tritonclient's) and gRPC: unloading the one model is a 400
    that says why (nothing could load it back: the pod would never be ready again), loading it a
    no-op, and any other name a 404 that names the model served. The model answers throughout."""
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="only model and cannot be unloaded") as refused:
        client.unload_model("ast")
    assert refused.value.status() == "400"
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as over_grpc:
        GRPCInferenceServiceStub(channel).RepositoryModelUnload(RepositoryModelUnloadRequest(model_name="ast"))
    assert over_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only model and cannot be unloaded" in over_grpc.value.details()
    client.load_model("ast")
    for verb in ("load", "unload"):
        other = requests.post(f"{server.url}/v2/repository/models/birds/{verb}", timeout=30)
        assert other.status_code == 404 and "serves one model, ast" in other.json()["error"], other.text
    assert client.is_server_ready() and client.is_model_ready("ast")
    assert requests.post(server.predict_url, data=encode(tone(400, 1.0, RATE), RATE, "WAV", "PCM_16"),
                         headers={"content-type": "audio/wav"}, timeout=60).status_code == 200
