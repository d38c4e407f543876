"""Logits → scores → the top-k labels, as the transformers `audio-classification` pipeline ranks them.

The same torch ops as the pipeline (`softmax`/`sigmoid`, then `topk`) so that scores and the order
of near-ties agree with what users see in a notebook.
"""

from typing import Optional

import torch

from .errors import ClientInputError, shown

FUNCTIONS = ("sigmoid", "softmax", "none")
AUDIOSET_NUM_LABELS = 527


def default_function(problem_type: Optional[str], num_labels: int) -> str:
    """The pipeline's choice from `config.problem_type`, except for AudioSet's label set.

    AudioSet is multi-label and AST was trained with a sigmoid per label, but the released
    checkpoints carry no `problem_type`, so the pipeline would softmax them into scores that
    sum to one across 527 co-occurring sounds.
    """
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == AUDIOSET_NUM_LABELS:
        return "sigmoid"
    return "softmax"


def check_function(name: object) -> str:
    if name not in FUNCTIONS:
        raise ClientInputError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}; got {shown(name)}")
    return name  # type: ignore[return-value]


def check_top_k(top_k: object, num_labels: int) -> int:
    """A positive integer; above the model's label count it means every label, as the pipeline
    clamps it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ClientInputError(f"top_k must be a positive integer (more than the model's {num_labels} labels means "
                               f"all of them); got {shown(top_k)}")
    return min(top_k, num_labels)


def scores(logits: torch.Tensor, function: str) -> torch.Tensor:
    """(batch, num_labels) logits → scores by the named function."""
    if function == "softmax":
        return logits.softmax(-1)
    if function == "sigmoid":
        return logits.sigmoid()
    return logits


def top_k(scores_: torch.Tensor, k: int, id2label: dict[int, str]) -> tuple[list[list[str]], torch.Tensor]:
    """Best k labels per row, highest score first: (labels, (batch, k) scores)."""
    values, ids = scores_.topk(k, dim=-1)
    return [[id2label[i] for i in row] for row in ids.tolist()], values
