"""`--backend auto`: the fastest engine for the precision, measured on the node it runs on.

No engine is fastest on every CPU (`make bench` on each kind of machine we have had: ONNX
Runtime ahead on one, OpenVINO or torch on others; bf16 pays only where the CPU multiplies it
natively). So at the first start for a (model version, precision, CPU, threads) key, each engine
that runs the precision here is built and timed on a window of features, the fastest serves, and
every timing is logged. The choice is kept beside the engine files (a JSON file named by the key),
so the next start, or a replica sharing the cache volume on the same kind of node, builds that
engine alone. The key names the CPU model, its vector flags and the thread count, so a pod
rescheduled onto another kind of node measures again. An engine that cannot be built here (an
export that fails, bf16 without native support) drops out of the race; torch always runs.
"""

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..allocator import release_freed_memory
from ..cpu import cpu_flags, cpu_model_name
from .onnx_export import ExportError, default_cache_dir, model_key
from .options import Engine, EngineOptions

logger = logging.getLogger(__name__)

# Torch last: its bf16 and int8 engines convert the loaded model in place (building one again is a no-op).
CANDIDATES = {"fp32": ("onnxruntime", "openvino", "torch"), "bf16": ("openvino", "torch"), "int8": ("onnxruntime", "torch")}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
TIMED_RUNS = 2


def cpu_key(threads: int, flags: Optional[set[str]] = None, name: Optional[str] = None) -> str:
    """The CPU as far as engine speed goes: its model, vector extensions and the threads we use."""
    flags = cpu_flags() if flags is None else flags
    described = f"{cpu_model_name() if name is None else name}|{','.join(f for f in ISA_FLAGS if f in flags)}|{threads}"
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def choose(model: torch.nn.Module, source: str, options: EngineOptions, features: torch.Tensor,
           build: Callable[[str], Engine]) -> tuple[str, Engine]:
    """The backend that serves and its engine: the one this key chose before, else the fastest now."""
    record = _record_path(model, source, options)
    known = _read(record)
    if known in CANDIDATES[options.precision]:
        try:
            logger.info("Engine choice %s (measured earlier on this kind of CPU, %s)", known, record)
            return known, build(known)
        except ExportError as exc:
            logger.warning("%s: measuring the engines again", exc)
    timings: dict[str, float] = {}
    for backend in CANDIDATES[options.precision]:
        try:
            engine = build(backend)
        except ExportError as exc:
            logger.warning("Engine %s cannot run %s here: %s", backend, options.precision, exc)
            continue
        timings[backend] = seconds_per_window(engine, features)
        logger.info("Engine %s, %s: %.3f s per window", backend, options.precision, timings[backend])
        del engine  # one engine's weights at a time beside the model's: the pod's memory limit holds
        release_freed_memory()
    fastest = min(timings, key=timings.__getitem__)  # torch always builds
    logger.info("Engine choice %s, the fastest of %s", fastest, {k: round(v, 4) for k, v in timings.items()})
    _write(record, fastest, timings)
    return fastest, build(fastest)


def seconds_per_window(engine: Engine, features: torch.Tensor) -> float:
    engine(features)  # warm-up: first-run allocations, lazy compilation
    runs = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        engine(features)
        runs.append(time.perf_counter() - start)
    return min(runs)


def _record_path(model: torch.nn.Module, source: str, options: EngineOptions) -> Path:
    cache_dir = options.cache_dir or default_cache_dir()
    return cache_dir / f"choice-{model_key(model, source)}-{options.precision}-{cpu_key(options.threads)}.json"


def _read(record: Path) -> Optional[str]:
    try:
        return json.loads(record.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def _write(record: Path, backend: str, timings: dict[str, float]) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"backend": backend, "seconds_per_window": timings, "cpu": cpu_model_name(),
                                      "flags": sorted(set(ISA_FLAGS) & cpu_flags())}, indent=1))
    except OSError as exc:
        logger.warning("Could not keep the engine choice in %s (%s): the next start measures again", record, exc)
