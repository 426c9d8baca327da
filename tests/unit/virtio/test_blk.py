"""virtio-blk (virtio 1.2 §5.2) over real image files, driven through the
virtio-mmio transport by a driver-side mock in guest memory."""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmlab.devices.backends.block import Overlay, RawFile, open_image
from vmlab.devices.virtio.blk import (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
                                VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
                                VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                VIRTIO_BLK_T_WRITE_ZEROES, VirtioBlk)
from vmlab.devices.virtio.device import DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1
from vmlab.devices.virtio.mmio import MmioTransport
from vmlab.emu.memory import GuestMemory
from virtio_driver import FakeIrq, MockDriver, RecordingMemory, mmio_init

SECTORS = 64
HDR, DATA, STATUS = 0x50000, 0x60000, 0x5F000


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return p


class Rig:
    def __init__(self, backend, read_only=False, features=None):
        self.ram = GuestMemory(1 << 20)
        self.mem = RecordingMemory(self.ram)
        self.blk = VirtioBlk(backend, read_only=read_only, serial=b"disk-serial-0123456789")
        self.irq = FakeIrq()
        self.t = MmioTransport(self.blk, self.mem, self.irq)
        self.q = MockDriver(self.mem, 16)
        self.status = mmio_init(self.t, features=features, queues=[self.q])

    def request(self, rtype, sector=0, out=b"", inlen=0, extra=None):
        """One request as three descriptors (header, data, status)."""
        self.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(STATUS, b"\xee")
        bufs = [(HDR, 16, False)]
        if out:
            self.mem.write(DATA, out)
            bufs.append((DATA, len(out), False))
        if inlen:
            bufs.append((DATA, inlen, True))
        bufs.append((STATUS, 1, True))
        self.q.publish([self.q.add_chain(extra or bufs)])
        self.t.write(0x50, 4, 0)
        used = self.q.take_used()
        return self.mem.read(STATUS, 1)[0], used

    def close(self):
        self.blk.close()
        self.ram.close()


@pytest.fixture
def rig(image):
    r = Rig(RawFile(str(image)))
    yield r
    r.close()


def test_blk_config_reports_capacity_and_blk_size(rig):
    assert rig.t.read(0x100, 4) | rig.t.read(0x104, 4) << 32 == SECTORS
    assert rig.t.read(0x100 + 20, 4) == 512 and rig.t.read(0x100 + 12, 4) > 0


def test_blk_read_returns_image_bytes(rig, image):
    st, used = rig.request(VIRTIO_BLK_T_IN, sector=3, inlen=1024)
    assert st == VIRTIO_BLK_S_OK and used == [(0, 1025)]
    assert rig.mem.read(DATA, 1024) == image.read_bytes()[3 * 512:5 * 512]
    assert rig.irq.level


def test_blk_write_lands_in_image(rig, image):
    st, _ = rig.request(VIRTIO_BLK_T_OUT, sector=5, out=b"\xab" * 512)
    assert st == VIRTIO_BLK_S_OK
    assert image.read_bytes()[5 * 512:6 * 512] == b"\xab" * 512


def test_blk_flush_calls_fsync_before_ack(rig, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(rig.q.used_idx()), real(fd)))
    st, _ = rig.request(VIRTIO_BLK_T_FLUSH)
    assert st == VIRTIO_BLK_S_OK and calls == [0]     # fsync ran while the used idx was still 0


