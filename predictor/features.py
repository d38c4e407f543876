"""Waveforms → the normalised log-mel filterbank AST was trained on, for a whole batch at once.

`ASTFeatureExtractor` computes the same numbers, but without torchaudio (which has no build for
torch 2.13) it falls back to a numpy path in float64, one clip at a time (about 20 ms per 10 s
clip here). This module is that numeric pipeline in torch over whole batches, with two
per-frame steps rewritten as whole-signal ones (see `__call__`). The mel filter bank and the
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

        Kaldi's per-frame pre-emphasis runs once over the whole signal instead: the two differ only
        in each frame's first sample, which the symmetric Hann window multiplies by zero. Removing
        a frame's mean x before pre-emphasis is then subtracting 0.03 x after it. The FFT runs in
        float64 as the extractor's does (float32 misses by up to 2e-3 in quiet low bins); the
        spectrum is then rounded to complex64, as the extractor stores it.
        """
        for waveform in waveforms:
            if len(waveform) < FRAME_LENGTH:
                raise ClientInputError(
                    f"clip is {len(waveform)} samples at {self.sampling_rate} Hz; "
                    f"AST needs at least {FRAME_LENGTH} (one 25 ms frame)"
                )
        signal = self._pad([w[: self.max_samples] for w in waveforms], FFT_LENGTH - FRAME_LENGTH)
        unpadded = signal[:, : signal.shape[1] - (FFT_LENGTH - FRAME_LENGTH)]
        dc = (1 - PREEMPHASIS) * unpadded.unfold(1, FRAME_LENGTH, HOP_LENGTH).mean(dim=-1, keepdim=True)
        emphasised = torch.cat((signal[:, :1], signal[:, 1:] - PREEMPHASIS * signal[:, :-1]), dim=1)
        # FFT_LENGTH-wide frames whose tail the zero-padded window silences: no separate padding copy.
        frames = emphasised.unfold(1, FFT_LENGTH, HOP_LENGTH).sub(dc).mul_(self.window)
        power = torch.fft.rfft(frames).to(torch.complex64).abs().square()
        fbank = torch.log(torch.clamp(power @ self.mel_filters, min=MEL_FLOOR))
        fbank = self._mask_beyond_each_clip(fbank, waveforms)
        if self.do_normalize:
            fbank = (fbank - self.mean) / (self.std * 2)
        return fbank

    def _pad(self, waveforms: list[np.ndarray], extra: int) -> torch.Tensor:
        """Right-pad to the longest clip plus `extra` zeros, into one float64 batch as the extractor computes."""
        length = max(len(w) for w in waveforms) + extra
        batch = torch.zeros(len(waveforms), length, dtype=torch.float64)
        for row, waveform in zip(batch, waveforms):
            row[: len(waveform)] = torch.from_numpy(np.asarray(waveform, dtype=np.float32))
        return batch

    def _mask_beyond_each_clip(self, fbank: torch.Tensor, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """Zero the frames past each clip's own end and pad the time axis to `max_length`.

        The extractor pads with zeros in the log domain (before normalisation), so frames that
        only exist because a longer batch-mate needed them must read 0, not log(mel_floor).
        """
        frames_per_clip = torch.tensor(
            [min(1 + (len(w) - FRAME_LENGTH) // HOP_LENGTH, self.max_length) for w in waveforms]
        )
        padded = torch.zeros(fbank.shape[0], self.max_length, fbank.shape[2], dtype=fbank.dtype)
        computed = min(fbank.shape[1], self.max_length)
        padded[:, :computed] = fbank[:, :computed]
        keep = torch.arange(self.max_length)[None, :] < frames_per_clip[:, None]
        return padded * keep[..., None]
