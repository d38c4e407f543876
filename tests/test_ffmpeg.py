"""The FFmpeg fallback reader on files the ffmpeg CLI makes from a known signal, and its refusals.

What libsndfile cannot read (AAC in M4A/MP4, ADTS, Opus in WebM, ALAC) must decode to the signal it
was made from; everything else FFmpeg could read (playlists, concat scripts, images, subtitles)
must be refused before it opens anything. Files a demuxer might open are named FIFOs: opening one
would block, so a test that finishes has shown nothing was opened.
"""

import http.server
import io
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest
import soundfile as sf

from predictor.audio import ffmpeg, mp4
from predictor.audio.ffmpeg import open_ffmpeg
from predictor.errors import ClientInputError

from .conftest import nested_boxes

SECONDS = 0.5
FREQUENCIES = (440.0, 1000.0)  # left, right: a swapped or interleaved channel shows
CODEC_SLACK = 2048  # AAC's priming frame and its last frame's padding; other codecs need less


def signal(rate: int, channels: int) -> np.ndarray:
    """(frames, channels) tones under a rising envelope, so that blocks out of order would show."""
    t = np.arange(int(SECONDS * rate)) / rate
    envelope = 0.1 + 0.5 * t / SECONDS
    return np.stack([envelope * np.sin(2 * np.pi * f * t) for f in FREQUENCIES[:channels]], axis=1).astype(np.float32)


def make(tmp_path: Path, rate: int, channels: int, suffix: str, *args: str) -> bytes:
    """The signal as a WAV, turned by the ffmpeg CLI into `suffix` with `args`."""
    wav, out = tmp_path / "in.wav", tmp_path / f"out{suffix}"
    sf.write(wav, signal(rate, channels), rate, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), *args, str(out)],
                   check=True, timeout=60)
    return out.read_bytes()


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def best_correlation(decoded: np.ndarray, original: np.ndarray) -> float:
    """Normalised correlation at the lag (within the codec slack) that lines the two up best."""
    size = len(decoded) + len(original)
    full = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(original, size)), size)
    lags = np.r_[full[:CODEC_SLACK + 1], full[-CODEC_SLACK:]]
    return float(lags.max() / np.sqrt(np.dot(decoded, decoded) * np.dot(original, original)))


VIDEO_FIRST = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-map", "1:v", "-map", "0:a", "-c:v", "mpeg4",
               "-c:a", "aac", "-shortest"]