def test_blk_past_end_is_ioerr(rig):
    assert rig.request(VIRTIO_BLK_T_IN, sector=SECTORS - 1, inlen=1024)[0] == VIRTIO_BLK_S_IOERR
    assert rig.request(VIRTIO_BLK_T_OUT, sector=2**63, out=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR


def test_blk_unaligned_length_is_ioerr(rig):
    assert rig.request(VIRTIO_BLK_T_IN, inlen=100)[0] == VIRTIO_BLK_S_IOERR


def test_blk_get_id_returns_serial(rig):
    st, used = rig.request(VIRTIO_BLK_T_GET_ID, inlen=20)
    assert st == VIRTIO_BLK_S_OK and rig.mem.read(DATA, 20) == b"disk-serial-01234567" and used[0][1] == 21


def test_blk_discard_and_write_zeroes(rig, image):
    seg = struct.pack("<QII", 8, 4, 0)
    assert rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[8 * 512:12 * 512] == bytes(2048)
    assert rig.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 16, 8, 0))[0] == VIRTIO_BLK_S_OK
    assert rig.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 16, 8, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 16, 8, 6))[0] == VIRTIO_BLK_S_UNSUPP
    assert rig.request(VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", SECTORS, 1, 0))[0] == VIRTIO_BLK_S_IOERR


def test_blk_unknown_type_is_unsupp(rig):
    assert rig.request(99)[0] == VIRTIO_BLK_S_UNSUPP


def test_blk_header_in_writable_buffer_is_ioerr(rig):
    st, _ = rig.request(0, extra=[(HDR, 16, True), (STATUS, 1, True)])
    assert st == VIRTIO_BLK_S_IOERR


def test_blk_no_status_byte_returns_chain_with_zero_length(rig):
    _, used = rig.request(0, extra=[(HDR, 16, False)])
    assert used == [(0, 0)]


def test_blk_loop_sets_needs_reset(rig):
    rig.q.write_desc(rig.q.DESC, 0, HDR, 16, 1, 0)
    rig.q.publish([0])
    rig.t.write(0x50, 4, 0)
    assert rig.t.read(0x70, 4) & DEVICE_NEEDS_RESET and rig.t.read(0x60, 4) & 2


def test_blk_read_only_refuses_writes_and_offers_ro(image):
    r = Rig(open_image(str(image), read_only=True))
    try:
        assert r.blk.device_features >> VIRTIO_BLK_F_RO & 1
        before = image.read_bytes()
        assert r.request(VIRTIO_BLK_T_OUT, out=b"z" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert r.request(VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 1, 0))[0] == VIRTIO_BLK_S_IOERR
        assert r.request(VIRTIO_BLK_T_IN, inlen=512)[0] == VIRTIO_BLK_S_OK
        assert image.read_bytes() == before
    finally:
        r.close()


def test_blk_snapshot_overlay_keeps_image_untouched(image):
    before = image.read_bytes()
    r = Rig(open_image(str(image), snapshot=True))
    try:
        assert r.request(VIRTIO_BLK_T_OUT, sector=1, out=b"\x5a" * 1024)[0] == VIRTIO_BLK_S_OK
        assert r.request(VIRTIO_BLK_T_IN, sector=0, inlen=2048)[0] == VIRTIO_BLK_S_OK
        assert r.mem.read(DATA, 2048) == before[:512] + b"\x5a" * 1024 + before[1536:2048]
        assert r.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    finally:
        r.close()
    assert image.read_bytes() == before


def test_blk_without_flush_feature_writes_through(image, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(1), real(fd)))
    r = Rig(RawFile(str(image)), features=1 << VIRTIO_F_VERSION_1)
    try:
        assert not r.blk.has(VIRTIO_BLK_F_FLUSH)
        assert r.request(VIRTIO_BLK_T_OUT, out=b"q" * 512)[0] == VIRTIO_BLK_S_OK and calls
    finally:
        r.close()


def _expected(rtype, sector, out_len, in_len, flags):
    if rtype == VIRTIO_BLK_T_IN:
        ok = out_len == 0 and in_len % 512 == 0 and sector * 512 + in_len <= SECTORS * 512
        return VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR
    if rtype == VIRTIO_BLK_T_OUT:
        ok = in_len == 0 and out_len % 512 == 0 and sector * 512 + out_len <= SECTORS * 512
        return VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR
    if rtype == VIRTIO_BLK_T_FLUSH:
        return VIRTIO_BLK_S_OK
    if rtype == VIRTIO_BLK_T_GET_ID:
        return VIRTIO_BLK_S_OK
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        return None            # checked by the dedicated tests
    return VIRTIO_BLK_S_UNSUPP


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 2, 99]), st.integers(0, SECTORS + 4),
                          st.sampled_from([0, 512, 1024, 100, 4096]), st.sampled_from([0, 512, 2048, 20, 7]),
                          st.integers(1, 3)), min_size=1, max_size=6))
def test_blk_random_requests_get_expected_status(rig, reqs):
    """Random well-framed requests, split over 1-3 descriptors per part: the
    status is what §5.2.6 asks; no access outside RAM; no exception."""
    for rtype, sector, out_len, in_len, split in reqs:
        rig.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(HDR, 16, False)]
        if out_len:
            step = max(1, out_len // split)
            bufs += [(DATA + o, min(step, out_len - o), False) for o in range(0, out_len, step)]
        if in_len:
            step = max(1, in_len // split)
            bufs += [(DATA + 0x8000 + o, min(step, in_len - o), True) for o in range(0, in_len, step)]
        bufs.append((STATUS, 1, True))
        rig.mem.write(STATUS, b"\xee")
        rig.q.publish([rig.q.add_chain(bufs, indirect=split == 2)])
        rig.t.write(0x50, 4, 0)
        want = _expected(rtype, sector, out_len, in_len, 0)
        got = rig.mem.read(STATUS, 1)[0]
        if want is not None:
            assert got == want, (rtype, sector, out_len, in_len)
        assert not rig.t.read(0x70, 4) & DEVICE_NEEDS_RESET
    assert rig.mem.outside == []
