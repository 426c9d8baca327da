"""EPT, the second dimension of the walk: native/mmu.c against emu/softmmu.py.

SDM Vol. 3C 29.3 ("The Extended Page Table Mechanism"): EPTP (25.6.11), EPT
entries (Tables 29-1..29-6), misconfigurations (29.3.3.1), violations
(29.3.3.2), EPT A/D flags (29.3.5), exit qualification (Table 28-7).

As in test_softmmu_twin.py: differential tests (random guest trees behind a
random EPT, tests/strategies.py ``nested_setups``; C and Python must agree on
everything, RAM afterwards included) and one example per rule on both walkers,
checked against the SDM's answer.  Expected qualifications are spelled with
vmm.qualification.EptViolationQualification so the walker and the VMX layer
read Table 28-7 the same way.

Hand-built setups: host RAM of 64 frames; the guest's frames are identity
mapped by 4 KiB EPT pages (so guest-physical == host-physical unless a test
remaps), the guest's tables at 0x1000.. and its data page at DATA; the EPT's
tables at 0x30000.. (PML4, PDPT, PD, PT).
"""
from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings

from vmlab.emu import softmmu as sm
from vmlab.emu.native import ffi, lib
from tests.strategies import (MODE_32, MODE_4LEVEL, MODE_NONE, MODE_PAE, MODES, control_regs,
                              map_path, nested_setups, put)
from vmlab.vmm.qualification import EptViolationQualification as Qual

RAM_SIZE = 64 * 4096
TOP = 0x1000            # guest top-level table; lower levels at 0x2000, 0x3000...
DATA = 0x10000          # the guest's data page
EPT_PML4, EPT_PDPT, EPT_PD, EPT_PT = 0x30000, 0x31000, 0x32000, 0x33000
EPT_FRAMES = 0x30       # guest frames 0..0x2f are mapped; the EPT itself is not
VA64 = 0x0000_7F12_3456_7ABC
VA32 = 0x8123_4ABC
RWX = sm.EPT_R | sm.EPT_W | sm.EPT_X
WB = sm.EPT_MT_WB << sm.EPT_MEMTYPE_SHIFT
UPPER = sm.PTE_P | sm.PTE_RW | sm.PTE_US | sm.PTE_A
FULL = UPPER | sm.PTE_D
EPTP = EPT_PML4 | sm.EPT_MT_WB | 3 << sm.EPTP_WALK_LENGTH_SHIFT
EPTP_AD = EPTP | sm.EPTP_AD


# ------------------------------------------------------------------ the two walkers
def _vcpu(ram, *, cr0=0, cr3=0, cr4=0, efer=0, maxphyaddr=40, pdpe1gb=True, eptp=None):
    n = len(ram)
    buf = ffi.new("uint8_t[]", n)
    ffi.memmove(buf, bytes(ram), n)
    v = ffi.new("vmlab_vcpu *")
    v.ram, v.ram_size = buf, n
    v.cr0, v.cr3, v.cr4, v.efer = cr0, cr3, cr4, efer
    v.maxphyaddr, v.pdpe1gb = maxphyaddr, int(pdpe1gb)
    if eptp is not None:
        v.eptp, v.ept_enabled = eptp, 1
    return v, buf


def c_walk(ram, vaddr, access, flags, **regs):
    """vmlab_walk_do on a copy of ram: (WalkResult, RAM afterwards)."""
    v, buf = _vcpu(ram, **regs)
    w = ffi.new("vmlab_walk *")
    rc = lib.vmlab_walk_do(v, vaddr, access, flags, w)
    assert rc == w.fault
    mode = sm.paging_mode(regs["cr0"], regs["cr4"], regs["efer"])
    return sm.WalkResult.from_native(w, mode), bytearray(ffi.buffer(buf))


def py_walk(ram, vaddr, access, flags, **regs):
    mem = bytearray(ram)
    return sm.walk(mem, vaddr, access, flags, **regs), mem


def c_ept_translate(ram, gpa, access, *, eptp, maxphyaddr=40):
    v, buf = _vcpu(ram, maxphyaddr=maxphyaddr, eptp=eptp)
    w = ffi.new("vmlab_walk *")
    rc = lib.vmlab_ept_translate(v, gpa, access, w)
    assert rc == w.fault
    return sm.WalkResult.from_native(w), bytearray(ffi.buffer(buf))


