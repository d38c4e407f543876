"""`python -m tools.compare --model_dir DIR FILE...`: each engine that `--backend auto` would time for a
precision (`engines.choice.CANDIDATES`, which leaves torch out for fp32 and int8), on your
checkpoint and your clips, against eager-torch fp32.

int8 and bf16 cost accuracy that depends on the checkpoint (a real model's activation outliers)
and the audio, which the random-init models of our tests cannot tell; this measures it where it
matters before a deployment switches `--precision`. Per engine and precision: seconds per window
(on this machine), the logits' cosine to eager-torch fp32 (the transformers model itself), the
largest score difference after the model's scoring function, and how many of fp32's top 5 labels
per window it keeps. The clips go through the server's own steps: decode, windows, filterbank.
"""

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from predictor import labels
from predictor.checkpoint import Checkpoint, ModelLoadError, load_feature_extractor
from predictor.cpu import configure_torch_threads, cpu_model_name
from predictor.engines import EngineOptions, ExportError, build_engine
from predictor.engines.calibration import file_features
from predictor.engines.choice import CANDIDATES, seconds_per_window
from predictor.engines.artifacts import OFFLINE_TIMEOUT_S
from predictor.engines.options import precision_list, split
from predictor.errors import ClientInputError
from predictor.features import LogMelFilterbank

logger = logging.getLogger(__name__)


@dataclass
class Row:
    backend: str
    precision: str
    seconds_per_window: Optional[float] = None
    min_cosine: Optional[float] = None
    min_embedding_cosine: Optional[float] = None
    max_score_diff: Optional[float] = None
    top5_kept: Optional[float] = None
    error: Optional[str] = None


def compare(model_dir: str, files: list[Path], precisions: list[str], threads: int, cache_dir: Path,
            calibration_dir: Optional[Path] = None) -> list[Row]:
    checkpoint = Checkpoint.open(model_dir)
    config = checkpoint.config
    function = labels.default_function(config.problem_type, config.num_labels)
    features = file_features(files, LogMelFilterbank.from_extractor(load_feature_extractor(checkpoint.source, config)))
    reference, reference_embedding = split(
        build_engine(checkpoint, EngineOptions("torch", "fp32", threads, cache_dir))(features), config.num_labels)
    expected = labels.scores(reference, function)
    rows = []
    for precision in precisions:
        for backend in CANDIDATES[precision]:
            row = Row(backend, precision)
            try:
                engine = build_engine(checkpoint.unloaded(),
                                      EngineOptions(backend, precision, threads, cache_dir, OFFLINE_TIMEOUT_S, calibration_dir))
            except ExportError as exc:
                row.error = str(exc).splitlines()[0]
                rows.append(row)
                continue
            logits, embedding = split(engine(features), config.num_labels)
            row.seconds_per_window = seconds_per_window(engine, features[:1])
            row.min_cosine = float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min())
            row.min_embedding_cosine = float(
                torch.nn.functional.cosine_similarity(embedding, reference_embedding, dim=-1).min())
            row.max_score_diff = float((labels.scores(logits, function) - expected).abs().max())
            row.top5_kept = float(sum(len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist()))
                                      for a, b in zip(logits, reference)) / (5 * len(reference)))
            rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'engine':<12} {'precision':<9} {'s/window':>9} {'min cosine':>11} {'embedding':>10} {'max score diff':>15} "
             f"{'top-5 kept':>10}"]
    for r in rows:
        if r.error:
            lines.append(f"{r.backend:<12} {r.precision:<9} not here: {r.error}")
        else:
            lines.append(f"{r.backend:<12} {r.precision:<9} {r.seconds_per_window:9.3f} {r.min_cosine:11.6f} "
                         f"{r.min_embedding_cosine:10.6f} {r.max_score_diff:15.2e} {r.top5_kept:10.3f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the checkpoint: a local directory or hub id")
    parser.add_argument("files", nargs="+", type=Path, help="audio files, any format the server reads")
    parser.add_argument("--precisions", type=precision_list, default=list(CANDIDATES),
                        help="comma-separated, from fp32,bf16,int8 (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="default: the container's CPU limit")
    parser.add_argument("--onnx_cache_dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--calibration_dir", type=Path, default=None,
                        help="int8 on OpenVINO: audio to calibrate on, as the server's flag (default: synthetic clips)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    threads = configure_torch_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ast-compare-") as scratch:
        try:
            rows = compare(args.model_dir, args.files, args.precisions, threads, args.onnx_cache_dir or Path(scratch),
                           args.calibration_dir)
        except (ClientInputError, ModelLoadError, OSError) as exc:
            parser.error(str(exc))
    if args.json:
        print(json.dumps({"cpu": cpu_model_name(), "threads": threads, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(f"{cpu_model_name()}, {threads} thread(s); reference: eager torch fp32\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
