"""Checksums that make a damaged checkpoint fail to load instead of loading wrong numbers.

torch.save writes a zip archive: for each record (the pickle, one per tensor storage, a few small ones) a local
header whose extra field pads the data to a 64-byte boundary, the data (stored, not compressed), a data descriptor
with the record's CRC32; then the central directory, the zip64 end records and the end record. torch.load checks
none of those CRCs, and no CRC covers the headers. So:

- every checkpoint we save carries the CRC32 of the archive exactly as torch.save wrote it, as the archive comment of
  the zip end record (`mae3d-crc32:1a2b3c4d`; the file's last 20 bytes). Zip readers skip comments, so torch.load,
  zipfile and unzip read the file as before. The CRC is computed while torch.save's bytes go to disk (no second
  read), in whichever thread saves. A flip anywhere (data, headers, padding, directory, the comment) is refused.
- a zip from elsewhere (TANGERINE, the original project, a user's torch.save, our files from before the comment):
  every byte must belong to a record, its descriptor, the directory or the end records, laid end to end; every field
  a reader uses must agree with its second copy (local header vs central directory vs data descriptor, zip64 vs
  classic end record); every record's CRC32 is recomputed. Flips in fields no reader uses (a timestamp, the padding
  bytes) cannot be seen there, and change nothing that is loaded.
- torch's legacy (non-zip) format has no checksum: it loads, with one line saying so (util/checkpoint.py).

CRC32, not a cryptographic hash: the damage guarded against is accidental (bit rot, a bad sector, a torn copy),
which CRC32 misses with probability 2^-32, while a forger could rewrite any digest stored in the file. It is the zip
format's own check, and ISA-L computes it at 7.5-25 GB/s on one core (zlib 1.4-4, SHA-256 0.6-1.8, BLAKE2b 0.3-0.9
GB/s on the development machine: `python bench/bench_checkpoint.py --hashes_only`), so verifying costs about the time
to read the file.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from util.errors import UserError

try:
    from isal.isal_zlib import crc32  # the same CRC-32 as zlib's, about 7x faster
except ImportError:  # pragma: no cover - isal is in requirements.txt; zlib gives identical values
    from zlib import crc32

TAG = b"mae3d-crc32:"
COMMENT_LEN = len(TAG) + 8
CHUNK = 1 << 20  # read in pieces that stay in the L2 cache for the CRC: ~2x faster than 16 MiB
LOCAL, DESCRIPTOR, CENTRAL = b"PK\x03\x04", b"PK\x07\x08", b"PK\x01\x02"
Z64_END, Z64_LOCATOR, END = b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"
END_LEN, LOCATOR_LEN, Z64_END_LEN, CENTRAL_LEN, LOCAL_LEN = 22, 20, 56, 46, 30
U16, U32 = 0xFFFF, 0xFFFFFFFF


class CorruptCheckpointError(UserError):
    """The file is truncated, damaged or not a torch checkpoint."""


class DamagedCheckpointError(CorruptCheckpointError):
    """A checksum or a structure field of the file disagrees with its contents: it changed after it was written."""


class _Damage(Exception):
    """What failed, as a phrase ('record 'archive/data/3' fails its CRC32 check (...)')."""


@dataclass
class _Record:
    name: str
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int


class ChecksummedFile:
    """A binary file being written that keeps the CRC32 of every byte written; `add_comment()` then appends it as
    the comment of the zip archive torch.save wrote into it."""

    def __init__(self, f) -> None:
        self._f = f
        self.crc = 0
        self._tail = b""  # the last END_LEN bytes written

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32(view, self.crc)
        self._tail = (self._tail + bytes(view[-END_LEN:]))[-END_LEN:]
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()

    def add_comment(self) -> None:
        """Set the end record's comment length and append `mae3d-crc32:<crc of the bytes before>`."""
        if len(self._tail) != END_LEN or self._tail[:4] != END or self._tail[-2:] != b"\x00\x00":
            raise RuntimeError("torch.save did not end its archive with a zip end record without comment; "
                               "util/checkpoint_verify.py must learn this torch version's layout.")
        self._f.seek(-2, os.SEEK_END)
        self._f.write(struct.pack("<H", COMMENT_LEN) + TAG + b"%08x" % self.crc)


