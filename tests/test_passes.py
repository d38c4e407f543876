"""`predictor.passes.in_parts`: a pass that runs out of GPU memory is split and retried, rows in order.
(The GPU pass itself runs in `make gpu-check`, which squeezes a server's memory to make it split.)"""

import pytest
import torch

from predictor.errors import Overloaded
from predictor.passes import in_parts


def fits(most: int):
    """A computation that runs out of memory past `most` rows, as a GPU would; each row's output is its index."""
    def compute(start: int, end: int) -> torch.Tensor:
        if end - start > most:
            raise torch.OutOfMemoryError(f"{end - start} rows do not fit")
        return torch.arange(start, end, dtype=torch.float32)[:, None]
    return compute


def test_a_pass_that_does_not_fit_is_halved_until_it_does_and_the_size_is_kept():
    splits = []
    logits, part = in_parts(fits(3), rows=13, part=8, ran_out=lambda rows, new: splits.append((rows, new)))
    assert logits[:, 0].tolist() == list(range(13))
    assert part == 2 and splits == [(8, 4), (4, 2)]
    again = []
    logits, part = in_parts(fits(3), rows=5, part=part, ran_out=lambda rows, new: again.append((rows, new)))
    assert logits[:, 0].tolist() == list(range(5)) and part == 2 and again == []


def test_one_window_that_does_not_fit_is_a_503_not_a_crash():
    with pytest.raises(Overloaded, match=r"no memory left for one window now; retry in about 1 s"):
        in_parts(fits(0), rows=4, part=4, ran_out=lambda rows, new: None)
