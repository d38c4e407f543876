"""The ONNX file ONNX Runtime runs: exported (and quantized) once per model version, in a child process.

The file is cached on disk, keyed by the model's config and weights, this export code and the
libraries' versions; in a pod, mount a volume at the cache directory to keep it across container
restarts. The export runs in a child process because it peaks at 2.4 GiB for the full-size
model and leaves its garbage fragmented through the heap of the process that ran it (that
server's resident set stayed ~0.4 GiB higher, measured); a child hands all of it back on exit.

    python -m predictor.onnx_export SOURCE FP32_FILE OUT_FILE PRECISION    # fp32, int8-s8 or int8-u8
"""

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import Checkpoint, weight_files
from ..cpu import configure_torch_threads, int8_weight_type

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
OFFLINE_TIMEOUT_S = 1800.0  # the same work ahead of serving (pack-model, compare): no probe waits, only a hang stops it
TEMP_SUFFIX = ".tmp"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # where `-m predictor.engines.onnx_export` imports from


PACKED_DIR = "engines"  # in a model directory: the engine files `make pack-model` put beside the weights


def packed(source: str, name: str) -> Optional[Path]:
    """The file of that name `make pack-model` put in the model directory, if it did: its name
    carries the same key as the cache's, so a match is the very file an export would write."""
    path = Path(source) / PACKED_DIR / name
    return path if path.is_file() else None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ast-kserve"


class ExportError(RuntimeError):
    """The ONNX file could not be made or kept: the message says why."""


def cached_onnx(checkpoint: Checkpoint, precision: str, cache_dir: Path, timeout_s: float) -> Path:
    """The cached file for this model version and precision, exported first if it is missing."""
    key = model_key(checkpoint)
    precision = f"int8-{int8_weight_type()}" if precision == "int8" else precision
    path = cache_dir / f"ast-{key}-{precision}.onnx"
    fp32 = cache_dir.resolve() / f"ast-{key}-fp32.onnx"
    return made_in_child(path, __name__, [checkpoint.source, str(fp32), str(path.resolve()), precision], timeout_s,
                         f"exporting the model to ONNX ({precision})")


def made_in_child(path: Path, module: str, args: list[str], timeout_s: float, what: str) -> Path:
    """`path` as packed in the model directory (`args[0]`) or cached, else made by
    `python -m module args` (which writes it whole or not at all); `ExportError`, saying `what`
    failed and why, if it cannot be."""
    if (found := packed(args[0], path.name)) is not None:
        logger.info("Using %s, packed with the model", found)
        return found
    if path.is_file():
        logger.info("Using cached %s", path)
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write the cache directory {path.parent}: {exc}") from exc
    if path in _FAILED:  # engines share files (OpenVINO's start from the fp32 export): fail once, not per engine
        raise _FAILED[path]
    _remove_abandoned_temp_files(path.parent)
    logger.info("%s (once per model version and cache directory) into %s", what[0].upper() + what[1:], path)
    try:
        done = run_child(module, args, timeout_s)
    except subprocess.TimeoutExpired:
        _FAILED[path] = ExportError(f"{what} took over {timeout_s:.3g} s, what was left of the start's budget (--start_timeout_s)")
        raise _FAILED[path] from None
    if done.returncode != 0 or not path.is_file():
        _FAILED[path] = ExportError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        raise _FAILED[path]
    peaks = [resource.getrusage(who).ru_maxrss / 2**20 for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF)]
    logger.info("Wrote %s (the child process peaked at %.1f GiB, the server's at %.1f GiB so far)", path, *peaks)
    return path


_FAILED: dict[Path, ExportError] = {}  # this process's failed attempts, by the file they were to write


