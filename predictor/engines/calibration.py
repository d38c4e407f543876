"""Windows of features for static int8 to take its activation scales from: real audio, or made here.

Static int8 (OpenVINO's, through NNCF) fixes each activation's scale from statistics over a few
calibration windows, so those windows should look like what the server will be sent. A directory
of recordings like the served ones does that best (`--calibration_dir`). Without one, the server
makes its own clips, so that no dataset has to ship with the image or be reachable from the pod:
harmonic tones with vibrato, chirps, coloured noise and bursts over silence, at levels from quiet
to loud, which covers the filterbank's range. Both go through the server's own steps (decode,
windows, filterbank); `python -m tools.compare` measures what either costs in accuracy.
"""

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import audio
from ..checkpoint import load_feature_extractor
from ..errors import ClientInputError
from ..features import LogMelFilterbank
from ..windows import Windowing

CALIBRATION_WINDOWS = 16
SYNTHETIC = "synthetic-1"  # names the generator below: change it when the clips change
MAX_FILE_SECONDS = 3600.0


def file_features(files: list[Path], filterbank: LogMelFilterbank) -> torch.Tensor:
    """Every window of every file at the default hop, as the server computes them."""
    windowing = Windowing.of(filterbank)
    target = audio.Target(filterbank.sampling_rate, max_seconds=MAX_FILE_SECONDS)
    slices = []
    for path in files:
        try:
            waveform = audio.decode(path.read_bytes(), target)
        except ClientInputError as exc:
            raise ClientInputError(f"{path}: {exc}") from None
        slices += windowing.slices(waveform, windowing.starts(len(waveform), windowing.seconds))
    return filterbank(slices)


def synthetic_clips(rate: int, count: int, samples: int, seed: int = 0) -> list[np.ndarray]:
    """`count` clips of four kinds in turn, each at its own level (-40 to -3 dBFS) over a faint
    noise floor: pure functions of the seed, so the calibration (and its cache key) is stable."""
    clips = []
    t = np.arange(samples) / rate
    for index in range(count):
        rng = np.random.default_rng(seed + index)
        kind = index % 4
        if kind == 0:  # a voice-like harmonic tone with vibrato
            f0 = np.exp(rng.uniform(np.log(80), np.log(800)))
            phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / rate
            clip = sum(np.sin(k * phase) / k for k in range(1, 9))
        elif kind == 1:  # a logarithmic chirp across most of the band
            low, high = rng.uniform(60, 300), rng.uniform(2000, 0.45 * rate)
            clip = np.sin(2 * np.pi * low * t[-1] / np.log(high / low) * ((high / low) ** (t / t[-1]) - 1))
        elif kind == 2:  # white, pink or brown noise
            spectrum = np.fft.rfft(rng.standard_normal(samples))
            spectrum[1:] /= np.arange(1, len(spectrum)) ** (rng.integers(0, 3) / 2)
            clip = np.fft.irfft(spectrum, samples)
        else:  # noise bursts and clicks over silence
            clip = rng.standard_normal(samples) * (rng.random(samples // 1600 + 1) < 0.3).repeat(1600)[:samples]
        clip = clip / (np.abs(clip).max() + 1e-12) * 10 ** (rng.uniform(-40, -3) / 20)
        clips.append((clip + 10 ** (-70 / 20) * rng.standard_normal(samples)).astype(np.float32))
    return clips


def calibration_features(source: str, config, directory: Optional[Path],
                         count: int = CALIBRATION_WINDOWS) -> torch.Tensor:
    """(count, frames, mel bins): the directory's windows spread evenly over its files (fewer if
    it holds fewer), else `count` synthetic ones."""
    filterbank = LogMelFilterbank.from_extractor(load_feature_extractor(source, config))
    if directory is None:
        return filterbank(synthetic_clips(filterbank.sampling_rate, count, Windowing.of(filterbank).length))
    features = file_features(audio_files(directory), filterbank)
    return features[np.linspace(0, len(features) - 1, min(count, len(features))).round().astype(int)]


def audio_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ClientInputError(f"--calibration_dir {directory} holds no files")
    return files


def calibration_key(directory: Optional[Path]) -> str:
    """What the calibration depends on: the generator's version, or the directory's files by
    name and content (copies made by a storage initializer have new dates, same bytes)."""
    if directory is None:
        return SYNTHETIC
    digest = hashlib.sha256()
    for path in audio_files(directory):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]
