"""Write a random-init AST model directory, for trying the server where no hub is reachable.

    python -m tools.random_ast models/ast-random            # AST's real geometry, 527 labels
    python -m tools.random_ast models/ast-tiny --tiny       # a few MB, for quick experiments

The directory has what a fine-tuned checkpoint has (config.json, model.safetensors,
preprocessor_config.json), so the server loads it exactly as it loads a real one. Its
predictions are noise: it exists to exercise the serving path, never to classify.
"""

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

from predictor.labels import AUDIOSET_NUM_LABELS

logger = logging.getLogger(__name__)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_FEATURES = {"num_mel_bins": 64, "max_length": 300}
AUDIOSET_INPUT = {"max_length": 1024, "num_mel_bins": 128}
"""With `tiny`: AudioSet AST's whole input (its 10.24 s windows, its filterbank) at a fraction of its cost."""


TINY_LABELS = ["Speech", "Music", "Dog", "Siren", "Silence", "Engine", "Bird", "Rain", "Wind", "Applause"]
"""The tiny test model's labels (any ten names will do; these read well in the tests' output)."""


def save_random_ast(directory: Path, labels: Optional[Sequence[str]] = None, tiny: bool = False, seed: int = 0,
                    max_length: Optional[int] = None, num_mel_bins: Optional[int] = None) -> Path:
    """Save a random AST with the given labels (default: 527 placeholder AudioSet classes); `max_length`
    frames and `num_mel_bins` if given (a tiny model with AudioSet's 1024 frames has AudioSet's 10.24 s
    windows; with its 128 mel bins too, AudioSet AST's whole input at a fraction of its cost)."""
    labels = list(labels or (f"AudioSet class {i}" for i in range(AUDIOSET_NUM_LABELS)))
    given = {"max_length": max_length, "num_mel_bins": num_mel_bins}
    features = {**(TINY_FEATURES if tiny else {}), **{k: v for k, v in given.items() if v}}
    config = ASTConfig(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **(TINY if tiny else {}),
        **features,
    )
    torch.manual_seed(seed)
    ASTForAudioClassification(config).save_pretrained(directory)
    ASTFeatureExtractor(**features).save_pretrained(directory)
    return Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tiny", action="store_true", help="2 layers, 32 wide, 64 mel bins x 300 frames")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("wrote %s", save_random_ast(args.directory, tiny=args.tiny))


if __name__ == "__main__":
    main()
