"""The fallback reader: audio libsndfile cannot open, decoded by FFmpeg's libraries in process.

libsndfile reads no AAC, MP4 or WebM, and those are what clients record in: phones' voice
recorders write AAC in M4A (older Android, AMR in 3GP), browsers' MediaRecorder writes Opus in
WebM. PyAV wraps the FFmpeg libraries its wheel ships, so decoding runs in this process, lazily,
block by block, with no ffmpeg subprocess per request (the transformers pipeline's `ffmpeg_read`
spawns one).

FFmpeg reads far more than audio: hundreds of demuxers and decoders, each a parser of the client's
bytes, and some demuxers open what a file refers to: an HLS playlist's segments (file:// or http://
URLs), a concat script's files, MOV data references. So FFmpeg is held to what speech comes in:
the containers in `FORMATS` (those above, plus MP3, Ogg, FLAC and WAV files that libsndfile turned
down) and the audio decoders in `DECODERS`. The input is opened from memory, never from a path nor
under a name whose extension would steer probing, and FFmpeg enforces the lists itself (`OPTIONS`),
before a demuxer reads a header or a decoder a packet: probing a video's streams decodes no video,
and every protocol is refused, so a nested open has nothing to reach; our `io_open` refuses too.
Python then checks the container and codec again before decoding.
"""

import ctypes
import io
import logging
import struct
from pathlib import Path
from typing import Iterator, Optional

import av
import numpy as np

from ..errors import ClientInputError, UnsupportedAudio
from .mp4 import check_sample_tables
from .source import Source

logger = logging.getLogger(__name__)

FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "aac", "mp3", "ogg", "flac", "wav", "amr")
"""FFmpeg's demuxers, by their full names: MP4 family, Matroska/WebM, ADTS AAC and the rest."""
ESTIMATED_DURATION = {"aac", "mp3", "amr"}
"""Demuxers whose duration may be guessed from the bit rate, not declared: no `frames` from them."""
DECODERS = ("aac", "aac_fixed", "opus", "vorbis", "mp3float", "mp3", "mp2float", "mp2", "flac", "alac",
            "amrnb", "amrwb", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le",
            "pcm_s32be", "pcm_f32le", "pcm_f32be", "pcm_f64le", "pcm_f64be", "pcm_u8", "pcm_s8",
            "pcm_alaw", "pcm_mulaw")
"""FFmpeg's audio decoders, by name (MP3 has two): the codecs these containers carry speech in."""
ALLOWED = "M4A/MP4/3GP, WebM/Matroska, ADTS AAC, MP3, Ogg, FLAC, WAV, AMR"
OPTIONS = {
    "format_whitelist": ",".join(FORMATS),
    "codec_whitelist": ",".join(DECODERS),  # the decoders avformat_find_stream_info may open
    "protocol_whitelist": "none",  # no such protocol: a nested open cannot reach file, http, ...
    "probesize": str(1 << 20),  # bytes, and microseconds: a bound on probing, ample for audio
    "analyzeduration": "5000000",
    "max_streams": "32",
}
TRUNCATION_SLACK_SECONDS = 0.25
"""Codec priming, padding and a partial last frame come to less; a file cut short misses more."""
AV_ERRORS = (av.FFmpegError, ValueError, EOFError, OSError)
MAX_FRAME_LENGTH = 65_536
"""Samples per channel in one ALAC frame (`_check_frame_length`)."""


ALLOCATION_FLOOR = 64 << 20
"""Bytes FFmpeg may always take at once, however small the requests (`cap_allocations`)."""


def cap_allocations(request_bytes: int) -> None:
    """Bound each allocation FFmpeg makes in this process by the largest request, or the floor.

    Its demuxers allocate what a header declares before they read it: a WAV of a few dozen bytes
    whose INFO chunk declared a gigabyte had FFmpeg zero a gigabyte (make fuzz found it). libavutil's
    av_max_alloc bounds every allocation of the process; past it FFmpeg fails with its own ENOMEM,
    which `open_ffmpeg` refuses like any other error. A real file needs no allocation larger than
    itself (its index, its tags), so this costs no real file anything. PyAV does not wrap
    av_max_alloc, so it is called in the libavutil that PyAV loaded."""
    libraries = {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                 if "libavutil" in line}
    if not libraries:
        logger.warning("FFmpeg's libavutil is not among this process's libraries: its allocations are not bounded")
    for library in libraries:
        ctypes.CDLL(library).av_max_alloc(ctypes.c_size_t(max(request_bytes, ALLOCATION_FLOOR)))


def open_ffmpeg(data: bytes) -> Source:
    """Open the first audio stream of an audio (or video) file; its samples decode as `blocks` are read."""
    if not data:
        raise ClientInputError("audio is empty (0 bytes)")
    check_sample_tables(data)
    try:
        container = av.open(io.BytesIO(data), container_options=OPTIONS, metadata_errors="replace",
                            io_open=_refuse_io)
    except ClientInputError:
        raise
    except av.ArgumentError:  # EINVAL: FFmpeg recognised the data as a container not on format_whitelist
        raise UnsupportedAudio(f"not in an audio container this server decodes ({ALLOWED})") from None
    except AV_ERRORS as exc:
        raise ClientInputError(f"not a complete audio file in a format FFmpeg recognises: {_reason(exc)}") from None
    try:
        return _open_stream(container)
    except ClientInputError:
        container.close()
        raise
    except AV_ERRORS as exc:
        container.close()
        raise ClientInputError(f"cannot decode the audio stream: {_reason(exc)}") from None
    except BaseException:
        container.close()
        raise


