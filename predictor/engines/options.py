"""What an engine is asked for, and what one is: shared by the engines and the code choosing one."""

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from .artifacts import OFFLINE_TIMEOUT_S

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
CPU_PRECISIONS = ("fp32", "bf16", "int8")
"""What the CPU engines run, and the tools that time them take (fp16 is for GPUs: `precision`)."""


def precision_list(text: str) -> list[str]:
    """An argparse type: `fp32,int8` → ["fp32", "int8"], for the tools that take several precisions."""
    chosen = text.split(",")
    if set(chosen) - set(CPU_PRECISIONS):
        raise argparse.ArgumentTypeError(f"choose from {','.join(CPU_PRECISIONS)}, comma-separated")
    return chosen


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"
    precision: str = "fp32"
    threads: int = 1
    cache_dir: Optional[Path] = None  # None: $XDG_CACHE_HOME/ast-kserve
    start_timeout_s: float = OFFLINE_TIMEOUT_S
    """One budget for the engine files made and the race run while the server starts (no probe
    answers until it is loaded): each child process gets what is left of it."""
    calibration_dir: Optional[Path] = None  # int8 for OpenVINO: None calibrates on synthetic clips
    started: float = field(default_factory=time.monotonic, compare=False)
    device: str = "cpu"  # a torch device; on a GPU the engine is torch

    def time_left(self) -> float:
        return max(0.0, self.start_timeout_s - (time.monotonic() - self.started))


class Engine(Protocol):
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, frames, mel bins) → (batch, labels + hidden): logits, then embedding (`split`)."""


def split(rows: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An engine's rows → (logits, embeddings): one tensor through the queue and between processes."""
    return rows[..., :num_labels], rows[..., num_labels:]