def py_ept_translate(ram, gpa, access, *, eptp, maxphyaddr=40):
    mem = bytearray(ram)
    return sm.ept_translate(mem, gpa, access, eptp=eptp, maxphyaddr=maxphyaddr), mem


WALKERS = {"c": c_walk, "python": py_walk}
TRANSLATORS = {"c": c_ept_translate, "python": py_ept_translate}


@pytest.fixture(params=sorted(WALKERS))
def walker(request):
    return WALKERS[request.param]


@pytest.fixture(params=sorted(TRANSLATORS))
def translator(request):
    return TRANSLATORS[request.param]


def u64(ram, addr):
    return int.from_bytes(ram[addr:addr + 8], "little")


# ------------------------------------------------------------------ hand-built setups
def ept_leaf(hpa, rights=RWX, flags=WB | sm.EPT_A | sm.EPT_D):
    return hpa | rights | flags


def nested(mode=MODE_4LEVEL, vaddr=VA64, leaf=DATA | FULL, *, upper=UPPER, ept_upper=RWX,
           **cr) -> tuple[bytearray, dict]:
    """Host RAM with a guest tree for vaddr (tables at 0x1000.., leaf ``leaf``)
    and an identity 4 KiB EPT for guest frames 0..0x2f; returns (ram, regs)."""
    ram = bytearray(RAM_SIZE)
    depth = {MODE_32: 2, MODE_PAE: 3, MODE_4LEVEL: 4}[mode]
    entries = [(0x2000 + 0x1000 * i) | (sm.PTE_P if mode == MODE_PAE and i == 0 else upper)
               for i in range(depth - 1)] + [leaf]
    map_path(ram, mode, TOP, vaddr, entries)
    put(ram, EPT_PML4, EPT_PDPT | ept_upper, 8)
    put(ram, EPT_PDPT, EPT_PD | ept_upper, 8)
    put(ram, EPT_PD, EPT_PT | ept_upper, 8)
    for f in range(EPT_FRAMES):
        put(ram, EPT_PT + 8 * f, ept_leaf(f << 12), 8)
    return ram, control_regs(mode, **cr) | {"cr3": TOP, "eptp": EPTP}


def set_pte(ram, gpa, value):
    """Replace the EPT PTE of guest-physical gpa (inside the first 2 MiB)."""
    put(ram, EPT_PT + 8 * (gpa >> 12), value, 8)


def guest_entry_gpa(vaddr, depth):
    """Guest-physical address of the 4-level entry at depth (0 = PML4E) in nested()."""
    table = TOP if depth == 0 else 0x1000 + 0x1000 * depth
    return table + ((vaddr >> (39 - 9 * depth)) & 511) * 8


# ------------------------------------------------------------------ differential tests
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.data_too_large])


def assert_twins_agree(s):
    rc, mc = c_walk(s.ram, s.vaddr, s.access, s.flags, **s.regs)
    rp, mp = py_walk(s.ram, s.vaddr, s.access, s.flags, **s.regs)
    assert rc == rp, f"\nC:\n{rc.describe()}\n{rc}\nPython:\n{rp.describe()}\n{rp}"
    assert mc == mp, "RAM after the walk differs (C != Python)"
    return rp, mp


@pytest.mark.parametrize("mode", MODES)
def test_ept_nested_walk_random_tables_c_and_python_agree(mode):
    @settings(max_examples=150 if mode == MODE_NONE else 600, **_SETTINGS)
    @given(nested_setups(modes=(mode,)))
    def check(s):
        assert_twins_agree(s)

    check()


@settings(max_examples=400, **_SETTINGS)
@given(nested_setups(modes=(MODE_NONE, MODE_4LEVEL)))
def test_ept_translate_random_ept_c_and_python_agree(s):
    gpa = s.guest.target if s.mode == MODE_NONE else s.guest.entries[0][0]
    access = s.access & ~sm.ACC_USER
    rc, mc = c_ept_translate(s.ram, gpa, access, eptp=s.eptp, maxphyaddr=s.guest.maxphyaddr)
    rp, mp = py_ept_translate(s.ram, gpa, access, eptp=s.eptp, maxphyaddr=s.guest.maxphyaddr)
    assert rc == rp, f"\nC:\n{rc.describe()}\nPython:\n{rp.describe()}"
    assert mc == mp


