"""The split virtqueue, device side (virtio 1.2 §2.7).

Layout in guest memory (virtio 1.2 §2.7, "Split Virtqueues"):

* Descriptor Table (§2.7.5): ``Queue Size`` entries of 16 bytes,
  ``le64 addr; le32 len; le16 flags; le16 next``;
* Available Ring (§2.7.6): ``le16 flags; le16 idx; le16 ring[Queue Size];
  le16 used_event`` (the last only with VIRTIO_F_EVENT_IDX);
* Used Ring (§2.7.8): ``le16 flags; le16 idx; struct {le32 id; le32 len}
  ring[Queue Size]; le16 avail_event`` (the last only with VIRTIO_F_EVENT_IDX).

The driver is hostile.  Every read and write of the rings and of the buffers
goes through :class:`emu.memory.GuestMemory` with its bounds checks; every walk
is bounded:

* a chain is at most ``Queue Size`` descriptors long (§2.7.5.2: "Drivers MUST
  NOT add a descriptor chain longer than 2^32 bytes in total; this implies that
  loops in the descriptor chain are forbidden!"; §2.7.5.3.1: "A driver MUST NOT
  create a descriptor chain longer than the Queue Size of the device"), so a
  ``next`` loop ends;
* an indirect table (§2.7.5.3) is one level deep (§2.7.5.3.1: "The driver MUST
  NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor (ie. only
  one table per descriptor)"), holds ``len / 16`` descriptors (so ``len`` is a
  non-zero multiple of 16), at most :data:`MAX_INDIRECT` of them, and is not
  combined with VIRTQ_DESC_F_NEXT ("A driver MUST NOT set both
  VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in flags");
* device-readable descriptors come before device-writable ones (§2.7.4.2: "The
  driver MUST place any device-writable descriptor elements after any
  device-readable descriptor elements");
* each buffer lies inside guest RAM and a chain's total length fits in 32 bits.

A chain that breaks one of these rules is a :class:`ChainError`; a ring that
cannot be read (an ``idx`` more than ``Queue Size`` ahead, a head index out of
range, rings outside RAM) is a :class:`QueueError`.  The device decides what
follows (the transport's DEVICE_NEEDS_RESET, §2.1.2); nothing here raises
anything else because of what the guest wrote.

Batching: :meth:`SplitQueue.pop_all` reads the available ring's ``idx`` and
every new ring entry in one read, and the descriptor table in one read, then
walks the chains over the unpacked table (no guest-memory call per
descriptor); :meth:`SplitQueue.push_used` writes a batch of used elements with
one write per contiguous ring stretch and then ``idx``.
"""
from __future__ import annotations

import struct

from vmlab.emu.errors import GuestMemoryError

# virtio 1.2 §2.7.5 "The Virtqueue Descriptor Table"
VIRTQ_DESC_F_NEXT = 1
"""This marks a buffer as continuing via the next field."""
VIRTQ_DESC_F_WRITE = 2
"""This marks a buffer as device write-only (otherwise device read-only)."""
VIRTQ_DESC_F_INDIRECT = 4
"""This means the buffer contains a list of buffer descriptors."""

# §2.7.6 "The Virtqueue Available Ring"
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# §2.7.8 "The Virtqueue Used Ring"
VIRTQ_USED_F_NO_NOTIFY = 1

# §2.7 Table: alignment of each part ("Descriptor Table 16, Available Ring 2,
# Used Ring 4").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

MAX_QUEUE_SIZE = 32768
"""§2.7: "Queue Size ... The maximum Queue Size value is 32768"."""
MAX_INDIRECT = 1024
"""Most entries vmlab accepts in one indirect table (QEMU's VIRTQUEUE_MAX_SIZE).
The spec bounds the table only by its length; a bound is vmlab's choice so a
hostile table cannot make the device walk 2^28 entries."""
MAX_CHAIN_BYTES = 1 << 32
"""§2.7.5.2 "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in
total"."""

_DESC = struct.Struct("<QIHH")


class QueueError(Exception):
    """The queue as a whole cannot be used (the device needs a reset)."""


class ChainError(Exception):
    """One descriptor chain is malformed; ``head`` is its ring head index."""

    def __init__(self, message: str, head: int):
        super().__init__(message)
        self.head = head


