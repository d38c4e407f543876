"""`make pack-model`: weights, configs and the engine files in one directory, so a new pod exports nothing
(and does not even load the torch model)."""

import subprocess
import sys
import tarfile

import requests

from tools.pack_model import pack

from .conftest import REPO, TINY_LABELS, encode, start_server, stop_server


def test_a_packed_model_starts_without_exporting_or_timing_engines(tiny_model_dir, speech_16k, tmp_path):
    out = tmp_path / "packed"
    done = subprocess.run([sys.executable, "-m", "tools.pack_model", str(tiny_model_dir), str(out), "--tar",
                           "--precisions", "int8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    engines = {p.name for p in (out / "engines").iterdir()}
    # int8 for CPUs with and without VNNI, and the fp32 export they (and OpenVINO's int8) start from
    assert {"fp32.onnx", "int8-s8.onnx", "int8-u8.onnx"} == {n.split("-", 2)[2] for n in engines if n.endswith(".onnx")}
    assert len([n for n in engines if "-int8-ov-" in n]) == 2  # OpenVINO's IR: .xml and .bin
    assert len([n for n in engines if n.startswith("choice-")]) == 1  # int8, timed on this CPU
    assert "openvino" not in engines  # blobs compiled for this CPU stay out: each node compiles its own
    assert f"packed {tiny_model_dir} into {out} (" in done.stderr and " MB): " in done.stderr
    with tarfile.open(tmp_path / "packed.tar.gz") as archive:
        assert {f"engines/{name}" for name in engines} < set(archive.getnames())

    cache = tmp_path / "fresh-cache"  # a new pod: nothing cached
    server = start_server(out, tmp_path / "server.log", ("--precision", "int8"), env={"AST_ONNX_CACHE_DIR": str(cache)})
    try:
        response = requests.post(server.predict_url, data=encode(speech_16k, 16000, "WAV", "FLOAT"), timeout=60)
    finally:
        stop_server(server)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"][0]
    assert len(predictions) == 5 and {p["label"] for p in predictions} <= set(TINY_LABELS)
    assert 0 < sum(p["score"] for p in predictions) <= 1 + 1e-6  # 10 labels: softmax, as the pipeline does
    log = server.log.read_text()
    assert "packed with the model" in log and "kept from an earlier measurement" in log, log
    assert "Exporting" not in log and "Quantizing" not in log and "Timing every engine" not in log, log
    assert "Loading the torch model" not in log, log  # ONNX Runtime and OpenVINO read their own files
    assert not [p for p in cache.rglob("*") if p.suffix in (".onnx", ".xml", ".json")]


def test_no_engines_packs_weights_and_configs_only(tiny_model_dir, tmp_path):
    out = pack(str(tiny_model_dir), tmp_path / "plain", ["fp32"], engines=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