FORMATS = {  # name: (rate, channels, suffix, ffmpeg's output options, the rate it decodes at)
    "m4a-aac-stereo-44k": (44100, 2, ".m4a", ["-c:a", "aac"], 44100),
    "m4a-aac-mono-48k": (48000, 1, ".m4a", ["-c:a", "aac"], 48000),
    "m4a-alac-stereo-44k": (44100, 2, ".m4a", ["-c:a", "alac"], 44100),
    "m4a-alac-mono-48k": (48000, 1, ".m4a", ["-c:a", "alac"], 48000),
    "webm-opus-stereo-48k": (48000, 2, ".webm", ["-c:a", "libopus"], 48000),
    "webm-opus-mono-44k": (44100, 1, ".webm", ["-c:a", "libopus"], 48000),  # Opus always runs at 48 kHz
    "adts-aac-stereo-44k": (44100, 2, ".aac", ["-c:a", "aac", "-f", "adts"], 44100),
    "mp4-video-then-aac-44k": (44100, 2, ".mp4", VIDEO_FIRST, 44100),
    "mp3-mono-44k": (44100, 1, ".mp3", ["-c:a", "libmp3lame"], 44100),
    "ogg-vorbis-stereo-48k": (48000, 2, ".ogg", ["-c:a", "libvorbis"], 48000),
    "flac-s32-stereo-48k": (48000, 2, ".flac", ["-c:a", "flac", "-sample_fmt", "s32"], 48000),
    "wav-u8-mono-44k": (44100, 1, ".wav", ["-c:a", "pcm_u8"], 44100),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_decodes_to_the_signal_it_was_made_from(tmp_path, name):
    rate, channels, suffix, args, decoded_rate = FORMATS[name]
    source = open_ffmpeg(make(tmp_path, rate, channels, suffix, *args))
    assert (source.rate, source.channels, source.reader) == (decoded_rate, channels, "ffmpeg")
    blocks = list(source.blocks)
    assert len(blocks) > 1  # decoded as read, not all at once
    assert all(b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == channels for b in blocks)
    decoded = np.concatenate(blocks)
    original = signal(decoded_rate, channels)
    assert abs(len(decoded) - len(original)) <= CODEC_SLACK
    if source.frames is not None:
        assert abs(source.frames - len(decoded)) <= CODEC_SLACK
    for channel in range(channels):
        assert abs(dominant_frequency(decoded[:, channel], decoded_rate) - FREQUENCIES[channel]) <= 4
        assert best_correlation(decoded[:, channel], original[:, channel]) > 0.95
        rms, expected = np.sqrt(np.mean(decoded[:, channel] ** 2)), np.sqrt(np.mean(original[:, channel] ** 2))
        assert abs(rms / expected - 1) < 0.1  # the sample format's scale is right


def test_tags_that_are_not_utf8_do_not_refuse_the_audio(tmp_path):
    wav, out = tmp_path / "in.wav", tmp_path / "tagged.m4a"
    sf.write(wav, signal(44100, 1), 44100)
    subprocess.run([b"ffmpeg", b"-nostdin", b"-loglevel", b"error", b"-i", bytes(wav), b"-c:a", b"aac",
                    b"-metadata", b"title=\xff\xfe not UTF-8", bytes(out)], check=True, timeout=60)
    source = open_ffmpeg(out.read_bytes())
    assert len(np.concatenate(list(source.blocks))) >= len(signal(44100, 1))


def test_frames_are_declared_only_where_the_container_states_them(tmp_path):
    assert open_ffmpeg(make(tmp_path, 44100, 2, ".m4a", "-c:a", "aac")).frames == int(SECONDS * 44100)
    # ADTS has no length field (FFmpeg guesses one from the bit rate); FFmpeg reports no track length for
    # Matroska (and MediaRecorder's WebM states no duration at all).
    assert open_ffmpeg(make(tmp_path, 44100, 2, ".aac", "-c:a", "aac", "-f", "adts")).frames is None
    assert open_ffmpeg(make(tmp_path, 48000, 2, ".webm", "-c:a", "libopus")).frames is None


def opened_containers(monkeypatch) -> list:
    opened, real_open = [], av.open
    monkeypatch.setattr(ffmpeg.av, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    return opened


def is_closed(container) -> bool:
    try:
        container.duration
    except AssertionError:  # PyAV: "Container is not open"
        return True
    return False


@pytest.mark.parametrize("read", [0, 2, "all"])
def test_the_container_closes_with_the_blocks(tmp_path, monkeypatch, read):
    data = make(tmp_path, 44100, 2, ".m4a", "-c:a", "aac")
    opened = opened_containers(monkeypatch)
    source = open_ffmpeg(data)
    if read == "all":
        list(source.blocks)  # to the end
    else:
        for _ in range(read):
            next(source.blocks)
        assert not is_closed(opened[0])
        source.blocks.close()  # what a reader that stops early does
    assert is_closed(opened[0])


def test_a_video_s_audio_is_demuxed_alone_and_its_video_never_decoded(tmp_path, monkeypatch):
    data = make(tmp_path, 44100, 2, ".mp4", *VIDEO_FIRST)
    opened = opened_containers(monkeypatch)
    source = open_ffmpeg(data)
    next(source.blocks)
    video = opened[0].streams.video[0]
    assert video.discard == av.stream.Discard.all and not video.codec_context.is_open
    source.blocks.close()


def test_a_file_whose_rate_or_channels_change_midway_is_refused(tmp_path):
    first = make(tmp_path, 44100, 2, ".aac", "-c:a", "aac", "-f", "adts")
    for rate, channels in [(48000, 2), (44100, 1)]:
        source = open_ffmpeg(first + make(tmp_path, rate, channels, ".aac", "-c:a", "aac", "-f", "adts"))
        with pytest.raises(ClientInputError, match="changes from 44100 Hz, 2 channel"):
            list(source.blocks)


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (np.random.default_rng(0).bytes(4096), "not a complete audio file|not in an audio container"),
    (b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n2\n00:00:01,000 --> 00:00:02,000\nworld\n",  # SubRip
     "not in an audio container"),
])
def test_what_is_not_audio_is_refused(data, problem):
    with pytest.raises(ClientInputError, match=problem):
        open_ffmpeg(data)


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_images_are_refused(tmp_path, suffix):
    out = tmp_path / f"image{suffix}"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64",
                    "-frames:v", "1", str(out)], check=True, timeout=60)
    with pytest.raises(ClientInputError, match="not in an audio container"):
        open_ffmpeg(out.read_bytes())


