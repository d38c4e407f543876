"""Audio in any form a client sends → float32 mono waveform at the model's sampling rate.

Decoding is libsndfile's (through soundfile): WAV, FLAC, OGG Vorbis/Opus, MP3 and the rest it
reads, so we never shell out to ffmpeg per request as the transformers pipeline does. Resampling
is soxr's band-limited "HQ" mode, the one librosa uses by default: a linear interpolator would
alias the upper octave straight into the mel bins AST looks at.

Everything here is a pure function of its arguments; problems the client can fix raise
`ClientInputError` with a message that names them.
"""

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .errors import ClientInputError

MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
TRUNCATED_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")
UNKNOWN_CHUNK_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


@dataclass(frozen=True)
class Target:
    """What the model takes: its sampling rate, how many samples of a clip it reads, and our limit.

    Samples past `keep_samples` never reach AST (the features are truncated to max_length frames),
    so neither decoding nor resampling goes further than that plus a second of margin for the
    resampler's filter: a ten-minute 96 kHz 8-channel FLAC of silence compresses to a few hundred
    KB but would decode to gigabytes.
    """

    rate: int
    keep_samples: int
    max_seconds: float

    def source_frames(self, rate: int) -> int:
        return math.ceil(self.keep_samples * rate / self.rate) + rate

    def check_duration(self, frames: int, rate: int) -> None:
        if frames / rate > self.max_seconds:
            raise ClientInputError(
                f"audio is {frames / rate:.1f} s long; this server accepts at most {self.max_seconds:g} s per clip"
            )


def decode(data: bytes, target: Target) -> np.ndarray:
    """Decode an encoded audio file to a mono waveform at the target rate.

    The header is read first so that an over-long clip is refused before its samples are
    decoded, and a file whose body is shorter than its header promises is called truncated
    instead of being silently classified on what is left.
    """
    if not data:
        raise ClientInputError("audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as file:
            _check_header(file, target)
            samples = file.read(min(file.frames, target.source_frames(file.samplerate)), dtype="float32",
                                always_2d=True)
            rate = file.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ClientInputError(
            f"could not decode audio ({len(data)} bytes): not a complete file in a format libsndfile "
            f"reads (WAV, FLAC, OGG Vorbis/Opus, MP3, ...): {_reason(exc)}"
        ) from None
    if len(samples) == 0:
        raise ClientInputError("audio has no samples (zero-length clip)")
    return from_waveform(downmix(samples), rate, target)


def _check_header(file: sf.SoundFile, target: Target) -> None:
    if file.frames <= 0:
        raise ClientInputError("audio has no samples (zero-length clip)")
    target.check_duration(file.frames, file.samplerate)
    # libsndfile quietly shortens a WAV/AIFF whose data chunk runs past the end of the file, and
    # only says so in its log: "data : 149260 (should be 74608)". Streaming writers leave the size
    # unknown (0 or all ones), which is not truncation.
    for line in file.extra_info.splitlines():
        declared = TRUNCATED_CHUNK.match(line)
        if declared and int(declared.group(1)) not in UNKNOWN_CHUNK_SIZES:
            raise ClientInputError(
                f"audio file is truncated: its header declares {declared.group(1)} bytes of samples, "
                f"the file holds {declared.group(2)}"
            )


def downmix(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) → (frames,), the channel mean: what `librosa.to_mono` does."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    return samples.mean(axis=1, dtype=np.float32)


def from_waveform(waveform: np.ndarray, rate: object, target: Target) -> np.ndarray:
    """Validate a mono waveform and resample the part the model reads to the target rate."""
    check_waveform(waveform)
    rate = check_sampling_rate(rate)
    target.check_duration(len(waveform), rate)
    waveform = waveform[: target.source_frames(rate)]
    if rate == target.rate:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    return soxr.resample(waveform, rate, target.rate, quality="HQ").astype(np.float32, copy=False)


def check_waveform(waveform: np.ndarray) -> None:
    """Refuse what would make the model's answer meaningless rather than merely wrong."""
    if waveform.ndim != 1:
        raise ClientInputError(f"waveform must be one-dimensional (mono), got shape {list(waveform.shape)}")
    if waveform.size == 0:
        raise ClientInputError("waveform has no samples (zero-length clip)")
    if not np.isfinite(waveform).all():
        bad = int(np.count_nonzero(~np.isfinite(waveform)))
        raise ClientInputError(f"waveform contains {bad} NaN or infinite sample(s)")


def check_sampling_rate(rate: object) -> int:
    """A sampling rate must be a whole number of Hz in a range soxr and AST can make sense of."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        if isinstance(rate, float) and rate.is_integer():
            rate = int(rate)
        else:
            raise ClientInputError(f"sampling_rate must be an integer number of Hz, got {rate!r}")
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise ClientInputError(
            f"sampling_rate {rate} Hz is outside {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz"
        )
    return int(rate)


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without soundfile's repr of our in-memory file object."""
    return getattr(exc, "error_string", None) or str(exc)