def outcome(s, r, before, after) -> set[str]:
    kinds = {f"layout-{s.layout}"}
    if r.fault == sm.FAULT_EPT_VIOLATION:
        q = r.ept_qualification
        where = "final" if q & sm.EPTQ_TRANSLATED else "paging"
        acc = {1: "read", 2: "write", 3: "read-write", 4: "fetch"}[q & 7]
        kinds.add(f"violation-{where}-{acc}")
        if not q & (sm.EPTQ_READABLE | sm.EPTQ_WRITABLE | sm.EPTQ_EXECUTABLE):
            kinds.add("violation-not-present")
    elif r.fault == sm.FAULT_EPT_MISCONFIG:
        kinds.add("misconfig-eptp" if not sm.eptp_valid(s.eptp, s.guest.maxphyaddr)
                  else "misconfig-entry")
    else:
        kinds.add({sm.OK: "ok", sm.FAULT_PF: "guest-pf", sm.FAULT_BUS: "bus"}[r.fault])
    if r.ok and r.ept_page_size > 4096:
        kinds.add(f"ok-ept-{r.ept_page_size >> 20}m")
    if before != after:
        kinds.add("ram-written")
        ept_frames = {a >> 12 for a, _ in s.ept_entries}
        if s.eptp & sm.EPTP_AD and any(before[f << 12:(f + 1) << 12] != after[f << 12:(f + 1) << 12]
                                       for f in ept_frames):
            kinds.add("ept-ad-written")
    return kinds


def test_nested_setups_hit_every_outcome():
    seen: collections.Counter = collections.Counter()
    n = 1500

    @settings(max_examples=n, database=None, **_SETTINGS)
    @given(nested_setups(modes=MODES[1:]))
    def collect(s):
        r, after = py_walk(s.ram, s.vaddr, s.access, s.flags, **s.regs)
        seen.update(outcome(s, r, bytes(s.ram), bytes(after)))

    collect()
    wanted = {"ok", "bus", "guest-pf", "misconfig-eptp", "misconfig-entry", "violation-not-present",
              "violation-paging-read", "violation-paging-write", "violation-paging-read-write",
              "violation-final-read", "violation-final-write", "violation-final-fetch",
              "ok-ept-2m", "ok-ept-1024m", "ram-written", "ept-ad-written"}
    assert wanted <= set(seen), f"never produced: {wanted - set(seen)} (seen {dict(seen)})"
    assert seen["ok"] > 0.3 * n


# ------------------------------------------------------------------ violations
def test_ept_write_to_read_only_page_gives_violation_with_qualification_write_final_access(walker):
    ram, regs = nested()
    set_pte(ram, DATA, ept_leaf(DATA, sm.EPT_R | sm.EPT_X))
    r, after = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert (r.fault, r.gpa, r.gla, r.perms) == (sm.FAULT_EPT_VIOLATION, DATA | 0xABC, VA64, 0)
    assert r.ept_qualification == Qual(write=True, readable=True, executable=True,
                                       linear_address_valid=True, translated_access=True).encode()
    assert r.ept_levels == 4 and r.ept_entry_addr == [EPT_PML4, EPT_PDPT, EPT_PD, EPT_PT + 0x80]
    assert after == ram          # the guest leaf's A/D come last: untouched


def test_ept_read_of_read_only_page_succeeds_without_write_permission(walker):
    ram, regs = nested()
    set_pte(ram, DATA, ept_leaf(DATA, sm.EPT_R))
    r, _ = walker(ram, VA64, sm.ACC_READ, sm.WALK_SET_AD, **regs)
    assert (r.fault, r.paddr, r.gpa, r.perms) == (sm.OK, DATA | 0xABC, DATA | 0xABC, sm.PROT_R)
    assert (r.ept_levels, r.ept_page_size, r.ept_qualification) == (4, 4096, 0)


def test_ept_fetch_from_non_executable_page_gives_violation_with_fetch_bit(walker):
    ram, regs = nested()
    set_pte(ram, DATA, ept_leaf(DATA, sm.EPT_R | sm.EPT_W))
    r, _ = walker(ram, VA64, sm.ACC_FETCH, 0, **regs)
    assert r.fault == sm.FAULT_EPT_VIOLATION
    assert r.ept_qualification == Qual(fetch=True, readable=True, writable=True,
                                       linear_address_valid=True, translated_access=True).encode()


