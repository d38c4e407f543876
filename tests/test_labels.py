"""`predictor.labels`: the pipeline's scoring and ranking, and the defaults we choose."""

import pytest
import torch

from predictor import labels
from predictor.errors import ClientInputError


@pytest.mark.parametrize(
    "problem_type, num_labels, expected",
    [
        (None, 527, "sigmoid"),  # AudioSet checkpoints carry no problem_type but are multi-label
        (None, 50, "softmax"),  # ESC-50 fine-tunes: single-label, as the pipeline decides
        ("single_label_classification", 35, "softmax"),
        ("multi_label_classification", 10, "sigmoid"),
        ("regression", 1, "none"),
    ],
)
def test_default_function(problem_type, num_labels, expected):
    assert labels.default_function(problem_type, num_labels) == expected


def test_scores_and_top_k_rank_like_the_pipeline():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, -2.0, 0.0, 1.0]])
    id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    names, values = labels.top_k(labels.scores(logits, "softmax"), 2, id2label)
    assert names == [["b", "d"], ["a", "d"]]
    torch.testing.assert_close(values, logits.softmax(-1).sort(descending=True).values[:, :2])
    _, sig = labels.top_k(labels.scores(logits, "sigmoid"), 4, id2label)
    torch.testing.assert_close(sig, logits.sigmoid().sort(descending=True).values)
    _, raw = labels.top_k(labels.scores(logits, "none"), 1, id2label)
    torch.testing.assert_close(raw[:, 0], logits.max(-1).values)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", True, None])
def test_top_k_that_is_not_a_positive_integer_is_refused(top_k):
    with pytest.raises(ClientInputError, match=r"top_k must be a positive integer \(more than the model's 10 labels "
                                               r"means all of them\)"):
        labels.check_top_k(top_k, 10)


@pytest.mark.parametrize("top_k, kept", [(1, 1), (10, 10), (11, 10), (10**6, 10)])
def test_top_k_above_the_label_count_means_every_label(top_k, kept):
    """As the transformers pipeline clamps it."""
    assert labels.check_top_k(top_k, 10) == kept


@pytest.mark.parametrize("name", ["relu", "", None, 1, "SOFTMAX"])
def test_unknown_function_is_refused(name):
    with pytest.raises(ClientInputError, match="function_to_apply must be one of sigmoid, softmax, none"):
        labels.check_function(name)
