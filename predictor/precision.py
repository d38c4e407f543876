"""`--precision auto|fp32|bf16|fp16|int8` → the precision that serves, decided once at start.

One rule on every device, as a user's other choices have it (OpenVINO infers in bf16 by default
where the CPU multiplies it natively; kserve's huggingfaceserver takes fp16 on a GPU): `auto` is
bf16 where the hardware multiplies bf16 natively (AVX512-BF16 or AMX on a CPU; a GPU from Ampere
on, compute capability 8.0) and the engine runs it, fp32 elsewhere, where bf16 is emulated and
slower than fp32. fp32 is the precision whose answers equal the transformers pipeline's (1e-4);
bf16's logits keep a cosine to them that `python -m tools.compare` and `make gpu-check` measure.
fp16 is for GPUs (a CPU has no fast fp16 GEMM); int8 is for the CPU engines.
"""

import logging

import torch

from .cpu import multiplies_bf16

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
AMPERE = (8, 0)


class PrecisionError(ValueError):
    """A precision this device or engine does not run: the message says what would."""


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return gpu_multiplies_bf16(torch.cuda.get_device_capability(device))
    return multiplies_bf16()


def gpu_multiplies_bf16(capability: tuple[int, int]) -> bool:
    """Tensor cores multiply bf16 from Ampere (compute capability 8.0) on; a V100 or T4 emulates it."""
    return capability >= AMPERE


def check(name: str, device: torch.device, backend: str) -> None:
    on_gpu = device.type == "cuda"
    if name == "fp16" and not on_gpu:
        raise PrecisionError("--precision fp16 runs on a GPU only (a CPU has no fast fp16 GEMM): on the CPU use "
                             "auto, bf16, fp32 or int8")
    if name == "int8" and on_gpu:
        raise PrecisionError(f"--precision int8 runs on the CPU engines only: on a GPU ({device}) use auto, bf16, "
                             "fp16 or fp32")
    if name == "bf16" and backend == "onnxruntime":
        raise PrecisionError("--precision bf16 needs --backend openvino, torch or auto")


def resolve(name: str, device: torch.device, backend: str) -> str:
    """The precision that serves, logged with the reason when `auto` chose it."""
    check(name, device, backend)
    if name != "auto":
        return name
    native = native_bf16(device)
    chosen = "bf16" if native and backend != "onnxruntime" else "fp32"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    reason = (f"{hardware} multiplies bf16 natively" if chosen == "bf16" else
              "ONNX Runtime runs fp32 or int8" if native else f"{hardware} does not multiply bf16 natively")
    logger.info("Precision: %s (--precision auto: %s; --precision fp32 gives the transformers pipeline's answers "
                "within 1e-4)", chosen, reason)
    return chosen
