"""`python -m predictor`: KServe's standard flags plus ours, then load the model and serve it.

Each of our flags `--some_flag` can also be set through the environment variable `SOME_FLAG`
(the flag wins), so an InferenceService can configure the server with `env:` as easily as with
`args:`. KServe's own flags are left to `args:`: Kubernetes injects `<SERVICE>_PORT` variables
into every pod, and a Service named `http` or `grpc` would otherwise set our ports.
"""

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from kserve import model_server

from . import logs
from .allocator import keep_freed_memory
from .cpu import configure_torch_threads
from .engines import BACKENDS, PRECISIONS, EngineOptions
from .engines.onnx_export import EXPORT_TIMEOUT_S
from .labels import FUNCTIONS
from .checkpoint import ModelLoadError
from .model import ASTModel
from .protocol.kserve import AudioModelServer

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
# After SIGTERM, in-flight requests get this long to finish: inside Kubernetes' default 30 s
# terminationGracePeriodSeconds (Knative's, the revision timeout, is longer still).
GRACE_PERIOD_S = 20
MODEL_FLAGS = ("model_dir", "top_k", "function_to_apply", "max_audio_seconds", "max_request_audio_seconds",
               "max_clips_per_request", "max_windows_per_request", "max_batch_size", "max_batch_wait_ms",
               "max_queued_windows", "max_channels")
ENGINE_FLAGS = ("backend", "precision", "threads", "onnx_cache_dir", "onnx_export_timeout_s", "calibration_dir")
# KServe's own flags, passed on explicitly: ModelServer's defaults come from kserve's own parse of
# sys.argv at import, not from the arguments main() was given.
SERVER_FLAGS = (
    "http_port", "grpc_port", "workers", "max_threads", "max_asyncio_workers", "enable_grpc", "enable_docs_url",
    "enable_latency_logging", "access_log_format", "event_loop", "timeout_keep_alive",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        parents=[model_server.parser],
        description="Serve an Audio Spectrogram Transformer over KServe's V1 and V2 protocols.",
    )
    parser.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help="Local directory with config.json and weights (KServe mounts storage at /mnt/models), or a hub id.",
    )
    parser.add_argument("--top_k", type=positive(int), default=5, help="Labels returned per clip unless a request says otherwise.")
    parser.add_argument(
        "--function_to_apply",
        choices=FUNCTIONS,
        default=None,
        help="Logits to scores. Default: as the transformers pipeline decides from config.problem_type, "
        "but sigmoid for AudioSet's 527 labels (multi-label).",
    )
    parser.add_argument("--max_audio_seconds", type=positive(float), default=600.0,
                        help="Longest clip accepted, in seconds; every clip is classified whole, window by window.")
    parser.add_argument("--max_request_audio_seconds", type=positive(float), default=600.0,
                        help="Most seconds of audio in one request, all clips together (checked from the headers "
                        "before decoding, and while decoding).")
    parser.add_argument("--max_clips_per_request", type=positive(int), default=64, help="Most clips accepted in one request.")
    parser.add_argument("--max_windows_per_request", type=positive(int), default=240,
                        help="Most model windows one request may cost (a smaller hop_seconds costs more): 240 is "
                        "four times the 59 windows of 10 minutes at the default hop.")
    parser.add_argument("--max_queued_windows", type=positive(int), default=240,
                        help="Most windows of admitted requests waiting for the model; past it a request gets "
                        "503 with Retry-After (gRPC UNAVAILABLE) at once. 240: four 10-minute clips, the most "
                        "containerConcurrency 4 lets in.")
    parser.add_argument("--max_channels", type=positive(int), default=64,
                        help="Most channels in one audio file (checked from its header); every channel is averaged "
                        "into mono, block by block, so memory does not grow with them.")
    parser.add_argument("--log_format", choices=logs.LOG_FORMATS, default="text",
                        help="text: kserve's log lines; json: one JSON object per line (time, level, logger, message, "
                        "and request_id while a request is handled). A --log_config_file wins over it.")
    parser.add_argument("--max_request_mb", type=positive(float), default=32.0,
                        help="Largest request: an HTTP body (413 past it, before it is read) or a gRPC message "
                        "(kserve's own default is 8 MiB), in MiB. A 10-minute 16 kHz 16-bit WAV is 19 MB.")
    parser.add_argument("--max_batch_size", type=positive(int), default=1,
                        help="Most windows (10.24 s each for AudioSet AST) in one forward pass. 1: no batching, "
                        "which served fastest on 2 cores (make bench); raise it on machines where batches pay.")
    parser.add_argument("--max_batch_wait_ms", type=non_negative(float), default=0.0,
                        help="How long a request waits for others to share its forward pass (0: only those already queued).")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: the fastest engine for the precision, timed on this kind of CPU at the first start "
                        "(the choice is kept in --onnx_cache_dir, or packed with the model by make pack-model). "
                        "onnxruntime: the model exported to ONNX once (cached), run clip by clip; openvino: that ONNX "
                        "file compiled by OpenVINO for this CPU (bf16 where the CPU multiplies bf16 natively; int8 "
                        "quantized by NNCF); torch: eager PyTorch with SDPA, the reference.")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32: equal to the transformers pipeline. bf16 (openvino, torch): for CPUs with "
                        "AVX512-BF16/AMX, logits' cosine to fp32 >= 0.9999. int8: onnxruntime's dynamic int8 or "
                        "openvino's static int8, whichever is faster here; check its accuracy on your clips with "
                        "python -m predictor.compare.")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="Intra-op threads. Default: the container's CPU limit (cgroup), not the node's core count.")
    parser.add_argument("--onnx_cache_dir", type=Path, default=None,
                        help="Where exported ONNX models are kept. Default: $XDG_CACHE_HOME/ast-kserve (~/.cache/ast-kserve).")
    parser.add_argument("--onnx_export_timeout_s", type=positive(float), default=EXPORT_TIMEOUT_S,
                        help="An export (or OpenVINO's int8 quantization) taking longer is abandoned: under --backend "
                        "auto that engine drops out, a named backend fails the start; keep it well inside the "
                        "liveness probe's initial delay, as the server answers probes only once loaded.")
    parser.add_argument("--calibration_dir", type=Path, default=None,
                        help="int8 on OpenVINO (static scales, NNCF): audio files like the ones you serve, to "
                        "calibrate on. Default: clips the server synthesises (no data needed).")
    parser.set_defaults(model_name="ast")
    apply_environment(parser, ("model_name", "max_request_mb", "log_format") + MODEL_FLAGS + ENGINE_FLAGS)
    return parser