def test_ept_not_present_final_page_gives_violation_with_no_permissions(walker):
    ram, regs = nested()
    set_pte(ram, DATA, DATA | WB)                  # bits 2:0 = 0
    r, _ = walker(ram, VA64, sm.ACC_READ | sm.ACC_USER, 0, **regs)
    assert (r.fault, r.gpa) == (sm.FAULT_EPT_VIOLATION, DATA | 0xABC)
    assert r.ept_qualification == Qual(read=True, linear_address_valid=True,
                                       translated_access=True).encode()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_ept_not_present_upper_entry_stops_ept_walk_there(walker, level):
    ram, regs = nested()
    put(ram, [EPT_PML4, EPT_PDPT, EPT_PD][level], 0, 8)
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    # the first access of the walk is the guest's PML4E
    assert (r.fault, r.gpa) == (sm.FAULT_EPT_VIOLATION, guest_entry_gpa(VA64, 0))
    assert (r.ept_levels, r.levels) == (level + 1, 0)
    assert r.ept_qualification == Qual(read=True, linear_address_valid=True).encode()


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_ept_unmapped_guest_paging_structure_gives_violation_with_bit8_clear(walker, depth):
    ram, regs = nested()
    gpa = guest_entry_gpa(VA64, depth)
    set_pte(ram, gpa, 0)
    r, _ = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    # reads of guest paging structures are data reads (29.3.3.2), whatever the access
    assert (r.fault, r.gpa, r.gla, r.levels) == (sm.FAULT_EPT_VIOLATION, gpa, VA64, depth)
    assert r.ept_qualification == Qual(read=True, linear_address_valid=True).encode()


def test_ept_read_only_guest_table_allows_walk_when_accessed_flags_are_set(walker):
    ram, regs = nested()
    for depth in range(4):
        set_pte(ram, guest_entry_gpa(VA64, depth), ept_leaf(0x1000 + 0x1000 * depth, sm.EPT_R))
    r, after = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert r.fault == sm.OK and after == ram       # A/D already set: nothing to write


@pytest.mark.parametrize("depth", [0, 2, 3])
def test_ept_setting_accessed_flag_in_read_only_guest_table_gives_write_violation(walker, depth):
    ram, regs = nested(leaf=DATA | sm.PTE_P | sm.PTE_RW, upper=sm.PTE_P | sm.PTE_RW)
    gpa = guest_entry_gpa(VA64, depth)
    set_pte(ram, gpa, ept_leaf(gpa & ~0xFFF, sm.EPT_R | sm.EPT_X))
    r, after = walker(ram, VA64, sm.ACC_READ, sm.WALK_SET_AD, **regs)
    # A/D updates are data writes (29.3.3.2); the access is to a paging entry (bit 8 = 0)
    assert (r.fault, r.gpa, r.levels) == (sm.FAULT_EPT_VIOLATION, gpa, depth + 1)
    assert r.ept_qualification == Qual(write=True, readable=True, executable=True,
                                       linear_address_valid=True).encode()
    # entries above got A=1 on the way down, the faulting one did not
    for d in range(4):
        assert bool(u64(after, guest_entry_gpa(VA64, d)) & sm.PTE_A) == (d < depth)


def test_ept_setting_accessed_flag_without_set_ad_needs_no_write_permission(walker):
    ram, regs = nested(leaf=DATA | sm.PTE_P | sm.PTE_RW, upper=sm.PTE_P | sm.PTE_RW)
    for depth in range(4):
        set_pte(ram, guest_entry_gpa(VA64, depth), ept_leaf(0x1000 + 0x1000 * depth, sm.EPT_R))
    r, after = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert r.fault == sm.OK and after == ram


def test_ept_pae_pdpte_unmapped_gives_violation_at_pdpte(walker):
    ram, regs = nested(MODE_PAE, VA32)
    pdpte = TOP + (VA32 >> 30) * 8
    set_pte(ram, pdpte, 0)
    r, _ = walker(ram, VA32, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.gpa, r.levels) == (sm.FAULT_EPT_VIOLATION, pdpte, 0)
    # vmlab reads PDPTEs during the walk (not at MOV CR3), so bit 7 is set
    assert r.ept_qualification == Qual(read=True, linear_address_valid=True).encode()


