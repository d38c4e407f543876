"""Where the model runs: `--device auto|cpu|cuda|cuda:N` → a torch device, checked at start.

`auto` takes the first GPU torch sees, else the CPU, as kserve's huggingfaceserver does. A GPU
asked for by name that torch does not see (a CPU build of torch, no driver, no `nvidia.com/gpu` in
the pod's limits) stops the start with a message that says which, rather than serving on the CPU at
a hundredth of the speed the deployment was sized for.
"""

import re

import torch

DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")
CPU_BACKENDS = ("onnxruntime", "openvino")
"""Engines that run on the CPU only: on a GPU the engine is torch."""


class DeviceError(ValueError):
    """The device asked for is not one this process can use: the message says why."""


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    if not DEVICE.fullmatch(text):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {text}")
    return text


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {name}: torch sees no GPU (torch {torch.__version__}, {build}); give the pod a "
                          "GPU (nvidia.com/gpu) and the CUDA image, or pass --device auto or cpu")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return torch.device("cuda", index)
