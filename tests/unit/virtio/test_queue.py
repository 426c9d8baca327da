"""Split virtqueue (devices/virtio/queue.py) against a driver-side mock in real
guest memory: valid chains parse to exactly what the driver wrote, malformed
ones give ChainError/QueueError, random tables never raise anything else and
never make the device touch memory outside RAM."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmlab.devices.virtio.queue import (MAX_INDIRECT, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                  VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Chain, ChainError, QueueError,
                                  SplitQueue, vring_need_event)
from vmlab.emu.memory import GuestMemory
from virtio_driver import MockDriver, RecordingMemory

RAM = 1 << 20


@pytest.fixture(scope="module")
def ram():
    m = GuestMemory(RAM)
    yield m
    m.close()


def setup(ram, size=16):
    ram.fill(0x60000, 0x1000)
    mem = RecordingMemory(ram)
    drv = MockDriver(mem, size)
    q = SplitQueue(mem, max_size=256)
    drv.configure(q)
    return mem, drv, q


def test_queue_direct_chain_parses_buffers_in_order(ram):
    mem, drv, q = setup(ram)
    h = drv.add_chain([(0x50000, 16, False), (0x50100, 512, True), (0x50400, 1, True)])
    drv.publish([h])
    (c,) = q.pop_all()
    assert isinstance(c, Chain) and c.head == h
    assert c.readable == [(0x50000, 16)] and c.writable == [(0x50100, 512), (0x50400, 1)]
    assert q.pop_all() == []


def test_queue_indirect_chain_parses_table(ram):
    mem, drv, q = setup(ram)
    h = drv.add_chain([(0x50000, 16, False), (0x50100, 4096, True), (0x52000, 1, True)], indirect=True)
    drv.publish([h])
    (c,) = q.pop_all()
    assert c.readable == [(0x50000, 16)] and c.writable == [(0x50100, 4096), (0x52000, 1)]


def test_queue_used_batch_wraps_ring_and_sets_idx(ram):
    mem, drv, q = setup(ram, size=4)
    for rnd in range(3):
        heads = [drv.add_chain([(0x50000 + 64 * k, 8, True)]) for k in range(3)]
        drv.publish(heads)
        chains = q.pop_all()
        assert [c.head for c in chains] == heads
        q.push_used([(c.head, 8) for c in chains])
        assert drv.take_used() == [(h, 8) for h in heads]
    assert drv.used_idx() == 9


def test_queue_loop_is_chain_error(ram):
    mem, drv, q = setup(ram)
    drv.write_desc(drv.DESC, 0, 0x50000, 8, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(drv.DESC, 1, 0x50000, 8, VIRTQ_DESC_F_NEXT, 0)
    drv.publish([0])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError) and "loop" in str(e)


@pytest.mark.parametrize("addr,length", [(RAM - 4, 8), (RAM, 1), (2**64 - 8, 16), (0x50000, 0xFFFFFFFF)])
def test_queue_buffer_outside_ram_is_chain_error(ram, addr, length):
    mem, drv, q = setup(ram)
    drv.publish([drv.add_chain([(0x50000, 16, False), (addr, length, True)])])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError) and "outside guest RAM" in str(e)
    assert mem.outside == []


def test_queue_readable_after_writable_is_chain_error(ram):
    mem, drv, q = setup(ram)
    drv.publish([drv.add_chain([(0x50000, 16, True), (0x50100, 16, False)])])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError) and "device-readable" in str(e)


def test_queue_nested_indirect_is_chain_error(ram):
    mem, drv, q = setup(ram)
    inner = drv.alloc(16)
    drv.write_desc(inner, 0, 0x50000, 8, 0, 0)
    outer = drv.alloc(16)
    drv.write_desc(outer, 0, inner, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.write_desc(drv.DESC, 0, outer, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish([0])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError) and "inside an indirect" in str(e)


@pytest.mark.parametrize("length,flags", [(0, 0), (24, 0), (16 * (MAX_INDIRECT + 1), 0), (16, VIRTQ_DESC_F_NEXT)])
def test_queue_bad_indirect_descriptor_is_chain_error(ram, length, flags):
    mem, drv, q = setup(ram)
    table = drv.alloc(16 * (MAX_INDIRECT + 1))
    drv.write_desc(drv.DESC, 0, table, length, VIRTQ_DESC_F_INDIRECT | flags, 1)
    drv.publish([0])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError)


def test_queue_indirect_loop_is_bounded(ram):
    mem, drv, q = setup(ram)
    table = drv.alloc(32)
    drv.write_desc(table, 0, 0x50000, 8, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(table, 1, 0x50000, 8, VIRTQ_DESC_F_NEXT, 0)
    drv.write_desc(drv.DESC, 0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish([0])
    (e,) = q.pop_all()
    assert isinstance(e, ChainError)


def test_queue_avail_idx_too_far_ahead_is_queue_error(ram):
    mem, drv, q = setup(ram)
    mem.write_int(drv.AVAIL + 2, 2, 17)
    with pytest.raises(QueueError):
        q.pop_all()


def test_queue_head_out_of_range_is_queue_error(ram):
    mem, drv, q = setup(ram)
    drv.publish([16])
    with pytest.raises(QueueError):
        q.pop_all()


def test_queue_rings_outside_ram_is_queue_error(ram):
    mem, drv, q = setup(ram)
    q.used_addr = RAM - 8
    with pytest.raises(QueueError):
        q.pop_all()
    assert mem.outside == []


def test_queue_event_idx_suppresses_until_used_event(ram):
    mem, drv, q = setup(ram)
    q.event_idx = True
    for k in range(4):
        drv.publish([drv.add_chain([(0x50000, 8, True)])])
    chains = q.pop_all()
    assert drv.avail_event() == 4            # the device asks to be kicked at idx 4
    drv.set_used_event(2)                    # interrupt me once used idx passes 2
    q.push_used([(chains[0].head, 0)])
    assert q.needs_notification()            # the first one always notifies
    q.push_used([(chains[1].head, 0)])
    assert not q.needs_notification()        # used idx 2: event 2 not yet crossed
    q.push_used([(chains[2].head, 0), (chains[3].head, 0)])
    assert q.needs_notification()            # 2 -> 4 crosses used_event 2


def test_queue_no_interrupt_flag_suppresses_without_event_idx(ram):
    mem, drv, q = setup(ram)
    drv.publish([drv.add_chain([(0x50000, 8, True)])])
    (c,) = q.pop_all()
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push_used([(c.head, 0)])
    assert not q.needs_notification()


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_matches_window_definition(event, old, delta):
    delta %= 0x8000
    new = (old + delta) & 0xFFFF
    window = {(old + k) & 0xFFFF for k in range(delta)}
    assert vring_need_event(event, new, old) == (event in window)


# ---------------------------------------------------------------- property tests
buf = st.tuples(st.integers(0x50000, 0xF0000), st.integers(0, 8192))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(buf, min_size=1, max_size=6), st.integers(0, 6), st.booleans()),
                min_size=1, max_size=8))
def test_queue_valid_chains_parse_to_what_the_driver_wrote(ram, reqs):
    """Firecracker-style: random chains with their expected parse."""
    mem, drv, q = setup(ram, size=64)
    heads, want = [], []
    for bufs, nread, indirect in reqs:
        nread = min(nread, len(bufs))
        spec = [(a, n, k >= nread) for k, (a, n) in enumerate(bufs)]
        heads.append(drv.add_chain(spec, indirect=indirect))
        want.append(([(a, n) for a, n, w in spec if not w and n], [(a, n) for a, n, w in spec if w and n]))
    drv.publish(heads)
    got = q.pop_all()
    assert [(c.readable, c.writable) for c in got] == want
    assert [c.head for c in got] == heads
    assert mem.outside == []


def _oracle(mem: GuestMemory, size: int, head: int):
    """Reference walk straight from the spec, one descriptor read at a time:
    returns (readable, writable) or None when the chain is malformed."""
    r, w = [], []
    table, n, i, steps, indirect, total = 0x1000, size, head, 0, False, 0
    while True:
        steps += 1
        if steps > n:
            return None
        addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(table + 16 * i, 16))
        if flags & VIRTQ_DESC_F_INDIRECT:
            if indirect or flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16 or length > 16 * MAX_INDIRECT:
                return None
            if not mem.contains(addr, length):
                return None
            table, n, i, steps, indirect = addr, length // 16, 0, 0, True
            continue
        if length:
            if not mem.contains(addr, length):
                return None
            total += length
            if total > 1 << 32:
                return None
            if flags & VIRTQ_DESC_F_WRITE:
                w.append((addr, length))
            elif w:
                return None
            else:
                r.append((addr, length))
        if not flags & VIRTQ_DESC_F_NEXT:
            return r, w
        if nxt >= n:
            return None
        i = nxt


addr_st = st.one_of(st.integers(0x50000, 0xF0000), st.sampled_from([0, RAM - 1, RAM, RAM - 16, 2**63, 2**64 - 1]),
                    st.integers(0, 2**64 - 1))
len_st = st.one_of(st.integers(0, 4096), st.sampled_from([16, 32, 48, 0xFFFFFFFF, 0x80000000, RAM]))
desc_st = st.tuples(addr_st, len_st, st.integers(0, 7), st.integers(0, 20))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(desc_st, min_size=16, max_size=16), st.lists(desc_st, max_size=8),
       st.lists(st.integers(0, 18), min_size=1, max_size=20), st.integers(0, 0xFFFF))
def test_queue_random_tables_never_raise_or_touch_outside_ram(ram, table, itable, ring, avail_idx):
    """Hostile driver: random descriptor table, one random indirect table that
    descriptors may point at, random ring entries and idx.  Only QueueError may
    come out; every chain matches the reference walk; no access outside RAM."""
    mem, drv, q = setup(ram, size=16)
    itab = 0x60000
    for k, (a, n, f, x) in enumerate(itable):
        drv.write_desc(itab, k, a, n, f, x)
    for k, (a, n, f, x) in enumerate(table):
        if f & VIRTQ_DESC_F_INDIRECT and k % 2:
            a, n = itab, 16 * max(1, len(itable))      # often a well-placed table
        drv.write_desc(drv.DESC, k, a, n, f, x)
    for k, h in enumerate(ring):
        mem.write_int(drv.AVAIL + 4 + 2 * (k % 16), 2, h)
    mem.write_int(drv.AVAIL + 2, 2, avail_idx if avail_idx % 3 else len(ring) % 17)
    try:
        got = q.pop_all()
    except QueueError:
        got = None
    assert mem.outside == []
    if got is None:
        return
    for c in got:
        want = _oracle(ram, 16, c.head)
        if want is None:
            assert isinstance(c, ChainError)
        else:
            assert isinstance(c, Chain) and (c.readable, c.writable) == want