def test_ept_32bit_guest_paging_goes_through_ept(walker):
    ram, regs = nested(MODE_32, VA32)
    r, _ = walker(ram, VA32, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.paddr, r.levels, r.ept_levels) == (sm.OK, DATA | 0xABC, 2, 4)
    set_pte(ram, DATA, 0)
    r, _ = walker(ram, VA32, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.gpa) == (sm.FAULT_EPT_VIOLATION, DATA | 0xABC)


def test_ept_violation_qualification_readable_bits_are_and_of_all_levels(walker):
    ram, regs = nested(ept_upper=sm.EPT_R | sm.EPT_X)    # PTEs RWX, the levels above R-X
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert r.fault == sm.OK and r.perms == sm.PROT_R | sm.PROT_X
    r, _ = walker(ram, VA64, sm.ACC_WRITE, 0, **regs)
    assert r.fault == sm.FAULT_EPT_VIOLATION
    assert r.ept_qualification == Qual(write=True, readable=True, executable=True,
                                       linear_address_valid=True, translated_access=True).encode()


def test_ept_guest_page_fault_comes_before_final_ept_translation(walker):
    ram, regs = nested(leaf=DATA | sm.PTE_P | sm.PTE_A, wp=True)   # guest read-only
    set_pte(ram, DATA, 0)                                          # and not mapped by EPT
    r, _ = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert (r.fault, r.error_code) == (sm.FAULT_PF, sm.PFEC_P | sm.PFEC_W)
    assert (r.gpa, r.paddr, r.ept_levels, r.ept_qualification) == (DATA | 0xABC, 0, 0, 0)


# ------------------------------------------------------------------ misconfigurations
def _misconfig(walker, ram, regs, gpa=guest_entry_gpa(VA64, 0), **kw):
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs | kw)
    assert (r.fault, r.gpa, r.ept_qualification, r.perms) == (sm.FAULT_EPT_MISCONFIG, gpa, 0, 0)
    return r


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("rights", [sm.EPT_W, sm.EPT_X, sm.EPT_W | sm.EPT_X])
def test_ept_present_entry_without_read_is_misconfiguration(walker, level, rights):
    # W without R always; X without R because vmlab does not advertise execute-only
    ram, regs = nested()
    addr = [EPT_PML4, EPT_PDPT, EPT_PD, EPT_PT + 8 * (TOP >> 12)][level]
    put(ram, addr, (u64(ram, addr) & ~7) | rights, 8)
    r = _misconfig(walker, ram, regs)
    assert r.ept_levels == level + 1


@pytest.mark.parametrize("memtype", [2, 3, 7])
def test_ept_leaf_reserved_memory_type_is_misconfiguration(walker, memtype):
    ram, regs = nested()
    set_pte(ram, DATA, DATA | RWX | memtype << sm.EPT_MEMTYPE_SHIFT)
    _misconfig(walker, ram, regs, gpa=DATA | 0xABC)


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_ept_leaf_valid_memory_type_translates(walker, memtype):
    ram, regs = nested()
    set_pte(ram, DATA, DATA | RWX | memtype << sm.EPT_MEMTYPE_SHIFT)
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert r.fault == sm.OK


# bit 7 of a PDPTE/PDE makes it a page (see the large-page tests); of a PML4E it is reserved
@pytest.mark.parametrize("level,bit", [(0, 3), (0, 5), (0, 6), (0, 7), (1, 3), (1, 4), (1, 6),
                                       (2, 3), (2, 5), (2, 6)])
def test_ept_non_leaf_bits_7_3_are_reserved(walker, level, bit):
    ram, regs = nested()
    addr = [EPT_PML4, EPT_PDPT, EPT_PD][level]
    put(ram, addr, u64(ram, addr) | 1 << bit, 8)
    assert _misconfig(walker, ram, regs).ept_levels == level + 1


