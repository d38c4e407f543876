"""`python -m tools.compare`: each raced engine and precision on a checkpoint and clips, against fp32."""

import json
import subprocess
import sys

from .conftest import encode, tone
from .test_engines import STATIC_INT8_MIN_COSINE

RATE = 16000


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.compare", *args], capture_output=True, text=True,
                          timeout=600)


def test_compare_reports_each_engine_against_fp32(tiny_model_dir, speech_wav, onnx_cache, tmp_path):
    long_clip = tmp_path / "long.flac"
    long_clip.write_bytes(encode(tone(440, 25.0, 44100), 44100, "FLAC"))  # three windows, resampled
    speech = tmp_path / "speech.wav"
    speech.write_bytes(speech_wav)
    done = run_compare("--model_dir", str(tiny_model_dir), "--precisions", "fp32,int8", "--threads", "1",
                       "--onnx_cache_dir", str(onnx_cache), "--json", str(speech), str(long_clip))
    assert done.returncode == 0, done.stderr
    rows = {(r["backend"], r["precision"]): r for r in json.loads(done.stdout)["rows"]}
    assert set(rows) == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"), ("openvino", "int8")}
    for (backend, precision), row in rows.items():
        assert row["error"] is None and row["seconds_per_window"] > 0, row
        if precision == "fp32":  # every fp32 engine is the transformers model within 1e-4
            assert row["max_score_diff"] <= 1e-4 and row["min_cosine"] > 0.99999 and row["top5_kept"] == 1.0, row
        else:  # the cosines the README states for int8 on a random-init model: dynamic, then static int8
            bound = 0.999 if backend == "onnxruntime" else STATIC_INT8_MIN_COSINE
            assert row["min_cosine"] >= bound and 0 < row["top5_kept"] <= 1, row


def test_compare_names_a_file_it_cannot_read(tiny_model_dir, tmp_path):
    broken = tmp_path / "notes.txt"
    broken.write_text("not audio")
    done = run_compare("--model_dir", str(tiny_model_dir), "--precisions", "fp32", str(broken))
    assert done.returncode == 2 and f"{broken}: could not decode audio" in done.stderr, done.stderr
