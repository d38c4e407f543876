"""Decoding, downmix and resampling: `predictor.audio` on real encoded files."""

import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from predictor import audio
from predictor.config import Config
from predictor.errors import ClientInputError

from .conftest import encode, tone

RATE = 16000
TARGET = audio.Target(rate=RATE, max_seconds=60)


def dominant_frequency(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    "fmt, subtype, tolerance",
    [
        ("WAV", "PCM_U8", 1e-2),
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "PCM_24", 1e-6),
        ("WAV", "PCM_32", 1e-6),
        ("WAV", "FLOAT", 0.0),
        ("FLAC", "PCM_16", 1e-4),
        ("FLAC", "PCM_24", 1e-6),
        ("OGG", "VORBIS", None),
        ("OGG", "OPUS", None),
        ("MP3", "MPEG_LAYER_III", None),
    ],
)
def test_each_format_decodes_to_the_same_signal(speech_16k, fmt, subtype, tolerance):
    rate = 48000 if subtype == "OPUS" else RATE  # Opus only runs at 48 kHz
    source = speech_16k if rate == RATE else soxr.resample(speech_16k, RATE, rate).astype(np.float32)
    decoded = audio.decode(encode(source, rate, fmt, subtype), TARGET)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    if tolerance is not None:  # lossless containers give the samples back
        np.testing.assert_allclose(decoded, speech_16k, atol=tolerance + 1e-7)
    else:  # lossy codecs: same duration, still clearly the same signal (codec delay allowed)
        assert abs(len(decoded) - len(speech_16k)) < 0.1 * RATE
        n = min(len(decoded), len(speech_16k))
        correlation = np.correlate(decoded[:n], speech_16k[:n], mode="full").max()
        assert correlation / np.dot(speech_16k[:n], speech_16k[:n]) > 0.5


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_a_1khz_tone_stays_1khz_at_any_rate(rate):
    decoded = audio.decode(encode(tone(1000, 2.0, rate), rate, "WAV", "PCM_16"), TARGET)
    assert abs(len(decoded) - 2 * RATE) <= 1
    # Stated tolerance: one FFT bin of a 2 s analysis (0.5 Hz).
    assert abs(dominant_frequency(decoded, RATE) - 1000) <= 0.5


def test_resampling_is_band_limited():
    """A 7 kHz tone at 44.1 kHz is kept; 12 kHz (above the new Nyquist) is removed, not aliased to 4 kHz."""
    rate = 44100
    kept = audio.decode((tone(7000, 1.0, rate), rate), TARGET)
    removed = audio.decode((tone(12000, 1.0, rate), rate), TARGET)
    assert np.sqrt(np.mean(kept**2)) > 0.3
    assert np.sqrt(np.mean(removed[1000:-1000] ** 2)) < 1e-3


def test_stereo_is_the_channel_mean():
    left, right = tone(440, 1.0, RATE, 0.4), tone(880, 1.0, RATE, 0.2)
    decoded = audio.decode(encode(np.stack([left, right], axis=1), RATE, "FLAC", "PCM_24"), TARGET)
    np.testing.assert_allclose(decoded, (left + right) / 2, atol=1e-6)


def test_any_channel_count_downmixes():
    channels = np.stack([tone(200 * (c + 1), 0.5, RATE, 0.1) for c in range(6)], axis=1)
    decoded = audio.decode(encode(channels, RATE, "WAV", "FLOAT"), TARGET)
    np.testing.assert_allclose(decoded, channels.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not audio at all" * 10, "could not decode"),
        (encode(np.zeros((0,), np.float32), RATE, "WAV", "PCM_16"), "no samples"),
    ],
)
def test_unreadable_input_names_the_problem(data, message):
    with pytest.raises(ClientInputError, match=message):
        audio.decode(data, TARGET)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16")])
def test_truncated_file_is_refused(speech_16k, fmt, subtype):
    data = encode(speech_16k, RATE, fmt, subtype)
    with pytest.raises(ClientInputError, match="truncated|corrupt|decode"):
        audio.decode(data[: len(data) // 2], TARGET)


def test_too_long_is_refused_before_decoding():
    data = encode(np.zeros(RATE * 5, np.float32), RATE, "WAV", "PCM_16")
    limited = audio.Target(RATE, max_seconds=4)
    with pytest.raises(ClientInputError, match="5.0 s long.*at most 4 s"):
        audio.open_clip(data, limited)
    with pytest.raises(ClientInputError, match="5.0 s long.*at most 4 s"):
        audio.open_clip((np.zeros(RATE * 5, np.float32), RATE), limited)


def test_nan_samples_are_refused():
    samples = tone(440, 0.5, RATE)
    samples[100] = np.nan
    with pytest.raises(ClientInputError, match="1 NaN or infinite"):
        audio.decode(encode(samples, RATE, "WAV", "FLOAT"), TARGET)


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, "16000", True, 10_000_000])
def test_bad_sampling_rates_are_refused(rate):
    with pytest.raises(ClientInputError, match="sampling_rate"):
        audio.decode((tone(440, 0.5, RATE), rate), TARGET)


