"""A file too large for the server's body limit → 16 kHz mono FLAC holding what the server would hear.

The server decodes every file to mono at 16 kHz (channel mean, soxr's HQ resampler) before anything
else; this runs the server's own decoder (`predictor.audio`) on the client and writes the result as
24-bit FLAC, which the server reads back without resampling. The answer is the one the original
file would have had, within the 24-bit rounding (about 6e-8 of full scale).
"""

import io

import soundfile as sf

from ..audio import Target, decode

MODEL_RATE = 16_000
LONGEST_SECONDS = 24 * 3600  # a bound the decoder needs; far past any server's --max_audio_seconds


def as_model_flac(data: bytes) -> bytes:
    waveform = decode(data, Target(rate=MODEL_RATE, max_seconds=LONGEST_SECONDS))
    buffer = io.BytesIO()
    sf.write(buffer, waveform, MODEL_RATE, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()
