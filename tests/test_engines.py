"""`predictor.engines`: ONNX Runtime against eager torch, int8 against fp32, and the export cache.
Every engine's rows are its logits and its pooled embedding (`options.split`): both are held to
transformers' `logits` and `pooler_output`."""

import base64
import importlib.metadata
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
import requests
import torch
from transformers import ASTForAudioClassification

from predictor.engines import EngineOptions, OnnxEngine, OpenVinoEngine, build_engine
from predictor.engines.options import split
from predictor.engines.torch_engine import TorchEngine
from predictor.checkpoint import Checkpoint, load_feature_extractor, weight_files
from predictor.engines.calibration import file_features, synthetic_clips
from predictor.engines.choice import cpu_key
from predictor.engines import artifacts
from predictor.engines.artifacts import OFFLINE_TIMEOUT_S, ExportError
from predictor.engines.openvino_int8 import int8_ir_path
from predictor.cpu import multiplies_bf16
from predictor.features import LogMelFilterbank
from predictor.windows import Windowing

from .conftest import assert_same_predictions, encode, expected, start_server, stop_server, tone


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return ASTForAudioClassification.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def features(tiny_model):
    torch.manual_seed(1)
    return torch.randn(5, tiny_model.config.max_length, tiny_model.config.num_mel_bins)


def checkpoint_of(model: ASTForAudioClassification, directory) -> Checkpoint:
    """The checkpoint with its torch module already loaded, as a server that has exported it holds it."""
    return Checkpoint(str(directory), model.config, model)


def cosine(a: torch.Tensor, b: torch.Tensor, num_labels: int) -> float:
    """The least cosine over the logits and over the embeddings of the rows `a` and `b`."""
    return min(float(torch.nn.functional.cosine_similarity(x, y, dim=-1).min())
               for x, y in zip(split(a, num_labels), split(b, num_labels)))


def reference_rows(model: ASTForAudioClassification, features: torch.Tensor) -> torch.Tensor:
    """transformers' logits and pooler_output, side by side as an engine's rows are."""
    with torch.inference_mode():
        out = model(input_values=features)
        pooled = model.audio_spectrogram_transformer(input_values=features).pooler_output
    return torch.cat([out.logits, pooled], dim=1)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_fp32_engines_equal_the_transformers_model(tiny_model, tiny_model_dir, features, onnx_cache, backend):
    engine = build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions(backend, "fp32", 2, onnx_cache))
    torch.testing.assert_close(engine(features), reference_rows(tiny_model, features), atol=1e-4, rtol=0)


def test_a_failed_export_falls_back_to_torch_unless_onnxruntime_was_asked_for(tiny_model, tiny_model_dir, features,
                                                                                tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache directory cannot be made under a file")
    engine = build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("auto", "fp32", 2, blocked / "cache"))
    assert isinstance(engine, TorchEngine)
    torch.testing.assert_close(engine(features), reference_rows(tiny_model, features), atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="cannot write the cache directory"):
        build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 2, blocked / "cache"))


def test_an_export_past_its_time_limit_falls_back_to_torch(tiny_model, tiny_model_dir, tmp_path):
    """The export's child process is killed when the start's budget runs out; nothing is cached."""
    hurried = EngineOptions("onnxruntime", "fp32", 1, tmp_path, start_timeout_s=0.05)
    with pytest.raises(ExportError, match=r"took over [\d.]+ s, what was left of the start's budget \(--start_timeout_s\)"):
        build_engine(checkpoint_of(tiny_model, tiny_model_dir), hurried)
    auto = EngineOptions("auto", "fp32", 1, tmp_path, start_timeout_s=0.05)
    assert isinstance(build_engine(checkpoint_of(tiny_model, tiny_model_dir), auto), TorchEngine)
    assert not list(tmp_path.glob("*.onnx"))


def test_an_export_whose_child_fails_falls_back_to_torch(tiny_model, tiny_model_dir, tmp_path):
    """The child loads the model afresh from its directory: weights gone since the server loaded
    them (a volume unmounted, say) make it fail, and its error comes back in the message."""
    vanished = tmp_path / "model"
    shutil.copytree(tiny_model_dir, vanished)
    for weights in weight_files(str(vanished)):
        weights.unlink()
    cache = tmp_path / "cache"
    with pytest.raises(ExportError, match=r"(?s)exporting the model to ONNX \(fp32\) failed \(exit 1\).*holds config.json but no weights"):
        build_engine(checkpoint_of(tiny_model, vanished), EngineOptions("onnxruntime", "fp32", 1, cache))
    engine = build_engine(checkpoint_of(tiny_model, vanished), EngineOptions("auto", "fp32", 1, cache))
    assert isinstance(engine, TorchEngine)
    assert not list(cache.glob("*.onnx"))