@pytest.mark.parametrize("bit,maxphyaddr", [(39, 39), (40, 40), (45, 40), (51, 46)])
def test_ept_address_bit_at_or_above_maxphyaddr_is_misconfiguration(walker, bit, maxphyaddr):
    ram, regs = nested()
    set_pte(ram, TOP, ept_leaf(TOP | 1 << bit))
    _misconfig(walker, ram, regs, maxphyaddr=maxphyaddr)


@pytest.mark.parametrize("bit", [8, 9, 10, 11, 52, 58, 62, 63])
def test_ept_ignored_and_flag_bits_do_not_misconfigure(walker, bit):
    ram, regs = nested()
    set_pte(ram, DATA, ept_leaf(DATA) | 1 << bit)
    put(ram, EPT_PD, u64(ram, EPT_PD) | 1 << bit, 8)
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.paddr) == (sm.OK, DATA | 0xABC)


@pytest.mark.parametrize("eptp", [EPTP & ~7 | 1, EPTP & ~7 | 4, EPTP & ~0x38 | 4 << 3,
                                  EPTP & ~0x38, EPTP | 1 << 8, EPTP | 1 << 40])
def test_ept_invalid_eptp_is_misconfiguration(walker, eptp):
    # memory type 1 (WC) or 4 (WT), walk length 5 or 1, bits 11:7 and 63:M reserved
    ram, regs = nested()
    r = _misconfig(walker, ram, regs, eptp=eptp)
    assert r.ept_levels == 0


def test_ept_misconfiguration_wins_over_missing_permission_above(walker):
    ram, regs = nested(ept_upper=sm.EPT_R)     # upper levels read-only: a write would violate
    set_pte(ram, DATA, DATA | RWX | 2 << sm.EPT_MEMTYPE_SHIFT)
    r, _ = walker(ram, VA64, sm.ACC_WRITE, 0, **regs)
    assert r.fault == sm.FAULT_EPT_MISCONFIG


# ------------------------------------------------------------------ large EPT pages
def test_ept_2m_page_translates_with_offset(walker):
    ram, regs = nested()
    # guest data at GPA 0x210000 (in the second 2 MiB), EPT PDE 1 is a 2 MiB page at HPA 0
    map_path(ram, MODE_4LEVEL, TOP, VA64, [0x2000 | UPPER, 0x3000 | UPPER, 0x4000 | UPPER,
                                            0x21_0000 | FULL])
    put(ram, EPT_PD + 8, ept_leaf(0, RWX) | sm.EPT_LARGE, 8)
    r, _ = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert (r.fault, r.gpa, r.paddr) == (sm.OK, 0x21_0ABC, 0x1_0ABC)
    assert (r.ept_levels, r.ept_page_size, r.page_size) == (3, 2 << 20, 4096)


def test_ept_1g_page_translates_with_offset(walker):
    ram, regs = nested()
    map_path(ram, MODE_4LEVEL, TOP, VA64, [0x2000 | UPPER, 0x3000 | UPPER, 0x4000 | UPPER,
                                            0x4001_0000 | FULL])
    put(ram, EPT_PDPT + 8, ept_leaf(0, RWX) | sm.EPT_LARGE, 8)
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.gpa, r.paddr) == (sm.OK, 0x4001_0ABC, 0x1_0ABC)
    assert (r.ept_levels, r.ept_page_size) == (2, 1 << 30)


@pytest.mark.parametrize("level,bit,misconfig", [(2, 12, True), (2, 20, True), (2, 21, False),
                                                 (1, 12, True), (1, 29, True), (1, 30, False)])
def test_ept_large_page_low_address_bits_are_reserved(walker, level, bit, misconfig):
    ram, regs = nested()
    table = EPT_PD if level == 2 else EPT_PDPT
    gpa = 0x21_0000 if level == 2 else 0x4001_0000
    map_path(ram, MODE_4LEVEL, TOP, VA64, [0x2000 | UPPER, 0x3000 | UPPER, 0x4000 | UPPER,
                                            gpa | FULL])
    put(ram, table + 8, ept_leaf(1 << bit, RWX) | sm.EPT_LARGE, 8)
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    if misconfig:
        assert (r.fault, r.gpa) == (sm.FAULT_EPT_MISCONFIG, gpa | 0xABC)
    else:                        # an address bit: the page lies past RAM
        assert (r.fault, r.paddr) == (sm.FAULT_BUS, (1 << bit) | 0x1_0ABC)


