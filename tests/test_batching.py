"""`predictor.batching`: concurrent requests share forward passes and each gets its own rows back."""

import asyncio
import time

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


class SlowForward(RecordingForward):
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)  # long enough for later requests to queue up behind this pass
        return super().__call__(features)


def test_by_default_requests_queued_during_a_pass_form_the_next():
    """max_wait 0: a lone request runs at once; the ones arriving meanwhile share the next pass."""
    forward = SlowForward()
    batcher = Batcher(forward, max_batch_size=4, max_wait_s=0.0)
    requests = requests_of([1, 1, 1, 1])

    async def main():
        first = asyncio.create_task(batcher(requests[0]))
        await asyncio.sleep(0.05)
        return await asyncio.gather(first, *(batcher(r) for r in requests[1:]))

    results = asyncio.run(main())
    assert forward.batch_sizes == [1, 3]
    for features, logits in zip(requests, results):
        torch.testing.assert_close(logits, expected_logits(features))


def test_a_cancelled_request_is_not_computed():
    forward_calls: list[int] = []

    def forward(features: torch.Tensor) -> torch.Tensor:
        forward_calls.append(len(features))
        time.sleep(0.2)  # the first pass is busy while the second request is cancelled
        return expected_logits(features)

    batcher = Batcher(forward, max_batch_size=4, max_wait_s=0.0)

    async def main():
        first = asyncio.create_task(batcher(torch.ones(1, 3, 4)))
        await asyncio.sleep(0.05)
        abandoned = asyncio.create_task(batcher(torch.ones(2, 3, 4)))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await first
        return await batcher(torch.ones(3, 3, 4))

    torch.testing.assert_close(asyncio.run(main()), expected_logits(torch.ones(3, 3, 4)))
    assert forward_calls == [1, 3]
