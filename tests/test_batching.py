"""`predictor.batching`: concurrent requests share forward passes and each gets its own rows back."""

import asyncio

import pytest
import torch

from predictor.batching import Batcher


class RecordingForward:
    """A stand-in engine whose logits are a known function of each row: the row's sum, twice."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(features))
        total = features.sum(dim=(1, 2))
        return torch.stack([total, 2 * total], dim=1)


def requests_of(sizes: list[int]) -> list[torch.Tensor]:
    return [torch.rand(n, 3, 4) for n in sizes]


def run_concurrently(batcher: Batcher, requests: list[torch.Tensor]) -> list[torch.Tensor]:
    async def main():
        return await asyncio.gather(*(batcher(r) for r in requests))

    return asyncio.run(main())


def expected_logits(features: torch.Tensor) -> torch.Tensor:
    total = features.sum(dim=(1, 2))
    return torch.stack([total, 2 * total], dim=1)


def test_requests_arriving_together_share_a_forward_pass():
    forward = RecordingForward()
    requests = requests_of([1, 2, 1])
    results = run_concurrently(Batcher(forward, max_batch_size=8, max_wait_s=0.2), requests)
    assert forward.batch_sizes == [4]
    for features, logits in zip(requests, results):
        torch.testing.assert_close(logits, expected_logits(features))


def test_batches_stop_at_max_batch_size_and_split_big_requests():
    forward = RecordingForward()
    requests = requests_of([3, 3, 5])
    results = run_concurrently(Batcher(forward, max_batch_size=4, max_wait_s=0.2), requests)
    assert max(forward.batch_sizes) <= 4 and sum(forward.batch_sizes) == 11
    for features, logits in zip(requests, results):
        torch.testing.assert_close(logits, expected_logits(features))


def test_a_failing_forward_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def forward(features: torch.Tensor) -> torch.Tensor:
        calls.append(len(features))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return expected_logits(features)

    batcher = Batcher(forward, max_batch_size=8, max_wait_s=0.0)

    async def main():
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher(torch.ones(1, 3, 4))
        return await batcher(torch.ones(2, 3, 4))

    torch.testing.assert_close(asyncio.run(main()), expected_logits(torch.ones(2, 3, 4)))
