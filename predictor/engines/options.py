"""What an engine is asked for, and what one is: shared by the engines and the code choosing one."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from .onnx_export import EXPORT_TIMEOUT_S

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")


def precision_list(text: str) -> list[str]:
    """An argparse type: `fp32,int8` → ["fp32", "int8"], for the tools that take several precisions."""
    chosen = text.split(",")
    if set(chosen) - set(PRECISIONS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(PRECISIONS)}, comma-separated")
    return chosen


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"
    precision: str = "fp32"
    threads: int = 1
    cache_dir: Optional[Path] = None  # None: $XDG_CACHE_HOME/ast-kserve
    export_timeout_s: float = EXPORT_TIMEOUT_S
    calibration_dir: Optional[Path] = None  # int8 for OpenVINO: None calibrates on synthetic clips


class Engine(Protocol):
    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...
