"""Pack an AST checkpoint into the directory the server loads from /mnt/models, engine files included.

    python -m tools.pack_model SOURCE OUT [--precisions fp32,int8] [--threads N] [--no_engines] [--tar]

SOURCE is anything `from_pretrained` reads: a directory saved by transformers (a fine-tune on
ESC-50 or Speech Commands, say, with `.bin` or safetensors weights) or a hub id. OUT receives
config.json, model.safetensors and preprocessor_config.json, checked by loading them back the
way the server does, and (unless --no_engines) `engines/`: what the server would otherwise make
at the first start of every new pod for each precision packed (the ONNX export, ONNX Runtime's
int8 files for CPUs with and without VNNI, OpenVINO's int8 IR) and the engine choice timed here,
with the threads the pods will have (their CPU limit). The server takes a file from there when its
name, which carries the key of the weights and the library versions, matches the one it would
make; the choice's name carries this CPU's model, vector extensions and those threads too, so on
a node of another CPU kind, or with another CPU limit, it times the engines once more, but
exports nothing. The engine files add to what every pod downloads: the
log prints the directory's size. Upload OUT (or the `--tar` archive) to the bucket or PVC that
the InferenceService's storage URI names.
"""

import argparse
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Optional

import torch
from transformers import ASTForAudioClassification

from predictor.precision import resolve as resolve_precision
from predictor.checkpoint import Checkpoint, ModelLoadError, load_feature_extractor, resolve_model_source
from predictor.config import positive
from predictor.cpu import configure_torch_threads
from predictor.engines import EngineOptions, build_engine
from predictor.engines.artifacts import OFFLINE_TIMEOUT_S, PACKED_DIR
from predictor.engines.onnx_export import cached_onnx
from predictor.engines.options import precision_list

logger = logging.getLogger(__name__)

MANIFEST_CPUS = 2  # the CPU limit of deploy/'s CPU manifests, which sizes a pod's threads
INT8_WEIGHT_TYPES = ("s8", "u8")  # the node's CPU decides which ONNX Runtime runs (engines.onnx_export.int8_weight_type)


def pack(source: str, out: Path, precisions: list[str], engines: bool = True,
         calibration_dir: Optional[Path] = None, threads: int = MANIFEST_CPUS) -> Path:
    location = resolve_model_source(source)
    model = ASTForAudioClassification.from_pretrained(location)
    extractor = load_feature_extractor(location, model.config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    extractor.save_pretrained(out)
    reloaded = ASTForAudioClassification.from_pretrained(out)
    if reloaded.config.id2label != model.config.id2label:
        raise ModelLoadError(f"{out} does not load back with the same labels")
    if engines:
        pack_engines(out, precisions, calibration_dir, threads)
    return out


def pack_engines(out: Path, precisions: list[str], calibration_dir: Optional[Path], threads: int) -> None:
    """Each precision as `--backend auto` would start on it, with OUT/engines as its cache, so the
    exports and the timed choice land there; then what a node of another CPU kind may run instead:
    the fp32 export (OpenVINO's bf16 starts from it) and the int8 file for the other kind of CPU."""
    directory = out / PACKED_DIR
    threads = configure_torch_threads(threads)
    checkpoint = Checkpoint.open(str(out))
    cached_onnx(checkpoint, "fp32", directory, OFFLINE_TIMEOUT_S)
    for precision in precisions:
        options = EngineOptions("auto", precision, threads, directory, OFFLINE_TIMEOUT_S, calibration_dir)
        build_engine(checkpoint.unloaded(), options)
        if precision == "int8":
            for weights in INT8_WEIGHT_TYPES:
                cached_onnx(checkpoint, f"int8-{weights}", directory, OFFLINE_TIMEOUT_S)
    shutil.rmtree(directory / "openvino", ignore_errors=True)  # compiled for this CPU: the node compiles its own


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("out", type=Path)
    parser.add_argument("--precisions", type=precision_list, default=None,
                        help="the --precision values the server will run, comma-separated (default: what --precision "
                        "auto serves on this CPU: bf16 where it multiplies bf16 natively, else fp32; the timed choice "
                        "is taken by nodes of this CPU kind only)")
    parser.add_argument("--threads", type=positive(int), default=MANIFEST_CPUS,
                        help=f"the CPU limit of the pods that will serve it, which sizes their threads: the engines "
                        f"are timed with that many (default: {MANIFEST_CPUS}, the manifests')")
    parser.add_argument("--no_engines", action="store_true",
                        help="weights and configs only: each new pod exports and times the engines itself")
    parser.add_argument("--calibration_dir", type=Path, default=None,
                        help="int8 on OpenVINO: audio to calibrate on (as the server's flag)")
    parser.add_argument("--tar", action="store_true", help="also write OUT.tar.gz with the files at its root")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    precisions = args.precisions or [resolve_precision("auto", torch.device("cpu"), "auto")]
    out = pack(args.source, args.out, precisions, not args.no_engines, args.calibration_dir, args.threads)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    logger.info("packed %s into %s (%.0f MB): %s", args.source, out, size_mb(out), ", ".join(files))
    if args.tar:
        archive = out.with_name(out.name + ".tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for name in files:
                tar.add(out / name, arcname=name)
        logger.info("wrote %s", archive)


if __name__ == "__main__":
    main()
