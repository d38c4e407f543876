"""Occlusion: which cells of a clip's spectrogram (time span x band of mel bins) a label's score rests on.

Each cell of a grid over the clip's frames and mel bins is replaced by silence, and the label's
score computed again: the drop is the cell's relevance. Silence is what digital silence gives,
the filterbank's log floor normalised (`LogMelFilterbank.silence`), so masking a silent cell
changes nothing and needs no pass: cells whose samples are all zero are not sent (their
relevance is 0). The extractor's padding past a clip's end is another constant (a log energy of
0), so the grid covers the clip's own frames only.

The masked copies are windows like any other: they go through the model's queue (taking turns
with other requests, counted by admission, batched on a GPU, over the frontends' channel) as
`Occluded` windows, and the pass silences each one's cell after its filterbank (`silence`). Our own
code: captum's `Occlusion` runs a model itself, on tensors in one process, where here the model
is an engine behind a queue in another thread or process.

Pure functions: no I/O, no kserve.
"""

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .features import FRAME_LENGTH, HOP_LENGTH, MIN_FREQUENCY


@dataclass(frozen=True)
class Occluded:
    """A window whose features get one cell of silence before the model reads them."""

    samples: np.ndarray
    frames: tuple[int, int]
    bins: tuple[int, int]


Window = Union[np.ndarray, Occluded]


@dataclass(frozen=True)
class Grid:
    """A clip's cells: each time cell's frames [first, last) and each band cell's mel bins."""

    frames: list[tuple[int, int]]
    bins: list[tuple[int, int]]

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(time cell, band cell) of every cell, time-major: the order of `relevance`'s rows."""
        return [(t, b) for t in range(len(self.frames)) for b in range(len(self.bins))]


def samples_of(windows: Sequence[Window]) -> list[np.ndarray]:
    return [w.samples if isinstance(w, Occluded) else w for w in windows]


def silence(features: torch.Tensor, windows: Sequence[Window], value: float) -> torch.Tensor:
    """(windows, frames, bins) features with each occluded window's cell set to `value`, in place."""
    for row, window in enumerate(windows):
        if isinstance(window, Occluded):
            features[row, window.frames[0]:window.frames[1], window.bins[0]:window.bins[1]] = value
    return features


def grid(frames: int, mel_bins: int, cell_frames: int, bands: int, max_cells: int) -> Grid:
    """Time cells of `cell_frames` frames (wider where `max_cells` would be passed; the last one may
    be shorter) by `bands` equal groups of mel bins, over a clip of at least one frame."""
    if frames < 1:
        raise ValueError(f"a grid needs at least one frame, not {frames}")
    bands = max(1, min(bands, mel_bins, max_cells))
    width = max(cell_frames, math.ceil(frames / (max_cells // bands)))
    edges = [round(b * mel_bins / bands) for b in range(bands + 1)]
    return Grid(frames=[(start, min(start + width, frames)) for start in range(0, frames, width)],
                bins=list(zip(edges[:-1], edges[1:])))


def copies(window: np.ndarray, cells: Grid) -> tuple[list[Occluded], list[int]]:
    """The masked copies worth computing, and the index in `cells.cells` of each: a time cell whose
    samples are all zero is silence already, and so are all its band cells."""
    masked, indices = [], []
    for index, (t, b) in enumerate(cells.cells):
        first, last = cells.frames[t]
        if np.any(window[first * HOP_LENGTH:(last - 1) * HOP_LENGTH + FRAME_LENGTH]):
            masked.append(Occluded(window, cells.frames[t], cells.bins[b]))
            indices.append(index)
    return masked, indices


def relevance(base: np.ndarray, masked: np.ndarray, indices: Sequence[int], cells: Grid) -> np.ndarray:
    """Scores of the labels explained, (labels,) on the clip and (copies, labels) on the masked
    copies → (labels, time cells, band cells): each cell's drop in each label's score, 0 where
    the cell was silence already."""
    drops = np.zeros((len(cells.cells), len(base)), np.float32)
    drops[list(indices)] = base[None, :] - masked
    return drops.T.reshape(len(base), len(cells.frames), len(cells.bins))


def times_s(cells: Grid, rate: int) -> list[float]:
    """Each time cell's centre, in seconds of the clip: the middle of its first frame's start and
    its last frame's end."""
    return [((first * HOP_LENGTH) + (last - 1) * HOP_LENGTH + FRAME_LENGTH) / 2 / rate for first, last in cells.frames]


def bands_hz(cells: Grid, mel_bins: int, rate: int) -> list[float]:
    """Each band cell's centre frequency: the middle, on Kaldi's mel scale, of its first and last
    filters' centres (the filters are spaced evenly on that scale from 20 Hz to Nyquist)."""
    mel = lambda hz: 1127.0 * math.log(1.0 + hz / 700.0)  # noqa: E731
    low, step = mel(MIN_FREQUENCY), (mel(rate / 2) - mel(MIN_FREQUENCY)) / (mel_bins + 1)
    centre = lambda b: low + (b + 1) * step  # noqa: E731
    return [700.0 * (math.exp((centre(first) + centre(last - 1)) / 2 / 1127.0) - 1.0) for first, last in cells.bins]
