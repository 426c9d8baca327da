"""virtio-net front-end (virtio 1.2 §5.1 "Network Device").

One queue pair (§5.1.2: "0 receiveq1, 1 transmitq1"), no control queue.
Offered features: VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS and VIRTIO_NET_F_MTU
(plus the transport-wide VERSION_1, INDIRECT_DESC, EVENT_IDX).
VIRTIO_NET_F_MRG_RXBUF is not offered, nor any checksum or segmentation
offload, so every frame is whole and at most ``mtu + 18`` bytes (an Ethernet
header, a VLAN tag and the payload), and each received frame fills one
descriptor chain.

Every buffer starts with ``struct virtio_net_hdr`` (§5.1.6), 12 bytes with
VIRTIO_F_VERSION_1 ("The legacy driver only presented num_buffers in the
struct virtio_net_hdr when VIRTIO_NET_F_MRG_RXBUF was negotiated; without
that feature the structure was 2 bytes shorter"):
``u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start;
le16 csum_offset; le16 num_buffers;``.

Frames move to and from a net back-end (devices/backends/net.py) in batches:
one ``send`` per transmit notification, one ``deliver`` per batch of arrivals.

What a hostile or careless driver gets (never an exception, never an access
outside RAM):

* a chain that breaks the ring rules (devices/virtio/queue.py: loops,
  buffers outside RAM, nested indirect tables) or a receive chain with a
  device-readable buffer or no room for the header (§5.1.6.3 "the driver
  MUST ... make buffers available ... device-writable"): DEVICE_NEEDS_RESET,
  the device drops everything until the driver resets it;
* a transmit chain with device-writable buffers, shorter than the header plus
  an Ethernet header (14 bytes), or whose frame is longer than ``mtu + 18``:
  the frame is dropped and counted, the chain returned with used length 0;
* a received frame longer than the receive buffer (or than ``mtu + 18``):
  dropped and counted, the buffer kept for the next frame; one shorter than
  an Ethernet header (14 bytes, from a broken back-end or peer): dropped and
  counted.

Frames that arrive while no receive buffer is available wait in a bounded
backlog (:data:`RX_BACKLOG` frames, the rest dropped), delivered when the
driver makes buffers available (like QEMU's queued packets).
"""
from __future__ import annotations

import collections
import struct

from vmlab.emu.errors import GuestMemoryError

from . import virtq
from .device import VIRTIO_ID_NET, DeviceNeedsReset, VirtioDevice
from .queue import ChainError, QueueError

# §5.1.3 "Feature bits"
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17

# §5.1.4 "Device configuration layout": status bits
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# §5.1.6 "Device Operation"
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
HDR_LEN = 12
"""sizeof(struct virtio_net_hdr) with VIRTIO_F_VERSION_1 and without
VIRTIO_NET_F_HASH_REPORT."""
ETH_HLEN = 14

RX_QUEUE, TX_QUEUE = 0, 1
DEFAULT_MTU = 1500
RX_BACKLOG = 256
"""Frames held for the guest while its receive queue is empty."""

