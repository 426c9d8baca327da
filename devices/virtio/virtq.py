"""Batch fast paths of the split virtqueue (virtio 1.2 §2.7) for the common
chain shapes of virtio-blk (§5.2.6: a 16-byte header, data, a status byte)
and virtio-net (§5.1.6: ``struct virtio_net_hdr`` and a frame): a whole
available ring per call, no Python per request, frame or descriptor.

Two implementations with one API and one result:

* :data:`NATIVE` -- the C routines of native/virtq.c (``vmlab_vq_*``);
* :data:`PYTHON` -- their pure-Python twins below, the executable
  specification the C is tested against (tests/unit/virtio/test_virtq.py
  compares them on hypothesis-generated rings, descriptor tables and frames).

:data:`FAST` is the one the devices use (NATIVE when the native module loads).

What a fast path does not take it leaves alone: a ring that fails
SplitQueue.check()/pending(), a chain SplitQueue._walk would reject, and
legal shapes other than the plain ones (a header split over descriptors, a
request type other than IN/OUT, zero buffers...) end the batch with
``STOP_PUNT`` *before* that chain is taken; the device model then takes it
through SplitQueue.pop_all and its own checks (DEVICE_NEEDS_RESET or an
error status).  Guest memory is never touched outside its RAM ranges,
``[0, mem.size)`` and ``[4 GiB, 4 GiB + mem.high_size)`` (never the 32-bit
hole between them).

The results: ``done`` chains completed (used elements written, then the used
idx; with VIRTIO_F_EVENT_IDX ``avail_event``), ``ok``/``errors`` (blk: OK /
IOERR statuses; net: frames dropped), ``wrote`` (blk OUT requests),
``frames`` (net frames moved), ``consumed`` (net rx: input frames used up,
moved or dropped), ``stop`` (why the batch ended) and ``bytes`` (data moved).
"""
from __future__ import annotations

import errno
import os
import struct
from array import array
from itertools import accumulate

# §2.7.5 descriptor flags
_NEXT, _WRITE, _INDIRECT = 1, 2, 4
# §5.2.6 request types and status values
_T_IN, _T_OUT = 0, 1
_S_OK, _S_IOERR = 0, 1
SECTOR = 512
NET_HDR_LEN = 12
"""sizeof(struct virtio_net_hdr) with VIRTIO_F_VERSION_1 (§5.1.6)."""
ETH_HLEN = 14

MAX_INDIRECT = 1024
"""Entries in one indirect table (devices/virtio/queue.py MAX_INDIRECT)."""
MAX_SEGS = 512
"""Non-empty buffers per chain a fast path takes (longer chains: STOP_PUNT)."""
STOP_EMPTY, STOP_PUNT, STOP_FULL = 0, 1, 2
MAX_TX_FRAMES = 256
"""Frames one net_tx call gathers at most (the largest queue vmlab offers)."""

_DESC = struct.Struct("<QIHH")
_HDR = struct.Struct("<IIQ")
_USED = struct.Struct("<II")


class Result:
    """What one batch did (see the module docstring)."""

    __slots__ = ("done", "ok", "errors", "wrote", "frames", "consumed", "stop", "bytes", "dma_lo", "dma_hi")

    def __init__(self) -> None:
        self.done = self.ok = self.errors = self.wrote = self.frames = self.consumed = 0
        self.stop = STOP_PUNT
        self.bytes = 0
        self.dma_lo, self.dma_hi = (1 << 64) - 1, 0     # the span the device wrote (data, status)

    def span(self, addr: int, length: int) -> None:
        if length:
            self.dma_lo = min(self.dma_lo, addr)
            self.dma_hi = max(self.dma_hi, addr + length)

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "Result(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


# ------------------------------------------------------------------ the twin
class _PyQueue:
    """SplitQueue state the Python twin walks (what native/virtq.c's
    vmlab_vq holds)."""

    def __init__(self, q) -> None:
        self.desc, self.avail, self.used = q.desc_addr, q.avail_addr, q.used_addr
        self.size, self.max_size, self.ready = q.size, q.max_size, bool(q.ready)
        self.event_idx = bool(q.event_idx)
        self.last_avail, self.used_idx = q.last_avail, q.used_idx

    def store(self, q) -> None:
        q.last_avail, q.used_idx = self.last_avail, self.used_idx


HIGH_RAM_BASE = 1 << 32
"""Where RAM above the 32-bit hole starts (emu/memory.py)."""


