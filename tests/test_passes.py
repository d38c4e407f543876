"""`predictor.passes`: the pass a GPU runs answers as the CPU's (run here on the CPU, whole), and one
that runs out of GPU memory is split and retried, rows in order (`in_parts`; on a GPU, `make
gpu-check` squeezes a server's memory to make it split)."""

import asyncio
import weakref
from typing import Callable

import numpy as np
import pytest
import torch

from predictor.batching import WindowQueue
from predictor.checkpoint import Checkpoint, load_feature_extractor
from predictor.engines import EngineOptions, build_engine
from predictor.errors import Overloaded
from predictor.features import LogMelFilterbank
from predictor.occlusion import Occluded
from predictor.passes import BatchedPass, CpuPass, in_parts


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


class Activations:
    """What a failed part's frames hold on a GPU: memory that only its traceback keeps."""


def runs_out_holding(kept: list) -> Callable[[int, int], torch.Tensor]:
    """Like `fits(0)`, each failing part's frame holding one `Activations` (weakly kept in `kept`)."""
    def compute(start: int, end: int) -> torch.Tensor:
        activations = Activations()
        kept.append(weakref.ref(activations))
        raise torch.OutOfMemoryError(f"{end - start} rows do not fit")
    return compute


def test_a_failed_part_lets_its_memory_go_before_the_retry_and_the_503():
    """The failed part's memory is free when `ran_out` empties the GPU's cache, and while the 503
    that one window does not fit is on its way to the client: its traceback, which holds the
    part's frames, is not kept."""
    kept, alive_at_split = [], []
    with pytest.raises(Overloaded) as refused:
        in_parts(runs_out_holding(kept), rows=2, part=2,
                 ran_out=lambda rows, new: alive_at_split.append(kept[-1]() is not None))
    assert alive_at_split == [False]
    assert len(kept) == 2 and all(ref() is None for ref in kept), "the 503 holds the failed part's frames"
    assert "1 rows do not fit" in str(refused.value.__cause__)


@pytest.fixture(scope="module")
def tiny_passes(tiny_model_dir):
    """The tiny model's filterbank and fp32 torch engine, as the server builds them."""
    checkpoint = Checkpoint.open(str(tiny_model_dir))
    filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(checkpoint.source, checkpoint.config))
    engine = build_engine(checkpoint, EngineOptions("torch", "fp32", 2))
    return filterbank, engine


def windows_of_every_length(filterbank: LogMelFilterbank) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [(0.1 * rng.standard_normal(length)).astype(np.float32)
            for length in (filterbank.max_samples, 20_000, 400, filterbank.max_samples, 3_333)]


def test_the_batched_pass_a_gpu_runs_answers_as_the_cpu_pass(tiny_passes):
    """What a GPU runs (padding into a reused buffer, the copy, the filterbank over the whole pass),
    here on the CPU: each window's logits are the per-clip pass's, buffers reused pass after pass."""
    filterbank, engine = tiny_passes
    batched, per_clip = BatchedPass(filterbank, engine, torch.device("cpu"), max_batch_size=8), CpuPass(filterbank, engine)
    windows = windows_of_every_length(filterbank)
    for chosen in (windows, windows[1:3], windows[::-1], windows):  # more passes than buffers
        torch.testing.assert_close(batched.run(batched.stage(chosen)), per_clip.run(chosen), atol=1e-4, rtol=0)


def test_occluded_windows_are_silenced_alike_in_both_passes(tiny_passes):
    """An occluded window's cell is silence in the features the engine reads, on the batched pass a
    GPU runs as on the CPU's, and masking a cell changes that window's rows and no other's."""
    filterbank, engine = tiny_passes
    batched, per_clip = BatchedPass(filterbank, engine, torch.device("cpu"), max_batch_size=8), CpuPass(filterbank, engine)
    plain = windows_of_every_length(filterbank)[:3]
    windows = [plain[0], Occluded(plain[0], (10, 60), (8, 40)), plain[1], Occluded(plain[1], (0, 5), (0, 64)), plain[2]]
    rows = per_clip.run(windows)
    torch.testing.assert_close(batched.run(batched.stage(windows)), rows, atol=1e-4, rtol=0)
    assert (rows[1] - rows[0]).abs().max() > 1e-4 and (rows[3] - rows[2]).abs().max() > 1e-4
    features = filterbank([plain[0]])
    features[0, 10:60, 8:40] = filterbank.silence
    torch.testing.assert_close(rows[1:2], engine(features), atol=1e-5, rtol=0)


def test_the_queue_stages_batched_passes_ahead_and_every_request_gets_its_rows(tiny_passes):
    filterbank, engine = tiny_passes
    queue = WindowQueue(BatchedPass(filterbank, engine, torch.device("cpu"), max_batch_size=2), max_batch_size=2,
                        max_wait_s=0.0)
    windows = windows_of_every_length(filterbank)
    requests = [windows[:2], windows[2:3], windows[3:], windows[1:4]]

    async def main():
        return await asyncio.gather(*(queue(request) for request in requests))

    for request, logits in zip(requests, asyncio.run(main())):
        torch.testing.assert_close(logits, CpuPass(filterbank, engine).run(request), atol=1e-4, rtol=0)


def test_a_staging_that_fails_leaves_both_buffers_in_turn(tiny_passes):
    filterbank, engine = tiny_passes
    batched, per_clip = BatchedPass(filterbank, engine, torch.device("cpu"), max_batch_size=4), CpuPass(filterbank, engine)
    too_short = [np.zeros(100, np.float32)]  # refused by the filterbank's check, inside stage
    for _ in range(3):
        with pytest.raises(Exception, match="AST needs at least 400"):
            batched.stage(too_short)
    windows = windows_of_every_length(filterbank)[:4]
    for _ in range(3):
        torch.testing.assert_close(batched.run(batched.stage(windows)), per_clip.run(windows), atol=1e-4, rtol=0)


def test_a_copy_with_no_room_beside_the_pass_in_flight_is_made_by_its_own_pass(tiny_passes, monkeypatch):
    """Staged while another pass holds the GPU's memory, the copy runs out of it: the windows stay on
    the host and their own pass copies them, part by part: same rows, no 503, and the buffers keep
    their turn."""
    filterbank, engine = tiny_passes
    batched, per_clip = BatchedPass(filterbank, engine, torch.device("cpu"), max_batch_size=8), CpuPass(filterbank, engine)
    windows = windows_of_every_length(filterbank)
    copy = torch.Tensor.to

    def no_room_for_the_staging_copy(tensor, *args, **kwargs):
        if kwargs.get("non_blocking"):  # the copy stream's: the GPU's memory is the pass in flight's
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return copy(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", no_room_for_the_staging_copy)
    staged = [batched.stage(windows) for _ in range(3)]  # more than the buffers: each kept its turn
    monkeypatch.undo()
    assert all(s.copied is None for s in staged)
    for each in staged:
        torch.testing.assert_close(batched.run(each), per_clip.run(windows), atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.run(batched.stage(windows)), per_clip.run(windows), atol=1e-4, rtol=0)