def test_a_video_without_audio_is_refused(tmp_path):
    out = tmp_path / "video.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:d=1",
                    "-c:v", "mpeg4", str(out)], check=True, timeout=60)
    with pytest.raises(ClientInputError, match="has no audio stream"):
        open_ffmpeg(out.read_bytes())


def test_an_audio_codec_off_the_list_is_refused_by_us_and_by_ffmpeg(tmp_path, monkeypatch):
    data = make(tmp_path, 48000, 2, ".mka", "-c:a", "ac3")
    with pytest.raises(ClientInputError, match="audio codec 'ac3'"):
        open_ffmpeg(data)
    monkeypatch.setattr(ffmpeg, "DECODERS", ffmpeg.DECODERS + ("ac3",))  # past our check: FFmpeg's codec_whitelist
    with pytest.raises(ClientInputError, match="cannot decode the audio stream"):
        open_ffmpeg(data)


def test_sample_tables_that_declare_more_samples_than_bytes_are_refused_before_ffmpeg_opens_them(tmp_path):
    """An M4A whose `stsz` says 80 million samples of one byte (a few bytes changed): FFmpeg would
    index every one of them as it opened the file, gigabytes for a file of a few KB. The file as
    the CLI made it opens; the changed one is refused from its tables, saying so."""
    data = make(tmp_path, 16000, 1, ".m4a", "-c:a", "aac")
    assert open_ffmpeg(data).frames
    changed = bytearray(data)
    at = changed.index(b"stsz") + 4
    changed[at + 4 : at + 12] = (1).to_bytes(4, "big") + (80_000_000).to_bytes(4, "big")  # size 1, count
    with pytest.raises(ClientInputError, match=f"the MP4 file's sample tables declare 80,000,000 samples in a file of "
                                               f"{len(data):,} bytes"):
        open_ffmpeg(bytes(changed))


@pytest.mark.parametrize("name", [b"moov", b"stbl"])
def test_boxes_nested_deeper_than_ffmpeg_reads_are_refused_from_the_walk_of_their_headers(tmp_path, name):
    """A few KB of nested box headers: walked by recursion, they passed Python's recursion limit (a
    server fault) and took seconds on their way there (each box passed up through every level, each
    `stbl` walked again). The depth FFmpeg itself reads is kept: a real file opens, and so does one
    with boxes that deep; one level deeper is refused, and so are 1,500, at once."""
    data = make(tmp_path, 16000, 1, ".m4a", "-c:a", "aac")
    assert open_ffmpeg(data).frames
    head = data[: int.from_bytes(data[:4], "big")]  # the CLI's `ftyp`
    assert mp4.declared_samples(head + nested_boxes(name, mp4.MAX_DEPTH)) == 0
    for depth in (mp4.MAX_DEPTH + 1, 1500):
        with pytest.raises(ClientInputError, match=f"the MP4 file nests '{name.decode()}' boxes more than "
                                                   f"{mp4.MAX_DEPTH} deep, deeper than FFmpeg reads"):
            open_ffmpeg(head + nested_boxes(name, depth))


def test_alac_frames_past_the_longest_are_refused_before_one_is_decoded(tmp_path):
    """ALAC's configuration states its frame length (the ffmpeg CLI writes 4096); one frame of 16.7M
    samples of silence costs a few bytes and would be decoded whole. Refused from the configuration."""
    data = make(tmp_path, 16000, 1, ".m4a", "-c:a", "alac")
    assert open_ffmpeg(data).frames
    changed = bytearray(data)
    at = changed.index((36).to_bytes(4, "big") + b"alac") + 8  # the `alac` atom FFmpeg keeps: size, type, version
    assert int.from_bytes(changed[at + 4 : at + 8], "big") == 4096
    changed[at + 4 : at + 8] = (1 << 24).to_bytes(4, "big")
    with pytest.raises(ClientInputError, match="the ALAC stream's frames are 16,777,216 samples long; this server "
                                               "decodes frames of at most 65,536"):
        open_ffmpeg(bytes(changed))


