"""A `Source`, block by block → the model's mono waveform: downmix, check, resample.

Memory follows the 16 kHz mono result, never the decoded source: each block is averaged to mono
and fed to soxr's streaming resampler (the same band-limited "HQ" mode as `soxr.resample`, the
one librosa uses: a linear interpolator would alias the upper octave straight into the mel bins
AST looks at). The duration limit is enforced on the frames actually decoded, so a header that
understates a file's length (streamed and VBR files) cannot get more audio through.
"""

import threading
from contextlib import closing
from typing import Iterator, Optional

import numpy as np
import soxr

from ..errors import ClientInputError
from .source import Source

MAX_AMPLITUDE = 1e14


class Abandoned(Exception):
    """Decoding stopped: the request it was for has gone (its client left)."""


def to_mono(source: Source, rate: int, max_frames: int, refusal: str,
            stop: Optional[threading.Event] = None) -> np.ndarray:
    """The source's samples as float32 mono at `rate`; past `max_frames` frames decoding stops and
    raises `refusal`, the message that names the limit. Once `stop` is set, at the next block,
    `Abandoned`."""
    pieces = list(mono_blocks(source, rate, max_frames, refusal, stop))
    return np.concatenate(pieces) if len(pieces) > 1 else np.ascontiguousarray(pieces[0], dtype=np.float32)


def mono_blocks(source: Source, rate: int, max_frames: int, refusal: str,
                stop: Optional[threading.Event] = None) -> Iterator[np.ndarray]:
    """`to_mono`, block by block: for a consumer that may stop early (the client's re-encoding),
    which closing the generator releases the file."""
    resampler = None if source.rate == rate else soxr.ResampleStream(source.rate, rate, 1, dtype="float32", quality="HQ")
    with closing(source.blocks):
        for block in source.blocks:
            if stop is not None and stop.is_set():
                raise Abandoned(f"stopped after {source.decoded} frames")
            source.decoded += len(block)
            if source.decoded > max_frames:
                raise ClientInputError(refusal)
            mono = downmix(block)
            check_samples(mono)
            yield mono if resampler is None else resampler.resample_chunk(mono)
    if source.decoded == 0:
        raise ClientInputError("audio has no samples (zero-length clip)")
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def downmix(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) → (frames,), the channel mean: what `librosa.to_mono` does."""
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    return samples.mean(axis=1, dtype=np.float32)


def check_samples(samples: np.ndarray) -> None:
    """Finite, and small enough that no step of the filterbank overflows: a 25 ms frame's mel
    energy is at most about 7e8 times its peak sample squared, and float32 ends at 3.4e38, so
    beyond ±1e14 the features would be infinite and the scores NaN. Audio is normally within ±1
    (integer PCM scaled to floats within ±2^31), far inside the bound."""
    peak = float(np.abs(samples).max(initial=0.0))
    if peak <= MAX_AMPLITUDE:
        return
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise ClientInputError(f"waveform contains {bad} NaN or infinite sample(s)")
    raise ClientInputError(
        f"waveform has samples as large as {peak:.3g}; this server takes samples within ±{MAX_AMPLITUDE:g} "
        "(audio is normally within ±1): larger ones overflow the spectrogram"
    )
