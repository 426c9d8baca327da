"""The split-queue batch fast paths (devices/virtio/virtq.py): the C routines
of native/virtq.c against their pure-Python twins on hypothesis-generated
descriptor tables, rings, requests and frames -- same results, same guest
memory afterwards, same queue indices, same image bytes -- and neither ever
touches memory past the RAM size it was given (a canary after it)."""
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from vmlab.devices.virtio import virtq
from vmlab.devices.virtio.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, \
    VIRTIO_BLK_T_OUT, VirtioBlk
from vmlab.devices.virtio.device import DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1
from vmlab.devices.virtio.mmio import MmioTransport
from vmlab.devices.virtio.queue import SplitQueue
from vmlab.devices.backends.block import RawFile
from vmlab.emu.memory import GuestMemory
from virtio_driver import FakeIrq, MockDriver, RecordingMemory, mmio_init

pytestmark = pytest.mark.skipif(virtq.NATIVE is None, reason="the native module has no vmlab_vq_* (not rebuilt)")

MAPPED = 1 << 20
RAM = MAPPED - 0x10000            # the size the fast paths are told: a canary follows it
CANARY = bytes(range(256)) * (0x10000 // 256)
DESC, AVAIL, USED = 0x1000, 0x20000, 0x30000
QSIZE = 16
DISK = 64 * 512


class ShrunkMemory:
    """Guest RAM as the fast paths see it (address, size, view), told a
    smaller size than is mapped so an access past it shows in the canary."""

    def __init__(self, mem: GuestMemory):
        self._mem = mem
        self.address = mem.address
        self.size = RAM
        self.view = mem.view[:RAM]

    def check(self, gpa, length):
        if gpa < 0 or length < 0 or gpa + length > RAM:
            raise AssertionError("outside")

    def contains(self, gpa, length=1):
        return 0 <= gpa and length >= 0 and gpa + length <= RAM

    def read_int(self, gpa, size):
        return int.from_bytes(self.view[gpa:gpa + size], "little")

    def note_written(self, gpa, length):
        if gpa < 0 or length < 0 or gpa + length > RAM:
            raise AssertionError("outside")


# Addresses: buffers in a heap, near the end of RAM, straddling it, past it.
addrs = st.one_of(st.integers(0x40000, 0x80000), st.sampled_from([RAM - 1, RAM - 16, RAM - 512, RAM, RAM + 8,
                                                                   MAPPED - 4, 2**64 - 8, 0]))
lens = st.one_of(st.sampled_from([0, 1, 12, 16, 26, 511, 512, 1024, 1526, 4096, 2**32 - 1]),
                 st.integers(0, 5000))
flags = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 1, 3, 3, 1])
descs = st.tuples(addrs, lens, flags, st.integers(0, QSIZE + 2))


def _layout(mem, table, itables, ring, avail_off, used_idx, last_avail, headers):
    v = mem.view
    v[:MAPPED] = bytes(MAPPED)
    v[RAM:MAPPED] = CANARY
    for i, (a, ln, f, n) in enumerate(table):
        struct.pack_into("<QIHH", v, DESC + 16 * i, a & (2**64 - 1), ln & 0xFFFFFFFF, f, n)
    for t, itable in enumerate(itables):
        for i, (a, ln, f, n) in enumerate(itable):
            struct.pack_into("<QIHH", v, ITABLES + 0x400 * t + 16 * i, a & (2**64 - 1), ln & 0xFFFFFFFF, f, n)
    for i, h in enumerate(ring):
        struct.pack_into("<H", v, AVAIL + 4 + 2 * ((last_avail + i) % QSIZE), h)
    struct.pack_into("<H", v, AVAIL + 2, (last_avail + avail_off) & 0xFFFF)
    struct.pack_into("<H", v, USED + 2, used_idx)
    # Frame bytes and request headers where the buffers point.
    for k in range(0x40010, 0x80000, 0x1000):
        v[k:k + 64] = bytes((k >> 4) + j & 0xFF for j in range(64))
    for addr, rtype, sector in headers:
        struct.pack_into("<IIQ", v, addr, rtype, 0, sector)


ITABLES = 0x90000


