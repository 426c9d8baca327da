"""Block back-ends: where a virtio-blk device's bytes live.

The protocol (:class:`BlockBackend`) is byte-addressed scatter/gather I/O,
like TinyEMU's three block functions: the front-end (devices/virtio/blk.py)
has already checked every range against ``size`` and every buffer against
guest RAM, and hands the back-end writable or read-only memoryviews of guest
RAM.  Back-ends raise :class:`BlockIOError` for a host-side failure; the
front-end turns that into VIRTIO_BLK_S_IOERR.

* :class:`RawFile` -- a raw image file, read-write or read-only; ``flush`` is
  ``fsync`` (the front-end acknowledges FLUSH only after it returns).
* :class:`Overlay` -- copy-on-write over another back-end (``snapshot=on``):
  writes land in memory, in 4 KiB clusters, and vanish with the process; the
  image is never written (QEMU's snapshot=on keeps them in a temporary qcow2).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os


class BlockIOError(Exception):
    """A back-end could not do what was asked (host I/O error)."""


class BlockBackend:
    """The block back-end protocol (see the module docstring)."""

    size = 0
    read_only = False

    def readv(self, offset: int, bufs: list) -> None:
        """Fill the memoryviews ``bufs`` with the bytes at ``offset``."""
        raise NotImplementedError

    def writev(self, offset: int, bufs: list) -> None:
        """Store the bytes of ``bufs`` at ``offset``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Return once every completed write is on stable storage."""

    def discard(self, offset: int, length: int) -> None:
        """The range's contents are no longer needed (they may read as anything)."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeroes afterwards."""
        zero = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(zero))
            self.writev(offset, [memoryview(zero)[:n]])
            offset += n
            length -= n

    def close(self) -> None:
        """Release the host resources."""


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): True if the host did it."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        return _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0
    except (OSError, AttributeError):
        return False


class RawFile(BlockBackend):
    """A raw image file.  ``read_only`` opens it O_RDONLY (writes are refused
    by the front-end before they reach here)."""

    def __init__(self, path: str, read_only: bool = False):
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as exc:
            raise BlockIOError(f"cannot open disk image {path!r}: {exc.strerror}") from None
        self.path = path
        self.read_only = read_only
        self.size = os.fstat(self.fd).st_size

    def readv(self, offset: int, bufs: list) -> None:
        want = sum(len(b) for b in bufs)
        try:
            got = os.preadv(self.fd, bufs, offset)
        except OSError as exc:
            raise BlockIOError(f"read of {self.path}: {exc.strerror}") from None
        if got != want:
            # A short read (the file shrank under us): finish it byte-exact.
            self._finish_short(offset, bufs, got)

    def _finish_short(self, offset: int, bufs: list, done: int) -> None:
        pos = 0
        for b in bufs:
            n = len(b)
            if pos + n > done:
                start = max(0, done - pos)
                data = os.pread(self.fd, n - start, offset + pos + start)
                b[start:start + len(data)] = data
                b[start + len(data):] = bytes(n - start - len(data))
            pos += n

    def writev(self, offset: int, bufs: list) -> None:
        if self.read_only:
            raise BlockIOError("the image is read-only")
        want = sum(len(b) for b in bufs)
        try:
            done = os.pwritev(self.fd, bufs, offset)
            while done < want:         # short write: the rest, byte-exact
                data = b"".join(bytes(b) for b in bufs)[done:]
                done += os.pwrite(self.fd, data, offset + done)
        except OSError as exc:
            raise BlockIOError(f"write of {self.path}: {exc.strerror}") from None

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise BlockIOError(f"fsync of {self.path}: {exc.strerror}") from None

    def discard(self, offset: int, length: int) -> None:
        if not self.read_only:
            _punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        # A punched hole reads as zeroes (fallocate(2)); else write them.
        if self.read_only or not _punch_hole(self.fd, offset, length):
            super().write_zeroes(offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


CLUSTER = 4096


class Overlay(BlockBackend):
    """Copy-on-write in memory over ``base`` (``snapshot=on``): reads see the
    overlay's clusters where written and ``base`` elsewhere; ``base`` is only
    read.  ``flush`` has nothing to make durable (the writes vanish at exit)."""

    def __init__(self, base: BlockBackend):
        self.base = base
        self.size = base.size
        self.read_only = False
        self.clusters: dict[int, bytearray] = {}

    def _cluster(self, c: int) -> bytearray:
        buf = self.clusters.get(c)
        if buf is None:
            buf = bytearray(CLUSTER)
            start = c * CLUSTER
            n = min(CLUSTER, self.size - start)
            if n > 0:
                self.base.readv(start, [memoryview(buf)[:n]])
            self.clusters[c] = buf
        return buf

    @staticmethod
    def _pieces(offset: int, bufs: list):
        """(cluster, offset in it, image offset, the part of a buffer) for the
        buffers laid end to end from ``offset``, split at cluster boundaries."""
        for b in bufs:
            view = memoryview(b)            # parts are views: readv fills the caller's buffer
            n = len(view)
            pos = 0
            while pos < n:
                c, off = divmod(offset + pos, CLUSTER)
                k = min(n - pos, CLUSTER - off)
                yield c, off, offset + pos, view[pos:pos + k]
                pos += k
            offset += n

    def readv(self, offset: int, bufs: list) -> None:
        if not self.clusters:
            self.base.readv(offset, bufs)
            return
        for c, off, at, part in self._pieces(offset, bufs):
            data = self.clusters.get(c)
            if data is None:
                self.base.readv(at, [part])
            else:
                part[:] = data[off:off + len(part)]

    def writev(self, offset: int, bufs: list) -> None:
        for c, off, _, part in self._pieces(offset, bufs):
            self._cluster(c)[off:off + len(part)] = part

    def discard(self, offset: int, length: int) -> None:
        pass                        # contents after a discard are unspecified

    def close(self) -> None:
        self.clusters.clear()
        self.base.close()


def open_image(path: str, read_only: bool = False, snapshot: bool = False) -> BlockBackend:
    """The back-end for ``-drive file=PATH[,readonly=on][,snapshot=on]``."""
    if snapshot:
        return Overlay(RawFile(path, read_only=True))
    try:
        return RawFile(path, read_only=read_only)
    except BlockIOError:
        if not read_only and os.path.exists(path) and not os.access(path, os.W_OK):
            raise BlockIOError(f"disk image {path!r} is not writable (use readonly=on or snapshot=on)") from None
        raise