def positive(kind: type) -> Callable[[str], Any]:
    return _bounded(kind, lambda value: value > 0, "positive")


def non_negative(kind: type) -> Callable[[str], Any]:
    return _bounded(kind, lambda value: value >= 0, "zero or more")


def _bounded(kind: type, accept: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and accept(value)):
            raise ValueError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def apply_environment(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Take the named flags' defaults from the upper-cased environment variable of the same name."""
    for action in parser._actions:
        value = os.environ.get(action.dest.upper())
        if value is None or action.dest not in names:
            continue
        try:
            default = action.type(value) if callable(action.type) else value
        except ValueError as exc:
            parser.error(f"environment variable {action.dest.upper()}={value!r}: {exc}")
        if action.choices is not None and default not in action.choices:
            parser.error(f"environment variable {action.dest.upper()}={value!r}: choose from {list(action.choices)}")
        action.default = default


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1:
        parser.error("--workers must be 1: one server process already uses every CPU the container may "
                     "(its torch threads follow the CPU limit); scale with replicas instead")
    if args.precision == "bf16" and args.backend == "onnxruntime":
        parser.error("--precision bf16 needs --backend openvino, torch or auto")
    if args.configure_logging:
        logs.configure(args.log_format, args.log_config_file, __package__)
    keep_freed_memory()
    threads = configure_torch_threads(args.threads)
    engine = EngineOptions(backend=args.backend, precision=args.precision, threads=threads, cache_dir=args.onnx_cache_dir,
                           export_timeout_s=args.onnx_export_timeout_s, calibration_dir=args.calibration_dir)
    model = ASTModel(name=args.model_name, engine=engine, **_pick(args, MODEL_FLAGS))
    try:
        model.load()
    except ModelLoadError as exc:
        logging.getLogger(__package__).error("%s", exc)
        return 1
    AudioModelServer(grace_period=GRACE_PERIOD_S, max_message_bytes=int(args.max_request_mb * 2**20),
                     **_pick(args, SERVER_FLAGS)).start([model])
    return 0


def _pick(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names}


if __name__ == "__main__":
    sys.exit(main())