def _queue(mem, last_avail, used_idx, event_idx, size=QSIZE):
    q = SplitQueue(mem, 256)
    q.size, q.ready, q.event_idx = size, True, event_idx
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.last_avail, q.used_idx = last_avail, used_idx
    return q


good_addr = st.integers(0x40, 0x7F).map(lambda p: p << 12)
# Chain shapes: blk (header, data, status), net tx (header+frame, or header,
# frame), net rx (one or two writable buffers), and anything.
buf = st.tuples(st.one_of(good_addr, addrs), lens, st.booleans())
def _blk(t):
    hdr, n, rtype, sector, flip, status = t
    w = (rtype != VIRTIO_BLK_T_OUT) != flip
    bufs = [(hdr, 16, False)] + ([(hdr + 0x200, n, w)] if n else []) + [(status + 0x800, 1, True)]
    return bufs, (hdr, rtype, sector)


SHAPES = (
    st.tuples(good_addr, st.sampled_from([512, 1024, 4096, 100, 0]),
              st.sampled_from([VIRTIO_BLK_T_IN] * 4 + [VIRTIO_BLK_T_OUT] * 3 + [4, 8, 99]),
              st.sampled_from([0, 1, 7, 50, 60, 63, 64, 2**63]), st.integers(0, 9).map(lambda x: x == 9),
              good_addr).map(_blk),
    st.tuples(good_addr, st.sampled_from([26, 60, 1526, 1600, 10])).map(lambda t: ([(t[0] + 0x10, t[1], False)], None)),
    st.tuples(good_addr, st.sampled_from([14, 60, 1514, 2000])).map(
        lambda t: ([(t[0], 12, False), (t[0] + 0x10, t[1], False)], None)),
    st.tuples(good_addr, st.sampled_from([12, 20, 100, 1526, 2048]), st.booleans()).map(
        lambda t: ([(t[0], t[1], True)] if not t[2] else [(t[0], 12, True), (t[0] + 0x100, t[1], True)], None)),
    st.lists(buf, min_size=1, max_size=4).map(lambda b: (b, None)),
)
mutation = st.tuples(st.integers(0, QSIZE - 1), st.sampled_from(["addr", "len", "flags", "next"]),
                     st.one_of(addrs, lens, flags, st.integers(0, QSIZE + 2)))