class _Ram:
    """The RAM ranges: ``[0, low)`` and ``[4 GiB, 4 GiB + high)``."""

    __slots__ = ("low", "high")

    def __init__(self, mem) -> None:
        self.low, self.high = mem.size, getattr(mem, "high_size", 0)


def _in_ram(m: _Ram, addr: int, length: int) -> bool:
    """vq_in_ram: inside one RAM range (GuestMemory.contains)."""
    if addr < 0 or length < 0:
        return False
    if addr < m.low:
        return length <= m.low - addr
    if addr < HIGH_RAM_BASE:
        return False
    off = addr - HIGH_RAM_BASE
    return off < m.high and length <= m.high - off


def _ring_count(ram, size: _Ram, q: _PyQueue):
    """vq_ring_ok: the number of available chains, or None."""
    n = q.size
    if not q.ready or n == 0 or n > q.max_size or n & (n - 1):
        return None
    if q.desc % 16 or q.avail % 2 or q.used % 4:
        return None
    if not (_in_ram(size, q.desc, 16 * n) and _in_ram(size, q.avail, 6 + 2 * n) and _in_ram(size, q.used, 6 + 8 * n)):
        return None
    c = (struct.unpack_from("<H", ram, q.avail + 2)[0] - q.last_avail) & 0xFFFF
    return c if c <= n else None


def _head(ram, q: _PyQueue):
    n = q.size
    head = struct.unpack_from("<H", ram, q.avail + 4 + 2 * (q.last_avail % n))[0]
    return head if head < n else None


def _walk(ram, size: _Ram, q: _PyQueue, head: int):
    """vq_walk: (segs [(addr, len, writable)], readable bytes, writable bytes)
    or None (punt)."""
    base, n, i, limit = q.desc, q.size, head, q.size
    in_indirect = False
    segs = []
    total = rlen = wlen = 0
    writable = False
    while True:
        if limit == 0:
            return None
        limit -= 1
        addr, length, flags, nxt = _DESC.unpack_from(ram, base + 16 * i)
        if flags & _INDIRECT:
            if in_indirect or flags & _NEXT:
                return None
            if length == 0 or length % 16 or length // 16 > MAX_INDIRECT or not _in_ram(size, addr, length):
                return None
            base, n, limit, i, in_indirect = addr, length // 16, length // 16, 0, True
            continue
        if length:
            if not _in_ram(size, addr, length):
                return None
            total += length
            if total > 1 << 32:
                return None
            if flags & _WRITE:
                writable = True
                wlen += length
            elif writable:
                return None
            else:
                rlen += length
            if len(segs) >= MAX_SEGS:
                return None
            segs.append((addr, length, bool(flags & _WRITE)))
        if not flags & _NEXT:
            return segs, rlen, wlen
        if nxt >= n:
            return None
        i = nxt


def _put_used(ram, q: _PyQueue, head: int, length: int) -> None:
    _USED.pack_into(ram, q.used + 4 + 8 * (q.used_idx % q.size), head, length)
    q.used_idx = (q.used_idx + 1) & 0xFFFF


def _finish(ram, q: _PyQueue, taken: int, used: int) -> None:
    if used:
        struct.pack_into("<H", ram, q.used + 2, q.used_idx)
    if taken and q.event_idx:
        struct.pack_into("<H", ram, q.used + 4 + 8 * q.size, q.last_avail)


def _io(fd: int, views: list, offset: int, write: bool) -> bool:
    """vq_io: whole positional I/O; reads past the end of the file read zeroes."""
    views = [v for v in views if len(v)]
    while views:
        try:
            r = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return False
        if r == 0:
            if write:
                return False
            for v in views:
                v[:] = bytes(len(v))
            return True
        offset += r
        while views and r >= len(views[0]):
            r -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][r:]
    return True


