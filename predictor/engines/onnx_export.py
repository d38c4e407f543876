"""The ONNX file ONNX Runtime runs: exported (and quantized) once per model version, in a child process.

The file is cached on disk (`artifacts`: keyed by the model's config and weights, this export code
and the libraries' versions); in a pod, mount a volume at the cache directory to keep it across
container restarts. The export runs in a child process because it peaks at several times the
model's size and leaves its garbage fragmented through the heap of the process that ran it (the
server's resident set stayed higher ever after; docs/performance.md has the figures); a child
hands all of it back on exit.

    python -m predictor.engines.onnx_export SOURCE FP32_FILE OUT_FILE PRECISION    # fp32, int8-s8 or int8-u8
"""

import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import Checkpoint
from ..cpu import configure_torch_threads, cpu_flags
from .artifacts import atomic_write, made_in_child, model_key

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cached_onnx(checkpoint: Checkpoint, precision: str, cache_dir: Path, timeout_s: float) -> Path:
    """The cached file for this model version and precision, exported first if it is missing."""
    key = model_key(checkpoint)
    precision = f"int8-{int8_weight_type()}" if precision == "int8" else precision
    path = cache_dir / f"ast-{key}-{precision}.onnx"
    fp32 = cache_dir.resolve() / f"ast-{key}-fp32.onnx"
    return made_in_child(path, __name__, [checkpoint.source, str(fp32), str(path.resolve()), precision], timeout_s,
                         f"exporting the model to ONNX ({precision})")


def int8_weight_type(flags: Optional[set[str]] = None) -> str:
    """The int8 weight type ONNX Runtime's dynamic quantization should use on this CPU.

    ONNX Runtime multiplies u8 activations by int8 weights. With VNNI (AVX512-VNNI, AVX-VNNI, AMX)
    s8 weights are exact; without it (AVX2 only) the u8 x s8 path sums pairs into int16 and
    saturates, as ONNX Runtime's quantization guide warns, and the logits drift far from fp32
    (`tests/test_engines.py` holds every backend to a cosine bound, on whatever CPU runs it).
    So: s8 with VNNI, u8 without.
    """
    return "s8" if (cpu_flags() if flags is None else flags) & VNNI_FLAGS else "u8"


def export(source: str, fp32: Path, out: Path, precision: str) -> None:
    """Write `fp32` (unless it exists: `out` itself for fp32) and, for int8, `out` quantized from it."""
    if precision not in ("fp32", "int8-s8", "int8-u8"):
        raise ValueError(f"no ONNX export for precision {precision!r}")
    if not fp32.is_file():
        from .ast_forward import PooledOutputs

        model = Checkpoint.open(source).module()
        example = torch.zeros(1, model.config.max_length, model.config.num_mel_bins)
        atomic_write(fp32, lambda tmp: torch.onnx.export(
            PooledOutputs(model).eval(), (example,), tmp, input_names=["input_values"],
            output_names=["logits", "embedding"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True,
            opset_version=ONNX_OPSET, external_data=False, verbose=False,
        ))
    if precision.startswith("int8"):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(fp32)
        # The exporter's intermediate shape annotations trip the quantizer's shape inference
        # ("Inferred shape and existing shape differ"); it infers them afresh without them.
        graph.graph.ClearField("value_info")
        weights = QuantType.QInt8 if precision == "int8-s8" else QuantType.QUInt8  # see int8_weight_type
        atomic_write(out, lambda tmp: quantize_dynamic(graph, tmp, per_channel=True, weight_type=weights))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    source, fp32, out, precision = sys.argv[1:]
    configure_torch_threads(None)
    export(source, Path(fp32), Path(out), precision)


if __name__ == "__main__":
    main()
