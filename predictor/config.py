"""Every setting of the server, written once: name, default, how it is parsed, and what it means.

`Config`'s fields are the one place a default lives. `add_arguments` makes each field a flag
(`--top_k`) whose default can come from the environment variable `AST_TOP_K`; the prefix keeps
names a cluster sets for its own reasons (`BACKEND`, `THREADS`, `PRECISION`, the `<SERVICE>_PORT`
variables Kubernetes injects) from reconfiguring the server. KServe's own flags are left to
`args:`. `from_arguments` turns the parsed flags back into a `Config`, which the model, the
engines and the decoder's limits read; the docs test reads `fields(Config)` against the docs.

A dataclass with argparse rather than pydantic-settings: kserve's flags are argparse already, and
one parser gives one `--help` and one error format for both.
"""

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from . import names
from .device import device_name
from .engines.options import BACKENDS
from .labels import FUNCTIONS
from .logs import LOG_FORMATS
from .precision import PRECISIONS

ENV_PREFIX = "AST_"
DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
# Defaults that depend on the device, which is known only once --device is resolved:
CPU_BATCH, GPU_BATCH = 1, 64
"""--max_batch_size: on 2 cores batches did not pay (`make bench`); on a GPU, past the batch where the
model alone stops gaining on an H100/H200-class GPU (the issue's figures), and a 10-minute
recording's 59 windows in one pass (`make gpu-check` times passes of other sizes there)."""
CPU_QUEUED_WINDOWS, GPU_QUEUED_WINDOWS = 240, 2048
"""--max_queued_windows: a memory bound (each waiting window holds its samples), sized to the
memory the manifests give a CPU pod and a GPU pod."""


def positive(kind: type) -> Callable[[str], Any]:
    return _bounded(kind, lambda value: value > 0, "positive")


def non_negative(kind: type) -> Callable[[str], Any]:
    return _bounded(kind, lambda value: value >= 0, "zero or more")