class Chain:
    """One available descriptor chain, already walked and checked.

    ``readable`` and ``writable`` are lists of ``(guest address, length)``
    buffers in chain order (device-readable ones first, §2.7.4.2);
    ``head`` is the index the used element must carry (§2.7.8: "id indicates
    the head entry of the descriptor chain describing the buffer").
    """

    __slots__ = ("head", "readable", "writable", "read_len", "write_len")

    def __init__(self, head: int, readable: list, writable: list):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = sum(n for _, n in readable)
        self.write_len = sum(n for _, n in writable)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10 / Linux ``vring_need_event``: true when ``event_idx`` lies in the
    window ``[old_idx, new_idx)`` of indices just published (mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class SplitQueue:
    """Device side of one split virtqueue.

    The transport fills ``size``, ``desc_addr``, ``avail_addr``, ``used_addr``
    and ``ready`` from the driver's register writes; ``event_idx`` is whether
    VIRTIO_F_EVENT_IDX was negotiated.  ``mem`` is the guest's GuestMemory.
    """

    def __init__(self, mem, max_size: int = 256):
        self.mem = mem
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """The state after a device reset (§2.1.2, §4.2.2.1: "Upon reset, the
        device MUST clear ... ready bits in the QueueReady register")."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.event_idx = False
        self.last_avail = 0          # next avail ring entry the device will read
        self.used_idx = 0            # next used ring index the device will write
        self.signalled_used = 0      # used idx when the driver was last notified
        self.signalled_valid = False

    # -- checks -------------------------------------------------------------
    def check(self) -> None:
        """Raise QueueError unless the queue may be used (§2.7: alignment and
        a power-of-2 size; every ring inside RAM)."""
        n = self.size
        if not self.ready:
            raise QueueError("queue is not ready")
        if n == 0 or n > self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of 2 in [1, {self.max_size}]")
        if self.desc_addr % DESC_ALIGN or self.avail_addr % AVAIL_ALIGN or self.used_addr % USED_ALIGN:
            raise QueueError("misaligned virtqueue part")
        mem = self.mem
        for addr, length, what in ((self.desc_addr, 16 * n, "descriptor table"),
                                   (self.avail_addr, 6 + 2 * n, "available ring"),
                                   (self.used_addr, 6 + 8 * n, "used ring")):
            if not mem.contains(addr, length):
                raise QueueError(f"{what} [{addr:#x}, +{length:#x}) lies outside guest RAM")

    # -- available ring -------------------------------------------------------
    def avail_idx(self) -> int:
        return self.mem.read_int(self.avail_addr + 2, 2)

    def pending(self) -> int:
        """How many chains the driver has made available and the device not
        taken yet (QueueError if ``idx`` ran more than a ring ahead)."""
        count = (self.avail_idx() - self.last_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available idx moved {count} entries ahead of a {self.size}-entry ring")
        return count

    def pop_all(self, limit: int | None = None) -> list:
        """Take every newly available chain (at most ``limit``): a list of
        :class:`Chain` and :class:`ChainError` in ring order.  QueueError if the
        ring itself is broken (the caller marks the device DEVICE_NEEDS_RESET).
        """
        try:
            self.check()
            count = self.pending()
        except GuestMemoryError as exc:       # RAM went away under the queue
            raise QueueError(str(exc)) from None
        if limit is not None:
            count = min(count, limit)
        if count == 0:
            return []
        n = self.size
        mem = self.mem
        # One read of the whole ring (n <= 32768 entries, bounds checked in check()).
        ring = struct.unpack_from(f"<{n}H", mem.read(self.avail_addr + 4, 2 * n))
        table = mem.read(self.desc_addr, 16 * n)
        descs = None
        start = self.last_avail
        out = []
        for k in range(count):
            head = ring[(start + k) % n]
            if head >= n:
                raise QueueError(f"available ring entry {(start + k) % n} holds head {head} >= queue size {n}")
            if descs is None:
                descs = _unpack_table(table, n)
            out.append(self._walk(descs, head))
        self.last_avail = (start + count) & 0xFFFF
        if self.event_idx:
            # §2.7.10: avail_event tells the driver which idx wants a notification.
            mem.write_int(self.used_addr + 4 + 8 * n, 2, self.last_avail)
        return out

    def _walk(self, descs, head: int):
        """Walk one chain over the unpacked table (see the module docstring)."""
        n = self.size
        mem = self.mem
        readable, writable = [], []
        total = 0
        i = head
        table = descs
        limit = n                 # descriptors left before the chain is too long
        in_indirect = False
        while True:
            if limit <= 0:
                return ChainError("descriptor chain longer than the queue size (a loop?)", head)
            limit -= 1
            addr, length, flags, nxt = table[i]
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    return ChainError("VIRTQ_DESC_F_INDIRECT inside an indirect table", head)
                if flags & VIRTQ_DESC_F_NEXT:
                    return ChainError("VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT", head)
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                    return ChainError(f"indirect table length {length} is not 16..{16 * MAX_INDIRECT} "
                                      f"in steps of 16", head)
                if not mem.contains(addr, length):
                    return ChainError(f"indirect table [{addr:#x}, +{length:#x}) outside guest RAM", head)
                m = length // 16
                table = _unpack_table(mem.read(addr, length), m)
                n = m
                limit = m
                i = 0
                in_indirect = True
                continue
            if length:
                if not mem.contains(addr, length):
                    return ChainError(f"buffer [{addr:#x}, +{length:#x}) outside guest RAM", head)
                total += length
                if total > MAX_CHAIN_BYTES:
                    return ChainError("descriptor chain longer than 2^32 bytes", head)
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    return ChainError("device-readable descriptor after a device-writable one", head)
                else:
                    readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= n:
                return ChainError(f"next index {nxt} >= table size {n}", head)
            i = nxt

    # -- used ring ------------------------------------------------------------
    def push_used(self, elems: list) -> None:
        """Publish ``[(head, written_len), …]`` in the used ring, then its idx
        (§2.7.8.2: the device updates idx after the ring entries)."""
        if not elems:
            return
        n = self.size
        mem = self.mem
        base = self.used_addr + 4
        idx = self.used_idx
        k = 0
        while k < len(elems):
            slot = idx % n
            run = min(len(elems) - k, n - slot)
            flat = []
            for head, length in elems[k:k + run]:
                flat.append(head)
                flat.append(length & 0xFFFFFFFF)
            mem.write(base + 8 * slot, struct.pack(f"<{2 * run}I", *flat))
            idx = (idx + run) & 0xFFFF
            k += run
        self.used_idx = idx
        mem.write_int(self.used_addr + 2, 2, idx)

    def needs_notification(self) -> bool:
        """After push_used: should the driver get a used buffer notification?

        §2.7.7.2: without VIRTIO_F_EVENT_IDX "If flags is 1, the device SHOULD
        NOT send a notification"; with it, "the device MUST ignore the lower bit
        of flags" and notifies when ``used_event`` lies in the indices just
        published (vring_need_event)."""
        mem = self.mem
        new = self.used_idx
        if not self.event_idx:
            self.signalled_used = new
            return not (mem.read_int(self.avail_addr, 2) & VIRTQ_AVAIL_F_NO_INTERRUPT)
        old = self.signalled_used
        valid = self.signalled_valid
        self.signalled_used = new
        self.signalled_valid = True
        if not valid:
            return True
        used_event = mem.read_int(self.avail_addr + 4 + 2 * self.size, 2)
        return vring_need_event(used_event, new, old)

    # -- state ------------------------------------------------------------------
    def state(self) -> dict:
        """The queue's registers and indices as a value (for snapshots and
        ``info devices``)."""
        return {"size": self.size, "ready": self.ready, "desc": self.desc_addr, "avail": self.avail_addr,
                "used": self.used_addr, "event_idx": self.event_idx, "last_avail": self.last_avail,
                "used_idx": self.used_idx}


def _unpack_table(data: bytes, n: int) -> list:
    """The descriptor table as a list of ``(addr, len, flags, next)``, one
    ``iter_unpack`` over the bytes (no Python call per descriptor field)."""
    return list(_DESC.iter_unpack(data[:16 * n]))
