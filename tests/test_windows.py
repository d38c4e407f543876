"""`predictor.windows`: where windows start, what they cover, and how their logits pool."""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from predictor.errors import ClientInputError
from predictor.windows import Windowing, aggregate, check_aggregate

AUDIOSET = Windowing(rate=16000, length=163_840, min_samples=400)


@pytest.mark.parametrize(
    "samples, hop, starts",
    [
        (1_600, 10.24, [0]),  # 0.1 s: one window
        (163_840, 10.24, [0]),  # exactly one window
        (163_841, 10.24, [0]),  # one sample more: less than a frame left, no second window
        (164_240, 10.24, [0, 163_840]),  # a frame more: a second window of one frame
        (491_520, 10.24, [0, 163_840, 327_680]),  # 30.72 s: three windows
        (491_520, 5.0, [0, 80_000, 160_000, 240_000, 320_000, 400_000, 480_000]),
        (20_000, 1 / 3, [0, 5_333, 10_667, 16_000]),  # round(k x hop x rate), not k x round(hop x rate)
    ],
)
def test_window_starts(samples, hop, starts):
    assert AUDIOSET.starts(samples, hop).tolist() == starts


def test_slices_are_views_and_times_end_at_the_clip():
    waveform = np.arange(491_520 - 1000, dtype=np.float32)
    starts = AUDIOSET.starts(len(waveform), 5.0)
    windows = AUDIOSET.slices(waveform, starts)
    assert all(np.shares_memory(w, waveform) for w in windows)
    assert [len(w) for w in windows] == [min(163_840, len(waveform) - s) for s in starts]
    start, end = AUDIOSET.times(starts, len(waveform))
    np.testing.assert_allclose(start, starts / 16000)
    np.testing.assert_allclose(end, np.minimum(starts / 16000 + 10.24, len(waveform) / 16000), rtol=1e-6)


@pytest.mark.parametrize("hop", [0, -1, 10.25, "1", True, None, 1e-9, 0.9 / 16000, float("nan"), float("inf")])
def test_bad_hops_are_refused(hop):
    with pytest.raises(ClientInputError, match=r"hop_seconds must be a number from one sample \(6.25e-05 s\) to the window, 10.24 s"):
        AUDIOSET.check_hop(hop)


@given(samples=st.integers(400, 2_000_000), hop=st.floats(1 / 16000, 10.24) | st.floats(1, 20).map(lambda n: n / 16000))
@example(samples=401, hop=1.3 / 16000)  # a second start rounds down to the last one allowed
def test_windows_are_counted_before_they_are_made(samples, hop):
    """What admission and the window limit count is what is computed (hops of fractional samples
    included), and every window holds at least one frame."""
    starts = AUDIOSET.starts(samples, hop)
    assert AUDIOSET.count(samples, hop) == len(starts) and starts[-1] <= samples - 400 and starts[0] == 0


@given(windows=st.integers(1, 300), hop=st.floats(1 / 16000, 10.24) | st.floats(1, 20).map(lambda n: n / 16000))
def test_decoding_stops_only_past_every_clip_of_so_many_windows(windows, hop):
    """`beyond`, where decoding a clip of unstated length stops: a clip that long has more than
    `windows` windows (and a longer one too: the count only grows with the length), and one a hop
    shorter has no more."""
    beyond = AUDIOSET.beyond(windows, hop)
    assert AUDIOSET.count(beyond, hop) > windows
    assert AUDIOSET.count(beyond - math.ceil(hop * 16000) - 1, hop) <= windows


def test_a_clip_shorter_than_a_frame_is_refused():
    with pytest.raises(ClientInputError, match="399 samples.*at least 400"):
        AUDIOSET.starts(399, 10.24)


def test_aggregates():
    logits = torch.tensor([[1.0, -2.0], [3.0, -4.0], [-1.0, 0.0]])
    torch.testing.assert_close(aggregate(logits, "max"), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(aggregate(logits, "mean"), torch.tensor([1.0, -2.0]))
    with pytest.raises(ClientInputError, match="aggregate must be one of max, mean; got 'median'"):
        check_aggregate("median")
