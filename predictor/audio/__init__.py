"""Audio in any form a client sends → float32 mono waveform at the model's sampling rate.

Two steps, so that a request's limits are checked before anything is decoded: `open_clip` reads
a file's header (or takes a waveform as it is) into a `Source`; `Target.waveform` decodes it,
block by block, to mono at the model's rate (`stream`), within the clip's limit and what is left
of the request's `SampleBudget` (`budget`). Files are read by libsndfile (`sndfile`)
when it can, which keeps every answer it gave before; what it cannot open (AAC in MP4/M4A, Opus in
WebM, ADTS) goes to FFmpeg's libraries in process (`ffmpeg`), limited to audio containers.

Problems the client can fix raise `ClientInputError` with a message that names them.
"""

import math
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from ..errors import ClientInputError, UnsupportedAudio, shown
from .budget import SampleBudget
from .ffmpeg import cap_allocations, open_ffmpeg
from .sndfile import ACCEPTED, NotReadable, open_sndfile
from .source import Source
from .stream import Abandoned, mono_blocks, to_mono

MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000

Clip = Union[bytes, tuple[np.ndarray, object]]
"""An encoded audio file, or a mono waveform with its sampling rate as the client stated it."""


@dataclass(frozen=True)
class Target:
    """The model's sampling rate, and the longest and widest clip this server takes."""

    rate: int
    max_seconds: float
    max_channels: Optional[int] = None  # None: any number (offline tools); the server sets --max_channels

    def check_header(self, source: Source) -> None:
        """Refuse from the header alone, before a sample is decoded."""
        _check_rate_range(source.rate, "audio is sampled at")
        if self.max_channels is not None and source.channels > self.max_channels:
            raise ClientInputError(f"audio has {source.channels} channels; this server accepts at most "
                                   f"{self.max_channels} (--max_channels)")
        if source.frames is not None and source.frames / source.rate > self.max_seconds:
            raise ClientInputError(
                f"audio is {source.frames / source.rate:.1f} s long; {self.clip_limit}"
            )

    @property
    def clip_limit(self) -> str:
        return f"this server accepts at most {self.max_seconds:g} s per clip (--max_audio_seconds)"

    def _clip_limit(self, source: Source) -> tuple[int, str]:
        return math.floor(self.max_seconds * source.rate), f"audio is longer than {self.max_seconds:g} s; {self.clip_limit}"

    def mono_blocks(self, source: Source) -> Iterator[np.ndarray]:
        """The clip at this rate, block by block, within the clip limit (the client's re-encoding,
        which may stop early: close the generator)."""
        return mono_blocks(source, self.rate, *self._clip_limit(source))

    def waveform(self, source: Source, budget: Optional[SampleBudget] = None,
                 beyond: Optional[tuple[int, str]] = None, stop: Optional[threading.Event] = None) -> np.ndarray:
        """Decode and resample; decoding stops past the clip limit, what is left of `budget`, or
        `beyond`: a length at this rate the clip must not reach, and the refusal that names why.
        The budget counts samples at the file's rate, so a file at a low rate that does not state
        its length is bounded at the model's rate by `beyond` alone. Once `stop` is set, decoding
        ends at the next block (`Abandoned`)."""
        limits = [self._clip_limit(source)]
        if budget is not None:
            limits.append((budget.frames_left(source.channels), budget.refusal(source)))
        if beyond is not None:  # frames whose resampling passes it, give or take soxr's rounding
            limits.append((math.ceil(beyond[0] * source.rate / self.rate) + 2, beyond[1]))
        max_frames, refusal = min(limits, key=lambda limit: limit[0])
        try:
            return to_mono(source, self.rate, max_frames, refusal, stop)
        finally:
            if budget is not None:
                budget.charge(source)


def open_clip(clip: Clip, target: Target) -> Source:
    """An encoded file's header or a waveform, checked against the clip limit; nothing decoded yet."""
    source = open_file(clip) if isinstance(clip, bytes) else from_waveform(*clip)
    try:
        target.check_header(source)
    except ClientInputError:
        source.blocks.close()
        raise
    return source


def open_file(data: bytes) -> Source:
    if not data:
        raise ClientInputError("audio is empty (0 bytes)")
    try:
        source = open_sndfile(data)
    except NotReadable as sndfile_reason:
        try:
            source = open_ffmpeg(data)
        except ClientInputError as ffmpeg_reason:
            refusal = UnsupportedAudio if isinstance(ffmpeg_reason, UnsupportedAudio) else ClientInputError
            raise refusal(
                f"could not decode audio ({len(data)} bytes): not a complete file in a format this server reads "
                f"({ACCEPTED}): libsndfile: {sndfile_reason}; ffmpeg: {ffmpeg_reason}"
            ) from None
    if source.frames == 0:
        source.blocks.close()
        raise ClientInputError("audio has no samples (zero-length clip)")
    return source


def from_waveform(waveform: np.ndarray, rate: object) -> Source:
    """A client's mono waveform as a one-block source, after the checks a file's header gets."""
    if waveform.ndim != 1:
        raise ClientInputError(f"waveform must be one-dimensional (mono), got shape {list(waveform.shape)}")
    if waveform.size == 0:
        raise ClientInputError("waveform has no samples (zero-length clip)")
    rate = check_sampling_rate(rate)
    return Source(rate=rate, channels=1, frames=len(waveform), blocks=(block for block in [waveform[:, None]]), reader="waveform")


def decode(clip: Clip, target: Target) -> np.ndarray:
    """One clip, opened and decoded against the clip limit alone."""
    return target.waveform(open_clip(clip, target))


def check_sampling_rate(rate: object) -> int:
    """A sampling rate must be a whole number of Hz in a range soxr and AST can make sense of."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        if isinstance(rate, float) and rate.is_integer():
            rate = int(rate)
        else:
            raise ClientInputError(f"sampling_rate must be an integer number of Hz, got {shown(rate)}")
    _check_rate_range(rate, "sampling_rate")
    return int(rate)


def _check_rate_range(rate: int, what: str) -> None:
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise ClientInputError(f"{what} {shown(rate)} Hz, outside {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz")


__all__ = ["Abandoned", "Clip", "SampleBudget", "Source", "Target", "cap_allocations", "check_sampling_rate", "decode", "from_waveform", "open_clip", "open_file"]
