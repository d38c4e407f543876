"""What runs AST: features (batch, frames, mel bins) → logits (batch, labels).

Both engines run `ast_forward.PooledLogits` (the last layer for the pooled tokens only). Which
engine runs is `--backend`; `auto` (the default) picks the fastest measured here (`make bench`,
2 cores) for the precision: ONNX Runtime for fp32 and int8, torch for bf16.

- `OnnxEngine`: the model exported once to ONNX (torch's dynamo exporter, the supported path in
  torch 2.13; see `onnx_export` for the cache) and run by ONNX Runtime, one clip at a time
  (batches did not pay, and its attention materialises every score matrix, so a batch costs
  gigabytes). fp32: 1.03-1.15x the torch engine across runs, within 1e-4 of it, ~1.0 of the
  fp32 GEMM roofline for the FLOPs it computes. int8: ONNX Runtime's dynamic quantization of the
  MatMul weights (per channel); it picks one activation scale per tensor, which clip by clip
  means per clip, so a clip's logits never depend on other requests. 1.16-1.19x the torch int8
  path below, same cosine.
- `TorchEngine`: the transformers modules in eager mode, SDPA attention, `torch.inference_mode`.
  fp32 at 0.93-1.0 of the roofline across runs.
- `--precision bf16` runs the torch engine in bfloat16, which CPUs with AVX512-BF16 or AMX
  multiply at twice the fp32 rate: 1.9x the pipeline here, logits' cosine to fp32 ≥ 0.9999.
  (Without those instructions bf16 is emulated and slower than fp32.)
- `--backend torch --precision int8`: every encoder Linear becomes `Int8Linear`, int8 weights per
  output channel and int8 activations per token, multiplied by `torch._int_mm` (the int8 GEMM
  torchao builds on; torchao's own eager path measured ~14x slower, and `torch.ao.quantization`
  is deprecated). Per-token scales make a clip's logits independent of its batch-mates.
  Attention stays fp32 (bf16 attention measured no faster on this CPU): ~45 % of the time.
Accuracy of both int8 paths: cosine ≥ 0.999 to fp32 on the random-init model; real checkpoints'
activation outliers may cost more, so check the cosine on your clips before relying on it.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from transformers import ASTForAudioClassification

from .ast_forward import PooledLogits
from .onnx_export import EXPORT_TIMEOUT_S, ExportError, cached_onnx, default_cache_dir

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"
    precision: str = "fp32"
    threads: int = 1
    cache_dir: Optional[Path] = None  # None: $XDG_CACHE_HOME/ast-kserve
    export_timeout_s: float = EXPORT_TIMEOUT_S


class Engine(Protocol):
    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    def __init__(self, model: ASTForAudioClassification, dtype: torch.dtype = torch.float32):
        self.logits = PooledLogits(model.to(dtype).eval())
        self.dtype = dtype

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.logits(features.to(self.dtype)).float()


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights (one scale per output channel) and int8 activations (one scale
    per token, so rows never share a scale): y = (q(x) @ q(W)^T) * sx * sw + b."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        quantized = torch.round(rows / scale).to(torch.int8)
        if len(quantized) <= 16:  # _int_mm wants more than 16 rows; pad (rows stay independent)
            quantized = torch.nn.functional.pad(quantized, (0, 0, 0, 17 - len(quantized)))
        output = torch._int_mm(quantized, self.weight_t)[: len(rows)].float()
        output.mul_(scale)  # in place: each full-size temporary costs a pass over memory
        return torch.addcmul(self.bias, output, self.weight_scale, out=output).reshape(*x.shape[:-1], -1)


def quantize_linears(model: ASTForAudioClassification) -> ASTForAudioClassification:
    """Every encoder Linear whose sizes the int8 GEMM takes (multiples of 8) becomes an Int8Linear;
    the classifier head stays fp32, so the logits' last step is exact."""
    for module in model.audio_spectrogram_transformer.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 8 == 0 and child.out_features % 8 == 0:
                setattr(module, name, Int8Linear(child))
    return model


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
        return torch.from_numpy(np.concatenate(
            [self.session.run(None, {"input_values": batch[i : i + 1]})[0] for i in range(len(batch))]
        ))

    @classmethod
    def build(cls, model: ASTForAudioClassification, source: str, options: EngineOptions) -> "OnnxEngine":
        """Every way this can fail comes out as `ExportError`, which `auto` answers with torch. A
        cached file ONNX Runtime cannot open is removed, so the next start exports it afresh."""
        try:
            path = cached_onnx(model, source, options.precision, options.cache_dir or default_cache_dir(),
                               options.export_timeout_s)
        except (OSError, ImportError) as exc:
            raise ExportError(f"could not prepare the ONNX model: {exc}") from exc
        try:
            return cls(path, options.threads)
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception itself
            path.unlink(missing_ok=True)
            raise ExportError(f"ONNX Runtime could not load {path} (removed from the cache): {exc}") from exc


def resolve_backend(backend: str, precision: str) -> str:
    """`auto`: the engine that measured fastest here for the precision (`make bench`, 2 cores):
    ONNX Runtime for fp32 and int8, torch for bf16 (which only the torch backend runs)."""
    if backend != "auto":
        return backend
    return "torch" if precision == "bf16" else "onnxruntime"


def build_engine(model: ASTForAudioClassification, source: str, options: EngineOptions) -> Engine:
    """The engine `options` ask for. With `auto`, a model that cannot be exported to ONNX (an
    unwritable cache, an export that fails) is served by torch instead, with a warning: slower,
    but serving. An explicit `--backend onnxruntime` raises `ExportError` instead."""
    backend = resolve_backend(options.backend, options.precision)
    logger.info("Engine: %s, %s", backend, options.precision)
    if backend == "onnxruntime":
        if options.precision == "bf16":
            raise ValueError("bf16 runs on the torch backend")
        try:
            return OnnxEngine.build(model, source, options)
        except ExportError as exc:
            if options.backend != "auto":
                raise
            logger.warning("%s\nServing with the torch engine instead (pass --backend torch to skip the export)", exc)
    if options.precision == "int8":
        return TorchEngine(quantize_linears(model.eval()))
    return TorchEngine(model, torch.bfloat16 if options.precision == "bf16" else torch.float32)