def verify(f, path: str) -> str:
    """Check the checkpoint open in `f` (binary, seekable) against its checksums; raise DamagedCheckpointError
    naming `path` and what failed. Returns 'ours' (whole-file CRC32 matched), 'zip' (structure and every record's
    CRC32 matched), 'zip without CRCs' (saved with compute_crc32=False: structure checked) or 'not a zip'."""
    size = os.fstat(f.fileno()).st_size
    tail_start = max(0, size - (END_LEN + U16 + LOCATOR_LEN + Z64_END_LEN))
    tail = _read(f, tail_start, size - tail_start)
    end = _find_end(tail)
    if end is None:
        f.seek(0)
        if f.read(4) == LOCAL:
            raise DamagedCheckpointError(f"Checkpoint {path} is damaged or cut short: its zip end record is missing "
                                         f"or does not end the file; it was refused.")
        return "not a zip"
    comment = tail[end + END_LEN:]
    try:
        if len(comment) != COMMENT_LEN:  # not ours, or ours with its comment length damaged (then none matches)
            return _check_archive(f, size, tail, tail_start + end)
        want = _our_crc(comment)
        got = crc32(b"\x00\x00", _crc_range(f, 0, size - COMMENT_LEN - 2, 0))  # the length torch wrote: 0
        if got == want:
            return "ours"
        _check_archive(f, size, tail, tail_start + end)  # raises naming the record or structure that changed
        raise _Damage(f"its CRC32 {got:08x} differs from the {want:08x} written into it, outside "
                      f"every record's data (a zip header, the alignment padding or the directory changed)")
    except _Damage as e:
        raise DamagedCheckpointError(f"Checkpoint {path} is damaged: {e}; it was refused.") from None


def _our_crc(comment: bytes) -> int:
    if comment[:len(TAG)] != TAG or not all(c in b"0123456789abcdef" for c in comment[len(TAG):]):
        raise _Damage(f"its checksum (the zip archive comment {comment!r}) is damaged")
    return int(comment[len(TAG):], 16)


def _find_end(tail: bytes) -> int | None:
    """Offset in `tail` of the zip end record whose comment reaches exactly the end of the file."""
    pos = len(tail) - END_LEN
    while pos >= 0:
        pos = tail.rfind(END, 0, pos + 4)
        if pos < 0:
            return None
        if pos + END_LEN + struct.unpack_from("<H", tail, pos + 20)[0] == len(tail):
            return pos
        pos -= 1
    return None


