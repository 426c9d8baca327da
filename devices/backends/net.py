"""Network back-ends: where a virtio-net device's frames go.

The protocol (:class:`NetBackend`) moves whole Ethernet frames (destination
MAC first, no FCS, no virtio-net header), in batches:

* the front-end (devices/virtio/net.py) calls ``send(frames)`` with the frames
  the guest transmitted;
* the back-end calls the ``deliver(frames)`` callback the front-end installed
  with ``connect`` for frames that arrive from outside;
* ``poll()`` is for back-ends fed by host I/O (``needs_poll``): the machine
  calls it periodically from its run loop (vmm/virtio_slots.py arms a timer),
  so frames reach the guest on the vCPU's thread, between instructions.

Back-ends:

* :class:`Hub` / :class:`HubPort` -- an in-process hub (QEMU's ``-netdev
  hub``/``hubport``): a frame sent on one port reaches every other port.  The
  machines on a hub must be run by one thread (vmm/together.py), because a
  delivery writes the receiving guest's RAM at once.
* :class:`UdpSocket` -- QEMU's ``-netdev dgram`` wire format: one Ethernet frame
  per UDP datagram, nothing else in the datagram (no length, no vnet header),
  from ``local`` to ``remote``.
* :class:`Capture` -- QEMU's ``-object filter-dump``: a filter on a back-end that
  writes every frame, both directions, to a pcap file (LINKTYPE_ETHERNET)
  that tcpdump, tshark and Wireshark read.
"""
from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Callable

MAX_FRAME = 65535
"""Largest frame a back-end carries (an IPv4 datagram's limit; QEMU's dgram
buffer is bigger, but no frame the virtio-net device accepts is larger)."""
POLL_BATCH = 256
"""Most datagrams one ``poll`` takes (bounds the time a poll can take)."""


class NetBackendError(Exception):
    """A back-end could not be set up (bad address, port in use)."""


class NetBackend:
    """The net back-end protocol (see the module docstring)."""

    needs_poll = False

    def __init__(self) -> None:
        self._deliver: Callable[[list], None] = lambda frames: None
        #: frames and bytes each way, and frames dropped (METRICS style)
        self.stats = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0, "dropped": 0}

    def connect(self, deliver: Callable[[list], None]) -> None:
        """Install the front-end's receive callback (``deliver(list of bytes)``)."""
        self._deliver = deliver

    def send(self, frames: list) -> None:
        """Frames the guest transmitted (bytes-like objects, whole frames)."""
        raise NotImplementedError

    def receive(self, frames: list) -> None:
        """Hand frames that arrived from outside to the front-end."""
        st = self.stats
        st["rx_frames"] += len(frames)
        st["rx_bytes"] += sum(map(len, frames))
        self._deliver(frames)

    def poll(self) -> None:
        """Take what arrived from the host side (back-ends with ``needs_poll``)."""

    def close(self) -> None:
        """Release host resources."""


class Hub:
    """An in-process Ethernet hub (no learning: every frame to every other port)."""

    def __init__(self, name: str = "hub0") -> None:
        self.name = name
        self.ports: list[HubPort] = []

    def port(self) -> "HubPort":
        """A new port on the hub, a NetBackend for one device."""
        p = HubPort(self)
        self.ports.append(p)
        return p

    def _forward(self, src: "HubPort", frames: list) -> None:
        for p in self.ports:
            if p is not src:
                p.receive(frames)


class HubPort(NetBackend):
    """One port of a :class:`Hub`."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub

    def send(self, frames: list) -> None:
        st = self.stats
        st["tx_frames"] += len(frames)
        st["tx_bytes"] += sum(map(len, frames))
        self.hub._forward(self, frames)

    def close(self) -> None:
        if self in self.hub.ports:
            self.hub.ports.remove(self)


def _inet(host: str, port: int, what: str) -> tuple[str, int]:
    try:
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    except (socket.gaierror, UnicodeError) as exc:
        raise NetBackendError(f"{what}: cannot resolve {host!r}: {exc}") from None
    return addr


class UdpSocket(NetBackend):
    """QEMU's ``-netdev dgram,local.type=inet,…,remote.type=inet,…``: frames
    go to ``remote`` as one datagram each; datagrams arriving at ``local``
    are frames for the guest (from any sender, as in QEMU).

    Sends never block: a datagram the host cannot queue now (EAGAIN, ENOBUFS)
    or whose peer is not listening (ECONNREFUSED on Linux) is dropped and
    counted, like a frame lost on a wire.
    """

    needs_poll = True

    def __init__(self, local: tuple[str, int], remote: tuple[str, int]) -> None:
        super().__init__()
        self.local = _inet(*local, "local")
        self.remote = _inet(*remote, "remote")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(self.local)
        except OSError as exc:
            self.sock.close()
            raise NetBackendError(f"cannot bind UDP {self.local[0]}:{self.local[1]}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.local = self.sock.getsockname()     # the real port when 0 was asked for

    def send(self, frames: list) -> None:
        st = self.stats
        sock, remote = self.sock, self.remote
        for f in frames:
            try:
                sock.sendto(f, remote)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EMSGSIZE):
                    st["dropped"] += 1
                    continue
                raise
            st["tx_frames"] += 1
            st["tx_bytes"] += len(f)

    def poll(self) -> None:
        out = []
        sock = self.sock
        for _ in range(POLL_BATCH):
            try:
                data = sock.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:               # ICMP errors surface here (ECONNREFUSED)
                continue
            if len(data) > MAX_FRAME:
                self.stats["dropped"] += 1
                continue
            out.append(data)
        if out:
            self.receive(out)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a datagram (for idle machines)."""
        import select
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def close(self) -> None:
        self.sock.close()


# pcap file format (https://wiki.wireshark.org/Development/LibpcapFileFormat):
# global header, then per frame a record header and the captured bytes.
PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
_PCAP_HDR = struct.Struct("<IHHiIII")
_PCAP_REC = struct.Struct("<IIII")


class Capture(NetBackend):
    """QEMU's ``-object filter-dump,netdev=…,file=…[,maxlen=N]``: sits between
    a front-end and ``inner``, passes every frame through unchanged and
    appends it to the pcap file ``path`` (frames longer than ``maxlen`` are
    cut there, the record keeping the real length, as in QEMU)."""

    def __init__(self, inner: NetBackend, path: str, maxlen: int = 65536) -> None:
        super().__init__()
        self.inner = inner
        self.needs_poll = inner.needs_poll
        self.maxlen = maxlen
        try:
            self.file = open(path, "wb")
        except OSError as exc:
            raise NetBackendError(f"cannot open capture file {path!r}: {exc.strerror}") from None
        self.file.write(_PCAP_HDR.pack(PCAP_MAGIC, 2, 4, 0, 0, maxlen, LINKTYPE_ETHERNET))
        self.file.flush()
        inner.connect(self._from_inner)

    def _dump(self, frames: list) -> None:
        t = time.time()
        sec, usec = int(t), int((t % 1) * 1e6)
        w = self.file.write
        for f in frames:
            n = min(len(f), self.maxlen)
            w(_PCAP_REC.pack(sec, usec, n, len(f)))
            w(bytes(f[:n]))
        self.file.flush()

    def _from_inner(self, frames: list) -> None:
        self._dump(frames)
        self.receive(frames)

    def send(self, frames: list) -> None:
        self._dump(frames)
        self.inner.send(frames)

    def poll(self) -> None:
        self.inner.poll()

    def close(self) -> None:
        self.file.close()
        self.inner.close()