def run_child(module: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`python -m module args` in a process of its own, whose memory the server never holds, with
    the model `source` (args[0]) as an absolute path. The server has just loaded the model, so a
    hub id is in the local cache: the child makes no second lookup."""
    local = Path(args[0])
    args = [str(local.resolve()) if local.is_dir() else args[0], *args[1:]]
    python_path = os.pathsep.join(filter(None, (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH"))))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    return subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, errors="replace", env=environment, timeout=timeout_s)


def export(source: str, fp32: Path, out: Path, precision: str) -> None:
    """Write `fp32` (unless it exists: `out` itself for fp32) and, for int8, `out` quantized from it."""
    if precision not in ("fp32", "int8-s8", "int8-u8"):
        raise ValueError(f"no ONNX export for precision {precision!r}")
    if not fp32.is_file():
        from ..ast_forward import PooledLogits

        model = Checkpoint.open(source).module()
        example = torch.zeros(1, model.config.max_length, model.config.num_mel_bins)
        _atomic_write(fp32, lambda tmp: torch.onnx.export(
            PooledLogits(model).eval(), (example,), tmp, input_names=["input_values"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), dynamo=True,
            opset_version=ONNX_OPSET, external_data=False, verbose=False,
        ))
    if precision.startswith("int8"):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(fp32)
        # The exporter's intermediate shape annotations trip the quantizer's shape inference
        # ("Inferred shape and existing shape differ"); it infers them afresh without them.
        graph.graph.ClearField("value_info")
        weights = QuantType.QInt8 if precision == "int8-s8" else QuantType.QUInt8  # see cpu.int8_weight_type
        _atomic_write(out, lambda tmp: quantize_dynamic(graph, tmp, per_channel=True, weight_type=weights))


def _remove_abandoned_temp_files(cache_dir: Path) -> None:
    """An export killed mid-way (timeout, out of memory) leaves its ~350 MB temp file (or
    directory) behind, and a volume would keep it forever. Older than twice the offline tools'
    limit, the longest any export runs, no export is still writing it, whatever start budget the
    servers sharing the cache directory were given."""
    for temp in cache_dir.glob(f"*{TEMP_SUFFIX}"):
        try:
            if time.time() - temp.stat().st_mtime > 2 * OFFLINE_TIMEOUT_S:
                shutil.rmtree(temp) if temp.is_dir() else temp.unlink()
                logger.info("Removed %s, left by an export that did not finish", temp)
        except OSError:  # another server removed it first
            pass


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temp file in the same directory, so a crash never leaves half a model."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_key(checkpoint: Checkpoint) -> str:
    """`_model_key`, once per process for the same weight files: hashing ~350 MB takes seconds,
    and a start asks for it once per engine."""
    files = weight_files(checkpoint.source)
    if not files:
        return _model_key(checkpoint, files)
    stamp = (checkpoint.source, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _KEYS:
        _KEYS[stamp] = _model_key(checkpoint, files)
    return _KEYS[stamp]


_KEYS: dict[tuple, str] = {}


def _model_key(checkpoint: Checkpoint, files: list[Path]) -> str:
    """A digest of what the exported file depends on: the config, the weights, the versions of
    the libraries that export and quantize it, and the source of our forward and of this export.

    The weights are hashed from their files (KServe's storage initializer rewrites them on every
    start, so dates say nothing; for a hub id, the snapshot the hub client resolved). Hashing the
    loaded tensors instead would fault in every page of the memory-mapped weights, which ONNX
    Runtime never needs: +0.4 GiB resident (measured); that is only the fallback."""
    libraries = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")  # read, not imported: onnxscript alone is 58 MiB
    digest = hashlib.sha256(checkpoint.config.to_json_string().encode())
    versions = tuple(importlib.metadata.version(name) for name in libraries) + (ONNX_OPSET,)
    digest.update(repr(versions).encode())
    for module in ("predictor.ast_forward", __spec__.name):  # __name__ is __main__ in the child
        digest.update(module_source(module))
    for weights in files:
        with open(weights, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    if not files:
        logger.warning("No weight files found for %s: hashing the loaded weights instead", checkpoint.source)
        for name, tensor in checkpoint.module().state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy())
    return digest.hexdigest()[:16]


def module_source(name: str) -> bytes:
    """A module's source file, read without importing it (ast_forward imports transformers' modeling
    code, which a start from an engine file never needs)."""
    return Path(importlib.util.find_spec(name).origin).read_bytes()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    source, fp32, out, precision = sys.argv[1:]
    configure_torch_threads(None)
    export(source, Path(fp32), Path(out), precision)


if __name__ == "__main__":
    main()