# ------------------------------------------------------------------ guest paging off, remapping
def test_ept_with_guest_paging_off_translates_linear_address_as_guest_physical(walker):
    ram, regs = nested()
    regs |= control_regs(MODE_NONE)
    set_pte(ram, 0x5000, ept_leaf(0x2A000))
    r, _ = walker(ram, 0x5123, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert (r.fault, r.gpa, r.paddr, r.levels, r.ept_levels) == (sm.OK, 0x5123, 0x2A123, 0, 4)
    set_pte(ram, 0x5000, ept_leaf(0x2A000, sm.EPT_R))
    r, _ = walker(ram, 0x5123, sm.ACC_WRITE, 0, **regs)
    assert (r.fault, r.gpa, r.gla) == (sm.FAULT_EPT_VIOLATION, 0x5123, 0x5123)
    # linear = guest-physical: the access is to the translation of a linear address
    assert r.ept_qualification == Qual(write=True, readable=True, linear_address_valid=True,
                                       translated_access=True).encode()


def test_ept_remapped_guest_tables_are_read_and_updated_at_host_address(walker):
    ram, regs = nested(leaf=DATA | sm.PTE_P | sm.PTE_RW, upper=sm.PTE_P | sm.PTE_RW)
    # move the guest's page table (GPA 0x4000) to host frame 0x20, data to 0x21
    ram[0x20000:0x21000] = ram[0x4000:0x5000]
    ram[0x4000:0x5000] = bytes(0x1000)
    set_pte(ram, 0x4000, ept_leaf(0x20000))
    set_pte(ram, DATA, ept_leaf(0x21000))
    r, after = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    index = 8 * ((VA64 >> 12) & 511)
    assert (r.fault, r.paddr, r.entry_addr[3]) == (sm.OK, 0x21ABC, 0x4000 + index)
    pte_host = 0x20000 + index
    assert u64(after, pte_host) == DATA | sm.PTE_P | sm.PTE_RW | sm.PTE_A | sm.PTE_D
    assert after[0x4000:0x5000] == bytes(0x1000)


def test_ept_page_outside_ram_reports_bus_fault_at_host_address(walker):
    ram, regs = nested()
    set_pte(ram, DATA, ept_leaf(RAM_SIZE))
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    assert (r.fault, r.gpa, r.paddr) == (sm.FAULT_BUS, DATA | 0xABC, RAM_SIZE | 0xABC)


# ------------------------------------------------------------------ EPT accessed / dirty flags
def test_ept_ad_treats_guest_paging_reads_as_writes(walker):
    ram, regs = nested()
    regs["eptp"] = EPTP_AD
    gpa = guest_entry_gpa(VA64, 1)
    set_pte(ram, gpa, ept_leaf(gpa & ~0xFFF, sm.EPT_R))
    r, _ = walker(ram, VA64, sm.ACC_READ, 0, **regs)
    # 29.3.5: with EPT A/D a violation on a paging-structure access sets bits 0 and 1
    assert (r.fault, r.gpa) == (sm.FAULT_EPT_VIOLATION, gpa)
    assert r.ept_qualification == Qual(read=True, write=True, readable=True,
                                       linear_address_valid=True).encode()


def test_ept_ad_sets_accessed_flags_and_dirty_on_written_pages(walker):
    ram, regs = nested()
    regs["eptp"] = EPTP_AD
    put(ram, EPT_PML4, EPT_PDPT | RWX, 8)        # A clear everywhere
    put(ram, EPT_PDPT, EPT_PD | RWX, 8)
    put(ram, EPT_PD, EPT_PT | RWX, 8)
    for f in range(EPT_FRAMES):
        set_pte(ram, f << 12, ept_leaf(f << 12, flags=WB))
    r, after = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert r.fault == sm.OK and r.dirty == 1 and r.perms & sm.PROT_W
    for addr in (EPT_PML4, EPT_PDPT, EPT_PD):
        assert u64(after, addr) == u64(ram, addr) | sm.EPT_A
    # guest paging-structure accesses count as writes: their pages get D too
    for f in (0x1, 0x2, 0x3, 0x4, DATA >> 12):
        assert u64(after, EPT_PT + 8 * f) == ept_leaf(f << 12, flags=WB | sm.EPT_A | sm.EPT_D)
    assert u64(after, EPT_PT + 8 * 5) == u64(ram, EPT_PT + 8 * 5)     # untouched frame


def test_ept_ad_clean_page_is_handed_out_without_write(walker):
    ram, regs = nested()
    regs["eptp"] = EPTP_AD
    set_pte(ram, DATA, ept_leaf(DATA, flags=WB | sm.EPT_A))
    r, after = walker(ram, VA64, sm.ACC_READ, sm.WALK_SET_AD, **regs)
    assert r.fault == sm.OK and r.dirty == 0 and r.perms == sm.PROT_R | sm.PROT_X
    assert u64(after, EPT_PT + 8 * (DATA >> 12)) == ept_leaf(DATA, flags=WB | sm.EPT_A)


def test_ept_ad_flags_are_not_written_without_set_ad(walker):
    ram, regs = nested()
    regs["eptp"] = EPTP_AD
    set_pte(ram, DATA, ept_leaf(DATA, flags=WB))
    r, after = walker(ram, VA64, sm.ACC_WRITE, 0, **regs)
    assert r.fault == sm.OK and after == ram and not r.perms & sm.PROT_W


def test_ept_without_ad_never_writes_ept_entries(walker):
    ram, regs = nested(leaf=DATA | sm.PTE_P | sm.PTE_RW, upper=sm.PTE_P | sm.PTE_RW)
    set_pte(ram, DATA, ept_leaf(DATA, flags=WB))
    r, after = walker(ram, VA64, sm.ACC_WRITE, sm.WALK_SET_AD, **regs)
    assert r.fault == sm.OK and r.dirty == 1
    assert after[EPT_PML4:EPT_PT + 0x1000] == ram[EPT_PML4:EPT_PT + 0x1000]


# ------------------------------------------------------------------ guest-physical accesses
def test_ept_translate_guest_physical_access_has_no_linear_address(translator):
    ram, regs = nested()
    set_pte(ram, 0x7000, ept_leaf(0x2B000, sm.EPT_R))
    r, _ = translator(ram, 0x7010, sm.ACC_READ, eptp=EPTP)
    assert (r.fault, r.paddr, r.page_size, r.levels) == (sm.OK, 0x2B010, 4096, 0)
    assert r.perms == sm.PROT_R
    r, _ = translator(ram, 0x7010, sm.ACC_WRITE, eptp=EPTP)
    assert (r.fault, r.gpa, r.gla) == (sm.FAULT_EPT_VIOLATION, 0x7010, 0)
    assert r.ept_qualification == Qual(write=True, readable=True).encode()     # bit 7 = 0


def test_ept_translate_without_ept_is_identity(translator):
    r, _ = translator(bytearray(RAM_SIZE), 0x7010, sm.ACC_WRITE, eptp=None)
    assert (r.fault, r.paddr, r.gpa, r.perms) == (sm.OK, 0x7010, 0x7010, 7)


def test_ept_translate_is_a_real_access_for_ept_ad(translator):
    ram, _ = nested()
    set_pte(ram, 0x7000, ept_leaf(0x7000, flags=WB))
    r, after = translator(ram, 0x7000, sm.ACC_WRITE, eptp=EPTP_AD)
    assert r.fault == sm.OK and r.dirty == 1
    assert u64(after, EPT_PT + 8 * 7) == ept_leaf(0x7000, flags=WB | sm.EPT_A | sm.EPT_D)


# ------------------------------------------------------------------ debugger view
def test_ept_violation_describe_names_the_access_and_ept_entries():
    ram, regs = nested()
    set_pte(ram, guest_entry_gpa(VA64, 2), 0)
    r, _ = py_walk(ram, VA64, sm.ACC_READ, 0, **regs)
    text = r.describe()
    assert "EPT violation at guest-physical" in text and "guest paging-structure entry" in text
    assert "EPT PTE" in text and "EPT PML4E" in text


# ------------------------------------------------------------------ benchmark helper
def test_bench_tlb_times_both_walkers_on_the_same_walks():
    from vmlab.tools.bench_tlb import bench_tlb
    out = bench_tlb(n_c=2000, n_py=40)     # raises if C and Python disagree
    assert out["c_fill_ns"] > 0 and out["py_fill_ns"] > 0 and out["speedup"] > 1