def test_waveform_must_be_mono():
    with pytest.raises(ClientInputError, match="one-dimensional"):
        audio.decode((np.zeros((2, 100), np.float32), RATE), TARGET)


@pytest.mark.parametrize("rate", [RATE, 44100, 96000])
def test_long_files_decode_whole_and_stream_to_the_same_samples(rate):
    """A 70 s file (many decoding blocks) is decoded whole; block-by-block downmix and resampling
    give exactly what downmixing and resampling the whole signal at once gives."""
    rng = np.random.default_rng(1)
    stereo = (0.1 * rng.standard_normal((rate * 70, 2))).astype(np.float32)
    decoded = audio.decode(encode(stereo, rate, "WAV", "FLOAT"), audio.Target(RATE, max_seconds=600))
    mono = stereo.mean(axis=1, dtype=np.float32)
    whole = mono if rate == RATE else soxr.resample(mono, rate, RATE, quality="HQ")
    assert len(decoded) == len(whole) and abs(len(decoded) - 70 * RATE) <= 1
    np.testing.assert_allclose(decoded, whole, atol=1e-7, rtol=0)


def ffmpeg_cli(source: np.ndarray, rate: int, tmp_path, *args: str) -> bytes:
    """The ffmpeg CLI's encoding of a float WAV, written to its standard output (a pipe)."""
    wav = tmp_path / "in.wav"
    sf.write(wav, source, rate, subtype="FLOAT")
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), *args, "-"], check=True,
                          capture_output=True, timeout=60).stdout


def test_a_length_the_header_does_not_state_is_limited_while_decoding(tmp_path):
    """A FLAC written to a pipe states no length: it opens, and the limit stops its decoding."""
    data = ffmpeg_cli(tone(440, 6.0, RATE), RATE, tmp_path, "-f", "flac")
    target = audio.Target(RATE, max_seconds=4)
    source = audio.open_clip(data, target)
    assert source.frames is None
    with pytest.raises(ClientInputError, match="longer than 4 s; this server accepts at most 4 s per clip"):
        target.waveform(source)
    whole = audio.decode(data, TARGET)
    np.testing.assert_allclose(whole, tone(440, 6.0, RATE), atol=1e-4)


def test_a_vbr_mp3_without_a_length_header_is_decoded_whole(tmp_path):
    """libsndfile only estimates an MP3's length and soundfile stops there: a VBR file without a
    Xing header, loud then quiet, came out a fraction of its length. FFmpeg reads it to the end."""
    rng = np.random.default_rng(2)
    loud_then_quiet = np.concatenate([0.5 * rng.standard_normal(RATE), 0.01 * rng.standard_normal(19 * RATE)])
    data = ffmpeg_cli(loud_then_quiet.astype(np.float32), RATE, tmp_path, "-c:a", "libmp3lame", "-q:a", "9",
                      "-write_xing", "0", "-f", "mp3")
    decoded = audio.decode(data, TARGET)
    assert abs(len(decoded) - 20 * RATE) < 0.1 * RATE


def test_many_channels_downmix_block_by_block():
    """64 channels: blocks hold a fixed number of samples across channels, and the mean is exact."""
    rng = np.random.default_rng(4)
    channels = (0.1 * rng.standard_normal((RATE * 3, 64))).astype(np.float32)
    decoded = audio.decode(encode(channels, RATE, "WAV", "FLOAT"), TARGET)
    np.testing.assert_allclose(decoded, channels.mean(axis=1, dtype=np.float32), atol=1e-7)


def test_the_default_sample_budget_takes_ten_minutes_of_48k_stereo_and_not_a_frame_more():
    budget = audio.SampleBudget(Config().max_request_samples)
    stereo = [audio.Source(rate=48000, channels=2, frames=600 * 48000, blocks=iter(()), reader="test")]
    budget.check_declared(stereo)
    stereo[0].frames += 1
    with pytest.raises(ClientInputError, match=r"holds 57,600,002 samples \(600.0 s x 2 channel\(s\) at 48000 Hz\): "
                                               r"2 more than this server decodes per request"):
        budget.check_declared(stereo)
