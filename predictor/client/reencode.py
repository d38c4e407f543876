"""A file too large for the server's body limit → 16 kHz mono FLAC holding what the server would hear.

The server decodes every file to mono at 16 kHz (channel mean, soxr's HQ resampler) before anything
else; this runs the server's own decoder (`predictor.audio`) on the client and writes the result as
24-bit FLAC, which the server reads back without resampling. The answer is the one the original
file would have had, within the 24-bit rounding (about 6e-8 of full scale), unless the decoded
audio passes full scale: integer FLAC cannot hold that, so those samples are clipped. It is
encoded block by block as it is decoded, and stops once the FLAC passes the size asked for: a
three-hour recording that cannot fit is not decoded whole first (0.7 GB at 16 kHz) to find out.
"""

import io
from contextlib import closing

import numpy as np
import soundfile as sf

from ..audio import Target, open_clip

MODEL_RATE = 16_000
LONGEST_SECONDS = 24 * 3600  # a bound the decoder needs; far past any server's --max_audio_seconds


class TooLarge(Exception):
    """The FLAC passed the size asked for after `seconds` of the audio."""

    def __init__(self, seconds: float):
        super().__init__(f"past it after {seconds:.1f} s of the audio")
        self.seconds = seconds


def as_model_flac(data: bytes, max_bytes: int) -> bytes:
    target = Target(rate=MODEL_RATE, max_seconds=LONGEST_SECONDS)
    buffer, written = io.BytesIO(), 0
    with sf.SoundFile(buffer, "w", MODEL_RATE, 1, "PCM_24", format="FLAC") as flac, \
            closing(target.mono_blocks(open_clip(data, target))) as blocks:
        for block in blocks:
            # Integer FLAC holds [-1, 1); decoded MP3/AAC and resampling can overshoot full scale, so clip there.
            flac.write(np.clip(block, -1.0, 1.0 - 2.0**-23))
            written += len(block)
            if buffer.tell() > max_bytes:
                raise TooLarge(written / MODEL_RATE)
    return buffer.getvalue()