class PythonVirtq:
    """The pure-Python twins of native/virtq.c."""

    name = "python"

    def blk(self, mem, q, fd: int, capacity: int, allow_write: bool) -> Result:
        """vmlab_vq_blk: carry out the available IN/OUT requests of the plain
        shape on the raw image ``fd`` of ``capacity`` bytes (OUT only with
        ``allow_write``)."""
        ram, size = mem.view, _Ram(mem)
        pq = _PyQueue(q)
        res = Result()
        count = _ring_count(ram, size, pq)
        taken = 0
        if count is not None:
            res.stop = STOP_EMPTY
            while taken < count:
                head = _head(ram, pq)
                w = _walk(ram, size, pq, head) if head is not None else None
                if w is None:
                    res.stop = STOP_PUNT
                    break
                segs = w[0]
                k = len(segs)
                if k < 2 or segs[0][2] or segs[0][1] != 16 or not segs[-1][2]:
                    res.stop = STOP_PUNT
                    break
                rtype, _, sector = _HDR.unpack_from(ram, segs[0][0])
                st_addr, st_len, _ = segs[-1]
                first_w = 1
                while first_w < k and not segs[first_w][2]:
                    first_w += 1
                if rtype == _T_IN and first_w == 1:
                    write = False
                    data = [(a, ln) for a, ln, _ in segs[1:-1]] + [(st_addr, st_len - 1)]
                elif rtype == _T_OUT and allow_write and first_w == k - 1 and st_len == 1:
                    write = True
                    data = [(a, ln) for a, ln, _ in segs[1:-1]]
                else:
                    res.stop = STOP_PUNT
                    break
                data = [(a, ln) for a, ln in data if ln]
                nbytes = sum(ln for _, ln in data)
                status, used = _S_OK, 1
                if nbytes % SECTOR or sector > capacity // SECTOR or nbytes > capacity - sector * SECTOR:
                    status = _S_IOERR
                else:
                    if not write:
                        for a, ln in data:
                            res.span(a, ln)
                    if data and not _io(fd, [ram[a:a + ln] for a, ln in data], sector * SECTOR, write):
                        status = _S_IOERR
                    elif not write:
                        used += nbytes
                ram[st_addr + st_len - 1] = status
                res.span(st_addr + st_len - 1, 1)
                _put_used(ram, pq, head, used)
                pq.last_avail = (pq.last_avail + 1) & 0xFFFF
                res.done += 1
                if status == _S_OK:
                    res.ok += 1
                    res.bytes += nbytes
                else:
                    res.errors += 1
                if write:
                    res.wrote += 1
                taken += 1
        _finish(ram, pq, taken, res.done)
        pq.store(q)
        return res

    def net_tx(self, mem, q, max_frame: int) -> tuple:
        """vmlab_vq_net_tx: take the available transmit chains; returns
        (Result, frames) with the frames (header stripped) as bytes-like
        objects, at most MAX_TX_FRAMES of them."""
        ram, size = mem.view, _Ram(mem)
        pq = _PyQueue(q)
        res = Result()
        frames = []
        count = _ring_count(ram, size, pq)
        taken = 0
        if count is not None:
            res.stop = STOP_EMPTY
            while taken < count:
                head = _head(ram, pq)
                w = _walk(ram, size, pq, head) if head is not None else None
                if w is None:
                    res.stop = STOP_PUNT
                    break
                segs, rlen, wlen = w
                if wlen or rlen < NET_HDR_LEN + ETH_HLEN or rlen - NET_HDR_LEN > max_frame:
                    res.errors += 1
                else:
                    if res.frames >= MAX_TX_FRAMES:
                        res.stop = STOP_FULL
                        break
                    frames.append(b"".join(ram[a:a + ln] for a, ln, _ in segs)[NET_HDR_LEN:])
                    res.frames += 1
                    res.bytes += rlen - NET_HDR_LEN
                _put_used(ram, pq, head, 0)
                pq.last_avail = (pq.last_avail + 1) & 0xFFFF
                res.done += 1
                taken += 1
        _finish(ram, pq, taken, res.done)
        pq.store(q)
        return res, frames

    def net_rx(self, mem, q, max_frame: int, frames: list, hdr: bytes) -> Result:
        """vmlab_vq_net_rx: put ``frames`` (in order) into the available
        receive chains, each after the 12-byte ``hdr``; a frame longer than
        its chain's room (or than ``max_frame``) is dropped.  ``consumed``
        says how many of ``frames`` are done with."""
        ram, size = mem.view, _Ram(mem)
        pq = _PyQueue(q)
        res = Result()
        count = _ring_count(ram, size, pq)
        taken = fi = 0
        nframes = len(frames)
        if count is not None:
            res.stop = STOP_EMPTY
            while taken < count:
                if fi >= nframes:
                    res.stop = STOP_FULL
                    break
                head = _head(ram, pq)
                w = _walk(ram, size, pq, head) if head is not None else None
                if w is None or w[1] or w[2] < NET_HDR_LEN:
                    res.stop = STOP_PUNT
                    break
                segs, _, wlen = w
                room = wlen - NET_HDR_LEN
                while fi < nframes and (len(frames[fi]) > room or len(frames[fi]) > max_frame):
                    fi += 1
                    res.errors += 1
                if fi >= nframes:
                    res.stop = STOP_FULL
                    break
                data = bytes(hdr[:NET_HDR_LEN]) + bytes(frames[fi])
                pos = 0
                for a, ln, _ in segs:
                    if pos >= len(data):
                        break
                    m = min(ln, len(data) - pos)
                    ram[a:a + m] = data[pos:pos + m]
                    res.span(a, m)
                    pos += m
                _put_used(ram, pq, head, len(data))
                pq.last_avail = (pq.last_avail + 1) & 0xFFFF
                res.done += 1
                res.frames += 1
                res.bytes += len(frames[fi])
                fi += 1
                taken += 1
        res.consumed = fi
        _finish(ram, pq, taken, res.done)
        pq.store(q)
        return res