def _read(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise _Damage(f"it ends at byte {offset + len(data)}, inside a structure that should reach byte {offset + n}")
    return data


def _crc_range(f, start: int, stop: int, crc: int) -> int:
    """crc32 of bytes [start, stop) of `f`, streamed in CHUNK pieces."""
    f.seek(start)
    buf = bytearray(min(CHUNK, max(stop - start, 0)))
    view = memoryview(buf)
    while start < stop:
        n = f.readinto(view[:min(len(buf), stop - start)])
        if not n:
            raise _Damage(f"it ends at byte {start}, inside a record")
        crc = crc32(view[:n], crc)
        start += n
    return crc


def _check_archive(f, size: int, tail: bytes, end_at: int) -> str:
    """Structure and record CRCs of a zip whose end record starts at byte `end_at`."""
    records, cd_start = _directory(f, tail, size - len(tail), end_at)
    records.sort(key=lambda r: r.offset)
    if not records or records[0].offset != 0:
        raise _Damage(f"its first record does not start the file (byte {records[0].offset if records else '-'})")
    no_crcs = all(r.crc == 0 for r in records if r.usize)
    for r, nxt in zip(records, records[1:] + [None]):
        _check_record(f, r, nxt.offset if nxt else cd_start, no_crcs)
    return "zip without CRCs" if no_crcs else "zip"


def _directory(f, tail: bytes, tail_start: int, end_at: int) -> tuple[list[_Record], int]:
    """The records listed by the central directory, after checking the end records against each other."""
    at = end_at - tail_start
    _, disk, cd_disk, n_here, n, cd_size, cd_off, _ = struct.unpack_from("<4sHHHHIIH", tail, at)
    if disk or cd_disk or n_here != n:
        raise _Damage("its zip end record is damaged (disk numbers or entry counts)")
    cd_end = end_at
    if at >= LOCATOR_LEN and tail[at - LOCATOR_LEN:at - LOCATOR_LEN + 4] == Z64_LOCATOR:
        _, loc_disk, z_off, disks = struct.unpack_from("<4sIQI", tail, at - LOCATOR_LEN)
        z = _read(f, z_off, Z64_END_LEN) if z_off + Z64_END_LEN <= end_at else b""
        if len(z) != Z64_END_LEN or z[:4] != Z64_END:
            raise _Damage(f"its zip64 end record (byte {z_off}) is damaged or misplaced")
        rec_len, _, _, zdisk, zcd_disk, zn_here, zn, zcd_size, zcd_off = struct.unpack_from("<QHHIIQQQQ", z, 4)
        classic = ((n, zn, U16), (cd_size, zcd_size, U32), (cd_off, zcd_off, U32))
        if (loc_disk or disks != 1 or zdisk or zcd_disk or zn_here != zn or z_off + 12 + rec_len != end_at - LOCATOR_LEN
                or any(c != z64 and c != sentinel for c, z64, sentinel in classic)):
            raise _Damage("its zip64 end records disagree with each other or with the zip end record")
        n, cd_size, cd_off, cd_end = zn, zcd_size, zcd_off, z_off
    if cd_off + cd_size != cd_end:
        raise _Damage(f"its central directory (bytes {cd_off}+{cd_size}) does not end where the end records begin "
                      f"(byte {cd_end})")
    cd = _read(f, cd_off, cd_size)
    records, pos = [], 0
    for i in range(n):
        record, pos = _central_entry(cd, pos, i, cd_off)
        records.append(record)
    if pos != cd_size or len({r.name for r in records}) != n:
        raise _Damage("its central directory is damaged (its entries do not fill it, or a name repeats)")
    return records, cd_off


def _central_entry(cd: bytes, pos: int, i: int, cd_off: int) -> tuple[_Record, int]:
    """Entry `i` of the central directory `cd`, which starts at byte `pos` of it; and where the next one starts."""
    bad = _Damage(f"its central directory entry {i} (byte {cd_off + pos}) is damaged")
    if cd[pos:pos + 4] != CENTRAL or pos + CENTRAL_LEN > len(cd):
        raise bad
    (flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, attributes,
     offset) = struct.unpack_from("<HHHHIIIHHHHHII", cd, pos + 8)
    name_at = pos + CENTRAL_LEN
    if name_at + nlen + elen + clen > len(cd):
        raise bad
    wanted = [v for v in (usize, csize, offset) if v == U32] + ([disk] if disk == U16 else [])
    z64 = _zip64_values(cd[name_at + nlen:name_at + nlen + elen], len(wanted), bad)
    usize, csize, offset = (z64.pop(0) if v == U32 else v for v in (usize, csize, offset))
    disk = z64.pop(0) if disk == U16 else disk
    name = cd[name_at:name_at + nlen].decode("utf-8", "replace")
    folder = attributes & 0x10 or name.endswith("/")  # miniz then reads nothing: the tensor would stay uninitialised
    if disk or flags & 1 or method not in (0, 8) or (method == 0 and csize != usize) or folder:
        raise _Damage(f"its central directory entry {i} (byte {cd_off + pos}) is damaged or unreadable by torch "
                      f"(method {method}, flags {flags:#x}, sizes {csize}/{usize}, attributes {attributes:#x})")
    return _Record(name, flags, method, crc, csize, usize, offset), name_at + nlen + elen + clen


def _zip64_values(extra: bytes, count: int, bad: _Damage) -> list[int]:
    """The `count` 8-byte values of the zip64 block (id 1) of an extra field, after checking the blocks fill it."""
    values, pos = [], 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise bad
        block_id, n = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + n > len(extra):
            raise bad
        if block_id == 1 and count:
            if n < 8 * count:
                raise bad
            values = list(struct.unpack_from(f"<{count}Q", extra, pos + 4))
        pos += 4 + n
    if len(values) != count:
        raise bad
    return values


def _check_record(f, r: _Record, next_start: int, no_crcs: bool) -> None:
    where = f"record '{r.name}' (byte {r.offset})"
    head = _read(f, r.offset, LOCAL_LEN)
    (sig, _, flags, method, _, _, crc, csize, usize, nlen, elen) = struct.unpack("<4sHHHHHIIIHH", head)
    name = _read(f, r.offset + LOCAL_LEN, nlen + elen)
    if sig != LOCAL or flags != r.flags or method != r.method or name[:nlen].decode("utf-8", "replace") != r.name:
        raise _Damage(f"the local header of {where} disagrees with the central directory")
    _zip64_values(name[nlen:], 0, _Damage(f"the extra field (alignment padding) of {where} is damaged"))
    if not flags & 8 and (crc != r.crc or (csize != U32 and csize != r.csize) or (usize != U32 and usize != r.usize)):
        raise _Damage(f"the local header of {where} disagrees with the central directory (CRC32 or sizes)")
    start = r.offset + LOCAL_LEN + nlen + elen
    stop = start + r.csize
    gap = next_start - stop
    if flags & 8:
        if gap not in (12, 16, 20, 24):
            raise _Damage(f"the data descriptor after {where} is missing or damaged ({gap} bytes before the next)")
        desc = _read(f, stop, gap)
        body = desc[4:] if gap in (16, 24) else desc
        fmt = "<IQQ" if len(body) == 20 else "<III"
        if (gap in (16, 24) and desc[:4] != DESCRIPTOR) or struct.unpack(fmt, body) != (r.crc, r.csize, r.usize):
            raise _Damage(f"the data descriptor of {where} disagrees with the central directory")
    elif gap:
        raise _Damage(f"{gap} bytes after {where} belong to no record (a damaged size or offset)")
    if r.method == 8:
        got = _inflated_crc(f, start, stop, r, where)
    elif no_crcs:
        return
    else:
        got = _crc_range(f, start, stop, 0)
    if not no_crcs and got != r.crc:
        raise _Damage(f"{where} fails its CRC32 check (stored {r.crc:08x}, computed {got:08x})")


def _inflated_crc(f, start: int, stop: int, r: _Record, where: str) -> int:
    """crc32 of a deflated record's inflated bytes (torch.save stores; a re-zipped file may deflate)."""
    inflate, crc, n = zlib.decompressobj(-15), 0, 0
    f.seek(start)
    try:
        while start < stop:
            chunk = f.read(min(CHUNK, stop - start))
            if not chunk:
                raise _Damage(f"it ends at byte {start}, inside {where}")
            start += len(chunk)
            out = inflate.decompress(chunk)
            crc, n = crc32(out, crc), n + len(out)
    except zlib.error as e:
        raise _Damage(f"{where} does not inflate ({e})") from None
    if not inflate.eof or inflate.unused_data or n != r.usize:
        raise _Damage(f"{where} inflates to {n} bytes, not the {r.usize} of its header")
    return crc
