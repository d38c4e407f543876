"""A file too large for the server's body limit → 16 kHz mono FLAC holding what the server would hear.

The server decodes every file to mono at 16 kHz (channel mean, soxr's HQ resampler) before anything
else; this runs the server's own decoder (`predictor.audio`) on the client and writes the result as
24-bit FLAC, which the server reads back without resampling. The answer is the one the original
file would have had, within the 24-bit rounding (about 6e-8 of full scale), unless the decoded
audio passes full scale: integer FLAC cannot hold that, so those samples are clipped.
"""

import io

import numpy as np
import soundfile as sf

from ..audio import Target, decode

MODEL_RATE = 16_000
LONGEST_SECONDS = 24 * 3600  # a bound the decoder needs; far past any server's --max_audio_seconds


def as_model_flac(data: bytes) -> bytes:
    waveform = decode(data, Target(rate=MODEL_RATE, max_seconds=LONGEST_SECONDS))
    # Integer FLAC holds [-1, 1); decoded MP3/AAC and resampling can overshoot full scale, so clip there.
    waveform = np.clip(waveform, -1.0, 1.0 - 2.0**-23)
    buffer = io.BytesIO()
    sf.write(buffer, waveform, MODEL_RATE, format="FLAC", subtype="PCM_24")
    return buffer.getvalue()
