"""Pack an AST checkpoint into the directory layout the server loads from /mnt/models.

    python -m tools.pack_model SOURCE OUT [--tar]

SOURCE is anything `from_pretrained` reads: a directory saved by transformers (a fine-tune on
ESC-50 or Speech Commands, say, with `.bin` or safetensors weights) or a hub id. OUT receives
config.json, model.safetensors and preprocessor_config.json, checked by loading them back the
way the server does; upload it (or the `--tar` archive) to the bucket or PVC that the
InferenceService's storage URI names.
"""

import argparse
import logging
import tarfile
from pathlib import Path

from transformers import ASTForAudioClassification

from predictor.model import ModelLoadError, load_feature_extractor, resolve_model_source

logger = logging.getLogger(__name__)


def pack(source: str, out: Path) -> Path:
    location = resolve_model_source(source)
    model = ASTForAudioClassification.from_pretrained(location)
    extractor = load_feature_extractor(location, model.config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    extractor.save_pretrained(out)
    reloaded = ASTForAudioClassification.from_pretrained(out)
    if reloaded.config.id2label != model.config.id2label:
        raise ModelLoadError(f"{out} does not load back with the same labels")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tar", action="store_true", help="also write OUT.tar.gz with the files at its root")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = pack(args.source, args.out)
    files = sorted(p.name for p in out.iterdir())
    logger.info("packed %s into %s: %s", args.source, out, ", ".join(files))
    if args.tar:
        archive = out.with_name(out.name + ".tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for name in files:
                tar.add(out / name, arcname=name)
        logger.info("wrote %s", archive)


if __name__ == "__main__":
    main()