def _open_stream(container: av.container.InputContainer) -> Source:
    name = container.format.name
    if name not in FORMATS:
        raise UnsupportedAudio(f"container {name!r} is not one this server decodes ({ALLOWED})")
    if not container.streams.audio:
        raise ClientInputError(f"the file (FFmpeg's {name} container) has no audio stream")
    stream = container.streams.audio[0]
    for other in container.streams:
        if other is not stream:
            other.discard = av.stream.Discard.all  # demuxed past, never decoded
    codec = stream.codec_context
    if codec is None or codec.name not in DECODERS:
        raise UnsupportedAudio(f"audio codec {codec.name if codec else 'unknown'!r} (in FFmpeg's {name} "
                               f"container) is not one this server decodes")
    codec.options = {"codec_whitelist": OPTIONS["codec_whitelist"]}
    codec.open(strict=False)
    _check_frame_length(codec)
    rate, channels = codec.sample_rate, codec.channels
    if rate <= 0 or channels <= 0:
        raise ClientInputError(f"the audio stream (in FFmpeg's {name} container) states no sample rate or channels")
    length = None
    if stream.duration and stream.duration > 0 and stream.time_base:
        length = round(stream.duration * stream.time_base * rate)
    frames, estimated = (None, length) if name in ESTIMATED_DURATION else (length, None)
    logger.debug("ffmpeg: %s, %s, %d Hz, %d channel(s), %s frames (estimated: %s)", name, codec.name, rate, channels,
                 frames, estimated)
    blocks = _blocks(container, stream, rate, channels, frames)
    next(blocks)  # into its try, so that closing it unread still closes the container
    return Source(rate=rate, channels=channels, frames=frames, blocks=blocks, reader="ffmpeg", estimated=estimated)


def _blocks(container: av.container.InputContainer, stream: av.AudioStream, rate: int, channels: int,
            frames: Optional[int]) -> Iterator[np.ndarray]:
    """(frames, channels) float32 blocks in [-1, 1). Every frame goes through swresample into packed
    float32 (one plane), whatever format the decoder gave: PyAV 18.1's `AudioFrame.planes` walks
    `extended_data` to a NULL that planar frames of 8 or more channels do not have, and read past
    its end (other memory in the samples, or a segfault of the whole server). Converting a sample
    format at an unchanged rate is exact for floats and the usual x / 2^(bits-1) for integers."""
    decoded = 0
    packer = av.AudioResampler(format="flt")  # same rate and layout; see `_blocks`' docstring
    try:
        yield np.empty((0, channels), np.float32)  # consumed by open_ffmpeg
        for packet in container.demux(stream):
            for frame in packet.decode():
                if frame.sample_rate != rate or frame.layout.nb_channels != channels:
                    raise ClientInputError(
                        f"audio changes from {rate} Hz, {channels} channel(s) to {frame.sample_rate} Hz, "
                        f"{frame.layout.nb_channels} channel(s) after {decoded} frames; one clip must keep both"
                    )
                for packed in packer.resample(frame):
                    block = packed.to_ndarray().reshape(-1, channels)
                    decoded += len(block)
                    yield block
        if frames is not None and decoded < frames - TRUNCATION_SLACK_SECONDS * rate:
            raise ClientInputError(f"audio file is truncated: its header declares {frames} frames, "
                                   f"the file holds {decoded}")
    except ClientInputError:
        raise
    except AV_ERRORS as exc:
        raise ClientInputError(f"audio is corrupt or truncated after {decoded} frames: {_reason(exc)}") from None
    finally:
        container.close()


def _check_frame_length(codec: av.CodecContext) -> None:
    """ALAC states its frame length in its configuration (FFmpeg reads it from the `alac` atom it
    keeps as extradata: size, type, version, then the length), up to 16.7M samples a channel, and
    a frame is decoded and converted whole before a limit sees a block of it: a frame of silence
    that long costs a few bytes and gigabytes of memory. Encoders write 4096; FLAC's largest
    block, 65,535, is where a frame stops being audio anyone records."""
    if codec.name != "alac" or len(codec.extradata or b"") < 16:
        return
    (length,) = struct.unpack_from(">I", codec.extradata, 12)
    if length > MAX_FRAME_LENGTH:
        raise ClientInputError(f"the ALAC stream's frames are {length:,} samples long; this server decodes frames of "
                               f"at most {MAX_FRAME_LENGTH:,}")


def _refuse_io(url: str, flags: int, options: dict) -> None:
    """FFmpeg's hook for opening another file or URL: an audio file needs none."""
    logger.warning("ffmpeg: refused to open %r, which the client's file refers to", url[:200])
    raise ClientInputError("the file refers to another file or URL; only self-contained audio is accepted")


def _reason(exc: BaseException) -> str:
    """FFmpeg's words without PyAV's errno and the placeholder name of our in-memory file."""
    return getattr(exc, "strerror", None) or str(exc)