def _bounded(kind: type, accept: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def non_empty(text: str) -> str:
    """A name or location: an empty value (an environment variable set to nothing) is a mistake,
    not the working directory or a model with no name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


non_empty.__name__ = "str"


def fraction(text: str) -> float:
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text}")
    return value


fraction.__name__ = "float"

request_mb = _bounded(float, lambda value: 0 < value < 2048, "positive and under 2048 (gRPC's largest message: 2 GiB)")


def optional_path(text: str) -> Optional[Path]:
    """A path; an empty value (an environment variable set to nothing) is none, not the working directory."""
    return Path(text) if text else None


def calibration_directory(text: str) -> Optional[Path]:
    """Checked at start, not after minutes of loading: the directory must exist to be read."""
    path = optional_path(text)
    if path is not None and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def setting(default: Any, help: str, parse: Callable[[str], Any] = str, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices})


@dataclass(frozen=True)
class Config:
    model_name: str = setting(names.MODEL_NAME, "The name in the URL paths (/v1/models/NAME:predict).", non_empty)
    model_dir: str = setting(DEFAULT_MODEL, "Local directory with config.json and weights (KServe mounts storage at "
                             "/mnt/models), or a hub id.", non_empty)
    top_k: int = setting(5, "Labels returned per clip unless a request says otherwise (at most the model's labels).",
                         positive(int))
    function_to_apply: Optional[str] = setting(
        None, "Logits to scores. Default: as the transformers pipeline decides from config.problem_type, but sigmoid "
        "for AudioSet's 527 labels (multi-label).", choices=FUNCTIONS)
    max_audio_seconds: float = setting(600.0, "Longest clip accepted, in seconds; every clip is classified whole, "
                                       "window by window.", positive(float))
    max_request_samples: int = setting(
        57_600_000, "Most samples one request may decode, counted at each file's own rate and over all its channels "
        "(samples x channels), all clips together: what decoding costs. Checked from the headers before decoding, "
        "and while decoding. The default lets 10 minutes of 48 kHz stereo through.", positive(int))
    max_clips_per_request: int = setting(64, "Most clips accepted in one request.", positive(int))
    max_windows_per_request: int = setting(
        240, "Most model windows one request may cost (a smaller hop_seconds costs more): four times the 59 windows "
        "of 10 minutes at the default hop.", positive(int))
    max_queue_seconds: float = setting(
        30.0, "Longest wait a new request may face: the windows admitted ahead of it (decoding or queued) times the "
        "time a window has been taking on this node. Past it the request gets 503 with Retry-After (gRPC "
        "UNAVAILABLE) before anything is decoded. 30 s leaves half of common client timeouts (tritonclient's 60 s) "
        "for the request's own windows.", positive(float))
    max_queued_windows: Optional[int] = setting(
        None, "Most windows admitted and waiting for the model (a memory bound: each waiting window holds its "
        "samples); past it a new request gets 503 with Retry-After at once. Default: 240 on a CPU, 2048 on a GPU "
        "(a second or two of its work).", positive(int))
    max_channels: int = setting(64, "Most channels in one audio file (checked from its header); every channel is "
                                "averaged into mono, block by block, so memory does not grow with them.", positive(int))
    max_request_mb: float = setting(names.MAX_REQUEST_MB, "Largest request: an HTTP body (413 past it) or a gRPC message (kserve's own "
                                    "default is 8 MiB), in MiB. A 10-minute 16 kHz 16-bit WAV is 19 MB.",
                                    request_mb)
    max_batch_size: Optional[int] = setting(
        None, "Most windows (10.24 s each for AudioSet AST) in one forward pass. Default: 1 on a CPU (batches did not "
        "pay on 2 cores), 64 on a GPU (make bench measures both).", positive(int))
    max_batch_wait_ms: float = setting(0.0, "How long a request waits for others to share its forward pass "
                                       "(0: only those already queued).", non_negative(float))
    backend: str = setting(
        "auto", "auto: the fastest engine for the precision, timed on this kind of CPU at the first start (kept in "
        "--onnx_cache_dir, or packed with the model by make pack-model). onnxruntime: the model exported to ONNX "
        "once (cached); openvino: that ONNX file compiled by OpenVINO for this CPU (int8 quantized by NNCF); "
        "torch: eager PyTorch with SDPA, the reference.", choices=BACKENDS)
    precision: str = setting(
        "auto", "auto: bf16 where the hardware multiplies it natively (AVX512-BF16 or AMX CPUs, GPUs from Ampere "
        "on), fp32 elsewhere; logged at start. fp32: equal to the transformers pipeline within 1e-4. bf16 "
        "(openvino, torch). fp16: GPUs only. int8: CPU only, onnxruntime's dynamic int8 or openvino's static int8, "
        "whichever is faster here. Check bf16's and int8's accuracy on your clips with python -m tools.compare.",
        choices=PRECISIONS)
    device: str = setting(
        "auto", "auto: the first GPU torch sees, else the CPU; cpu; cuda or cuda:N: that GPU, refused at start where "
        "torch sees none. On a GPU the engine is torch (eager, SDPA attention).", device_name)
    gpu_memory_fraction: Optional[float] = setting(
        None, "On a GPU: the share of its memory this server may take (0-1], as when pods share a GPU; a pass that "
        "runs out of it is split and retried. Default: all of it.", fraction)
    frontends: Optional[int] = setting(
        None, "Processes that take requests (HTTP and gRPC: parsing, decoding, answering), all feeding one process "
        "that holds the model and its queue. Default: 1 on a CPU, where the model needs the cores; on a GPU, where "
        "one process's request handling is the bound, one per CPU of the container's limit but one, which the "
        "model's process keeps.", positive(int))
    threads: Optional[int] = setting(None, "Intra-op threads, and the decoding pool's size. Default: the container's "
                                     "CPU limit (cgroup), not the node's core count.", positive(int))
    onnx_cache_dir: Optional[Path] = setting(None, "Where engine files and engine choices are kept. Default: "
                                             "$XDG_CACHE_HOME/ast-kserve (~/.cache/ast-kserve).", optional_path)
    start_timeout_s: float = setting(
        240.0, "The start's budget for making engine files (ONNX export, OpenVINO's int8) and timing the engines: "
        "each gets what is left of it. Past it, under --backend auto that engine drops out; a named backend fails "
        "the start. Size the startupProbe above it.", positive(float))
    calibration_dir: Optional[Path] = setting(None, "int8 on OpenVINO (static scales, NNCF): audio files like the "
                                              "ones you serve, to calibrate on. Default: clips the server synthesises.",
                                              calibration_directory)
    explain_cell_seconds: float = setting(
        1.0, "Explanations by occlusion: the time cells' width in seconds (widened where a clip would need more "
        "than --explain_max_cells).", positive(float))
    explain_bands: int = setting(4, "Explanations by occlusion: the band cells, equal groups of the mel bins.",
                                 positive(int))
    explain_max_cells: int = setting(
        48, "Explanations by occlusion: most cells per clip, each a masked copy of the clip's window through the "
        "model (cells that are digital silence cost nothing): the cost of an explanation in windows.", positive(int))
    explain_max_pictures: int = setting(
        64, "Explanations as pictures (explain_format png): most pictures one request may ask for, clips x top_k; "
        "each is drawn on the host and carried in the answer as a base64 PNG of a pixel per frame and mel bin.",
        positive(int))
    log_format: str = setting("text", "text: kserve's log lines; json: one JSON object per line (time, level, logger, "
                              "message, and request_id while a request is handled). A --log_config_file wins over it.",
                              choices=LOG_FORMATS)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, environ: Optional[dict] = None) -> None:
        """Each setting as a flag, its default taken from `AST_<NAME>` where set. `--model_name` is
        kserve's own flag already: only its default is ours."""
        environ = os.environ if environ is None else environ
        for setting_ in fields(cls):
            default = _from_environment(parser, setting_, environ)
            if setting_.name == "model_name":
                parser.set_defaults(model_name=default)
                continue
            meta = setting_.metadata
            parser.add_argument(f"--{setting_.name}", type=meta["parse"], choices=meta["choices"], default=default,
                                help=f"{meta['help']} Environment: {env_name(setting_.name)}.")

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> "Config":
        return cls(**{setting_.name: getattr(arguments, setting_.name) for setting_ in fields(cls)})

    def batch_size(self, on_gpu: bool) -> int:
        return self.max_batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)

    def queued_windows(self, on_gpu: bool) -> int:
        return self.max_queued_windows or (GPU_QUEUED_WINDOWS if on_gpu else CPU_QUEUED_WINDOWS)

    def frontend_count(self, on_gpu: bool, cpus: int) -> int:
        return self.frontends or (max(1, cpus - 1) if on_gpu else 1)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _from_environment(parser: argparse.ArgumentParser, setting_: Any, environ: dict) -> Any:
    name = env_name(setting_.name)
    value = environ.get(name)
    if value is None:
        return setting_.default
    meta = setting_.metadata
    try:
        parsed = meta["parse"](value)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"environment variable {name}={value!r}: {exc}")
    if meta["choices"] is not None and parsed not in meta["choices"]:
        parser.error(f"environment variable {name}={value!r}: choose from {list(meta['choices'])}")
    return parsed
