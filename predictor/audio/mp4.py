"""An MP4 file's sample tables, read before FFmpeg opens the file.

FFmpeg's mov demuxer builds its index from the sample tables (`stsz`, `stts`, `stsc` in `moov`;
`trun` in fragments) while it opens the file, an entry of a couple of dozen bytes per sample the
tables declare, before a frame is decoded and before any limit of ours can be checked. The tables
can declare tens of millions of samples in a few bytes (a constant sample size, one run of
chunks), so a file of a few KB could make the server allocate gigabytes. Every sample of a real
file holds at least one byte of it, so the samples the tables declare, over every track, may not
outnumber the file's bytes. PyAV is FFmpeg, and no other library the server has reads these
tables, so the boxes are walked here: their headers and the few fields counted, nothing else.

Pure functions on bytes.
"""

import struct
from typing import Iterator, Optional

import numpy as np

from ..errors import ClientInputError

TOP_LEVEL = {b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"free", b"skip", b"wide", b"uuid", b"sidx", b"pnot"}
"""Boxes an MP4 family file starts with: anything else is not one, and is left to FFmpeg's probing."""
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}
"""The boxes on the way to the sample tables."""
MAX_DEPTH = 10
"""Containers within containers: FFmpeg's mov demuxer reads no deeper (a real file's sample tables
are five in: moov, trak, mdia, minf, stbl)."""


def check_sample_tables(data: bytes) -> None:
    """Refuse an MP4 whose sample tables declare more samples than it has bytes."""
    if len(data) < 8 or data[4:8] not in TOP_LEVEL:
        return
    samples = declared_samples(data)
    if samples > len(data):
        raise ClientInputError(f"the MP4 file's sample tables declare {samples:,} samples in a file of {len(data):,} "
                               "bytes: more samples than bytes, so they do not describe this file")


def declared_samples(data: bytes) -> int:
    """The samples every track's tables declare: for each `stbl`, the most that its sample sizes,
    sample times and chunks say, and every fragment's runs."""
    total = 0
    for name, body in _boxes(data, 0, len(data)):
        if name == b"stbl":
            tables = dict(_children(data, *body))
            total += max(_sizes(data, tables), _times(data, tables), _chunks(data, tables))
        elif name == b"trun" and body[1] - body[0] >= 8:
            total += struct.unpack_from(">I", data, body[0] + 4)[0]
    return total


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """Every box from `start` to `end` and, depth first, inside the containers: (type, (its body's
    first byte, its end)). A stack of levels, not a generator per level: a few KB of nested headers
    would pass Python's recursion limit, and each box would pass up through every level above it."""
    levels = [_children(data, start, end)]
    while levels:
        box = next(levels[-1], None)
        if box is None:
            levels.pop()
            continue
        yield box
        name, body = box
        if name in CONTAINERS:
            if len(levels) > MAX_DEPTH:
                raise ClientInputError(f"the MP4 file nests {name.decode()!r} boxes more than {MAX_DEPTH} deep, deeper "
                                       "than FFmpeg reads")
            levels.append(_children(data, *body))


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """The boxes from `start` to `end`, not the boxes inside them."""
    offset = start
    while offset + 8 <= end:
        size, name = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1 and offset + 16 <= end:
            size, header = struct.unpack_from(">Q", data, offset + 8)[0], 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            return  # FFmpeg decides what a broken box means
        yield name, (offset + header, offset + size)
        offset += size


def _sizes(data: bytes, tables: dict) -> int:
    """`stsz`/`stz2`: the sample count after the version, flags and (stsz) the constant size."""
    for name, at in ((b"stsz", 8), (b"stz2", 8)):
        if name in tables and tables[name][1] - tables[name][0] >= at + 4:
            return struct.unpack_from(">I", data, tables[name][0] + at)[0]
    return 0


def _times(data: bytes, tables: dict) -> int:
    """`stts`: the sum of its runs' sample counts."""
    entries = _entries(data, tables.get(b"stts"), 2)
    return int(entries[:, 0].sum()) if len(entries) else 0


def _chunks(data: bytes, tables: dict) -> int:
    """`stsc` over `stco`/`co64`'s chunk count: each run of chunks times its samples per chunk."""
    runs = _entries(data, tables.get(b"stsc"), 3)
    offsets = tables.get(b"stco") or tables.get(b"co64")
    if not len(runs) or offsets is None or offsets[1] - offsets[0] < 8:
        return 0
    chunks = struct.unpack_from(">I", data, offsets[0] + 4)[0]
    first = runs[:, 0]
    ends = np.append(first[1:], chunks + 1)
    return int(min((np.clip(ends - first, 0, None) * runs[:, 1].astype(np.float64)).sum(), 2.0**62))


def _entries(data: bytes, body: Optional[tuple[int, int]], fields: int) -> np.ndarray:
    """A full box's table of big-endian uint32 rows (after version, flags and the entry count),
    as many as the count says and the box holds."""
    if body is None or body[1] - body[0] < 8:
        return np.zeros((0, fields), np.int64)
    count = struct.unpack_from(">I", data, body[0] + 4)[0]
    rows = min(count, (body[1] - body[0] - 8) // (4 * fields))
    table = np.frombuffer(data, dtype=">u4", count=rows * fields, offset=body[0] + 8)
    return table.reshape(rows, fields).astype(np.int64)
