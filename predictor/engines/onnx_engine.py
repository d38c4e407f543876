"""ONNX Runtime on the model exported once to ONNX (`onnx_export`), one clip at a time."""

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from .artifacts import ExportError, default_cache_dir, unusable
from .onnx_export import cached_onnx
from .options import EngineOptions


class OnnxEngine:
    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.numpy()
        return torch.from_numpy(np.concatenate(  # logits, then the embedding (`options.split`)
            [np.concatenate(self.session.run(None, {"input_values": batch[i : i + 1]}), axis=1)
             for i in range(len(batch))]
        ))

    @staticmethod
    def prepare(checkpoint: Checkpoint, options: EngineOptions) -> Path:
        """The ONNX file, exported if it is not cached yet; every failure is an `ExportError`."""
        if options.precision == "bf16":
            raise ExportError("--backend onnxruntime runs fp32 and int8, not bf16: use --backend openvino or torch")
        try:
            return cached_onnx(checkpoint, options.precision, options.cache_dir or default_cache_dir(),
                               options.time_left())
        except (OSError, ImportError) as exc:
            raise ExportError(f"could not prepare the ONNX model: {exc}") from exc

    @classmethod
    def build(cls, checkpoint: Checkpoint, options: EngineOptions) -> "OnnxEngine":
        path = cls.prepare(checkpoint, options)
        try:
            return cls(path, options.threads)
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception itself
            raise unusable(path, options.cache_dir or default_cache_dir(), "ONNX Runtime", exc, remove=True) from exc