def test_truncated_files_are_refused(tmp_path):
    """A file whose header promises more than its body holds is an error, not a shorter clip."""
    at_end = make(tmp_path, 44100, 2, ".m4a", "-c:a", "aac")  # ffmpeg's default: the index after the samples
    with pytest.raises(ClientInputError, match="not a complete audio file"):
        open_ffmpeg(at_end[: len(at_end) // 2])
    faststart = make(tmp_path, 44100, 2, ".m4a", "-c:a", "aac", "-movflags", "+faststart")  # as phones write
    with pytest.raises(ClientInputError, match="truncated"):
        list(open_ffmpeg(faststart[: len(faststart) // 2]).blocks)
    # Cut between two packets, the file ends where FFmpeg's demuxer sees a clean end: our own check.
    with av.open(io.BytesIO(faststart)) as container:
        starts = [packet.pos for packet in container.demux(audio=0) if packet.pos is not None and packet.pos > 0]
    with pytest.raises(ClientInputError, match="header declares 22050 frames, the file holds"):
        list(open_ffmpeg(faststart[: starts[len(starts) // 2]]).blocks)


# Files that refer to other files and URLs.

@pytest.fixture
def http_server() -> Iterator[tuple[str, list]]:
    """A loopback server that records every request it gets."""
    requests: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.ts"
    os.mkfifo(path)
    return path


def playlist(url: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}\n#EXT-X-ENDLIST\n".encode()


def concat(path: Path) -> bytes:
    return f"ffconcat version 1.0\nfile {path}\n".encode()


@pytest.mark.timeout(30)
def test_playlists_and_concat_scripts_are_refused_without_opening_what_they_name(http_server, fifo):
    url, requests = http_server
    for data in [playlist(f"{url}/x.ts"), playlist(f"file://{fifo}"), concat(fifo)]:
        with pytest.raises(ClientInputError):
            open_ffmpeg(data)
    assert requests == []


@pytest.mark.timeout(30)
def test_each_defence_alone_keeps_ffmpeg_from_what_a_file_names(http_server, fifo, tmp_path):
    """The HLS and concat demuxers forced on, each guard on its own; unguarded, they do reach out."""
    url, requests = http_server
    with pytest.raises(av.FFmpegError):  # the control: the threat is real and the server would see it
        av.open(io.BytesIO(playlist(f"{url}/control.ts")), format="hls")
    wav = tmp_path / "local.wav"
    sf.write(wav, signal(8000, 1), 8000)
    with av.open(io.BytesIO(concat(wav)), options={"safe": "0"}) as local:  # and a local file would be read
        assert local.streams.audio
    assert requests and set(requests) == {"/control.ts"}

    with pytest.raises(av.ArgumentError):  # format_whitelist, even when the demuxer is forced
        av.open(io.BytesIO(playlist(f"{url}/x.ts")), format="hls", container_options=ffmpeg.OPTIONS)
    unlisted = {"allowed_extensions": "ALL", "safe": "0"}  # nor do the demuxers' own checks stop these
    nested = [(playlist(f"{url}/x.ts"), "hls"), (playlist(f"file://{fifo}"), "hls"), (concat(fifo), "concat")]
    for data, demuxer in nested:
        with pytest.raises(av.FFmpegError):  # protocol_whitelist alone
            av.open(io.BytesIO(data), format=demuxer,
                    container_options={**ffmpeg.OPTIONS, "format_whitelist": demuxer, **unlisted})
    no_protocols = {key: value for key, value in ffmpeg.OPTIONS.items() if key != "protocol_whitelist"}
    for data in [playlist(f"{url}/x.ts"), playlist(f"file://{fifo}")]:
        with pytest.raises(ClientInputError, match="refers to another file"):  # our io_open alone
            av.open(io.BytesIO(data), format="hls", io_open=ffmpeg._refuse_io,
                    container_options={**no_protocols, "format_whitelist": "hls", **unlisted})
    assert set(requests) == {"/control.ts"}
