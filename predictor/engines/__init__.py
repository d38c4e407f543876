"""What runs AST: features (batch, frames, mel bins) → rows (batch, labels + hidden): each window's
logits, then its pooled embedding (`options.split`).

Every engine runs `ast_forward.PooledOutputs` (the last layer for the pooled tokens only), one
module each; `--backend` names one, and `auto` (the default) measures them on the node and keeps
the fastest for the precision (`choice`). Measured speeds live in `benchmarks/results/` and the
README, by CPU.

- `onnx_engine`: ONNX Runtime on the model exported once to ONNX (torch's dynamo exporter, the
  supported path in torch 2.13; `onnx_export` keeps the file), one clip at a time: batches did
  not pay, and its attention materialises every score matrix. int8 is ONNX Runtime's dynamic
  quantization of the MatMul weights per channel, with one activation scale per tensor, which
  clip by clip means per clip, so a clip's logits never depend on other requests.
- `openvino_engine`: OpenVINO compiling the same ONNX file for this CPU, one clip at a time;
  fp32, and bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX).
- `torch_engine`: the transformers modules in eager mode, SDPA attention. bf16 pays only with
  AVX512-BF16 or AMX (elsewhere it is emulated, slower than fp32). int8: every encoder Linear
  becomes `Int8Linear`, int8 weights per output channel and int8 activations per token through
  `torch._int_mm` (torchao's eager path measured far slower, and `torch.ao.quantization` is
  deprecated); attention stays fp32.
int8 costs accuracy that depends on the checkpoint (real checkpoints' activation outliers) and the
CPU's int8 kernels: `python -m tools.compare` measures the cosine on your clips, and the docs list
what was measured where, before you rely on it.
"""

import logging
from dataclasses import replace
from typing import Optional

import torch

from .. import metrics
from ..checkpoint import Checkpoint
from ..cpu import multiplies_bf16
from .choice import choose
from .onnx_engine import OnnxEngine
from .artifacts import ExportError
from .openvino_engine import OpenVinoEngine
from .options import BACKENDS, PRECISIONS, Engine, EngineOptions

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["BACKENDS", "PRECISIONS", "Engine", "EngineOptions", "ExportError", "OnnxEngine", "OpenVinoEngine",
           "build_engine"]


def build_engine(checkpoint: Checkpoint, options: EngineOptions, serving: Optional[str] = None) -> Engine:
    """The engine `options` ask for; with `auto`, the fastest for the precision on this node
    (`choice`). An engine asked for by name that cannot be built here raises `ExportError`.
    Only the torch engine (and an export not yet made) loads the checkpoint's torch module.
    `serving`: the name of the model it will serve, shown with the engine in `ast_engine_info`
    (engines built for a tool or a benchmark serve none).

    `auto` with bf16 on a CPU that does not multiply bf16 natively serves fp32 instead, with a
    warning: torch's emulated bf16 is several times slower than fp32 there (README, Performance), and
    a pod rescheduled from an AMX node onto such a node should keep serving, not crash or crawl.
    A named `--backend torch` still emulates it; `--backend openvino` refuses."""
    if options.device != "cpu":  # ONNX Runtime and OpenVINO run here on the CPU only
        options = replace(options, backend="torch")
    if options.backend == "auto" and options.precision == "bf16" and not multiplies_bf16():
        logger.warning("--precision bf16: this CPU does not multiply bf16 natively (no AVX512-BF16 or AMX), where "
                       "bf16 runs several times slower than fp32; serving fp32 instead (exact, and faster here)")
        options = replace(options, precision="fp32")
    if options.backend == "auto":
        backend, engine = choose(checkpoint, options,
                                 prepare=lambda name: _prepare(checkpoint, replace(options, backend=name)),
                                 build=lambda name: _build(checkpoint, replace(options, backend=name)))
    else:
        backend, engine = options.backend, _build(checkpoint, options)
    logger.info("Engine: %s, %s, on %s", backend, options.precision, options.device)
    if serving is not None:
        metrics.engine_serving(serving, backend, options.precision, options.device)
    return engine


def _prepare(checkpoint: Checkpoint, options: EngineOptions) -> None:
    """What an engine needs on disk (an export), made now; `ExportError` if it cannot be."""
    if options.backend == "openvino":
        OpenVinoEngine.prepare(checkpoint, options)
    elif options.backend == "onnxruntime":
        OnnxEngine.prepare(checkpoint, options)


def _build(checkpoint: Checkpoint, options: EngineOptions) -> Engine:
    if options.backend == "openvino":
        return OpenVinoEngine.build(checkpoint, options)
    if options.backend == "onnxruntime":
        return OnnxEngine.build(checkpoint, options)
    from .torch_engine import TorchEngine, quantize_linears  # imports transformers' modeling code: only when used

    if options.precision == "int8":
        return TorchEngine(quantize_linears(checkpoint.module()), device=options.device)
    return TorchEngine(checkpoint.module(), DTYPES[options.precision], options.device)
