"""`--backend auto`: the fastest engine for the precision, measured on the node it runs on.

No engine is fastest on every CPU (`make bench` on each kind of machine we have had: ONNX
Runtime ahead on some, OpenVINO on others; bf16 pays only where the CPU multiplies it
natively). So at the first start for a (model version, precision, CPU, threads) key, each engine
that runs the precision here is built and timed on a window of features, every timing is logged,
and the fastest serves. The race runs in a child process, like the export: engines built one after
another leave their peak in the process that built them, and the server's own memory must stay
what serving needs. The outcome is kept beside the engine files (a JSON file named by the key), so
the next start, or a replica sharing the cache volume on the same kind of node, builds that engine
alone; `make pack-model` can ship it with the model. The key names the CPU model, its vector
flags and the thread count, so a pod rescheduled onto another kind of node measures again. An
engine that cannot be built here (an export that fails, bf16 without native support) drops out;
if none can, eager torch serves.
"""

import hashlib
import importlib.metadata
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import Checkpoint
from ..cpu import configure_torch_threads, cpu_flags, cpu_model_name
from .artifacts import ExportError, atomic_write, default_cache_dir, model_key, packed, run_child
from .options import Engine, EngineOptions

logger = logging.getLogger(__name__)

# Raced for each precision. torch was never clearly fastest for fp32 or int8 on any CPU we have
# numbers for (README, by CPU: slower, or within run-to-run spread of ONNX Runtime, and its int8
# has no fast kernel without VNNI), so it is not timed there, only built when nothing else can be;
# for bf16 it stays (no OpenVINO figure yet from a CPU with AVX512-BF16 but no AMX). Torch last:
# its bf16 engine converts the loaded model in place.
CANDIDATES = {"fp32": ("onnxruntime", "openvino"), "bf16": ("openvino", "torch"), "int8": ("onnxruntime", "openvino")}
FALLBACK = "torch"  # eager PyTorch builds wherever the model loaded
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
TIMED_RUNS = 2


def cpu_key(threads: int, flags: Optional[set[str]] = None, name: Optional[str] = None) -> str:
    """The CPU as far as engine speed goes: its model, vector extensions and the threads we use."""
    flags = cpu_flags() if flags is None else flags
    described = f"{cpu_model_name() if name is None else name}|{','.join(f for f in ISA_FLAGS if f in flags)}|{threads}"
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def choose(checkpoint: Checkpoint, options: EngineOptions, prepare: Callable[[str], None],
           build: Callable[[str], Engine]) -> tuple[str, Engine]:
    """The backend that serves and its engine: the one this key chose before, else the winner of a
    race run now; should the race fail, the first candidate that builds. Exports happen here, in
    the server (each in a child of its own), before the race: the race's process never holds a
    model beside an export."""
    candidates = []
    for backend in CANDIDATES[options.precision]:
        try:
            prepare(backend)
            candidates.append(backend)
        except ExportError as exc:
            logger.warning("Engine %s cannot run %s here: %s", backend, options.precision, exc)
    record = record_path(checkpoint, options)
    kept = packed(checkpoint.source, record.name) or record
    outcome = _read(kept)
    if outcome is not None:
        logger.info("Engine choice kept from an earlier measurement on this kind of CPU (%s)", kept)
    elif len(candidates) > 1:
        outcome = _race_in_child(checkpoint.source, options, candidates, record)
    for backend, seconds in (outcome or {}).get("seconds_per_window", {}).items():
        logger.info("Engine %s, %s: %.3f s per window", backend, options.precision, seconds)
    fastest = (outcome or {}).get("backend")
    order = [fastest] if fastest in candidates else []
    for backend in order + [b for b in candidates if b not in order]:
        try:
            return backend, build(backend)
        except ExportError as exc:
            logger.warning("Engine %s cannot run %s here: %s", backend, options.precision, exc)
    return FALLBACK, build(FALLBACK)


def race(config, candidates: list[str], options: EngineOptions, build: Callable[[str], Engine]) -> Optional[dict]:
    """Each candidate built and timed in turn, one alive at a time: {backend, seconds_per_window};
    None where none could be built (nothing is kept: the next start tries again)."""
    window = torch.randn(1, config.max_length, config.num_mel_bins, generator=torch.Generator().manual_seed(0))
    timings: dict[str, float] = {}
    for backend in candidates:
        try:
            engine = build(backend)
        except ExportError as exc:
            logger.warning("Engine %s cannot run %s here: %s", backend, options.precision, exc)
            continue
        timings[backend] = seconds_per_window(engine, window)
        del engine
    if not timings:
        return None
    return {"backend": min(timings, key=timings.__getitem__), "seconds_per_window": timings,
            "cpu": cpu_model_name(), "flags": sorted(set(ISA_FLAGS) & cpu_flags()), "threads": options.threads}


def seconds_per_window(engine: Engine, features: torch.Tensor) -> float:
    engine(features)  # warm-up: first-run allocations, lazy compilation
    runs = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        engine(features)
        runs.append(time.perf_counter() - start)
    return min(runs)


def record_path(checkpoint: Checkpoint, options: EngineOptions) -> Path:
    """Named by the model key (its libraries' versions among them), the precision, the CPU, and
    OpenVINO's and NNCF's versions (which the model key leaves out: its export does not use them):
    an upgrade of either may change who is fastest."""
    cache_dir = options.cache_dir or default_cache_dir()
    versions = hashlib.sha256(repr(tuple(_version(name) for name in ("openvino", "nncf"))).encode()).hexdigest()[:8]
    return cache_dir / f"choice-{model_key(checkpoint)}-{options.precision}-{cpu_key(options.threads)}-{versions}.json"


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # the CUDA image leaves OpenVINO out
        return None


def _race_in_child(source: str, options: EngineOptions, candidates: list[str], record: Path) -> Optional[dict]:
    timeout_s = options.time_left()
    if timeout_s <= 0:
        logger.warning("No time is left of --start_timeout_s to time the engines: serving with the first that builds")
        return None
    logger.info("Timing every engine for %s on this kind of CPU (once; kept in %s)", options.precision, record)
    try:
        done = run_child(__name__, [source, options.precision, str(options.threads), str(record.parent.resolve()),
                                    ",".join(candidates), str(record.resolve()),
                                    str(options.calibration_dir.resolve()) if options.calibration_dir else ""], timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("Timing the engines took over %.0f s, what was left of --start_timeout_s: serving with the first "
                       "that builds", timeout_s)
        return None
    if done.returncode != 0:
        logger.warning("Timing the engines failed (exit %d): serving with the first that builds\n%s",
                       done.returncode, done.stderr[-3000:])
        return None
    return _read(record)


def _read(record: Path) -> Optional[dict]:
    try:
        outcome = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


def main() -> None:
    """The race in its own process: writes the outcome to the record path it is given."""
    from . import build_engine  # the package imports this module

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    source, precision, threads, cache_dir, candidates, record, calibration_dir = sys.argv[1:]
    configure_torch_threads(int(threads))
    options = EngineOptions("auto", precision, int(threads), Path(cache_dir),
                            calibration_dir=Path(calibration_dir) if calibration_dir else None)

    checkpoint = Checkpoint.open(source)
    outcome = race(checkpoint.config, candidates.split(","), options,
                   lambda backend: build_engine(checkpoint.unloaded(), replace(options, backend=backend)))
    if outcome is not None:
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(record), lambda temp: Path(temp).write_text(json.dumps(outcome, indent=1)))


if __name__ == "__main__":
    main()
