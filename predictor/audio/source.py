"""An opened audio file, whichever library reads it: its header's facts and its samples in blocks.

Readers (`sndfile`, `ffmpeg`) hand back a `Source`; `stream` turns one into the model's 16 kHz
mono waveform block by block, so memory follows the result, never the decoded source.
"""

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


@dataclass
class Source:
    rate: int
    channels: int
    frames: Optional[int]
    """Frames the header declares; None where the container does not say or cannot be trusted
    (streamed files, VBR without an index): decoding then enforces the limits as it goes."""
    blocks: Iterator[np.ndarray]
    """float32 (frames, channels) blocks in order; a generator that releases the file when closed."""
    reader: str
    """What read it, for the logs: 'libsndfile', 'ffmpeg' or 'waveform' (a client's samples)."""
    decoded: int = 0
    """Frames decoded so far: what a request's audio budget is charged, whatever the header said."""
    estimated: Optional[int] = None
    """Frames the container estimates where it states none (MP3, from its bit rate): what admission
    counts until decoding says, never a reason to refuse the clip."""
