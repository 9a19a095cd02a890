"""Inflation with a cap: gzip and raw deflate streams are inflated in chunks and refused as soon
as the output would pass the budget, so a 1 MB file that inflates to 1 GiB never takes 1 GiB."""

from __future__ import annotations

import io
import zlib

from .limits import ImageTooLargeError

CHUNK = 1 << 20
GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer
RAW_WBITS = -zlib.MAX_WBITS  # raw deflate (DICOM Deflated Explicit VR Little Endian)


def inflate(data, cap: int, label: str, wbits: int = GZIP_WBITS, what: str = "inflated data") -> bytearray:
    """All of `data` inflated, or ImageTooLargeError once more than `cap` bytes would come out.
    The size is counted first with output thrown away chunk by chunk, so a bomb is refused
    holding about one chunk. A truncated stream is an EOFError, a corrupt one zlib.error."""
    size = _inflate(data, cap, label, wbits, what, None)
    out = bytearray()
    _inflate(data, size, label, wbits, what, out)
    return out


def _inflate(data, cap: int, label: str, wbits: int, what: str, out: bytearray | None) -> int:
    view = memoryview(data)
    pos = total = 0
    d = zlib.decompressobj(wbits)
    while not d.eof:
        if d.unconsumed_tail:
            src = d.unconsumed_tail
        elif pos < len(view):
            src, pos = view[pos:pos + CHUNK], pos + CHUNK
        else:
            src = b""  # all input given: drain what zlib still holds
        chunk = d.decompress(src, min(CHUNK, cap + 1 - total))  # max_length: never past the budget
        if not chunk and not src:
            raise EOFError("compressed stream ended before its end marker")
        total += len(chunk)
        if total > cap:
            raise ImageTooLargeError(f"{label}: {what} passes {cap / 2**20:,.0f} MiB, the decoding budget; refused")
        if out is not None:
            out += chunk
    rest = d.unused_data + bytes(view[pos:])
    if wbits == GZIP_WBITS and rest.startswith(b"\x1f\x8b"):  # multi-member gzip: members concatenated
        total += _inflate(rest, cap - total, label, wbits, what, out)
    return total


class CappedReader(io.RawIOBase):
    """A seekable read-only view of `raw` (a GzipFile) that refuses any read or seek past `cap`
    bytes of output: nibabel's lazy slice reads on a .nii.gz inflate no further than the budget."""

    def __init__(self, raw, cap: int, label: str):
        self.raw, self.cap, self.label = raw, cap, label

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.raw.tell() + offset if whence == io.SEEK_CUR else None
        if target is None:
            raise io.UnsupportedOperation("seek from the end of a capped stream")
        self._check(target)
        return self.raw.seek(target)

    def readinto(self, buffer) -> int:
        room = self.cap - self.raw.tell()
        if room <= 0 < len(buffer):  # at the cap: the end of the stream, or a read past the budget
            if self.raw.read(1):
                self._check(self.cap + 1)
            return 0
        data = self.raw.read(min(len(buffer), room))  # read-ahead stops at the cap without failing
        buffer[:len(data)] = data
        return len(data)

    def _check(self, position: int) -> None:
        if position > self.cap:
            raise ImageTooLargeError(f"{self.label}: reading it needs more than {self.cap / 2**20:,.0f} MiB "
                                     "inflated, the decoding budget; refused")