def test_a_cached_file_onnxruntime_cannot_open_is_removed(tiny_model, tiny_model_dir, tmp_path):
    build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 1, tmp_path))
    (cached,) = tmp_path.glob("*.onnx")
    cached.write_bytes(b"not a protobuf")  # e.g. a disk that filled up under an earlier version
    with pytest.raises(ExportError, match="could not load"):
        build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 1, tmp_path))
    assert not cached.exists()


def test_a_local_version_label_keeps_the_key(tiny_model_dir, monkeypatch):
    """PyPI's torch 2.13.0 (the CUDA build, what a laptop's pip installs for make pack-model) packs
    the files the image's 2.13.0+cpu reads: the label says which wheel, not what it exports."""
    real, keys = importlib.metadata.version, []
    for label in ("", "+cpu", "+cu130"):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: real(name).split("+")[0] + label if name == "torch" else real(name))
        keys.append(artifacts._model_key(Checkpoint.open(str(tiny_model_dir)), weight_files(str(tiny_model_dir))))
    assert len(set(keys)) == 1


def test_packed_engines_without_the_file_asked_for_are_said_once(tmp_path, caplog):
    (tmp_path / "engines").mkdir()
    with caplog.at_level(logging.WARNING, logger="predictor.engines.artifacts"):
        for _ in range(2):
            assert artifacts.packed(str(tmp_path), "ast-0123456789abcdef-fp32.onnx") is None
        assert artifacts.packed(str(tmp_path / "elsewhere"), "ast-0123456789abcdef-int8.onnx") is None  # none packed
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path / 'engines'} holds no ast-0123456789abcdef-fp32.onnx (packed for another model version" in warning


def test_a_hub_id_is_keyed_by_its_cached_snapshot_files(tmp_path, monkeypatch):
    """What `from_pretrained` leaves in the hub cache: refs/main naming a snapshot directory."""
    import huggingface_hub.constants

    repo = tmp_path / "models--org--ast"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text(name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert weight_files("org/ast") == [snapshot / "model.safetensors"]
    assert weight_files("org/not-downloaded") == []


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_a_backends_server_matches_the_pipeline(tiny_model_dir, tiny_pipeline, speech_16k, tmp_path, backend):
    server = start_server(tiny_model_dir, tmp_path / "server.log", extra_args=("--backend", backend, "--precision", "fp32"))
    try:
        body = {"instances": [{"b64": base64.b64encode(encode(speech_16k, 16000, "WAV", "FLOAT")).decode()}],
                "parameters": {"top_k": 3, "function_to_apply": "softmax"}}
        response = requests.post(server.predict_url, json=body)
    finally:
        stop_server(server)
    assert f"Engine: {backend}, fp32" in server.log.read_text()
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json()["predictions"][0], expected(tiny_pipeline, speech_16k, 3, "softmax"))


def test_openvino_runs_bf16_only_where_the_cpu_multiplies_bf16(tiny_model, tiny_model_dir, features, tmp_path):
    """On a CPU with AVX512-BF16 or AMX: bf16 within the cosine the README promises; elsewhere a
    refusal that says why, before anything is exported."""
    options = EngineOptions("openvino", "bf16", 2, tmp_path)
    if multiplies_bf16():
        reference = reference_rows(tiny_model, features)
        engine = build_engine(checkpoint_of(tiny_model, tiny_model_dir), options)
        first = engine(features)
        assert cosine(first, reference, tiny_model.config.num_labels) >= 0.9999
        for scale in (0.1, 10.0):  # a clip's answer is its own, whatever ran before it
            engine(features * scale)
            assert torch.equal(engine(features), first)
    else:
        with pytest.raises(ExportError, match="does not multiply bf16 natively"):
            build_engine(checkpoint_of(tiny_model, tiny_model_dir), options)
        assert not list(tmp_path.glob("*.onnx"))


def test_auto_serves_bf16_only_where_the_cpu_multiplies_bf16_and_fp32_elsewhere(tiny_model, tiny_model_dir, features,
                                                                                onnx_cache, caplog):
    reference = reference_rows(tiny_model, features)
    with caplog.at_level(logging.WARNING, logger="predictor.engines"):
        engine = build_engine(Checkpoint.open(str(tiny_model_dir)), EngineOptions("auto", "bf16", 2, onnx_cache))
    fell_back = any("serving fp32 instead" in r.getMessage() for r in caplog.records)
    if multiplies_bf16():
        assert not fell_back and cosine(engine(features), reference, tiny_model.config.num_labels) >= 0.9999
    else:
        assert fell_back
        torch.testing.assert_close(engine(features), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend, tolerance", [("torch", 1e-5), ("onnxruntime", 0.0)])
def test_int8_is_close_to_fp32_and_independent_of_batch_mates(tiny_model_dir, features, onnx_cache, backend, tolerance):
    """The cosine the README promises, on whatever CPU runs this (ONNX Runtime's int8 weights
    follow its VNNI, see onnx_export.int8_weight_type). Per-token scales (torch) or one clip per run
    (onnxruntime): batch-mates cannot move a clip's logits beyond float summation order (torch)
    or at all (onnxruntime)."""
    fp32 = TorchEngine(ASTForAudioClassification.from_pretrained(tiny_model_dir))(features)
    model = ASTForAudioClassification.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    engine = build_engine(checkpoint_of(model, tiny_model_dir), EngineOptions(backend, "int8", 2, onnx_cache))
    loud = features.clone()
    loud[1:] *= 50  # batch-mates with far larger activations, which a shared scale would follow
    batched = engine(loud)
    assert cosine(engine(features), fp32, model.config.num_labels) >= 0.999
    torch.testing.assert_close(batched[0], engine(features[:1])[0], atol=tolerance, rtol=0)


def test_export_is_cached_per_model_version_and_clears_what_killed_exports_left(tiny_model, tiny_model_dir, tmp_path):
    """A temp file older than twice the longest export's time limit was left by an export that was killed (its
    writer would have finished by then): an export removes it, and leaves a younger one alone."""
    abandoned, in_progress = tmp_path / "ast-old.onnx.tmp", tmp_path / "ast-now.onnx.tmp"
    for temp in (abandoned, in_progress):
        temp.write_bytes(b"half a model")
    long_ago = time.time() - 2 * OFFLINE_TIMEOUT_S - 60
    os.utime(abandoned, (long_ago, long_ago))
    build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 1, tmp_path))
    exported = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")}
    assert len(exported) == 1
    assert list(tmp_path.glob("*.tmp")) == [in_progress]
    build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 1, tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")} == exported


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_int8_server_answers_a_clip_the_same_with_any_batch_mates(tiny_model_dir, tmp_path, backend):
    """The issue's requirement for --precision int8: a clip's answer must not depend on who it was
    batched with, even when its request's clips share one forward pass."""
    server = start_server(tiny_model_dir, tmp_path / "server.log",
                          extra_args=("--precision", "int8", "--backend", backend, "--max_batch_size", "4"))
    clip = encode(tone(700, 1.0, 16000), 16000, "WAV", "FLOAT")
    loud = encode(np.clip(np.random.default_rng(0).standard_normal(32000), -1, 1).astype(np.float32), 16000, "WAV", "FLOAT")

    def predict(*files: bytes) -> list:
        body = {"instances": [{"b64": base64.b64encode(f).decode()} for f in files],
                "parameters": {"top_k": 10, "function_to_apply": "none"}}
        response = requests.post(server.predict_url, json=body)
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    try:
        alone = predict(clip)[0]
        with_others = predict(loud, clip, loud)[1]
    finally:
        stop_server(server)
    assert [p["label"] for p in alone] == [p["label"] for p in with_others]
    np.testing.assert_allclose([p["score"] for p in alone], [p["score"] for p in with_others], atol=1e-5, rtol=0)


