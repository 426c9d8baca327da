"""Pure-Python guest page walker: the reference twin of native/mmu.c.

Written from the SDM, not from the C, so that the two check each other
(tests/unit/test_softmmu_twin.py runs both on the same RAM with hypothesis):

* SDM Vol. 3A 4.1.1, Table 4-1: which paging mode CR0.PG, CR4.PAE, CR4.LA57 and
  EFER.LMA select;
* 4.3, Tables 4-4..4-6: 32-bit paging, 4 MiB pages with CR4.PSE and PSE-36;
* 4.4, Tables 4-8..4-11: PAE paging;
* 4.5, Tables 4-14..4-20: 4-level and 5-level paging, 1 GiB pages;
* 4.6.1: access rights (U/S, R/W, CR0.WP, XD with EFER.NXE, SMEP, SMAP with
  EFLAGS.AC and implicit supervisor-mode accesses);
* 4.7: #PF error code (P, W/R, U/S, RSVD, I/D);
* 4.8: accessed and dirty flags.

The API and its result are those of ``vmlab_walk_do`` / ``vmlab_walk``
(native/vmlab.h): same constants, same fields, same side effects on RAM.

Physical memory protocol (``PhysMem``): an object with ``size`` (bytes of RAM
from guest-physical 0), ``read(gpa, n) -> bytes`` and ``write(gpa, data)``;
:class:`emu.memory.GuestMemory` is one.  A ``bytearray`` (or any writable
buffer) is accepted as well and wrapped by :class:`BufferMem`.  The walker only
calls ``read``/``write`` inside ``[0, size)``.

Two vmlab platform choices that are not SDM rules, shared with the C walker:

* a paging-structure entry that does not lie wholly inside RAM reads as 0 (not
  present): a hostile guest gets a #PF, the host is never touched;
* a translation whose 4 KiB frame starts at or beyond the end of RAM is
  ``FAULT_BUS`` (MMIO or unassigned): the run loop decides what that means.

Known, deliberate differences from a real CPU (the walker has no event to hang
them on; the CPU model must do them):

* PAE PDPTEs are read on every walk, not loaded into the PDPTE registers by MOV
  to CR3 (SDM 4.4.1).  A PDPTE with P=1 and a reserved bit should make that MOV
  raise #GP(0); the walker reports it as a #PF with RSVD instead.
* Canonical-address checks (#GP/#SS, SDM Vol. 3A 3.3.7.1) belong to the
  segmentation stage and are not made here; protection keys (CR4.PKE/PKS,
  4.6.2) and HLAT are not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# ----------------------------------------------------------------- constants (vmlab.h)
#: Access kinds, encoded like the #PF error code (SDM Vol. 3A 4.7).
ACC_READ = 0
ACC_WRITE = 2
ACC_USER = 4
ACC_FETCH = 16

#: Walk flags.
WALK_SET_AD = 1        #: a real access: update accessed/dirty flags
WALK_IMPLICIT_SUP = 2  #: implicit supervisor-mode access (GDT/LDT/IDT/TSS), SDM 4.6.1
WALK_AC = 4            #: EFLAGS.AC = 1 (lifts SMAP for explicit accesses)

#: Permissions (Unicorn's uc_prot).
PROT_R = 1
PROT_W = 2
PROT_X = 4

#: Walk outcome.
OK = 0
FAULT_PF = 1   #: guest #PF, see error_code
FAULT_BUS = 2  #: the final physical frame is not RAM

#: #PF error-code bits, SDM Vol. 3A 4.7 (Figure 4-12).
PFEC_P = 1 << 0
PFEC_W = 1 << 1
PFEC_US = 1 << 2
PFEC_RSVD = 1 << 3
PFEC_ID = 1 << 4

#: Control-register bits used by paging (SDM Vol. 3A 2.5, 2.2.1).
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

#: Paging-structure entry bits (SDM Vol. 3A Tables 4-4..4-20).
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_XD = 1 << 63

#: Paging modes (SDM Vol. 3A Table 4-1).
MODE_NONE = "none"
MODE_32BIT = "32-bit"
MODE_PAE = "pae"
MODE_4LEVEL = "4-level"
MODE_5LEVEL = "5-level"

MAX_LEVELS = 5
PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_4M = 1 << 22
PAGE_1G = 1 << 30

_U64 = (1 << 64) - 1


def _bits(hi: int, lo: int) -> int:
    """Mask of bits hi..lo inclusive (empty when hi < lo)."""
    return ((1 << (hi + 1)) - (1 << lo)) if hi >= lo else 0


# ----------------------------------------------------------------- physical memory
@runtime_checkable
class PhysMem(Protocol):
    """Guest-physical RAM ``[0, size)`` as the walker sees it."""

    size: int

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class BufferMem:
    """:class:`PhysMem` over a writable buffer (bytearray, memoryview, cffi buffer)."""

    def __init__(self, buf):
        self.buf = buf
        self.size = len(buf)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.buf[gpa:gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.buf[gpa:gpa + len(data)] = data


def as_phys(mem) -> PhysMem:
    """Return mem itself if it speaks :class:`PhysMem`, else wrap it as a buffer."""
    if isinstance(mem, PhysMem):
        return mem
    return BufferMem(mem)


def _read_entry(mem: PhysMem, gpa: int, size: int) -> int:
    # vmlab platform choice (see module docstring): outside RAM reads as 0.
    if gpa < 0 or gpa + size > mem.size:
        return 0
    return int.from_bytes(mem.read(gpa, size), "little")


def _set_entry_bits(mem: PhysMem, gpa: int, size: int, bits: int) -> None:
    """OR bits into the entry as it is in memory now (an earlier A update of an
    aliased entry must not be lost)."""
    if gpa < 0 or gpa + size > mem.size:
        return
    val = int.from_bytes(mem.read(gpa, size), "little") | bits
    mem.write(gpa, val.to_bytes(size, "little"))


# ----------------------------------------------------------------- result
@dataclass
class WalkResult:
    """Outcome of one walk; the fields of ``vmlab_walk`` (native/vmlab.h).

    ``paddr``/``page_size`` are filled once a leaf entry was accepted (so also on
    an access-rights #PF and on FAULT_BUS); ``perms`` is what the translation
    grants this access's privilege, without W while the leaf is clean (the first
    store must come back to set D, SDM 4.8), and 0 on a #PF.  ``entry_addr`` and
    ``entry_val`` always have 5 slots; the first ``levels`` are the entries read,
    top level first, values as read before A/D updates.
    """

    vaddr: int
    access: int
    paddr: int = 0
    page_size: int = 0
    perms: int = 0
    fault: int = OK
    error_code: int = 0
    levels: int = 0
    dirty: int = 0
    entry_addr: list[int] = field(default_factory=lambda: [0] * MAX_LEVELS)
    entry_val: list[int] = field(default_factory=lambda: [0] * MAX_LEVELS)
    #: paging mode the walk ran in (not part of vmlab_walk; not compared)
    mode: str = field(default="", compare=False)

    @property
    def ok(self) -> bool:
        return self.fault == OK

    @classmethod
    def from_native(cls, w, mode: str = "") -> "WalkResult":
        """Copy a cffi ``vmlab_walk`` into a WalkResult (for tests and debuggers)."""
        return cls(vaddr=w.vaddr, access=w.access, paddr=w.paddr, page_size=w.page_size,
                   perms=w.perms, fault=w.fault, error_code=w.error_code, levels=w.levels,
                   dirty=w.dirty, entry_addr=list(w.entry_addr), entry_val=list(w.entry_val),
                   mode=mode)

    def describe(self) -> str:
        """Multi-line, human-readable account of the walk (debugger output)."""
        names = _LEVEL_NAMES.get(self.mode, ())
        acc = ("fetch" if self.access & ACC_FETCH else "write" if self.access & ACC_WRITE
               else "read") + (" user" if self.access & ACC_USER else " supervisor")
        lines = [f"{self.mode or 'walk'} {acc} of {self.vaddr:#x}"]
        for i in range(self.levels):
            name = names[i] if i < len(names) else f"L{i}"
            lines.append(f"  {name:<6} @{self.entry_addr[i]:#014x} = {self.entry_val[i]:#018x}")
        if self.fault == FAULT_PF:
            ec = self.error_code
            bits = [n for b, n in ((PFEC_P, "P"), (PFEC_W, "W"), (PFEC_US, "U"),
                                   (PFEC_RSVD, "RSVD"), (PFEC_ID, "I/D")) if ec & b]
            lines.append(f"  #PF error code {ec:#x} ({'|'.join(bits) or 'not present'})")
        else:
            perms = "".join(c if self.perms & b else "-" for b, c in
                            ((PROT_R, "r"), (PROT_W, "w"), (PROT_X, "x")))
            where = "not RAM" if self.fault == FAULT_BUS else "RAM"
            lines.append(f"  -> {self.paddr:#x} ({where}), page {self.page_size:#x}, {perms}"
                         f"{', dirty' if self.dirty else ''}")
        return "\n".join(lines)


_LEVEL_NAMES = {
    MODE_32BIT: ("PDE", "PTE"),
    MODE_PAE: ("PDPTE", "PDE", "PTE"),
    MODE_4LEVEL: ("PML4E", "PDPTE", "PDE", "PTE"),
    MODE_5LEVEL: ("PML5E", "PML4E", "PDPTE", "PDE", "PTE"),
}


# ----------------------------------------------------------------- the walk
def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    """Paging mode selected by the control registers (SDM Vol. 3A Table 4-1)."""
    if not cr0 & CR0_PG:
        return MODE_NONE
    if not cr4 & CR4_PAE:
        return MODE_32BIT
    if not efer & EFER_LMA:
        return MODE_PAE
    return MODE_5LEVEL if cr4 & CR4_LA57 else MODE_4LEVEL


@dataclass(frozen=True)
class _Level:
    """One paging-structure entry on the way: where it is and what it means."""

    shift: int       # lowest linear-address bit of its index
    index_bits: int  # width of the index


# Linear-address decomposition per mode (SDM Figures 4-2, 4-5, 4-8, 4-9).
_LAYOUT = {
    MODE_32BIT: (_Level(22, 10), _Level(12, 10)),
    MODE_PAE: (_Level(30, 2), _Level(21, 9), _Level(12, 9)),
    MODE_4LEVEL: (_Level(39, 9), _Level(30, 9), _Level(21, 9), _Level(12, 9)),
    MODE_5LEVEL: (_Level(48, 9), _Level(39, 9), _Level(30, 9), _Level(21, 9), _Level(12, 9)),
}


def walk(mem, vaddr: int, access: int, flags: int, *, cr0: int, cr3: int, cr4: int, efer: int,
         maxphyaddr: int = 40, pdpe1gb: bool = True) -> WalkResult:
    """Translate linear address ``vaddr`` for ``access`` (ACC_* bits) like the CPU.

    ``flags``: WALK_SET_AD makes this a real access (A/D flags are written to
    ``mem``), WALK_IMPLICIT_SUP an implicit supervisor-mode access (ACC_USER is
    then ignored), WALK_AC says EFLAGS.AC=1.  ``maxphyaddr`` is CPUID's
    physical-address width, 32..52 (0 means 40, like the C); ``pdpe1gb`` says whether
    1 GiB pages exist (CPUID.80000001H:EDX[26]).
    """
    mem = as_phys(mem)
    m = maxphyaddr or 40
    mode = paging_mode(cr0, cr4, efer)
    res = WalkResult(vaddr=vaddr, access=access, mode=mode)
    implicit = bool(flags & WALK_IMPLICIT_SUP)
    user = bool(access & ACC_USER) and not implicit   # SDM 4.6: implicit => supervisor
    write = bool(access & ACC_WRITE)
    fetch = bool(access & ACC_FETCH)
    set_ad = bool(flags & WALK_SET_AD)

    if mode == MODE_NONE:
        # Linear = physical; outside IA-32e mode linear addresses are 32 bits.
        res.paddr = vaddr if efer & EFER_LMA else vaddr & 0xFFFFFFFF
        res.page_size = PAGE_4K
        res.perms = PROT_R | PROT_W | PROT_X
        res.dirty = 1
        return _check_bus(mem, res)

    nxe = bool(efer & EFER_NXE)
    smep = bool(cr4 & CR4_SMEP)
    # I/D is reported for fetches only if SMEP, or PAE/4/5-level paging with NXE (4.7).
    reports_id = smep or (mode != MODE_32BIT and nxe)
    pfec_base = (PFEC_W if write else 0) | (PFEC_US if user else 0) | \
        (PFEC_ID if fetch and reports_id else 0)

    def page_fault(code: int) -> WalkResult:
        res.fault = FAULT_PF
        res.error_code = pfec_base | code
        res.perms = 0
        return res

    esize = 4 if mode == MODE_32BIT else 8
    # Where the first table is (SDM Tables 4-3, 4-7, 4-12).
    if mode == MODE_32BIT:
        table = cr3 & 0xFFFFF000
    elif mode == MODE_PAE:
        table = cr3 & 0xFFFFFFE0
    else:
        table = cr3 & _bits(min(m, 52) - 1, 12)

    levels = _LAYOUT[mode]
    rw = us = True     # R/W and U/S are ANDed over the entries that control access
    xd = False         # XD is ORed (only with NXE)
    leaf_addr = leaf_val = 0
    for depth, lvl in enumerate(levels):
        level = len(levels) - depth          # 5..1: PML5 .. PT
        ea = table + ((vaddr >> lvl.shift) & ((1 << lvl.index_bits) - 1)) * esize
        e = _read_entry(mem, ea, esize)
        res.entry_addr[depth] = ea
        res.entry_val[depth] = e
        res.levels = depth + 1
        if not e & PTE_P:
            return page_fault(0)
        rsvd, page_size = _entry_format(mode, level, e, m=m, nxe=nxe, pse=bool(cr4 & CR4_PSE),
                                        pdpe1gb=pdpe1gb)
        if e & rsvd:
            return page_fault(PFEC_P | PFEC_RSVD)
        if mode == MODE_PAE and level == 3:
            # A PAE PDPTE has no R/W, U/S, XD nor A flag (Table 4-8): it only
            # points at the page directory.
            table = e & _bits(m - 1, 12)
            continue
        rw &= bool(e & PTE_RW)
        us &= bool(e & PTE_US)
        xd |= nxe and bool(e & PTE_XD)
        if page_size:
            res.page_size = page_size
            res.paddr = _frame(mode, e, page_size, m) | (vaddr & (page_size - 1))
            leaf_addr, leaf_val = ea, e
            break
        # A non-leaf entry used for the translation gets A=1 (4.8).
        if set_ad and not e & PTE_A:
            _set_entry_bits(mem, ea, esize, PTE_A)
        table = (e & 0xFFFFF000) if mode == MODE_32BIT else (e & _bits(m - 1, 12))

    # ---- access rights (SDM 4.6.1)
    if user:
        perms = (PROT_R if us else 0) | (PROT_W if us and rw else 0) | \
            (PROT_X if us and not xd else 0)
    else:
        # SMAP: supervisor data accesses to user-mode addresses need EFLAGS.AC=1
        # and an explicit access.
        smap_denies = bool(cr4 & CR4_SMAP) and us and (implicit or not flags & WALK_AC)
        readable = not smap_denies
        writable = readable and (rw or not cr0 & CR0_WP)
        # SMEP: no supervisor fetch from user-mode addresses.
        executable = not xd and not (smep and us)
        perms = (PROT_R if readable else 0) | (PROT_W if writable else 0) | \
            (PROT_X if executable else 0)
    need = PROT_W if write else PROT_X if fetch else PROT_R
    if not perms & need:
        return page_fault(PFEC_P)

    # ---- accessed / dirty (SDM 4.8): only for an access that is allowed.
    res.dirty = int(bool(leaf_val & PTE_D))
    if set_ad:
        bits = 0 if leaf_val & PTE_A else PTE_A
        if write and not leaf_val & PTE_D:
            bits |= PTE_D
            res.dirty = 1
        if bits:
            _set_entry_bits(mem, leaf_addr, esize, bits)
    if not res.dirty:
        perms &= ~PROT_W        # vmlab TLB contract: a clean page is handed out read-only
    res.perms = perms
    return _check_bus(mem, res)


def _entry_format(mode: str, level: int, e: int, *, m: int, nxe: bool, pse: bool,
                  pdpe1gb: bool) -> tuple[int, int]:
    """Reserved bits of present entry ``e`` and the page size it maps (0: it
    references another table).  SDM Vol. 3A Tables 4-4..4-6 (32-bit), 4-8..4-11
    (PAE), 4-14..4-20 (4/5-level)."""
    xd_rsvd = 0 if nxe else PTE_XD
    if mode == MODE_32BIT:
        if level == 2 and e & PTE_PS and pse:
            # Table 4-4: bits (M'-20):13 are PA bits (M'-1):32, M' = min(M, 40);
            # bits 21:(M'-19) are reserved.
            mm = min(m, 40)
            return _bits(21, max(mm - 19, 13)), PAGE_4M
        if level == 2:
            return 0, 0             # PS ignored without CR4.PSE (4.3)
        return 0, PAGE_4K           # Table 4-6: no reserved bits
    if mode == MODE_PAE:
        hi = _bits(62, m)           # Tables 4-9..4-11: "62:M Reserved"
        if level == 3:
            return _bits(63, m) | _bits(8, 5) | _bits(2, 1), 0   # Table 4-8
        if level == 2 and e & PTE_PS:
            return hi | xd_rsvd | _bits(20, 13), PAGE_2M
        if level == 2:
            return hi | xd_rsvd, 0
        return hi | xd_rsvd, PAGE_4K
    # 4-level / 5-level: bits 51:M reserved, 62:52 ignored (or protection key).
    hi = _bits(51, m)
    if level >= 4:                  # PML5E, PML4E: PS is reserved (Tables 4-14, 4-15)
        return hi | xd_rsvd | PTE_PS, 0
    if level == 3 and e & PTE_PS:
        if not pdpe1gb:             # no 1 GiB pages: PS is reserved (4.5.4)
            return hi | xd_rsvd | PTE_PS, 0
        return hi | xd_rsvd | _bits(29, 13), PAGE_1G   # Table 4-16
    if level == 2 and e & PTE_PS:
        return hi | xd_rsvd | _bits(20, 13), PAGE_2M   # Table 4-18
    return hi | xd_rsvd, (PAGE_4K if level == 1 else 0)


def _frame(mode: str, e: int, page_size: int, m: int) -> int:
    """Physical base of the page a leaf entry maps."""
    if mode == MODE_32BIT:
        if page_size == PAGE_4M:
            mm = min(m, 40)
            high = (e >> 13) & ((1 << (mm - 32)) - 1) if mm > 32 else 0
            return (e & 0xFFC00000) | (high << 32)
        return e & 0xFFFFF000
    # PAT (bit 12 of a large leaf) is below the page size and so falls out here.
    return e & _bits(m - 1, 12) & ~(page_size - 1)


def _check_bus(mem: PhysMem, res: WalkResult) -> WalkResult:
    if (res.paddr & ~0xFFF) >= mem.size:
        res.fault = FAULT_BUS
    return res


def translate(mem, vaddr: int, *, cr0: int, cr3: int, cr4: int, efer: int, user: bool = False,
              write: bool = False, fetch: bool = False, implicit: bool = False, ac: bool = False,
              set_ad: bool = False, maxphyaddr: int = 40, pdpe1gb: bool = True) -> WalkResult:
    """Debugger convenience: the whole walk for one access, no TLB involved.

    Leaves ``mem`` untouched unless ``set_ad``; ``print(translate(...).describe())``
    shows every entry read and the outcome.
    """
    access = (ACC_WRITE if write else 0) | (ACC_FETCH if fetch else 0) | (ACC_USER if user else 0)
    flags = (WALK_SET_AD if set_ad else 0) | (WALK_IMPLICIT_SUP if implicit else 0) | \
        (WALK_AC if ac else 0)
    return walk(mem, vaddr, access, flags, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                maxphyaddr=maxphyaddr, pdpe1gb=pdpe1gb)


__all__ = [
    "ACC_READ", "ACC_WRITE", "ACC_USER", "ACC_FETCH", "WALK_SET_AD", "WALK_IMPLICIT_SUP",
    "WALK_AC", "PROT_R", "PROT_W", "PROT_X", "OK", "FAULT_PF", "FAULT_BUS", "PFEC_P", "PFEC_W",
    "PFEC_US", "PFEC_RSVD", "PFEC_ID", "PhysMem", "BufferMem", "WalkResult", "paging_mode",
    "walk", "translate", "as_phys",
]
