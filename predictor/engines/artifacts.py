"""Engine files on disk: where they are kept, how they are named, and how one is made.

Every engine file (the ONNX export and its int8 versions, OpenVINO's int8 model, the engine
choice) is named by a key over what it depends on (`model_key`: the config, the weights, the
libraries' versions, the source of the code that makes it), kept in a cache directory, or found
packed with the model by `make pack-model` (`packed`). One that is missing is made in a child
process (`made_in_child`), written through a temp file so that a crash never leaves half of one,
within the time the start has left.
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

from ..checkpoint import Checkpoint, weight_files

logger = logging.getLogger(__name__)

OFFLINE_TIMEOUT_S = 1800.0  # the same work ahead of serving (pack-model, compare): no probe waits, only a hang stops it
TEMP_SUFFIX = ".tmp"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # where `-m predictor.engines.<module>` imports from
KEYED_SOURCES = ("predictor.engines.ast_forward", "predictor.engines.onnx_export")
"""The code an exported file is made by: a change to it makes a new key."""


PACKED_DIR = "engines"  # in a model directory: the engine files `make pack-model` put beside the weights


def packed(source: str, name: str) -> Optional[Path]:
    """The file of that name `make pack-model` put in the model directory, if it did: its name
    carries the same key as the cache's, so a match is the very file an export would write. A
    directory of packed files without it is said once: the start then makes what it could have read."""
    directory = Path(source) / PACKED_DIR
    path = directory / name
    if path.is_file():
        return path
    if directory.is_dir() and name not in _UNPACKED:
        _UNPACKED.add(name)
        logger.warning("%s holds no %s (packed for another model version, other versions of torch, transformers, "
                       "onnx or onnxruntime, or another kind of CPU): making it here instead", directory, name)
    return None


_UNPACKED: set[str] = set()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ast-kserve"


class ExportError(RuntimeError):
    """An engine file could not be made or kept: the message says why."""


def unusable(path: Path, cache_dir: Path, engine: str, exc: Exception, remove: bool = False) -> ExportError:
    """A file `engine` could not open, said as an `ExportError`. With `remove`, a file of the cache
    is removed, so that the next start makes it afresh (a disk that filled up under an earlier
    version may have cut it short). A file packed with the model is never removed: every replica
    reads it, and a failure to open it may be this node's alone."""
    if path.parent.resolve() != cache_dir.resolve():
        fate = "packed with the model: pack it again (make pack-model) if it is damaged"
    elif remove:
        try:
            path.unlink(missing_ok=True)
            fate = "removed from the cache: the next start makes it again"
        except OSError as error:
            fate = f"could not be removed from the cache: {error}"
    else:
        fate = "in the cache: remove it if it is damaged, and the next start makes it again"
    return ExportError(f"{engine} could not load {path} ({fate}): {exc}")


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
    if timeout_s <= 0:
        raise ExportError(f"{what}: no time is left of the start's budget (--start_timeout_s)")
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
    logger.info("Wrote %s (the child process peaked at %.2f GiB, the server's at %.2f GiB so far)", path, *peaks)
    return path


_FAILED: dict[Path, ExportError] = {}  # this load's failed attempts, by the file they were to write


def forget_failures() -> None:
    """A new load (a repository's model loaded through the API) tries every file again: a failure
    for want of time while other models served need not be for good."""
    _FAILED.clear()


def run_child(module: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`python -m module args` in a process of its own, whose memory the server never holds, with
    the model `source` (args[0]) as an absolute path. The server has just loaded the model, so a
    hub id is in the local cache: the child makes no second lookup."""
    local = Path(args[0])
    args = [str(local.resolve()) if local.is_dir() else args[0], *args[1:]]
    python_path = os.pathsep.join(filter(None, (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH"))))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)  # under --frontends: a child's series are not the server's
    return subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, errors="replace", env=environment, timeout=timeout_s)


def _remove_abandoned_temp_files(cache_dir: Path) -> None:
    """An export killed mid-way (timeout, out of memory) leaves its temp file (or directory,
    the size of the weights) behind, and a volume would keep it forever. Older than twice the offline tools'
    limit, the longest any export runs, no export is still writing it, whatever start budget the
    servers sharing the cache directory were given."""
    for temp in cache_dir.glob(f"*{TEMP_SUFFIX}"):
        try:
            if time.time() - temp.stat().st_mtime > 2 * OFFLINE_TIMEOUT_S:
                shutil.rmtree(temp) if temp.is_dir() else temp.unlink()
                logger.info("Removed %s, left by an export that did not finish", temp)
        except OSError:  # another server removed it first
            pass


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
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
    """`_model_key`, once per process for the same weight files: hashing the weights is slow next to
    the rest of a start, and a start asks for it once per engine."""
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
    the libraries that export and quantize it, and the source of our forward and of the export.

    The weights are hashed from their files (KServe's storage initializer rewrites them on every
    start, so dates say nothing; for a hub id, the snapshot the hub client resolved). Hashing the
    loaded tensors instead would fault in every page of the memory-mapped weights, which ONNX
    Runtime never needs (docs/performance.md has the resident cost); that is only the fallback."""
    libraries = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")  # read, not imported: importing them costs memory
    digest = hashlib.sha256(checkpoint.config.to_json_string().encode())
    # The opset is in the export's source. A local label (torch's "+cpu") says which wheel, not
    # what it exports: a model packed with PyPI's torch 2.13.0 serves from the image's 2.13.0+cpu.
    versions = tuple(importlib.metadata.version(name).split("+")[0] for name in libraries)
    digest.update(repr(versions).encode())
    for module in KEYED_SOURCES:
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
