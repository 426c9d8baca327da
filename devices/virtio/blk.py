"""virtio-blk front-end (virtio 1.2 §5.2 "Block Device").

The front-end parses requests out of descriptor chains and checks them; the
data moves between guest RAM and a block back-end (devices/backends/block.py)
as memoryviews of RAM, without copies (``os.preadv`` lands in guest memory).

A request (§5.2.6) is ``struct virtio_blk_req { le32 type; le32 reserved;
le64 sector; u8 data[]; u8 status; }``: the 16-byte header and any
out-data are device-readable, in-data and the final status byte are
device-writable.  §2.6.4 "Message Framing": "the device MUST NOT make
assumptions about the particular arrangement of descriptors", so the header
and the status byte are found by byte position, not by descriptor.

What a malformed request gets (never an exception, never an access outside
RAM -- the queue has checked every buffer against RAM already):

* no writable byte for the status: the chain is returned with used length 0
  (the driver cannot be told more);
* header short or in device-writable memory, data length not a multiple of
  512 (§5.2.6.1 "The length of data MUST be a multiple of 512 bytes for
  VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT requests"), a range past the end of the
  disk, a write to a read-only disk (§5.2.6.2 "A device MUST set the status
  byte to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature
  if offered, and MUST NOT write any data"), a back-end error:
  VIRTIO_BLK_S_IOERR;
* an unknown type, unknown discard/write-zeroes flags, or discard with the
  unmap flag (§5.2.6.2 "the device MUST set the status byte to
  VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set"):
  VIRTIO_BLK_S_UNSUPP.

FLUSH (§5.2.6.2 "upon receipt of a VIRTIO_BLK_T_FLUSH request, the device
MUST ensure that any writes which were completed are committed to
non-volatile storage") is acknowledged only after the back-end's ``flush``
(``fsync``) has returned.  A driver that did not negotiate VIRTIO_BLK_F_FLUSH
gets a write-through device: every batch of writes is flushed before it is
acknowledged.
"""
from __future__ import annotations

import os
import struct

from vmlab.devices.backends.block import BlockBackend, BlockIOError, RawFile

from . import virtq
from .device import VIRTIO_ID_BLOCK, DeviceNeedsReset, VirtioDevice
from .queue import Chain, ChainError

# §5.2.3 Feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# §5.2.6 status values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
"""§5.2.6: ``struct virtio_blk_discard_write_zeroes`` flags bit 0 (unmap)."""
VIRTIO_BLK_ID_BYTES = 20
"""§5.2.6: GET_ID returns "up to VIRTIO_BLK_ID_BYTES bytes"."""

SECTOR = 512
SEG_MAX = 254
"""seg_max: data segments per request (Linux's default max_segments is 128;
QEMU offers queue size - 2)."""
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32

_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")


def _split(segs: list, n: int) -> tuple[list, list]:
    """Cut a buffer list after ``n`` bytes: (first n bytes, the rest)."""
    head, rest = [], []
    for k, (a, ln) in enumerate(segs):
        if n <= 0:
            rest.extend(segs[k:])
            break
        if ln <= n:
            head.append((a, ln))
            n -= ln
        else:
            head.append((a, n))
            rest.append((a + n, ln - n))
            n = 0
            rest.extend(segs[k + 1:])
            break
    return head, rest


