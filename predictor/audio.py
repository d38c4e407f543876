"""Audio in any form a client sends → float32 mono waveform at the model's sampling rate.

Decoding is libsndfile's (through soundfile): WAV, FLAC, OGG Vorbis/Opus, MP3 and the rest it
reads, so we never shell out to ffmpeg per request as the transformers pipeline does. Resampling
is soxr's band-limited "HQ" mode, the one librosa uses by default: a linear interpolator would
alias the upper octave straight into the mel bins AST looks at.

Everything here is a pure function of its arguments; problems the client can fix raise
`ClientInputError` with a message that names them.
"""

import io
import re

import numpy as np
import soundfile as sf
import soxr

from .errors import ClientInputError

MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
TRUNCATED_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")
UNKNOWN_CHUNK_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


def decode(data: bytes, target_rate: int, max_seconds: float) -> np.ndarray:
    """Decode an encoded audio file to a mono waveform at `target_rate`.

    The header is read first so that an over-long clip is refused before its samples are
    decoded, and a file whose body is shorter than its header promises is called truncated
    instead of being silently classified on what is left.
    """
    if not data:
        raise ClientInputError("audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as file:
            _check_header(file, max_seconds)
            samples = file.read(dtype="float32", always_2d=True)
            rate = file.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise ClientInputError(
            f"could not decode audio ({len(data)} bytes): not a complete file in a format libsndfile "
            f"reads (WAV, FLAC, OGG Vorbis/Opus, MP3, ...): {_reason(exc)}"
        ) from None
    if len(samples) == 0:
        raise ClientInputError("audio has no samples (zero-length clip)")
    return to_model_rate(downmix(samples), rate, target_rate)


def _check_header(file: sf.SoundFile, max_seconds: float) -> None:
    if file.frames <= 0:
        raise ClientInputError("audio has no samples (zero-length clip)")
    duration = file.frames / file.samplerate
    if duration > max_seconds:
        raise ClientInputError(
            f"audio is {duration:.1f} s long; this server accepts at most {max_seconds:g} s per clip"
        )
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


def to_model_rate(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Validate a mono waveform and resample it to `target_rate`."""
    check_waveform(waveform)
    rate = check_sampling_rate(rate)
    if rate == target_rate:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    return soxr.resample(waveform, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


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