# ------------------------------------------------------------------ the C
class NativeVirtq:
    """native/virtq.c through cffi; same API and results as PythonVirtq."""

    name = "native"

    def __init__(self, ffi, lib) -> None:
        self.ffi, self.lib = ffi, lib
        self._res = ffi.new("vmlab_vq_result *")
        self._lens = ffi.new("uint32_t[]", MAX_TX_FRAMES)

    def _vq(self, q):
        c = q.__dict__.get("_native_vq")
        if c is None:
            c = q._native_vq = self.ffi.new("vmlab_vq *")
        c.desc, c.avail, c.used = q.desc_addr, q.avail_addr, q.used_addr
        c.size, c.max_size, c.ready, c.event_idx = q.size, q.max_size, bool(q.ready), bool(q.event_idx)
        c.last_avail, c.used_idx = q.last_avail, q.used_idx
        return c

    def _result(self) -> Result:
        r, out = self._res, Result()
        out.done, out.ok, out.errors, out.wrote = r.done, r.ok, r.errors, r.wrote
        out.frames, out.consumed, out.stop, out.bytes = r.frames, r.consumed, r.stop, r.bytes
        out.dma_lo, out.dma_hi = r.dma_lo, r.dma_hi
        return out

    def _ram(self, mem):
        mem.check(0, 0)                      # a released RAM raises ClosedError here
        return self.ffi.cast("uint8_t *", mem.address)

    def blk(self, mem, q, fd: int, capacity: int, allow_write: bool) -> Result:
        c = self._vq(q)
        self.lib.vmlab_vq_blk(self._ram(mem), mem.size, getattr(mem, "high_size", 0), c, fd, capacity, bool(allow_write), self._res)
        q.last_avail, q.used_idx = c.last_avail, c.used_idx
        return self._result()

    def net_tx(self, mem, q, max_frame: int) -> tuple:
        c = self._vq(q)
        ram = self._ram(mem)
        pending = (mem.read_int(q.avail_addr + 2, 2) - q.last_avail) & 0xFFFF if mem.contains(q.avail_addr + 2, 2) else 0
        nmax = max(1, min(pending, MAX_TX_FRAMES))
        buf = bytearray(nmax * max_frame)
        self.lib.vmlab_vq_net_tx(ram, mem.size, getattr(mem, "high_size", 0), c, max_frame, self.ffi.from_buffer("uint8_t[]", buf), len(buf), self._lens,
                                 MAX_TX_FRAMES, self._res)
        q.last_avail, q.used_idx = c.last_avail, c.used_idx
        res = self._result()
        if not res.frames:
            return res, []
        lens = self.ffi.unpack(self._lens, res.frames)
        view = memoryview(buf)
        ends = list(accumulate(lens))
        return res, [view[e - n:e] for e, n in zip(ends, lens)]

    def net_rx(self, mem, q, max_frame: int, frames: list, hdr: bytes) -> Result:
        c = self._vq(q)
        data = b"".join(frames)
        lens = array("I", map(len, frames))
        ffi = self.ffi
        self.lib.vmlab_vq_net_rx(self._ram(mem), mem.size, getattr(mem, "high_size", 0), c, max_frame, ffi.from_buffer("uint8_t[]", data),
                                 ffi.from_buffer("uint32_t[]", lens) if lens else ffi.NULL, len(lens),
                                 ffi.from_buffer("uint8_t[]", bytes(hdr[:NET_HDR_LEN]).ljust(NET_HDR_LEN, b"\0")),
                                 self._res)
        q.last_avail, q.used_idx = c.last_avail, c.used_idx
        return self._result()


PYTHON = PythonVirtq()
try:
    from vmlab.native._vmlab_native import ffi as _ffi, lib as _lib   # type: ignore[import-not-found]
    NATIVE = NativeVirtq(_ffi, _lib) if hasattr(_lib, "vmlab_vq_blk") else None
except ImportError:                      # the native module is not built: the twins do the work
    NATIVE = None
FAST = NATIVE if NATIVE is not None else PYTHON