@st.composite
def scenarios(draw, prefer):
    # mostly the preferred shape (SHAPES[prefer]), sometimes any
    chains = [(draw(SHAPES[prefer] if draw(st.integers(0, 9)) else st.one_of(*SHAPES)), draw(st.integers(0, 5)))
              for _ in range(draw(st.integers(1, 6)))]
    table = [(0, 0, 0, 0)] * QSIZE
    itables, ring, nxt, hdrs = [], [], 0, []
    for (bufs, hdr), how in chains:
        if hdr is not None:
            hdrs.append(hdr)
        if how == 0 and len(itables) < 4:      # through an indirect table
            it = [(a, ln, (2 if w else 0) | (1 if k + 1 < len(bufs) else 0), k + 1) for k, (a, ln, w) in enumerate(bufs)]
            table[nxt % QSIZE] = (ITABLES + 0x400 * len(itables), 16 * len(it), 4, 0)
            itables.append(it)
            ring.append(nxt % QSIZE)
            nxt += 1
            continue
        idxs = [(nxt + k) % QSIZE for k in range(len(bufs))]
        for k, (a, ln, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            table[idxs[k]] = (a, ln, (2 if w else 0) | (0 if last else 1), 0 if last else idxs[k + 1])
        ring.append(idxs[0])
        nxt += len(bufs)
    for i, field, value in draw(st.lists(mutation, max_size=3)) if not draw(st.integers(0, 2)) else ():
        a, ln, f, n = table[i]
        table[i] = {"addr": (value, ln, f, n), "len": (a, value, f, n), "flags": (a, ln, value & 0xFFFF, n),
                    "next": (a, ln, f, value & 0xFFFF)}[field]
    if not draw(st.integers(0, 3)):
        ring = [h if draw(st.integers(0, 9)) else draw(st.integers(0, QSIZE + 1)) for h in ring]
    return dict(table=table, itables=itables, ring=ring,
                avail_off=draw(st.sampled_from([len(ring), len(ring), len(ring), 0, 1, QSIZE + 1, 0xFFFF])),
                used_idx=draw(st.integers(0, 0xFFFF)), last_avail=draw(st.integers(0, 0xFFFF)),
                event_idx=draw(st.booleans()),
                headers=hdrs)


@pytest.fixture(scope="module")
def mems():
    a, b = GuestMemory(MAPPED), GuestMemory(MAPPED)
    yield a, b
    a.close()
    b.close()


def _both(mems, sc):
    a, b = mems
    for m in (a, b):
        _layout(m, sc["table"], sc["itables"], sc["ring"], sc["avail_off"], sc["used_idx"], sc["last_avail"],
                sc["headers"])
    qa = _queue(a, sc["last_avail"], sc["used_idx"], sc["event_idx"])
    qb = _queue(b, sc["last_avail"], sc["used_idx"], sc["event_idx"])
    return ShrunkMemory(a), ShrunkMemory(b), qa, qb


def _same_after(mems, qa, qb):
    a, b = mems
    assert bytes(a.view[RAM:MAPPED]) == CANARY, "the C touched memory past the RAM size"
    assert bytes(b.view[RAM:MAPPED]) == CANARY
    assert bytes(a.view[:RAM]) == bytes(b.view[:RAM])
    assert (qa.last_avail, qa.used_idx) == (qb.last_avail, qb.used_idx)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(allow_write=st.booleans(), sc=scenarios(0))
def test_blk_native_matches_python_twin(mems, tmp_path_factory, allow_write, sc):
    d = tmp_path_factory.mktemp("img")
    image = os.urandom(DISK)
    paths = [d / "a.img", d / "b.img"]
    for p in paths:
        p.write_bytes(image)
    fds = [os.open(p, os.O_RDWR) for p in paths]
    try:
        ma, mb, qa, qb = _both(mems, sc)
        ra = virtq.NATIVE.blk(ma, qa, fds[0], DISK, allow_write)
        rb = virtq.PYTHON.blk(mb, qb, fds[1], DISK, allow_write)
        assert ra.as_tuple() == rb.as_tuple()
        event(f"blk done={min(ra.done, 2)} ok={min(ra.ok, 1)} err={min(ra.errors, 1)} stop={ra.stop}")
        _same_after(mems, qa, qb)
        assert paths[0].read_bytes() == paths[1].read_bytes()
        if not allow_write:
            assert paths[0].read_bytes() == image
    finally:
        for fd in fds:
            os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_frame=st.sampled_from([14, 60, 1518, 9000]), sc=scenarios(1))
def test_net_tx_native_matches_python_twin(mems, max_frame, sc):
    ma, mb, qa, qb = _both(mems, sc)
    ra, fa = virtq.NATIVE.net_tx(ma, qa, max_frame)
    rb, fb = virtq.PYTHON.net_tx(mb, qb, max_frame)
    assert ra.as_tuple() == rb.as_tuple()
    assert [bytes(f) for f in fa] == [bytes(f) for f in fb]
    event(f"tx frames={min(ra.frames, 2)} dropped={min(ra.errors, 1)} stop={ra.stop}")
    _same_after(mems, qa, qb)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_frame=st.sampled_from([14, 60, 1518, 9000]),
       frames=st.lists(st.binary(min_size=0, max_size=1600), max_size=12), sc=scenarios(3))
def test_net_rx_native_matches_python_twin(mems, max_frame, frames, sc):
    ma, mb, qa, qb = _both(mems, sc)
    hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
    ra = virtq.NATIVE.net_rx(ma, qa, max_frame, frames, hdr)
    rb = virtq.PYTHON.net_rx(mb, qb, max_frame, frames, hdr)
    assert ra.as_tuple() == rb.as_tuple()
    assert ra.consumed <= len(frames)
    event(f"rx frames={min(ra.frames, 2)} dropped={min(ra.errors, 1)} stop={ra.stop}")
    _same_after(mems, qa, qb)


