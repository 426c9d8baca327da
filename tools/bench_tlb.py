"""TLB-fill cost of a two-dimensional walk: native/mmu.c against emu/softmmu.py.

Cold 2D walks (4-level guest paging x 4-level EPT, SDM Vol. 3C 29.3), the
work a TLB miss of a nested guest costs: up to 4 guest entries, each behind a
4-level EPT translation, plus the final page's EPT translation -- 24 entry
reads.  Both walkers translate the same random linear addresses, spread over
many distinct guest pages (each behind its own guest PTE and EPT PTE), in the
same process, without A/D updates so that every walk does the same work.  The
C side runs ``vmlab_walk_bench`` (the loop is in C, so cffi's per-call cost is
not measured); the two checksums must agree.

``python -m vmlab.tools.bench_tlb`` prints the numbers as JSON.
"""
from __future__ import annotations

import json
import random
import struct
import time

from vmlab.emu import softmmu as sm
from vmlab.emu.native import ffi, lib

_PAGE = 4096
#: Guest-physical layout: the guest's tables in [0, 1 MiB), data pages above.
_GUEST_TABLES = 0
_GUEST_DATA = 1 << 20
#: Host-physical: guest-physical frames at the same address, the EPT above.
_EPT_BASE = 24 << 20
_RAM = 28 << 20
_RWX_WB = sm.EPT_R | sm.EPT_W | sm.EPT_X | sm.EPT_MT_WB << sm.EPT_MEMTYPE_SHIFT
_EPTP = _EPT_BASE | sm.EPT_MT_WB | 3 << sm.EPTP_WALK_LENGTH_SHIFT
_REGS = dict(cr0=sm.CR0_PG | sm.CR0_WP | 1, cr4=sm.CR4_PAE,
             efer=sm.EFER_LME | sm.EFER_LMA | sm.EFER_NXE)
_GUEST_FLAGS = sm.PTE_P | sm.PTE_RW | sm.PTE_A | sm.PTE_D


def _put(ram: bytearray, addr: int, value: int) -> None:
    struct.pack_into("<Q", ram, addr, value)


def build(fanout: int = 4, ptes: int = 64, seed: int = 1) -> tuple[bytearray, int, list[int]]:
    """Host RAM with a 4-level guest tree (``fanout`` PML4Es x PDPTEs x PDEs,
    ``ptes`` pages under each PDE, every page on its own guest-physical frame)
    behind a 4 KiB EPT; returns (ram, cr3, one linear address per page)."""
    rng = random.Random(seed)
    ram = bytearray(_RAM)
    frames = iter(range(_GUEST_TABLES // _PAGE + 1, _GUEST_DATA // _PAGE))
    data = iter(range(_GUEST_DATA // _PAGE, _EPT_BASE // _PAGE))
    cr3 = next(frames) * _PAGE
    vaddrs = []
    # spread the indices so that neighbouring pages do not share cache lines
    for i4 in rng.sample(range(256), fanout):
        pdpt = next(frames) * _PAGE
        _put(ram, cr3 + 8 * i4, pdpt | _GUEST_FLAGS)
        for i3 in rng.sample(range(512), fanout):
            pd = next(frames) * _PAGE
            _put(ram, pdpt + 8 * i3, pd | _GUEST_FLAGS)
            for i2 in rng.sample(range(512), fanout):
                pt = next(frames) * _PAGE
                _put(ram, pd + 8 * i2, pt | _GUEST_FLAGS)
                for i1 in rng.sample(range(512), ptes):
                    _put(ram, pt + 8 * i1, next(data) * _PAGE | _GUEST_FLAGS)
                    vaddrs.append(i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12 | rng.randrange(_PAGE))
    # EPT: identity 4 KiB mappings of guest-physical [0, _EPT_BASE)
    pdpt, pd, pt0 = _EPT_BASE + _PAGE, _EPT_BASE + 2 * _PAGE, _EPT_BASE + 3 * _PAGE
    _put(ram, _EPT_BASE, pdpt | sm.EPT_R | sm.EPT_W | sm.EPT_X)
    _put(ram, pdpt, pd | sm.EPT_R | sm.EPT_W | sm.EPT_X)
    for f in range(_EPT_BASE // _PAGE):
        pt = pt0 + (f >> 9) * _PAGE
        if f & 511 == 0:
            _put(ram, pd + 8 * (f >> 9), pt | sm.EPT_R | sm.EPT_W | sm.EPT_X)
        _put(ram, pt + 8 * (f & 511), f * _PAGE | _RWX_WB)
    rng.shuffle(vaddrs)
    return ram, cr3, vaddrs


def _checksum(results) -> int:
    s = 0
    for paddr, fault in results:
        s = (s * 31 + (paddr ^ (fault << 56))) & 0xFFFF_FFFF_FFFF_FFFF
    return s


def bench_tlb(n_c: int = 200_000, n_py: int = 3_000, access: int = sm.ACC_READ) -> dict:
    """Time cold 2D walks in C and in Python; returns ``c_fill_ns`` and
    ``py_fill_ns`` (nanoseconds per walk), ``speedup`` (py / c),
    ``c_fill_1d_ns`` (the same walks in C with EPT off, for the EPT's share)
    and the work done (pages, walks)."""
    ram, cr3, vaddrs = build()
    buf = ffi.new("uint8_t[]", len(ram))
    ffi.memmove(buf, bytes(ram), len(ram))
    v = ffi.new("vmlab_vcpu *")
    v.ram, v.ram_size, v.maxphyaddr, v.pdpe1gb = buf, len(ram), 40, 1
    v.cr0, v.cr3, v.cr4, v.efer = _REGS["cr0"], cr3, _REGS["cr4"], _REGS["efer"]
    v.eptp, v.ept_enabled = _EPTP, 1

    seq = [vaddrs[i % len(vaddrs)] for i in range(n_c)]
    arr = ffi.new("uint64_t[]", seq)
    lib.vmlab_walk_bench(v, arr, min(n_c, 10_000), access)        # warm the code, not the data
    t0 = time.perf_counter_ns()
    c_sum = lib.vmlab_walk_bench(v, arr, n_c, access)
    c_ns = (time.perf_counter_ns() - t0) / n_c
    v.ept_enabled = 0             # the same walks in one dimension (the EPT is the identity)
    t0 = time.perf_counter_ns()
    c1_sum = lib.vmlab_walk_bench(v, arr, n_c, access)
    c1_ns = (time.perf_counter_ns() - t0) / n_c
    v.ept_enabled = 1
    if c1_sum != c_sum:
        raise RuntimeError("bench_tlb: an identity EPT changed a translation")

    mem = sm.BufferMem(ram)
    py = []
    t0 = time.perf_counter_ns()
    for va in seq[:n_py]:
        r = sm.walk(mem, va, access, 0, cr3=cr3, eptp=_EPTP, **_REGS)
        py.append((r.paddr, r.fault))
    py_ns = (time.perf_counter_ns() - t0) / n_py
    if not all(f == sm.OK for _, f in py):
        raise RuntimeError("bench_tlb: the benchmark tree has a faulting walk")
    if lib.vmlab_walk_bench(v, arr, n_py, access) != _checksum(py):
        raise RuntimeError("bench_tlb: C and Python walks disagree")
    return {"c_fill_ns": round(c_ns, 1), "py_fill_ns": round(py_ns, 1),
            "speedup": round(py_ns / c_ns, 1), "c_fill_1d_ns": round(c1_ns, 1),
            "pages": len(vaddrs), "c_walks": n_c, "py_walks": n_py}


if __name__ == "__main__":
    print(json.dumps(bench_tlb()))
