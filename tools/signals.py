"""Test signals: a tone, and any samples written into an audio container by soundfile, for the
tests, the benchmarks and the tools alike."""

import io
from typing import Optional

import numpy as np
import soundfile as sf


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: Optional[str] = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()