@pytest.mark.parametrize("impl", ["NATIVE", "PYTHON"])
def test_fast_paths_take_plain_requests_and_leave_the_rest(impl, tmp_path):
    """A concrete batch: two reads, a write, a read past the end (IOERR), then
    a GET_ID the fast path leaves (STOP_PUNT, not taken)."""
    fp = getattr(virtq, impl)
    img = tmp_path / "d.img"
    img.write_bytes(bytes(range(256)) * (DISK // 256))
    ram = GuestMemory(MAPPED)
    fd = os.open(img, os.O_RDWR)
    try:
        drv = MockDriver(ram, QSIZE)
        q = SplitQueue(ram, 256)
        drv.configure(q)
        heads = []
        for k, (t, sector, data_len, w) in enumerate([(0, 1, 1024, True), (0, 3, 512, True), (1, 5, 512, False),
                                                      (0, 64, 512, True), (8, 0, 20, True)]):
            h = 0x40000 + 0x100 * k
            ram.write(h, struct.pack("<IIQ", t, 0, sector))
            data = 0x60000 + 0x1000 * k
            if not w:
                ram.write(data, b"\xab" * data_len)
            heads.append(drv.add_chain([(h, 16, False), (data, data_len, w), (0x70000 + k, 1, True)]))
        drv.publish(heads)
        r = fp.blk(ram, q, fd, DISK, True)
        assert (r.done, r.ok, r.errors, r.wrote, r.stop) == (4, 3, 1, 1, virtq.STOP_PUNT)
        assert drv.take_used() == [(heads[0], 1025), (heads[1], 513), (heads[2], 1), (heads[3], 1)]
        assert ram.read(0x70000, 4) == bytes([VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR])
        assert ram.read(0x60000, 1024) == img.read_bytes()[512:1536]
        assert img.read_bytes()[5 * 512:6 * 512] == b"\xab" * 512
        assert q.last_avail == 4               # the GET_ID is still available
    finally:
        os.close(fd)
        ram.close()


def test_blk_device_fast_and_python_paths_agree(tmp_path):
    """The same random batch through VirtioBlk with the fast path (GuestMemory)
    and without (a memory wrapper): same statuses, used ring and image."""
    import random
    rng = random.Random(1234)
    results = []
    for fast in (True, False):
        img = tmp_path / f"{fast}.img"
        img.write_bytes(bytes(range(256)) * (DISK // 256))
        ram = GuestMemory(MAPPED)
        mem = ram if fast else RecordingMemory(ram)
        blk = VirtioBlk(RawFile(str(img)))
        t = MmioTransport(blk, mem, FakeIrq())
        drv = MockDriver(mem, QSIZE)
        assert mmio_init(t, features=(1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << 28),
                         queues=[drv]) & 4
        assert (blk._fast is not None) == fast
        rng.seed(99)
        used = []
        for _ in range(6):
            heads = []
            for k in range(rng.randint(1, 5)):
                t_ = rng.choice([0, 0, 1, 4, 8, 0])
                sector = rng.choice([0, 3, 62, 63, 64, 100])
                n = rng.choice([512, 1024, 0, 100])
                h = 0x40000 + 0x100 * k
                mem.write(h, struct.pack("<IIQ", t_, 0, sector))
                data = 0x60000 + 0x1000 * k
                bufs = [(h, 16, False)] + ([(data, n, t_ != 1)] if n else []) + [(0x70000 + k, 1, True)]
                heads.append(drv.add_chain(bufs, indirect=rng.random() < 0.3))
            drv.publish(heads)
            t.write(0x50, 4, 0)
            used.append((drv.take_used(), bytes(ram.read(0x70000, 8)), bytes(ram.read(0x60000, 0x5000))))
        assert not t.status & DEVICE_NEEDS_RESET
        results.append((used, img.read_bytes(), {k: v for k, v in blk.stats.items()}))
        blk.close()
        ram.close()
    assert results[0] == results[1]


def test_net_device_fast_and_python_paths_agree():
    """The same transmit batches (good frames, runts, oversize, header split
    over two buffers, indirect) and the same arrivals (some too large for
    their buffer, more than there are buffers) through VirtioNet with the
    fast path (GuestMemory) and without (a memory wrapper): same frames sent,
    same used rings, same receive buffers, same statistics."""
    import random
    from vmlab.devices.backends.net import NetBackend
    from vmlab.devices.virtio.net import VirtioNet

    class Sink(NetBackend):
        def __init__(self):
            super().__init__()
            self.sent = []

        def send(self, frames):
            self.sent.append([bytes(f) for f in frames])

    class RxDrv(MockDriver):
        DESC, AVAIL, USED, HEAP = 0x1000, 0x8000, 0x9000, 0x40000

    class TxDrv(MockDriver):
        DESC, AVAIL, USED, HEAP = 0x2000, 0xA000, 0xB000, 0x80000

    results = []
    for fast in (True, False):
        rng = random.Random(7)
        ram = GuestMemory(MAPPED)
        mem = ram if fast else RecordingMemory(ram)
        sink = Sink()
        net = VirtioNet(sink)
        t = MmioTransport(net, mem, FakeIrq())
        rx, tx = RxDrv(mem, 16), TxDrv(mem, 16)
        assert mmio_init(t, features=(1 << VIRTIO_F_VERSION_1) | (1 << 28), queues=[rx, tx]) & 4
        assert (net._fast is not None) == fast
        log = []
        for _ in range(5):
            heads = []
            for k in range(rng.randint(1, 6)):
                n = rng.choice([1514, 60, 10, 1519, 1600, 200])
                data = bytes(12) + bytes([0xFF] * 6 + [k] * 6) + bytes((j * 7 + k) & 0xFF for j in range(max(0, n - 12)))
                a = tx.alloc(len(data), data)
                bufs = [(a, len(data), False)] if rng.random() < 0.5 else [(a, 12, False), (a + 12, len(data) - 12, False)]
                heads.append(tx.add_chain(bufs, indirect=rng.random() < 0.3))
            tx.publish(heads)
            t.write(0x50, 4, 1)
            log.append(("tx", tx.take_used()))
            heads = []
            for k in range(rng.randint(0, 4)):
                size = rng.choice([1526, 100, 2048, 12])
                a = rx.alloc(size)
                bufs = [(a, size, True)] if rng.random() < 0.6 or size < 24 else [(a, 12, True), (a + 12, size - 12, True)]
                heads.append(rx.add_chain(bufs, indirect=rng.random() < 0.3))
            rx.publish(heads)
            t.write(0x50, 4, 0)
            net.deliver([bytes([k]) * rng.choice([60, 90, 1514, 1600]) for k in range(rng.randint(0, 5))])
            log.append(("rx", rx.take_used()))
        assert not t.status & DEVICE_NEEDS_RESET
        results.append((log, sink.sent, bytes(ram.read(0x40000, 0x40000)), dict(net.stats), len(net.backlog)))
        ram.close()
    stats = results[0][3]
    assert stats["tx_frames"] and stats["tx_dropped"] and stats["rx_frames"] and stats["rx_dropped"], stats
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert results[0][2] == results[1][2]
    assert results[0][3] == results[1][3]
    assert results[0][4] == results[1][4]


HIGH = 1 << 32
BIG = (3 << 30) + (1 << 20)        # RAM [0, 3 GiB) and [4 GiB, 4 GiB + 1 MiB)


@pytest.fixture(scope="module")
def big_mems():
    a, b = GuestMemory(BIG), GuestMemory(BIG)
    assert a.high_size == 1 << 20
    yield a, b
    a.close()
    b.close()


def _high(addr):
    return HIGH + (addr & 0xFFFFF)


# Buffers above 4 GiB (mostly), in the hole below it, past the high RAM, straddling it.
big_addrs = st.one_of(st.integers(0, 0xEF).map(lambda p: HIGH + (p << 12)),
                      st.integers(0, 0xEF).map(lambda p: HIGH + (p << 12)),
                      st.sampled_from([HIGH - 16, (3 << 30) - 8, 3 << 30, (3 << 30) + 0x1000, HIGH + (1 << 20) - 8,
                                       HIGH + (1 << 20), HIGH + (1 << 20) - 1, 0x40000]))


@st.composite
def big_chain(draw, kind, rtype):
    a = [draw(big_addrs) for _ in range(3)]
    if kind == "blk":
        return [(a[0], 16, False), (a[1], draw(st.sampled_from([512, 1024, 4096])), rtype == VIRTIO_BLK_T_IN),
                (a[2], 1, True)]
    if kind == "tx":
        return [(a[0], draw(st.sampled_from([26, 100, 1526])), False)]
    return [(a[0], draw(st.sampled_from([112, 1526, 2048])), True)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(["blk", "tx", "rx"]),
       indirect_at=st.sampled_from([None, None, HIGH + 0xF0000, (3 << 30) + 0x100, HIGH + (1 << 20) - 16]),
       rtype=st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]))
def test_fast_paths_use_ram_above_4g_and_never_the_hole(big_mems, tmp_path_factory, data, kind, indirect_at, rtype):
    """RAM above 4 GiB (emu/memory.py splits RAM above 3 GiB around the
    32-bit hole): buffers there are used, buffers in the hole or past the
    high RAM are refused (STOP_PUNT), the C and the twin agree, and the hole
    is never touched (it is PROT_NONE: a touch would kill the process)."""
    chains = data.draw(st.lists(big_chain(kind, rtype), min_size=1, max_size=4))
    a, b = big_mems
    queues = []
    for m in (a, b):
        m.view[0:0x60000] = bytes(0x60000)
        m.view[HIGH:HIGH + (1 << 20)] = bytes(range(256)) * 4096
        drv = MockDriver(m, QSIZE)
        heads = []
        for k, bufs in enumerate(chains):
            if k == 0 and indirect_at is not None:
                # chain 0 through an indirect table above 4 GiB, in the hole or straddling the end
                head = drv.next_desc % QSIZE
                drv.next_desc += 1
                drv.write_desc(drv.DESC, head, indirect_at, 16 * len(bufs), 4, 0)
                if m.contains(indirect_at, 16 * len(bufs)):
                    for i, (ad, ln, w) in enumerate(bufs):
                        drv.write_desc(indirect_at, i, ad, ln, (2 if w else 0) | (1 if i + 1 < len(bufs) else 0), i + 1)
                heads.append(head)
            else:
                heads.append(drv.add_chain(bufs))
            if m.contains(bufs[0][0], 16):
                m.write(bufs[0][0], struct.pack("<IIQ", rtype, 0, 3))
        drv.publish(heads)
        q = SplitQueue(m, 256)
        drv.configure(q)
        queues.append(q)
    qa, qb = queues
    if kind == "blk":
        d = tmp_path_factory.mktemp("img")
        paths = [d / "a.img", d / "b.img"]
        image = os.urandom(DISK)
        for p in paths:
            p.write_bytes(image)
        fds = [os.open(p, os.O_RDWR) for p in paths]
        try:
            ra = virtq.NATIVE.blk(a, qa, fds[0], DISK, True)
            rb = virtq.PYTHON.blk(b, qb, fds[1], DISK, True)
            assert paths[0].read_bytes() == paths[1].read_bytes()
        finally:
            for fd in fds:
                os.close(fd)
    elif kind == "tx":
        ra, fa = virtq.NATIVE.net_tx(a, qa, 1518)
        rb, fb = virtq.PYTHON.net_tx(b, qb, 1518)
        assert [bytes(f) for f in fa] == [bytes(f) for f in fb]
    else:
        frames = [bytes([k]) * 100 for k in range(5)]
        hdr = bytes(10) + b"\x01\x00"
        ra = virtq.NATIVE.net_rx(a, qa, 1518, frames, hdr)
        rb = virtq.PYTHON.net_rx(b, qb, 1518, frames, hdr)
    assert ra.as_tuple() == rb.as_tuple()
    assert (qa.last_avail, qa.used_idx) == (qb.last_avail, qb.used_idx)
    assert bytes(a.view[0:0x60000]) == bytes(b.view[0:0x60000])
    assert bytes(a.view[HIGH:HIGH + (1 << 20)]) == bytes(b.view[HIGH:HIGH + (1 << 20)])
    event(f"{kind} done={min(ra.done, 2)} stop={ra.stop}")
