"""Where a checkpoint is and what comes with it: the model directory KServe mounts (or a hub id), and
the feature extractor saved beside the weights. Shared by the server, the export and calibration
children, `compare` and `pack_model`, none of which needs the server's kserve.Model to find them.
"""

import os
from pathlib import Path
from typing import Any

from transformers import ASTFeatureExtractor


class ModelLoadError(RuntimeError):
    """Nothing loadable at the configured location; the message says where we looked."""


def resolve_model_source(model_dir: str) -> str:
    """A local directory (or the one model directory inside it), else the string as a hub id.

    KServe's storage initializer copies a bucket prefix into /mnt/models as is, so a model saved
    one level down (`gs://bucket/models/` holding `ast/config.json`) is found too.
    """
    path = Path(model_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        nested = [p for p in path.iterdir() if (p / "config.json").is_file()]
        if len(nested) == 1:
            return str(nested[0])
        raise ModelLoadError(
            f"'{model_dir}' is a directory but holds no config.json (nor one subdirectory with one); "
            f"it contains: {sorted(p.name for p in path.iterdir())[:20]}"
        )
    if path.is_absolute() or model_dir.startswith(("./", "../", "~")) or os.sep * 2 in model_dir:
        raise ModelLoadError(f"model directory '{model_dir}' does not exist")
    return model_dir


def load_feature_extractor(source: str, config: Any) -> ASTFeatureExtractor:
    """The saved preprocessor config if there is one, else AST's defaults sized to the model."""
    try:
        extractor = ASTFeatureExtractor.from_pretrained(source)
    except OSError:
        extractor = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
    if (extractor.num_mel_bins, extractor.max_length) != (config.num_mel_bins, config.max_length):
        raise ModelLoadError(
            f"feature extractor makes {extractor.num_mel_bins} mel bins x {extractor.max_length} frames "
            f"but the model expects {config.num_mel_bins} x {config.max_length}"
        )
    return extractor