class VirtioBlk(VirtioDevice):
    """virtio-blk over ``backend``; ``read_only`` offers VIRTIO_BLK_F_RO."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_size = 256

    def __init__(self, backend: BlockBackend, read_only: bool = False, serial: bytes = b"vmlab-virtio-blk"):
        super().__init__()
        self.backend = backend
        self.read_only = read_only or backend.read_only
        self.serial = serial[:VIRTIO_BLK_ID_BYTES]
        self.capacity = backend.size // SECTOR
        #: requests completed per type, and with each status (Firecracker METRICS style)
        self.stats = {"requests": 0, "notifies": 0, "ok": 0, "ioerr": 0, "unsupp": 0, "bad_chains": 0,
                      "flushes": 0}

    def specific_features(self) -> int:
        f = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
             | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES))
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        return f

    def config(self) -> bytes:
        """§5.2.4 ``struct virtio_blk_config`` up to write_zeroes_may_unmap."""
        return struct.pack("<QII4sI8sBBHIIIIIB3x", self.capacity, 0, SEG_MAX, b"\0" * 4, SECTOR, b"\0" * 8,
                           0, 0, 1, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1, MAX_DISCARD_SECTORS,
                           MAX_DISCARD_SEG, 0)

    # -- request processing -----------------------------------------------------
    def activate(self, mem, queues: list, features: int) -> None:
        super().activate(mem, queues, features)
        # The batch fast path (devices/virtio/virtq.py) for a raw image in
        # guest RAM that has a host address; other back-ends (snapshot=on)
        # and memory wrappers take the Python path below.
        be = self.backend
        self._fast = virtq.FAST if (type(be) is RawFile and getattr(mem, "address", None) is not None) else None

    def notify(self, index: int) -> None:
        q = self.queues[index]
        st = self.stats
        st["notifies"] += 1
        fast = getattr(self, "_fast", None)
        while True:
            if fast is not None:
                # IN/OUT of the plain shape in one call; OUT only when the
                # driver has FLUSH (else writes are flushed before the ack,
                # below) and the disk is writable.
                r = fast.blk(self.mem, q, self.backend.fd, self.capacity * SECTOR,
                             self.has(VIRTIO_BLK_F_FLUSH) and not self.read_only)
                if r.dma_hi:        # DMA: translated code on those pages goes
                    self.mem.note_written(r.dma_lo, r.dma_hi - r.dma_lo)
                if r.done:
                    st["requests"] += r.done
                    st["ok"] += r.ok
                    st["ioerr"] += r.errors
                    if q.needs_notification():
                        self.signal_used(index)
                if r.stop == virtq.STOP_EMPTY:
                    return
                chains = q.pop_all(limit=1)     # the request the fast path left to us
            else:
                chains = q.pop_all()
            if not chains:
                return
            used = []
            wrote = False
            for c in chains:
                if isinstance(c, ChainError):
                    # A chain that breaks the ring rules: the device cannot know
                    # which byte is the status; like QEMU's virtio_error the
                    # device stops until the driver resets it.
                    self.stats["bad_chains"] += 1
                    if used:
                        q.push_used(used)
                    raise DeviceNeedsReset(f"virtio-blk: {c}")
                n, is_write = self._request(c)
                wrote |= is_write
                used.append((c.head, n))
            if wrote and not self.has(VIRTIO_BLK_F_FLUSH):
                self._flush_quietly()       # write-through when FLUSH was not negotiated
            q.push_used(used)
            if q.needs_notification():
                self.signal_used(index)

    def _flush_quietly(self) -> None:
        try:
            self.backend.flush()
        except BlockIOError:
            pass

    def _request(self, c: Chain) -> tuple[int, bool]:
        """Carry out one request; return (bytes written to the chain, was it a write)."""
        self.stats["requests"] += 1
        if not c.writable:
            return 0, False
        mem = self.mem
        # The status byte is the last device-writable byte (§5.2.6).
        a, ln = c.writable[-1]
        status_addr = a + ln - 1
        win = c.writable[:-1] + ([(a, ln - 1)] if ln > 1 else [])
        is_write = False
        if c.read_len < 16:
            status, n = VIRTIO_BLK_S_IOERR, 0
        else:
            rd = c.readable
            if rd[0][1] >= 16:
                hdr = mem.read(rd[0][0], 16)
            else:
                hdr = b"".join(mem.read(x, y) for x, y in _split(rd, 16)[0])
            rtype, _, sector = _HDR.unpack(hdr)
            try:
                status, n, is_write = self._do(rtype, sector, _split(rd, 16)[1], win)
            except BlockIOError:
                status, n = VIRTIO_BLK_S_IOERR, 0
        mem.write(status_addr, bytes((status,)))
        key = ("ok", "ioerr", "unsupp")[status]
        self.stats[key] += 1
        return n + 1, is_write

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return sector * SECTOR + nbytes <= self.capacity * SECTOR

    def _views(self, segs: list) -> list:
        mem = self.mem
        return [mem.buffer(a, ln) for a, ln in segs]

    def _do(self, rtype: int, sector: int, rdata: list, wdata: list) -> tuple[int, int, bool]:
        """(status, bytes of in-data written, wrote to the disk?)."""
        if rtype == VIRTIO_BLK_T_IN:
            nbytes = sum(ln for _, ln in wdata)
            if nbytes % SECTOR or rdata or not self._range_ok(sector, nbytes):
                return VIRTIO_BLK_S_IOERR, 0, False
            self.backend.readv(sector * SECTOR, self._views(wdata))
            for a, ln in wdata:     # DMA into RAM views: translated code on those pages goes
                self.mem.note_written(a, ln)
            return VIRTIO_BLK_S_OK, nbytes, False
        if rtype == VIRTIO_BLK_T_OUT:
            nbytes = sum(ln for _, ln in rdata)
            if self.read_only or wdata or nbytes % SECTOR or not self._range_ok(sector, nbytes):
                return VIRTIO_BLK_S_IOERR, 0, False
            self.backend.writev(sector * SECTOR, self._views(rdata))
            return VIRTIO_BLK_S_OK, 0, True
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.stats["flushes"] += 1
            self.backend.flush()
            return VIRTIO_BLK_S_OK, 0, False
        if rtype == VIRTIO_BLK_T_GET_ID:
            room = sum(ln for _, ln in wdata)
            data = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:room]
            pos = 0
            for a, ln in wdata:
                if pos >= len(data):
                    break
                self.mem.write(a, data[pos:pos + ln])
                pos += ln
            return VIRTIO_BLK_S_OK, len(data), False
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(rtype, rdata)
        return VIRTIO_BLK_S_UNSUPP, 0, False

    def _discard_or_zero(self, rtype: int, rdata: list) -> tuple[int, int, bool]:
        """§5.2.6: the data is ``struct virtio_blk_discard_write_zeroes {le64
        sector; le32 num_sectors; le32 flags;}`` repeated."""
        raw = b"".join(self.mem.read(a, ln) for a, ln in rdata)
        if not raw or len(raw) % _SEG.size or len(raw) // _SEG.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR, 0, False
        segs = list(_SEG.iter_unpack(raw))
        for sector, num, flags in segs:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP, 0, False
            if rtype == VIRTIO_BLK_T_DISCARD and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP, 0, False
            if num > MAX_DISCARD_SECTORS or not self._range_ok(sector, num * SECTOR):
                return VIRTIO_BLK_S_IOERR, 0, False
        if self.read_only:
            return VIRTIO_BLK_S_IOERR, 0, False
        for sector, num, _ in segs:
            if rtype == VIRTIO_BLK_T_DISCARD:
                self.backend.discard(sector * SECTOR, num * SECTOR)
            else:
                self.backend.write_zeroes(sector * SECTOR, num * SECTOR)
        return VIRTIO_BLK_S_OK, 0, True

    def close(self) -> None:
        self.backend.close()


def serial_for(path: str) -> bytes:
    """A GET_ID string for an image: its file name, at most 20 bytes."""
    return os.path.basename(path).encode()[:VIRTIO_BLK_ID_BYTES] or b"vmlab-virtio-blk"
