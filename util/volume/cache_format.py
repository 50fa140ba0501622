"""The file format of one cache entry (format 2): a compressed array with a CRC-32 over every byte before it.

    MAGIC (8 bytes) | header length (uint32 LE) | header (JSON) | payload (one blosc2 frame) | CRC-32 (uint32 LE)

The header names the array's shape and dtype, its `levels` (uint16 images: value = level / levels, see
util.volume.cache; 0 for label maps and other arrays stored as they are) and whether the payload holds slice-to-slice
differences along axis 0 (`delta`, uint16 arithmetic modulo 2^16, undone with one addition per slice). The CRC covers
magic, header and payload, so any change of up to 32 consecutive bits anywhere in the file (a flipped byte in the
header, the payload or the CRC itself) is always detected, and any other damage with probability 1 - 2^-32; a cut
file fails the same check. Readers verify it before they parse anything (`unpack`).
"""
from __future__ import annotations

import json
import os
import struct
import threading

import blosc2
import numpy as np
from isal import isal_zlib

MAGIC = b"MAE3DVC\x02"
_HEAD = struct.Struct("<8sI")
_CRC = struct.Struct("<I")
BLOCKSIZE = 1 << 20  # 1 MiB blocks: smaller and faster to decompress than blosc2's default (bench_cache_format.py)
DTYPES = ("uint8", "int16", "uint16", "int32", "int64", "float32")

# name -> (blosc2 codec, level, delta along axis 0 for uint16 images); bit-shuffle always (typesize = itemsize).
# Measured on the real CTs (bench/bench_cache_format.py): lz4 without slice differences read no faster than this
# from HU levels and took 0.44-0.73x today's bytes, so zstd is the one codec; the name is recorded per folder.
CODECS = {"zstd": (blosc2.Codec.ZSTD, 1, True)}


class DamagedEntry(Exception):
    """An entry file whose checksum, header or payload does not hold (the message says which)."""


def crc32(data) -> int:
    """CRC-32 (zlib's polynomial) by ISA-L: about 10x zlib's speed, well below a millisecond per entry."""
    return isal_zlib.crc32(data) & 0xFFFFFFFF


def pack(stored: np.ndarray, levels: int, codec: str) -> bytes:
    """The file bytes of `stored` (an array as util.volume.cache.encode returns it) compressed with `codec`."""
    a = np.ascontiguousarray(stored)
    if a.dtype.name not in DTYPES:
        raise ValueError(f"cache entry: cannot store dtype {a.dtype}; expected one of {DTYPES}.")
    blosc_codec, clevel, delta = CODECS[codec]
    delta = bool(delta and a.dtype == np.uint16 and a.ndim == 3 and a.shape[0] > 1)
    if delta:
        d = a.copy()
        np.subtract(d[1:], a[:-1], out=d[1:])  # modulo 2^16; small differences of neighbouring slices
        a = d
    payload = blosc2.compress2(a, codec=blosc_codec, clevel=clevel, typesize=a.dtype.itemsize, nthreads=1,
                               filters=[blosc2.Filter.BITSHUFFLE], filters_meta=[0],
                               blocksize=min(BLOCKSIZE, max(a.nbytes, 1)))
    header = json.dumps({"shape": list(a.shape), "dtype": a.dtype.name, "levels": int(levels),
                         "delta": int(delta)}, separators=(",", ":")).encode()
    body = _HEAD.pack(MAGIC, len(header)) + header + payload
    return body + _CRC.pack(crc32(body))


_BUFFER = threading.local()


def read(path: str) -> memoryview:
    """The whole file at `path`, read into a buffer this thread reuses (valid until its next call): no page
    faults for a fresh allocation per read. Raises OSError (FileNotFoundError when there is none)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = getattr(_BUFFER, "data", None)
        if buf is None or len(buf) < size:
            buf = _BUFFER.data = bytearray(max(size, 1 << 20))
        view, got = memoryview(buf), 0
        while got < size:
            n = os.readv(fd, [view[got:size]])
            if n == 0:
                break
            got += n
        return view[:got]
    finally:
        os.close(fd)


def check(data: memoryview) -> tuple[dict, memoryview]:
    """(header, payload) of an entry's bytes after the CRC, magic and header are verified; raises DamagedEntry."""
    n = len(data)
    if n < _HEAD.size + _CRC.size:
        raise DamagedEntry(f"{n} bytes, shorter than any entry")
    if crc32(data[:n - _CRC.size]) != _CRC.unpack_from(data, n - _CRC.size)[0]:
        raise DamagedEntry("checksum mismatch")
    magic, hlen = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or _HEAD.size + hlen > n - _CRC.size:
        raise DamagedEntry("not a format-2 cache entry")
    try:
        header = json.loads(bytes(data[_HEAD.size:_HEAD.size + hlen]))
        shape, dtype = tuple(int(s) for s in header["shape"]), np.dtype(header["dtype"])
        levels, delta = int(header["levels"]), bool(header["delta"])
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedEntry(f"unreadable header ({e})") from None
    if dtype.name not in DTYPES or any(s < 0 for s in shape) or not 0 <= levels <= 65535:
        raise DamagedEntry("impossible header values")
    header.update(shape=shape, dtype=dtype, levels=levels, delta=delta)
    return header, data[_HEAD.size + hlen:n - _CRC.size]


def unpack(data: memoryview, keep_deltas: bool = False) -> tuple[np.ndarray, int, bool]:
    """(array, levels, deltas) of an entry's bytes: checked (`check`), decompressed into a new array, the slice
    differences undone unless keep_deltas (then `deltas` says whether the array still holds them: `undelta`).
    Raises DamagedEntry."""
    header, payload = check(data)
    out = np.empty(header["shape"], header["dtype"])
    try:
        nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(payload)
        if nbytes != out.nbytes or cbytes != len(payload):
            raise DamagedEntry(f"payload of {nbytes} bytes for a {out.nbytes}-byte array")
        if out.nbytes:
            blosc2.decompress2(payload, dst=out, nthreads=1)
    except (ValueError, RuntimeError) as e:
        raise DamagedEntry(f"undecodable payload ({e})") from None
    if header["delta"] and not keep_deltas:
        undelta(out)
    return out, header["levels"], header["delta"] and keep_deltas


def undelta(a: np.ndarray) -> np.ndarray:
    """Slice differences along axis 0 -> values, in place (uint16, modulo 2^16): one addition per slice, in-cache
    work (about 2 ms at 256^3)."""
    for d in range(1, a.shape[0]):
        np.add(a[d], a[d - 1], out=a[d])
    return a