_RX_HDR = struct.pack("<BBHHHHH", 0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)
"""The header of every received frame: no flags, no GSO, num_buffers 1
(§5.1.6.4: without VIRTIO_NET_F_MRG_RXBUF a frame uses one buffer)."""


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; ValueError if malformed."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex bytes")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex bytes") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class VirtioNet(VirtioDevice):
    """virtio-net over the net back-end ``backend`` (devices.backends.net)."""

    device_id = VIRTIO_ID_NET
    num_queues = 2
    queue_max_size = 256

    def __init__(self, backend, mac: bytes = b"\x52\x54\x00\x12\x34\x56", mtu: int = DEFAULT_MTU,
                 link_up: bool = True):
        super().__init__()
        self.backend = backend
        self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = link_up
        self.max_frame = mtu + ETH_HLEN + 4          # Ethernet header + one VLAN tag
        self.backlog: collections.deque = collections.deque()
        self._spare: list = []                       # receive chains popped but not used yet
        self.broken = False
        self.stats = {"tx_frames": 0, "tx_bytes": 0, "tx_dropped": 0, "rx_frames": 0, "rx_bytes": 0,
                      "rx_dropped": 0, "bad_chains": 0, "notifies": 0}
        backend.connect(self.deliver)

    def specific_features(self) -> int:
        return (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MTU)

    def config(self) -> bytes:
        """§5.1.4 ``struct virtio_net_config {u8 mac[6]; le16 status;
        le16 max_virtqueue_pairs; le16 mtu;}``."""
        return struct.pack("<6sHHH", self.mac, VIRTIO_NET_S_LINK_UP if self.link_up else 0, 1, self.mtu)

    def set_link(self, up: bool) -> None:
        """Cable in or out: the status field changes and the driver gets a
        configuration change notification (§5.1.4.2 with VIRTIO_NET_F_STATUS)."""
        if up != self.link_up:
            self.link_up = up
            self.signal_config()

    # -- life cycle ---------------------------------------------------------------
    def activate(self, mem, queues, features) -> None:
        super().activate(mem, queues, features)
        self.broken = False
        # The batch fast path (devices/virtio/virtq.py) for guest RAM with a
        # host address; memory wrappers (tests) take the Python path below.
        self._fast = virtq.FAST if getattr(mem, "address", None) is not None else None

    def reset(self) -> None:
        super().reset()
        self.backlog.clear()
        self._spare = []
        self.broken = False

    def close(self) -> None:
        self.backend.close()

    def _fail(self, why: str) -> None:
        self.broken = True
        self.backlog.clear()
        self._spare = []
        self.signal_needs_reset(why)

    # -- notifications -------------------------------------------------------------
    def notify(self, index: int) -> None:
        self.stats["notifies"] += 1
        if self.broken:
            return
        try:
            if index == TX_QUEUE:
                self._transmit()
            elif index == RX_QUEUE:
                if self.backend.needs_poll:
                    self.backend.poll()          # may deliver (and flush) already
                self._flush_rx()
        except (QueueError, DeviceNeedsReset, GuestMemoryError) as exc:
            self._fail(str(exc))

    # -- transmit (§5.1.6.2) -------------------------------------------------------
    def _transmit(self) -> None:
        q = self.queues[TX_QUEUE]
        mem = self.mem
        st = self.stats
        max_frame = self.max_frame
        fast = getattr(self, "_fast", None)
        while True:
            if fast is not None:
                r, frames = fast.net_tx(mem, q, max_frame)
                if r.done:
                    st["tx_dropped"] += r.errors
                    if frames:
                        if self.link_up:
                            st["tx_frames"] += r.frames
                            st["tx_bytes"] += r.bytes
                            self.backend.send(frames)
                        else:
                            st["tx_dropped"] += r.frames
                    if q.needs_notification():
                        self.signal_used(TX_QUEUE)
                if r.stop == virtq.STOP_FULL:
                    continue
                if r.stop == virtq.STOP_EMPTY:
                    return
                chains = q.pop_all(limit=1)     # the chain the fast path left to us
            else:
                chains = q.pop_all()
            if not chains:
                return
            used = []
            frames = []
            bad = None
            for c in chains:
                if isinstance(c, ChainError):
                    st["bad_chains"] += 1
                    bad = c
                    break
                used.append((c.head, 0))
                n = c.read_len - HDR_LEN
                if c.writable or n < ETH_HLEN or n > max_frame:
                    st["tx_dropped"] += 1
                    continue
                rd = c.readable
                if len(rd) == 2 and rd[0][1] == HDR_LEN:       # Linux's usual: header, frame
                    frames.append(mem.read(rd[1][0], n))
                elif len(rd) == 1:                              # header and frame together
                    frames.append(mem.read(rd[0][0] + HDR_LEN, n))
                else:
                    frames.append(b"".join(mem.read(a, ln) for a, ln in rd)[HDR_LEN:])
            if frames:
                if self.link_up:
                    st["tx_frames"] += len(frames)
                    st["tx_bytes"] += sum(map(len, frames))
                    self.backend.send(frames)
                else:
                    st["tx_dropped"] += len(frames)
            q.push_used(used)
            if bad is not None:
                raise DeviceNeedsReset(f"virtio-net transmitq: {bad}")
            if q.needs_notification():
                self.signal_used(TX_QUEUE)

    # -- receive (§5.1.6.3, §5.1.6.4) ----------------------------------------------
    def deliver(self, frames: list) -> None:
        """Frames from the back-end for the guest (any thread-safety is the
        caller's: see devices/backends/net.py)."""
        st = self.stats
        if not self.active or self.broken or not self.link_up:
            st["rx_dropped"] += len(frames)
            return
        if any(len(f) < ETH_HLEN for f in frames):
            # A frame shorter than an Ethernet header is no frame: dropped and
            # counted (a back-end bug or a hostile peer on the hub), never
            # handed to the guest's driver, which parses the header.
            kept = [f for f in frames if len(f) >= ETH_HLEN]
            st["rx_dropped"] += len(frames) - len(kept)
            frames = kept
        room = RX_BACKLOG - len(self.backlog)
        if len(frames) > room:
            st["rx_dropped"] += len(frames) - room
            frames = frames[:room]
        self.backlog.extend(frames)
        try:
            self._flush_rx()
        except (QueueError, DeviceNeedsReset, GuestMemoryError) as exc:
            self._fail(str(exc))

    def _flush_rx(self) -> None:
        backlog = self.backlog
        if not backlog or not self.active or self.broken:
            return
        q = self.queues[RX_QUEUE]
        if not q.ready:
            return
        mem = self.mem
        st = self.stats
        max_frame = self.max_frame
        hdr = _RX_HDR
        fast = getattr(self, "_fast", None)
        while backlog:
            if fast is not None and not self._spare:
                frames = list(backlog)
                r = fast.net_rx(mem, q, max_frame, frames, hdr)
                if r.dma_hi:        # DMA: translated code on those pages goes
                    mem.note_written(r.dma_lo, r.dma_hi - r.dma_lo)
                if r.consumed == len(frames):
                    backlog.clear()
                else:
                    for _ in range(r.consumed):
                        backlog.popleft()
                st["rx_frames"] += r.frames
                st["rx_bytes"] += r.bytes
                st["rx_dropped"] += r.errors
                if r.done and q.needs_notification():
                    self.signal_used(RX_QUEUE)
                if r.stop != virtq.STOP_PUNT:
                    return                  # no buffers left, or no frames left
            chains = self._spare
            self._spare = []
            want = len(backlog) - len(chains)
            if want > 0:
                chains = chains + q.pop_all(limit=want)
            if not chains:
                return                      # no buffers: frames wait for the next RX notify
            used = []
            k = 0
            for k, c in enumerate(chains):
                if isinstance(c, ChainError) or c.readable or c.write_len < HDR_LEN:
                    st["bad_chains"] += 1
                    q.push_used(used)
                    why = c if isinstance(c, ChainError) else \
                        f"chain {c.head} is not device-writable buffers of at least {HDR_LEN} bytes"
                    raise DeviceNeedsReset(f"virtio-net receiveq: {why}")
                room = c.write_len - HDR_LEN
                f = None
                while backlog:
                    f = backlog.popleft()
                    if len(f) <= room and len(f) <= max_frame:
                        break
                    st["rx_dropped"] += 1
                    f = None
                if f is None:
                    self._spare = list(chains[k:])
                    break
                wr = c.writable
                a, ln = wr[0]
                n = HDR_LEN + len(f)
                if ln >= n:
                    mem.write(a, hdr + f)
                else:
                    data = memoryview(hdr + f)
                    pos = 0
                    for a, ln in wr:
                        m = min(ln, n - pos)
                        mem.write(a, data[pos:pos + m])
                        pos += m
                        if pos >= n:
                            break
                used.append((c.head, n))
                st["rx_frames"] += 1
                st["rx_bytes"] += len(f)
            q.push_used(used)
            if used and q.needs_notification():
                self.signal_used(RX_QUEUE)
            if self._spare:
                return
