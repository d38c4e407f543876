"""OpenVINO's int8: NNCF post-training quantization of the fp32 ONNX export, once, in a child process.

OpenVINO runs int8 fast when the graph carries static quantization (int8 weights, and activation
scales fixed from calibration), which is what NNCF writes; handed ONNX Runtime's dynamic-int8
graph instead, it ran slower than its own fp32 (issue 11's measurements). NNCF's transformer
mode keeps the numerically touchy steps (softmax, layer norm, GELU) in fp32 and applies
SmoothQuant and fast bias correction; the statistics come from `calibration` windows, synthetic
unless `--calibration_dir` names real audio. The result is an OpenVINO IR (.xml and .bin) in the
cache directory, keyed by the model version, the calibration set, the feature extractor's
config and the versions of OpenVINO, NNCF and the code that makes the windows. Like the export, quantizing runs in a child: it holds the fp32 model, its
statistics and the quantized copy at once, and the server's memory should stay what serving needs.

    python -m predictor.engines.openvino_int8 SOURCE FP32_ONNX OUT_XML [CALIBRATION_DIR]
"""

import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from transformers import AutoConfig

from ..checkpoint import Checkpoint, load_feature_extractor
from ..cpu import configure_torch_threads
from ..errors import ClientInputError
from . import calibration
from .artifacts import TEMP_SUFFIX, ExportError, made_in_child, model_key, module_source
from .options import EngineOptions

logger = logging.getLogger(__name__)


KEYED_SOURCES = (calibration.__name__, "predictor.features", "predictor.windows", __spec__.name)
"""The code the calibration windows are made by (their features fix the activation scales)."""


def cached_int8_ir(checkpoint: Checkpoint, fp32: Path, options: EngineOptions, cache_dir: Path) -> Path:
    """The quantized IR, made first if it is missing."""
    directory = options.calibration_dir
    path = int8_ir_path(checkpoint, directory, cache_dir)
    args = [checkpoint.source, str(fp32.resolve()), str(path.resolve())] + ([str(directory.resolve())] if directory else [])
    return made_in_child(path, __name__, args, options.time_left(),
                         f"quantizing the model to int8 for OpenVINO (NNCF, calibrated on "
                         f"{directory or f'{calibration.CALIBRATION_WINDOWS} synthetic windows'})")


def int8_ir_path(checkpoint: Checkpoint, directory: Optional[Path], cache_dir: Path) -> Path:
    """Named for the model, the calibration set, the feature extractor (whose normalisation the
    scales are taken after) and the versions of what makes it; `ExportError` if the calibration
    set cannot be read."""
    try:
        digest = hashlib.sha256(calibration.calibration_key(directory).encode())
    except (ClientInputError, OSError) as exc:
        raise ExportError(f"cannot calibrate on --calibration_dir {directory}: {exc}") from exc
    digest.update(load_feature_extractor(checkpoint.source, checkpoint.config).to_json_string().encode())
    digest.update(repr(tuple(importlib.metadata.version(name) for name in ("openvino", "nncf"))).encode())
    for module in KEYED_SOURCES:
        digest.update(module_source(module))
    return cache_dir / f"ast-{model_key(checkpoint)}-int8-ov-{digest.hexdigest()[:12]}.xml"


def quantize(source: str, fp32: Path, out: Path, directory: Optional[Path]) -> None:
    import nncf
    import openvino

    features = calibration.calibration_features(source, AutoConfig.from_pretrained(source), directory).numpy()
    graph = openvino.Core().read_model(str(fp32))
    quantized = nncf.quantize(graph, nncf.Dataset([window[None] for window in features]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(features))
    scratch = Path(tempfile.mkdtemp(dir=out.parent, suffix=TEMP_SUFFIX))
    try:  # the .bin first, then the .xml the cache looks for: never an .xml without its weights
        openvino.save_model(quantized, str(scratch / "model.xml"), compress_to_fp16=False)
        os.replace(scratch / "model.bin", out.with_suffix(".bin"))
        os.replace(scratch / "model.xml", out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    source, fp32, out, *directory = sys.argv[1:]
    configure_torch_threads(None)
    quantize(source, Path(fp32), Path(out), Path(directory[0]) if directory else None)


if __name__ == "__main__":
    main()