def test_bf16_is_close_to_fp32(tiny_model_dir, features):
    model = ASTForAudioClassification.from_pretrained(tiny_model_dir)
    fp32 = TorchEngine(model)(features)
    bf16 = build_engine(Checkpoint.open(str(tiny_model_dir)), EngineOptions("torch", "bf16", 2))(features)
    assert bf16.dtype == torch.float32
    assert cosine(bf16, fp32, model.config.num_labels) >= 0.9999  # what the README promises


def test_changed_weights_get_a_new_export(tiny_model_dir, onnx_cache, tmp_path):
    """The same weights elsewhere share the session's export (the test server made it); changed
    weights get one of their own."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model = ASTForAudioClassification.from_pretrained(model_dir)
    build_engine(checkpoint_of(model, model_dir), EngineOptions("onnxruntime", "fp32", 1, onnx_cache))
    before = set(onnx_cache.glob("*-fp32.onnx"))
    with torch.no_grad():
        model.classifier.dense.bias += 1.0
    model.save_pretrained(model_dir)
    engine = build_engine(checkpoint_of(model, model_dir), EngineOptions("onnxruntime", "fp32", 1, onnx_cache))
    assert len(set(onnx_cache.glob("*-fp32.onnx")) - before) == 1
    features = torch.zeros(1, model.config.max_length, model.config.num_mel_bins)
    torch.testing.assert_close(engine(features), TorchEngine(model)(features), atol=1e-4, rtol=0)


ENGINE_TYPES = {"onnxruntime": OnnxEngine, "openvino": OpenVinoEngine, "torch": TorchEngine}


def test_auto_times_every_engine_once_per_kind_of_cpu_and_keeps_the_fastest(tiny_model_dir, tmp_path, caplog):
    def auto():
        with caplog.at_level(logging.INFO, logger="predictor.engines"):
            return build_engine(Checkpoint.open(str(tiny_model_dir)), EngineOptions("auto", "fp32", 1, tmp_path))

    first = auto()
    assert any("Timing every engine" in r.getMessage() for r in caplog.records)
    timed = {r.getMessage().split(",")[0].removeprefix("Engine ") for r in caplog.records if "s per window" in r.getMessage()}
    assert timed == {"onnxruntime", "openvino"}  # torch only serves when neither can
    (record,) = tmp_path.glob("choice-*-fp32-*.json")
    kept = json.loads(record.read_text())
    assert kept["backend"] == min(kept["seconds_per_window"], key=kept["seconds_per_window"].get)
    assert isinstance(first, ENGINE_TYPES[kept["backend"]])
    caplog.clear()
    second = auto()  # the next start on this kind of CPU: no race, the kept engine
    assert not any("Timing every engine" in r.getMessage() for r in caplog.records)
    assert any("kept from an earlier measurement" in r.getMessage() for r in caplog.records)
    assert isinstance(second, ENGINE_TYPES[kept["backend"]])


@pytest.mark.parametrize("files", [{"notes.txt": "not audio"}, {}])
def test_a_lone_candidate_serves_without_a_race_or_a_claim_of_one(tiny_model_dir, onnx_cache, tmp_path, caplog, files):
    """OpenVINO's int8 cannot be made from a calibration set that is not audio, or holds nothing:
    ONNX Runtime is the only int8 engine left, so nothing is timed, and nothing is said to be kept
    from a timing."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for name, text in files.items():
        (calibration / name).write_text(text)
    with caplog.at_level(logging.INFO, logger="predictor.engines"):  # the session's cache: no export twice
        engine = build_engine(Checkpoint.open(str(tiny_model_dir)),
                              EngineOptions("auto", "int8", 1, onnx_cache, calibration_dir=calibration))
    assert isinstance(engine, OnnxEngine)
    messages = [r.getMessage() for r in caplog.records]
    assert any("Engine openvino cannot run int8 here" in m for m in messages), messages
    assert not any("Timing every engine" in m or "kept from an earlier measurement" in m for m in messages), messages


