"""`predictor.features` against transformers' `ASTFeatureExtractor`, the numeric reference."""

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor

from predictor.errors import ClientInputError
from predictor.features import LogMelFilterbank

from tools.random_ast import TINY_FEATURES

from .conftest import tone

RATE = 16000
TOLERANCE = 1e-4


def reference(extractor: ASTFeatureExtractor, clips: list[np.ndarray]) -> np.ndarray:
    return extractor(clips, sampling_rate=RATE, return_tensors="np")["input_values"]


def clips_of_every_kind(speech: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        speech,
        rng.standard_normal(RATE * 12).astype(np.float32) * 0.3,  # longer than max_length: truncated
        tone(1000, 2.0, RATE) + 0.25,  # a DC offset, which Kaldi removes per frame
        np.zeros(RATE, np.float32),  # digital silence: the log floor
        rng.standard_normal(400).astype(np.float32),  # exactly one frame
        np.clip(rng.standard_normal(RATE * 3) * 2, -1, 1).astype(np.float32),  # clipped, full scale
    ]


@pytest.mark.parametrize("settings", [{}, TINY_FEATURES, {"do_normalize": False}], ids=["ast-default", "tiny", "raw"])
def test_batch_equals_the_extractor_clip_by_clip(speech_16k, settings):
    extractor = ASTFeatureExtractor(**settings)
    clips = clips_of_every_kind(speech_16k)
    ours = LogMelFilterbank.from_extractor(extractor)(clips).numpy()
    expected = reference(extractor, clips)
    assert ours.shape == expected.shape == (len(clips), extractor.max_length, extractor.num_mel_bins)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("settings", [{}, TINY_FEATURES], ids=["ast-default", "tiny"])
def test_a_padded_batch_at_once_equals_the_extractor(speech_16k, settings):
    """The path a GPU takes (every window of a pass in one padded batch), run here on the CPU."""
    extractor = ASTFeatureExtractor(**settings)
    clips = clips_of_every_kind(speech_16k)
    filterbank = LogMelFilterbank.from_extractor(extractor)
    ours = filterbank.batch(*filterbank.padded(clips)).numpy()
    np.testing.assert_allclose(ours, reference(extractor, clips), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours, filterbank(clips).numpy(), atol=1e-6, rtol=0)


def test_padding_into_a_reused_buffer_leaves_nothing_of_the_last_pass(speech_16k):
    filterbank = LogMelFilterbank.from_extractor(ASTFeatureExtractor())
    buffer = torch.full((4 * filterbank.max_samples,), 7.0)
    samples, lengths = filterbank.padded([speech_16k[:RATE], speech_16k[: RATE // 2]], out=buffer)
    assert samples.shape == (2, RATE) and lengths.tolist() == [RATE, RATE // 2]
    assert samples.data_ptr() == buffer.data_ptr() and samples.is_contiguous()  # copied to a GPU as it is
    assert not samples[1, RATE // 2 :].any()
    np.testing.assert_array_equal(samples[0].numpy(), speech_16k[:RATE])


def test_a_clip_does_not_depend_on_its_batch_mates(speech_16k):
    filterbank = LogMelFilterbank.from_extractor(ASTFeatureExtractor())
    short = speech_16k[: RATE // 2]
    alone = filterbank([short]).numpy()
    with_longer = filterbank([short, np.ones(RATE * 11, np.float32) * 0.1]).numpy()
    np.testing.assert_array_equal(alone[0], with_longer[0])


def test_padding_frames_are_the_extractors_normalised_zero(speech_16k):
    extractor = ASTFeatureExtractor()
    features = LogMelFilterbank.from_extractor(extractor)([speech_16k[:RATE]]).numpy()[0]
    frames = 1 + (RATE - 400) // 160
    np.testing.assert_allclose(features[frames:], (0 - extractor.mean) / (2 * extractor.std), rtol=0, atol=1e-6)


def test_a_clip_shorter_than_one_frame_is_refused():
    with pytest.raises(ClientInputError, match="399 samples.*at least 400"):
        LogMelFilterbank.from_extractor(ASTFeatureExtractor())([np.zeros(399, np.float32)])


def test_a_part_of_a_padded_batch_equals_its_clips_alone(speech_16k):
    """A pass split after running out of GPU memory computes slices of the padded batch: a slice of
    one short clip keeps the longest clip's width, and its frames past its own end are padding."""
    filterbank = LogMelFilterbank.from_extractor(ASTFeatureExtractor())
    clips = [speech_16k[:RATE], np.ones(RATE * 11, np.float32) * 0.1, speech_16k[: RATE // 3]]
    samples, lengths = filterbank.padded(clips)
    for start, end in ((0, 1), (2, 3), (0, 2)):
        np.testing.assert_allclose(filterbank.batch(samples[start:end], lengths[start:end]).numpy(),
                                   filterbank(clips[start:end]).numpy(), atol=1e-6, rtol=0)
