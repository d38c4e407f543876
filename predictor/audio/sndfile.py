"""libsndfile's reader (through soundfile): WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF and the rest.

The first reader tried: it is the one the pipeline-parity tests pin down, and it reads the
formats most clients send without FFmpeg; of what it can parse, only `ALLOWED` is decoded. What it cannot open goes to `ffmpeg`, and so do two
kinds of file it opens but whose length it only guesses, since soundfile never reads past that
guess: MP3 (a VBR file without a Xing header would be cut short, or refused as too long) and
files whose header leaves the length open (a FLAC written to a pipe).
"""

import io
import re
from typing import Iterator, Optional

import numpy as np
import soundfile as sf

from ..errors import ClientInputError, UnsupportedAudio
from .source import Source

_PCM = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
_WAV = _PCM + ("ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM")
ALLOWED = {"WAV": _WAV, "WAVEX": _WAV, "RF64": _WAV, "W64": _WAV, "AIFF": _PCM + ("ULAW", "ALAW"),
           "FLAC": _PCM, "OGG": ("VORBIS", "OPUS"), "CAF": _PCM}
"""libsndfile's formats and sample encodings this server reads: what recorders, browsers, DAWs and
telephony write (IMA/MS ADPCM: dictation recorders' WAVs). libsndfile parses some forty more
(PAF, VOC, NIST, IRCAM, HTK, SVX, XI, G.721 WAV, ...), few clients send them, and their parsers are
the least exercised, so they are refused (415) before a sample is read."""
ACCEPTED = ("WAV/WAVEX/RF64/W64 (PCM, float, mu-law, A-law, IMA/MS ADPCM), AIFF/AIFC, FLAC, Ogg Vorbis/Opus, "
            "CAF (PCM), MP3, M4A/MP4 (AAC, ALAC), WebM/Matroska (Opus, Vorbis), ADTS AAC, AMR")
BLOCK_SAMPLES = 131_072  # per block, all channels together: a block's memory does not grow with the channels
TRUNCATED_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")
UNKNOWN_CHUNK_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}
UNKNOWN_FRAMES = 2**62  # libsndfile's SF_COUNT_MAX, or near it: the header does not say


class NotReadable(Exception):
    """libsndfile does not open these bytes; another reader may."""


def open_sndfile(data: bytes) -> Source:
    try:
        file = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise NotReadable(reason(exc)) from None
    try:
        if file.format == "MP3" or file.frames >= UNKNOWN_FRAMES:
            raise NotReadable(f"libsndfile only estimates the length of this {file.format} file")
        if file.subtype not in ALLOWED.get(file.format, ()):
            raise UnsupportedAudio(f"audio in {file.format_info} with {file.subtype_info} samples is not a format this "
                                   f"server decodes; it takes {ACCEPTED}")
        _check_truncation(file)
    except (NotReadable, ClientInputError):
        file.close()
        raise
    frames: Optional[int] = file.frames if file.frames > 0 else None
    blocks = _blocks(file)
    next(blocks)  # into its `with`, so that closing it unread still closes the file
    return Source(rate=file.samplerate, channels=file.channels, frames=frames, blocks=blocks, reader="libsndfile")


def _blocks(file: sf.SoundFile) -> Iterator[np.ndarray]:
    with file:
        yield np.empty((0, file.channels), np.float32)  # consumed by open_sndfile
        while True:
            try:
                block = file.read(max(1, BLOCK_SAMPLES // file.channels), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise ClientInputError(
                    f"could not decode audio: the file is corrupt or truncated after {file.tell()} frames: {reason(exc)}"
                ) from None
            if not len(block):
                return
            yield block


def _check_truncation(file: sf.SoundFile) -> None:
    """libsndfile quietly shortens a WAV/AIFF whose data chunk runs past the end of the file, and
    only says so in its log: "data : 149260 (should be 74608)". Streaming writers leave the size
    unknown (0 or all ones), which is not truncation."""
    for line in file.extra_info.splitlines():
        declared = TRUNCATED_CHUNK.match(line)
        if declared and int(declared.group(1)) not in UNKNOWN_CHUNK_SIZES:
            raise ClientInputError(
                f"audio file is truncated: its header declares {declared.group(1)} bytes of samples, "
                f"the file holds {declared.group(2)}"
            )


def reason(exc: Exception) -> str:
    """libsndfile's own words, without soundfile's repr of our in-memory file object."""
    return getattr(exc, "error_string", None) or str(exc)
