"""Long clips → windows of the model's length; window logits → clip logits and segment times.

AST reads `max_length` frames (10.24 s for AudioSet AST) and the transformers pipeline truncates
everything after them. Here a clip is cut into windows of exactly that many hops of samples,
window k starting at sample round(k x hop x rate) while the start lies inside the clip, and each
window is classified as the pipeline would classify that slice alone (a last, shorter window is
padded by the filterbank as the extractor pads). A clip no longer than one window is one window,
so short clips are answered exactly as before.

A trailing window shorter than one 25 ms frame is skipped: it holds no frame the extractor would
compute, only its padding, and its "scores" would describe silence that is not in the clip.

Pure functions on numpy arrays and torch tensors: no I/O, no kserve.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ClientInputError, shown
from .features import FRAME_LENGTH, HOP_LENGTH, LogMelFilterbank

AGGREGATES = ("max", "mean")


@dataclass(frozen=True)
class Windowing:
    rate: int
    length: int
    """Samples per window: the model's frames times the hop between frames (163,840 for AudioSet AST)."""
    min_samples: int
    """One analysis frame (400 samples): less than that holds nothing the filterbank computes."""

    @classmethod
    def of(cls, filterbank: LogMelFilterbank) -> "Windowing":
        """The windows a filterbank reads whole: its `max_length` frames' worth of hops."""
        return cls(filterbank.sampling_rate, filterbank.max_length * HOP_LENGTH, FRAME_LENGTH)

    @property
    def seconds(self) -> float:
        return self.length / self.rate

    def check_hop(self, hop_seconds: object) -> float:
        if isinstance(hop_seconds, bool) or not isinstance(hop_seconds, (int, float)) \
                or not 1 / self.rate <= hop_seconds <= self.seconds:
            raise ClientInputError(
                f"hop_seconds must be a number from one sample ({1 / self.rate:g} s) to the window, "
                f"{self.seconds:g} s; got {shown(hop_seconds)}"
            )
        return float(hop_seconds)

    def count(self, samples: int, hop_seconds: float) -> int:
        """How many windows `starts` will give, without building them (a budget check comes first)."""
        if samples < self.min_samples:
            return 1  # refused by `starts`, with the reason
        return int(np.floor((samples - self.min_samples) / (hop_seconds * self.rate) + 1e-9)) + 1

    def beyond(self, windows: int, hop_seconds: float) -> int:
        """A length in samples that no clip of at most `windows` windows reaches (`count` gives it
        more): where decoding a clip whose header did not say how long it is may stop."""
        return self.min_samples + int(np.ceil(windows * hop_seconds * self.rate))

    def starts(self, samples: int, hop_seconds: float) -> np.ndarray:
        """First sample of each window of a clip `samples` long."""
        if samples < self.min_samples:
            raise ClientInputError(
                f"clip is {samples} samples at {self.rate} Hz; AST needs at least {self.min_samples} (one 25 ms frame)"
            )
        # Each start k x hop is at most samples - min_samples (`count`), so its window holds a frame;
        # rounded, it stays there. The windows are the ones counted, budgeted and admitted.
        return np.round(np.arange(self.count(samples, hop_seconds)) * hop_seconds * self.rate).astype(np.int64)

    def slices(self, waveform: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
        """Views into the waveform, one per window: no copies."""
        return [waveform[start : start + self.length] for start in starts.tolist()]

    def times(self, starts: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Seconds of the clip each window covers: start, and min(start + window, duration)."""
        return starts / self.rate, np.minimum(starts + self.length, samples) / self.rate


def check_aggregate(name: object) -> str:
    if name not in AGGREGATES:
        raise ClientInputError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {shown(name)}")
    return name  # type: ignore[return-value]


def aggregate(window_logits: torch.Tensor, how: str) -> torch.Tensor:
    """(windows, labels) logits → (labels,): the clip's logits, before any scoring function."""
    if how == "max":
        return window_logits.amax(dim=0)
    return window_logits.mean(dim=0)
