"""Waveforms → the normalised log-mel filterbank AST was trained on.

`ASTFeatureExtractor` computes the same numbers, but without torchaudio (which has no build for
torch 2.13) it falls back to a numpy path in float64, one clip at a time (several times slower:
`make bench` measures both). This module is that numeric pipeline in torch, vectorised over frames, with two
per-frame steps rewritten as whole-signal ones (see `_clip`). The mel filter bank and the
window come from `transformers.audio_utils`, built once with the extractor's own settings; the
frame geometry and Kaldi constants below are the ones `ASTFeatureExtractor` passes to
`spectrogram`; `tests/test_features.py` holds the result to the extractor's within 1e-4.

The named steps are Kaldi's `fbank` as the extractor configures it: 25 ms frames every 10 ms
without centring, per-frame DC removal, pre-emphasis 0.97, symmetric Hann window, 512-point power
spectrum, Kaldi-scale mel filters from 20 Hz, natural log floored at float32 epsilon; then zero-pad
or truncate to `max_length` frames and normalise with the extractor's mean and 2x std.
"""

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import ASTFeatureExtractor
from transformers.audio_utils import mel_filter_bank, window_function

from .errors import ClientInputError

FRAME_LENGTH = 400  # 25 ms at 16 kHz; ASTFeatureExtractor fixes these three.
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon, Kaldi's log floor
MIN_FREQUENCY = 20.0


@dataclass(frozen=True)
class LogMelFilterbank:
    """The extractor's settings with the filter bank and window precomputed as tensors."""

    sampling_rate: int
    max_length: int
    mean: float
    std: float
    do_normalize: bool
    mel_filters: torch.Tensor  # (FFT_LENGTH // 2 + 1, num_mel_bins), float32
    window: torch.Tensor  # (FFT_LENGTH,) float64: symmetric Hann over FRAME_LENGTH, then zeros

    @classmethod
    def from_extractor(cls, extractor: ASTFeatureExtractor) -> "LogMelFilterbank":
        with warnings.catch_warnings():
            # 128 Kaldi-scale bins over a 512-point FFT leave the lowest filter empty, by design of
            # the AST recipe; the extractor computes the same bank, warning included.
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            filters = mel_filter_bank(
                num_frequency_bins=FFT_LENGTH // 2 + 1,
                num_mel_filters=extractor.num_mel_bins,
                min_frequency=MIN_FREQUENCY,
                max_frequency=extractor.sampling_rate // 2,
                sampling_rate=extractor.sampling_rate,
                norm=None,
                mel_scale="kaldi",
                triangularize_in_mel_space=True,
            )
        window = torch.from_numpy(window_function(FRAME_LENGTH, "hann", periodic=False, frame_length=FFT_LENGTH, center=False))
        if window[0] != 0:
            raise ValueError("whole-signal pre-emphasis needs a window that zeroes each frame's first sample")
        return cls(
            sampling_rate=extractor.sampling_rate,
            max_length=extractor.max_length,
            mean=extractor.mean,
            std=extractor.std,
            do_normalize=extractor.do_normalize,
            mel_filters=torch.from_numpy(filters).float(),
            window=window,
        )

    @property
    def num_mel_bins(self) -> int:
        return self.mel_filters.shape[1]

    @property
    def max_samples(self) -> int:
        """Samples that reach the model: anything later is cut by the truncation to max_length."""
        return FRAME_LENGTH + HOP_LENGTH * (self.max_length - 1)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """Clips of any lengths ≥ one frame → (batch, max_length, num_mel_bins) float32.

        Each clip is computed on its own and the results stacked: one padded float64 batch moved
        more memory than it saved in calls, and ran 2.5x slower per clip (`make bench`).
        """
        for waveform in waveforms:
            if len(waveform) < FRAME_LENGTH:
                raise ClientInputError(
                    f"clip is {len(waveform)} samples at {self.sampling_rate} Hz; "
                    f"AST needs at least {FRAME_LENGTH} (one 25 ms frame)"
                )
        return torch.stack([self._clip(np.asarray(w[: self.max_samples], dtype=np.float32)) for w in waveforms])

    def _clip(self, waveform: np.ndarray) -> torch.Tensor:
        """One clip's (max_length, num_mel_bins) features.

        Kaldi's per-frame pre-emphasis runs once over the whole signal instead: the two differ only
        in each frame's first sample, which the symmetric Hann window multiplies by zero. Removing
        a frame's mean x before pre-emphasis is then subtracting 0.03 x after it. The FFT runs in
        float64 as the extractor's does (float32 misses by up to 2e-3 in quiet low bins), and so
        does the power (re² + im²: 3.5x faster than abs() of a complex tensor); it is rounded to
        float32 after, where the extractor rounds the spectrum to complex64 before (≤ 1e-7 apart).
        Normalising before padding makes the padding one constant fill.
        """
        signal = torch.from_numpy(waveform).double()
        frames_count = 1 + (len(signal) - FRAME_LENGTH) // HOP_LENGTH
        dc = (1 - PREEMPHASIS) * signal.unfold(0, FRAME_LENGTH, HOP_LENGTH).mean(dim=-1, keepdim=True)
        emphasised = torch.zeros(len(signal) + FFT_LENGTH - FRAME_LENGTH, dtype=torch.float64)
        emphasised[0] = signal[0]
        torch.sub(signal[1:], signal[:-1], alpha=PREEMPHASIS, out=emphasised[1 : len(signal)])
        # FFT_LENGTH-wide frames whose tail the zero-padded window silences: no separate padding copy.
        frames = emphasised.unfold(0, FFT_LENGTH, HOP_LENGTH)[:frames_count].sub(dc).mul_(self.window)
        spectrum = torch.fft.rfft(frames)
        power = (spectrum.real.square() + spectrum.imag.square()).float()
        mel = torch.log(torch.clamp(power @ self.mel_filters, min=MEL_FLOOR))[: self.max_length]
        # The extractor pads with zeros in the log domain, then normalises.
        mean, scale = (self.mean, self.std * 2) if self.do_normalize else (0.0, 1.0)
        fbank = torch.full((self.max_length, self.num_mel_bins), (0.0 - mean) / scale)
        fbank[: len(mel)] = mel.sub_(mean).div_(scale)
        return fbank