def test_a_damaged_file_packed_with_the_model_is_named_kept_and_auto_serves_without_it(tiny_model, tiny_model_dir,
                                                                                      tmp_path):
    """Packed files are every replica's: one that ONNX Runtime or OpenVINO cannot open is an
    `ExportError` naming it (under auto, the next engine serves), and it stays where it is."""
    cache = tmp_path / "cache"
    build_engine(checkpoint_of(tiny_model, tiny_model_dir), EngineOptions("onnxruntime", "fp32", 1, cache))
    (exported,) = cache.glob("*.onnx")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    damaged = tmp_path / "model" / "engines" / exported.name
    damaged.parent.mkdir()
    damaged.write_bytes(exported.read_bytes()[:5000])  # an upload cut short
    checkpoint = checkpoint_of(tiny_model, tmp_path / "model")
    for backend, engine in (("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO")):
        with pytest.raises(ExportError, match=f"{engine} could not load {damaged} \\(packed with the model: pack it again"):
            build_engine(checkpoint, EngineOptions(backend, "fp32", 1, tmp_path / "node-cache"))
        assert damaged.stat().st_size == 5000
    assert isinstance(build_engine(checkpoint, EngineOptions("auto", "fp32", 1, tmp_path / "node-cache")), TorchEngine)
    assert not list((tmp_path / "node-cache").glob("choice-*"))  # nothing timed is nothing kept: the next start tries again


