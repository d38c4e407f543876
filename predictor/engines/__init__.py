"""What runs AST: features (batch, frames, mel bins) → logits (batch, labels).

Every engine runs `ast_forward.PooledLogits` (the last layer for the pooled tokens only), one
module each: `torch_engine`, `onnx_engine` and `openvino_engine`, the last two on the model
exported once to ONNX (`onnx_export`, cached). Which engine runs is `--backend`; `auto` (the
default) picks the fastest measured on the first CPU this ran on (`make bench`, 2 cores) for the
precision: ONNX Runtime for fp32 and int8, torch for bf16.

- `OpenVinoEngine`: OpenVINO compiling the same ONNX file for the CPU it runs on, one clip at a
  time; fp32, and bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX; elsewhere it
  refuses bf16 rather than emulate it slowly). Compiled blobs are cached beside the ONNX file.

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

import torch
from transformers import ASTForAudioClassification

from .onnx_engine import OnnxEngine
from .onnx_export import ExportError
from .openvino_engine import OpenVinoEngine
from .options import BACKENDS, PRECISIONS, Engine, EngineOptions
from .torch_engine import TorchEngine, quantize_linears

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "PRECISIONS", "Engine", "EngineOptions", "ExportError", "OnnxEngine", "OpenVinoEngine",
           "TorchEngine", "build_engine", "resolve_backend"]

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
    if backend == "openvino":
        return OpenVinoEngine.build(model, source, options)
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
