"""Waveforms → the normalised log-mel filterbank AST was trained on.

`ASTFeatureExtractor` computes the same numbers, but without torchaudio (which has no build for
torch 2.13) it falls back to a numpy path in float64, one clip at a time (several times slower:
`make bench` measures both). This module is that numeric pipeline in torch, vectorised over frames
and over clips, with two per-frame steps rewritten as whole-signal ones (see `batch`): one
implementation for both devices, clip by clip on the CPU, a whole pass at once on a GPU. The mel filter bank and the
window come from `transformers.audio_utils`, built once with the extractor's own settings; the
frame geometry and Kaldi constants below are the ones `ASTFeatureExtractor` passes to
`spectrogram`; `tests/test_features.py` holds the result to the extractor's within 1e-4.

The named steps are Kaldi's `fbank` as the extractor configures it: 25 ms frames every 10 ms
without centring, per-frame DC removal, pre-emphasis 0.97, symmetric Hann window, 512-point power
spectrum, Kaldi-scale mel filters from 20 Hz, natural log floored at float32 epsilon; then zero-pad
or truncate to `max_length` frames and normalise with the extractor's mean and 2x std.
"""

import math
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

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
    def normalisation(self) -> tuple[float, float]:
        """(mean, scale): a log-mel value x becomes (x - mean) / scale."""
        return (self.mean, self.std * 2) if self.do_normalize else (0.0, 1.0)

    @property
    def silence(self) -> float:
        """What every bin of a frame of digital silence is: the log floor, normalised (`occlusion`)."""
        mean, scale = self.normalisation
        return (math.log(MEL_FLOOR) - mean) / scale

    def frames(self, samples: int) -> int:
        """The frames computed from a clip of `samples` (at least one frame's worth): those past
        `max_length` are cut."""
        return min(1 + (samples - FRAME_LENGTH) // HOP_LENGTH, self.max_length)

    @property
    def max_samples(self) -> int:
        """Samples that reach the model: anything later is cut by the truncation to max_length."""
        return FRAME_LENGTH + HOP_LENGTH * (self.max_length - 1)

    def __call__(self, waveforms: Sequence[np.ndarray]) -> torch.Tensor:
        """Clips of any lengths ≥ one frame → (batch, max_length, num_mel_bins) float32, on the CPU.

        Each clip is computed on its own and the results stacked: on a CPU one padded float64 batch
        moved more memory than it saved in calls, and ran 2.5x slower per clip (`make bench`).
        """
        self.check(len(waveform) for waveform in waveforms)
        return torch.cat([self.batch(torch.from_numpy(np.asarray(w[: self.max_samples], dtype=np.float32))[None],
                                     torch.tensor([min(len(w), self.max_samples)]))
                          for w in waveforms])

    def check(self, lengths: Iterable[int]) -> None:
        for length in lengths:
            if length < FRAME_LENGTH:
                raise ClientInputError(
                    f"clip is {length} samples at {self.sampling_rate} Hz; "
                    f"AST needs at least {FRAME_LENGTH} (one 25 ms frame)"
                )

    def padded(self, waveforms: Sequence[np.ndarray], out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips → what `batch` takes: (clips, longest) zero-padded float32, contiguous, at the start
        of `out` when given (a flat pinned host buffer, from which a GPU copies without a staging
        copy), and their lengths."""
        self.check(len(waveform) for waveform in waveforms)
        lengths = torch.tensor([min(len(w), self.max_samples) for w in waveforms])
        count, longest = len(waveforms), int(lengths.max())
        samples = torch.zeros(count, longest) if out is None else out[: count * longest].view(count, longest)
        for row, (waveform, length) in enumerate(zip(waveforms, lengths.tolist())):
            samples[row, :length] = torch.from_numpy(np.asarray(waveform[:length], dtype=np.float32))
            samples[row, length:] = 0
        return samples, lengths

    def to(self, device: torch.device) -> "LogMelFilterbank":
        """The same filterbank with its tensors on `device` (a GPU computes whole passes at once)."""
        return replace(self, mel_filters=self.mel_filters.to(device), window=self.window.to(device))

    def batch(self, samples: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(clips, samples) zero-padded float32 on this filterbank's device, each clip's length (at
        least one frame, at most `max_samples`) → (clips, max_length, num_mel_bins) float32 there.

        Kaldi's per-frame pre-emphasis runs once over the whole signal instead: the two differ only
        in each frame's first sample, which the symmetric Hann window multiplies by zero. Removing
        a frame's mean x before pre-emphasis is then subtracting 0.03 x after it. A clip's padding
        only reaches frames past its own last one (and the window's zeroed tail), which become
        padding. The FFT runs in float64 as the extractor's does (float32 misses by up to 2e-3 in
        quiet low bins), and so does the power (re² + im²: 3.5x faster than abs() of a complex
        tensor); it is rounded to float32 after, where the extractor rounds the spectrum to
        complex64 before (≤ 1e-7 apart). Normalising before padding makes the padding one constant.
        """
        signal = samples.double()
        count, length = len(signal), signal.shape[1]
        frames = self.frames(length)
        dc = (1 - PREEMPHASIS) * signal.unfold(1, FRAME_LENGTH, HOP_LENGTH)[:, :frames].mean(dim=-1, keepdim=True)
        emphasised = torch.zeros(count, length + FFT_LENGTH - FRAME_LENGTH, dtype=torch.float64, device=signal.device)
        emphasised[:, 0] = signal[:, 0]
        torch.sub(signal[:, 1:], signal[:, :-1], alpha=PREEMPHASIS, out=emphasised[:, 1:length])
        # FFT_LENGTH-wide frames whose tail the zero-padded window silences: no separate padding copy.
        framed = emphasised.unfold(1, FFT_LENGTH, HOP_LENGTH)[:, :frames].sub(dc).mul_(self.window)
        spectrum = torch.fft.rfft(framed)
        power = (spectrum.real.square() + spectrum.imag.square()).float()
        mel = torch.log(torch.clamp(power @ self.mel_filters, min=MEL_FLOOR))
        # The extractor pads with zeros in the log domain, then normalises.
        mean, scale = self.normalisation
        padding = (0.0 - mean) / scale
        fbank = torch.full((count, self.max_length, self.num_mel_bins), padding, device=signal.device)
        fbank[:, :frames] = mel.sub_(mean).div_(scale)
        if int(lengths.min()) < length:  # a shorter clip's frames past its own end become padding
            frames_count = 1 + (lengths.to(signal.device) - FRAME_LENGTH) // HOP_LENGTH
            past_end = torch.arange(self.max_length, device=signal.device)[None, :] >= frames_count[:, None]
            fbank.masked_fill_(past_end[..., None], padding)
        return fbank