def test_openvino_int8_is_quantized_again_for_another_feature_extractor(tiny_model, tiny_model_dir, tmp_path):
    """Its activation scales are taken after the extractor's normalisation: a fine-tune's corrected
    mean and std make a new IR, not the old one reused."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = int8_ir_path(checkpoint_of(tiny_model, tmp_path / "model"), None, tmp_path)
    config = tmp_path / "model" / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "mean": -6.85, "std": 5.57}))
    assert int8_ir_path(checkpoint_of(tiny_model, tmp_path / "model"), None, tmp_path) != before


def test_the_choice_is_kept_per_cpu_model_vector_extensions_and_threads():
    epyc = cpu_key(2, {"avx2", "fma", "sse4_2"}, "AMD EPYC")
    assert epyc == cpu_key(2, {"avx2", "fma"}, "AMD EPYC")  # flags no engine's speed depends on do not count
    assert len({epyc, cpu_key(4, {"avx2", "fma"}, "AMD EPYC"), cpu_key(2, {"avx2", "fma", "amx_bf16"}, "AMD EPYC"),
                cpu_key(2, {"avx2", "fma"}, "Intel Xeon")}) == 4


# A 32-wide random model is no subject for int8's accuracy: its error is relatively larger than at
# AST's 768 width, and it moves with the CPU's int8 kernels (VNNI or not, AMX or not) by more than a
# tight bound allows. Accuracy is measured at full size by `make bench` and `python -m
# tools.compare`; here the bound only says the quantized model is still the model (a wrong
# scale or a broken graph lands far below it), with room for every CPU kind we have run on.
STATIC_INT8_MIN_COSINE = 0.85


def test_openvino_int8_is_calibrated_once_per_calibration_set(tiny_model_dir, speech_wav, tmp_path):
    """NNCF's static int8, calibrated on synthetic clips unless a directory of audio is named: one
    IR per model and calibration set, kept in the cache; close to fp32 on audio like its
    calibration's (static scales clip what lies far outside it); and a clip's logits do not depend
    on its batch-mates (one clip per run)."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "speech.wav").write_bytes(speech_wav)
    model = ASTForAudioClassification.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(str(tiny_model_dir), model.config))
    speech = file_features([calibration / "speech.wav"], filterbank)
    features = torch.cat([speech, filterbank(synthetic_clips(16000, 3, Windowing.of(filterbank).length, seed=100))])
    fp32 = TorchEngine(model)(features)
    cache = tmp_path / "cache"

    def int8(directory=None):
        return build_engine(checkpoint_of(model, tiny_model_dir),
                            EngineOptions("openvino", "int8", 2, cache, calibration_dir=directory))

    synthetic = int8()
    (made,) = cache.glob("*-int8-ov-*.xml")
    assert made.with_suffix(".bin").is_file()
    assert cosine(synthetic(features), fp32, model.config.num_labels) >= STATIC_INT8_MIN_COSINE
    torch.testing.assert_close(synthetic(features)[:1], synthetic(features[:1]), atol=0, rtol=0)
    stamp = made.stat().st_mtime_ns
    int8()
    assert made.stat().st_mtime_ns == stamp  # kept, not quantized again
    real = int8(calibration)
    assert len(list(cache.glob("*-int8-ov-*.xml"))) == 2
    assert cosine(real(speech), fp32[: len(speech)], model.config.num_labels) >= STATIC_INT8_MIN_COSINE
    (calibration / "notes.txt").write_text("not audio")
    with pytest.raises(ExportError, match=r"(?s)quantizing the model to int8 for OpenVINO .* failed.*notes.txt: "
                                          r"could not decode audio"):
        int8(calibration)
