"""OpenVINO on the model exported once to ONNX (`onnx_export`), compiled for the CPU it runs on.

OpenVINO reads the ONNX file ONNX Runtime runs, so one export serves both, and its compiled blob
is cached (`CACHE_DIR`) beside it: a second start skips the compile. One clip at a time, like the
ONNX Runtime engine, so a clip's logits never depend on its batch-mates. bf16 is OpenVINO's
`INFERENCE_PRECISION_HINT` on CPUs that multiply bf16 natively (its `BF16` capability: AVX512-BF16
or AMX); elsewhere bf16 is refused, since emulating it is slower than fp32. int8 is the IR NNCF
quantizes from that export (`openvino_int8`), with static activation scales from calibration.
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..cpu import multiplies_bf16
from .artifacts import ExportError, default_cache_dir, unusable
from .onnx_export import cached_onnx
from .openvino_int8 import cached_int8_ir
from .options import EngineOptions

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the IR's own int8, the rest in fp32
# In bf16 with more than one thread, OpenVINO's snippets (its JIT-fused subgraphs) made a clip's
# logits depend on the clip inferred before it (tests/test_load.py caught labels swapping under
# load); without them the answer is the clip's own, at a speed within run-to-run spread on the
# full-size model (re-measure with `make bench`).
DETERMINISTIC = {"bf16": {"SNIPPETS_MODE": "DISABLE"}}


class OpenVinoEngine:
    def __init__(self, path: Path, precision: str, threads: int, cache_dir: Path):
        import openvino

        core = openvino.Core()
        core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads,
                  "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", **DETERMINISTIC.get(precision, {})}
        self.request = core.compile_model(str(path), "CPU", config).create_infer_request()

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.numpy()
        rows = []
        for i in range(len(batch)):
            outputs = self.request.infer({0: batch[i : i + 1]})
            rows.append(np.concatenate([outputs[0], outputs[1]], axis=1))  # logits, then the embedding
        return torch.from_numpy(np.concatenate(rows))

    @staticmethod
    def prepare(checkpoint: Checkpoint, options: EngineOptions) -> Path:
        """The model file to compile (the fp32 ONNX export, or for int8 the IR quantized from it),
        made if need be, once the precision is one this CPU runs fast."""
        if importlib.util.find_spec("openvino") is None:
            raise ExportError("OpenVINO is not installed here (the CUDA image leaves it out)")
        check_precision(options.precision)
        cache_dir = options.cache_dir or default_cache_dir()
        fp32 = cached_onnx(checkpoint, "fp32", cache_dir, options.time_left())
        return cached_int8_ir(checkpoint, fp32, options, cache_dir) if options.precision == "int8" else fp32

    @classmethod
    def build(cls, checkpoint: Checkpoint, options: EngineOptions) -> "OpenVinoEngine":
        """Every failure is an `ExportError` (under --backend auto, another engine serves)."""
        path = cls.prepare(checkpoint, options)  # packed with the model (read-only) or in the cache
        cache_dir = options.cache_dir or default_cache_dir()
        try:
            return cls(path, options.precision, options.threads, cache_dir / "openvino")
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError, and its own types beside it
            raise unusable(path, cache_dir, "OpenVINO", exc) from exc


def check_precision(precision: str) -> None:
    if precision == "bf16" and not multiplies_bf16():
        raise ExportError("this CPU does not multiply bf16 natively (no AVX512-BF16 or AMX), so bf16 would be "
                          "slower than fp32 here: use --precision fp32 or int8")
