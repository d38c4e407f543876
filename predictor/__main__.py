"""`python -m predictor`: KServe's standard flags plus ours (`config`), then load the model and serve it."""

import argparse
import logging
import socket
import sys
from typing import Optional

from kserve import model_server

from . import logs
from .allocator import keep_freed_memory
from .checkpoint import ModelLoadError
from .config import Config, non_empty
from .cpu import configure_torch_threads, cpu_limit
from .device import CPU_BACKENDS, DeviceError
from .device import resolve as resolve_device
from .frontends import Launch
from .frontends import serve as serve_with_frontends
from .model import ASTModel
from .precision import PrecisionError
from .precision import check as check_precision
from .protocol.kserve import AudioModelServer
from .repository import AudioModelRepository, VolumeIndex, model_names

# After SIGTERM, in-flight requests get this long to finish: inside Kubernetes' default 30 s
# terminationGracePeriodSeconds (Knative's, the revision timeout, is longer still).
GRACE_PERIOD_S = 20
# KServe's own flags, passed on explicitly: ModelServer's defaults come from kserve's own parse of
# sys.argv at import, not from the arguments main() was given.
SERVER_FLAGS = (
    "http_port", "grpc_port", "workers", "max_threads", "max_asyncio_workers", "enable_grpc", "enable_docs_url",
    "enable_latency_logging", "access_log_format", "event_loop", "timeout_keep_alive",
)


def build_parser(environ: Optional[dict] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        parents=[model_server.parser],
        description="Serve an Audio Spectrogram Transformer over KServe's V1 and V2 protocols. Each of our flags "
        "can also be set by its AST_ environment variable (the flag wins).",
    )
    Config.add_arguments(parser, environ)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1:
        parser.error("--workers must be 1: one server process already uses every CPU the container may "
                     "(its torch threads follow the CPU limit); scale with replicas instead")
    if args.device.startswith("cuda") and args.backend in CPU_BACKENDS:
        parser.error(f"--backend {args.backend} runs on the CPU; on a GPU (--device {args.device}) the engine is torch: "
                     "pass --backend auto or torch")
    try:  # kserve's flag: our parse applies to AST_MODEL_NAME alone
        non_empty(args.model_name)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument --model_name: {exc}")
    config = Config.from_arguments(args)
    if args.configure_logging:
        logs.configure(config.log_format, args.log_config_file, __package__)
    try:  # auto takes the CPU where the engine or precision asked for runs there only
        cpu_only = args.backend in CPU_BACKENDS or args.precision == "int8"
        device = resolve_device("cpu" if args.device == "auto" and cpu_only else args.device)
        check_precision(args.precision, device, args.backend)
    except (DeviceError, PrecisionError) as exc:
        parser.error(str(exc))
    server_flags = {name: getattr(args, name) for name in SERVER_FLAGS}
    frontends = config.frontend_count(device.type == "cuda", cpu_limit())  # as documented: the container's, not --threads
    names = model_names(config.model_dir)
    if names is not None or frontends == 1:  # frontends: the supervisor binds the HTTP port, and says so
        check_ports(parser, args)
    if names is not None:
        if config.frontends and config.frontends > 1:
            parser.error("--frontends above 1 serves one model: a model repository (a --model_dir of model "
                         "directories) is served by one process")
        return serve_repository(config, names, str(device), server_flags)
    if frontends > 1:
        return serve_with_frontends(Launch(args, config, str(device), server_flags, GRACE_PERIOD_S, frontends,
                                           threads=max(1, (config.threads or cpu_limit()) // frontends)))
    keep_freed_memory()
    model = ASTModel(config, threads=configure_torch_threads(config.threads), device=str(device))
    try:
        model.load()
    except ModelLoadError as exc:
        logging.getLogger(__package__).error("%s", exc)
        return 1
    AudioModelServer(grace_period=GRACE_PERIOD_S, max_message_bytes=config.max_request_bytes,
                     **server_flags).start([model])
    return 0


def check_ports(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The ports kserve will listen on, free now: else kserve finds out once the model has loaded
    (minutes, with an export), and ends in tracebacks."""
    for flag in ("http_port", "grpc_port") if args.enable_grpc else ("http_port",):
        port = getattr(args, flag)
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed connection's port is free
                probe.bind(("0.0.0.0", port))
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            parser.error(f"--{flag} {port} cannot be listened on: {reason}")


def serve_repository(config: Config, names: list[str], device: str, server_flags: dict) -> int:
    """Every model of the repository, loaded in name order, each under its directory's name."""
    keep_freed_memory()
    repository = AudioModelRepository(config, threads=configure_torch_threads(config.threads), device=device,
                                      latency_logging=server_flags["enable_latency_logging"])
    models = loaded(repository, names)
    if models is None:
        return 1
    AudioModelServer(grace_period=GRACE_PERIOD_S, max_message_bytes=config.max_request_bytes,
                     registered_models=repository, repository_extension=VolumeIndex(repository),
                     **server_flags).start(models)
    return 0


def loaded(repository: AudioModelRepository, names: list[str]) -> Optional[list[ASTModel]]:
    """The repository's models, each loaded; None (logged) where one cannot be. A function of its
    own so that no frame of the server's life holds a model past its unload."""
    models = [repository.model(name) for name in names]
    for model in models:
        try:
            model.load()
        except ModelLoadError as exc:
            logging.getLogger(__package__).error("model %s of the repository %s: %s", model.name,
                                                 repository.config.model_dir, exc)
            return None
    return models


if __name__ == "__main__":
    sys.exit(main())
