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
* 4.8: accessed and dirty flags;
* SDM Vol. 3C 29.3 (EPT): with ``eptp`` given, the walk is two-dimensional --
  every guest-physical address it touches (each guest paging-structure entry,
  PAE PDPTEs included, and the final page) goes through the 4-level EPT first
  (25.6.11 EPTP, 29.3.2 Tables 29-1..29-6, misconfigurations 29.3.3.1,
  violations 29.3.3.2, EPT A/D flags 29.3.5, exit qualification Table 28-7).
  See :func:`walk` for the order of the steps.

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
* EPT: 4-level only, with 2 MiB and 1 GiB pages, no execute-only, mode-based
  execute control, #VE, sub-page permissions or supervisor shadow stacks (what
  vmm/capabilities.py advertises by default).  Because PDPTEs are read during
  the walk, an EPT fault on a PAE PDPTE has a guest-linear address (Table 28-7
  bit 7 = 1, bit 8 = 0) where hardware, loading them at MOV to CR3, has none.
  An invalid EPTP (VM entry refuses it) is reported as a misconfiguration.
  A guest paging-structure entry whose EPT translation lands outside RAM reads
  as 0, like one outside RAM without EPT.
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
FAULT_EPT_VIOLATION = 3  #: EPT violation (SDM Vol. 3C 29.3.3.2): gpa, ept_qualification
FAULT_EPT_MISCONFIG = 4  #: EPT misconfiguration (SDM Vol. 3C 29.3.3.1): gpa

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

#: EPT paging-structure entry bits (SDM Vol. 3C Tables 29-1..29-6).
EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_MEMTYPE_SHIFT = 3      #: bits 5:3 of a leaf: EPT memory type
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7         #: PDPTE: 1 GiB page, PDE: 2 MiB page
EPT_A = 1 << 8
EPT_D = 1 << 9
#: EPT memory types (SDM Vol. 3C 29.3.7); 2, 3 and 7 are reserved.
EPT_MT_UC, EPT_MT_WC, EPT_MT_WT, EPT_MT_WP, EPT_MT_WB = 0, 1, 4, 5, 6
#: EPTP fields (SDM Vol. 3C 25.6.11, Table 25-9).
EPTP_WALK_LENGTH_SHIFT = 3  #: bits 5:3: page-walk length - 1 (vmlab: 4-level only)
EPTP_AD = 1 << 6            #: accessed and dirty flags for EPT

#: EPT-violation exit qualification bits (SDM Vol. 3C Table 28-7).
EPTQ_READ = 1 << 0
EPTQ_WRITE = 1 << 1
EPTQ_FETCH = 1 << 2
EPTQ_READABLE = 1 << 3
EPTQ_WRITABLE = 1 << 4
EPTQ_EXECUTABLE = 1 << 5
EPTQ_GLA_VALID = 1 << 7
EPTQ_TRANSLATED = 1 << 8    #: if bit 7: the access was to the final page, not a paging entry

MAX_LEVELS = 5
EPT_LEVELS = 4
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

    def contains(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa < self.size and 0 <= length <= self.size - gpa


def _is_ram(mem, gpa: int, length: int) -> bool:
    """Whether [gpa, gpa+length) is RAM: GuestMemory knows its two ranges
    (below and above the 32-bit hole; native/mmu.c vmlab_is_ram), a plain
    PhysMem is ``[0, size)``."""
    contains = getattr(mem, "contains", None)
    if contains is not None:
        return contains(gpa, length)
    return 0 <= gpa < mem.size and 0 <= length <= mem.size - gpa


def as_phys(mem) -> PhysMem:
    """Return mem itself if it speaks :class:`PhysMem`, else wrap it as a buffer."""
    # isinstance() against a runtime-checkable Protocol costs microseconds: the
    # common cases first.
    if type(mem) is BufferMem:
        return mem
    if isinstance(mem, (bytearray, memoryview)):
        return BufferMem(mem)
    if isinstance(mem, PhysMem):
        return mem
    return BufferMem(mem)


def _read_entry(mem: PhysMem, gpa: int, size: int) -> int:
    # vmlab platform choice (see module docstring): outside RAM reads as 0.
    if not _is_ram(mem, gpa, size):
        return 0
    return int.from_bytes(mem.read(gpa, size), "little")


def _set_entry_bits(mem: PhysMem, gpa: int, size: int, bits: int) -> None:
    """OR bits into the entry as it is in memory now (an earlier A update of an
    aliased entry must not be lost)."""
    if not _is_ram(mem, gpa, size):
        return
    val = int.from_bytes(mem.read(gpa, size), "little") | bits
    mem.write(gpa, val.to_bytes(size, "little"))


# ----------------------------------------------------------------- result
@dataclass
class WalkResult:
    """Outcome of one walk; the fields of ``vmlab_walk`` (native/vmlab.h).

    ``gpa``/``page_size`` are filled once a leaf entry was accepted (so also on
    an access-rights #PF and on FAULT_BUS); ``paddr`` is then the same address
    without EPT, and with EPT its host-physical translation once the final EPT
    translation succeeded.  ``perms`` is what the translation grants this
    access's privilege (ANDed with the EPT's R/W/X), without W while the leaf is
    clean (the first store must come back to set D, SDM 4.8; also EPT D when
    EPTP enables EPT A/D), and 0 on a fault.  ``entry_addr`` and ``entry_val``
    always have 5 slots; the first ``levels`` are the entries read, top level
    first, at their guest-physical addresses, values as read before A/D updates.

    EPT faults: ``gpa`` is the guest-physical address that faulted,
    ``ept_qualification`` the exit qualification of a violation (0 for a
    misconfiguration, which has none), ``gla`` the linear address when bit 7 is
    valid (0 otherwise).  ``ept_levels``/``ept_entry_addr``/``ept_entry_val``
    (4 slots, host-physical) and ``ept_page_size`` record the EPT translation
    that faulted, or on success the final page's; nothing on a guest #PF.
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
    gpa: int = 0
    gla: int = 0
    ept_qualification: int = 0
    ept_page_size: int = 0
    ept_levels: int = 0
    ept_entry_addr: list[int] = field(default_factory=lambda: [0] * EPT_LEVELS)
    ept_entry_val: list[int] = field(default_factory=lambda: [0] * EPT_LEVELS)
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
                   gpa=w.gpa, gla=w.gla, ept_qualification=w.ept_qualification,
                   ept_page_size=w.ept_page_size, ept_levels=w.ept_levels,
                   ept_entry_addr=list(w.ept_entry_addr), ept_entry_val=list(w.ept_entry_val),
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
        for i in range(self.ept_levels):
            lines.append(f"  EPT {_EPT_LEVEL_NAMES[i]:<6} @{self.ept_entry_addr[i]:#014x} = "
                         f"{self.ept_entry_val[i]:#018x}")
        if self.fault == FAULT_PF:
            ec = self.error_code
            bits = [n for b, n in ((PFEC_P, "P"), (PFEC_W, "W"), (PFEC_US, "U"),
                                   (PFEC_RSVD, "RSVD"), (PFEC_ID, "I/D")) if ec & b]
            lines.append(f"  #PF error code {ec:#x} ({'|'.join(bits) or 'not present'})")
        elif self.fault == FAULT_EPT_MISCONFIG:
            lines.append(f"  EPT misconfiguration at guest-physical {self.gpa:#x}")
        elif self.fault == FAULT_EPT_VIOLATION:
            q = self.ept_qualification
            acc = "|".join(n for b, n in ((EPTQ_READ, "read"), (EPTQ_WRITE, "write"),
                                          (EPTQ_FETCH, "fetch")) if q & b)
            rwx = "".join(c if q & b else "-" for b, c in
                          ((EPTQ_READABLE, "r"), (EPTQ_WRITABLE, "w"), (EPTQ_EXECUTABLE, "x")))
            what = ("no linear address" if not q & EPTQ_GLA_VALID else
                    "final page" if q & EPTQ_TRANSLATED else "guest paging-structure entry")
            lines.append(f"  EPT violation at guest-physical {self.gpa:#x}: {acc} of {what}, "
                         f"EPT grants {rwx} (qualification {q:#x})")
        else:
            perms = "".join(c if self.perms & b else "-" for b, c in
                            ((PROT_R, "r"), (PROT_W, "w"), (PROT_X, "x")))
            where = "not RAM" if self.fault == FAULT_BUS else "RAM"
            lines.append(f"  -> {self.paddr:#x} ({where}), page {self.page_size:#x}, {perms}"
                         f"{', dirty' if self.dirty else ''}")
        return "\n".join(lines)


_EPT_LEVEL_NAMES = ("PML4E", "PDPTE", "PDE", "PTE")
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
         maxphyaddr: int = 40, pdpe1gb: bool = True, eptp: int | None = None) -> WalkResult:
    """Translate linear address ``vaddr`` for ``access`` (ACC_* bits) like the CPU.

    ``flags``: WALK_SET_AD makes this a real access (A/D flags are written to
    ``mem``), WALK_IMPLICIT_SUP an implicit supervisor-mode access (ACC_USER is
    then ignored), WALK_AC says EFLAGS.AC=1.  ``maxphyaddr`` is CPUID's
    physical-address width, 32..52 (0 means 40, like the C); ``pdpe1gb`` says whether
    1 GiB pages exist (CPUID.80000001H:EDX[26]).

    ``eptp``: None for no EPT; else the EPT pointer, and ``mem`` is host-physical
    memory holding both the EPT and (at their translations) the guest's tables.
    A nested walk goes (SDM Vol. 3C 29.3):

    1. each guest paging-structure entry, top level first: its guest-physical
       address through the EPT as a data read (29.3.3.2; with EPTP[6] also as a
       write, 29.3.5), then the entry itself (#PF); setting A in a non-leaf
       entry is a data write and needs EPT W on that entry's page;
    2. the guest access rights (#PF);
    3. the final guest-physical address through the EPT for the access (R, W or X);
    4. A/D in the guest leaf (EPT W on its page): last, so that an access that
       exits leaves the leaf as it was, as a #PF does.

    An EPT fault of steps 1 and 4 has qualification bit 8 = 0, of step 3 bit 8 = 1;
    bit 7 is always 1 (vmlab reads PAE PDPTEs during the walk, see the module
    docstring, so a PDPTE fault also has a linear address).
    """
    mem = as_phys(mem)
    m = maxphyaddr or 40
    mode = paging_mode(cr0, cr4, efer)
    res = WalkResult(vaddr=vaddr, access=access, mode=mode)
    gphys = _GuestPhys(mem, res, eptp, m, bool(flags & WALK_SET_AD))
    try:
        return _walk(gphys, res, mode, vaddr, access, flags, cr0=cr0, cr3=cr3, cr4=cr4,
                     efer=efer, m=m, pdpe1gb=pdpe1gb)
    except _EptFault:
        return res


def _walk(gphys: "_GuestPhys", res: WalkResult, mode: str, vaddr: int, access: int, flags: int,
          *, cr0: int, cr3: int, cr4: int, efer: int, m: int, pdpe1gb: bool) -> WalkResult:
    implicit = bool(flags & WALK_IMPLICIT_SUP)
    user = bool(access & ACC_USER) and not implicit   # SDM 4.6: implicit => supervisor
    write = bool(access & ACC_WRITE)
    fetch = bool(access & ACC_FETCH)
    set_ad = bool(flags & WALK_SET_AD)

    if mode == MODE_NONE:
        # Linear = (guest-)physical; outside IA-32e mode linear addresses are 32 bits.
        res.gpa = vaddr if efer & EFER_LMA else vaddr & 0xFFFFFFFF
        res.page_size = PAGE_4K
        return _finish(gphys, res, PROT_R | PROT_W | PROT_X, leaf=None)

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
        e = gphys.read_entry(ea, esize)
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
            res.gpa = _frame(mode, e, page_size, m) | (vaddr & (page_size - 1))
            leaf_addr, leaf_val = ea, e
            break
        # A non-leaf entry used for the translation gets A=1 (4.8).
        if set_ad and not e & PTE_A:
            gphys.set_entry_bits(ea, esize, PTE_A)
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
        if gphys.eptp is None:
            res.paddr = res.gpa
        return page_fault(PFEC_P)
    return _finish(gphys, res, perms, leaf=(leaf_addr, leaf_val, esize))


def _finish(gphys: "_GuestPhys", res: WalkResult, perms: int, leaf) -> WalkResult:
    """Steps 3 and 4 of a walk (see :func:`walk`), the TLB contract, the bus check."""
    write = bool(res.access & ACC_WRITE)
    res.paddr, ept_perms, dirty = gphys.translate_final(res.gpa)
    perms &= ept_perms           # EPT_R/W/X are PROT_R/W/X
    if leaf is not None:
        # ---- accessed / dirty (SDM 4.8): only for an access that is allowed.
        leaf_addr, leaf_val, esize = leaf
        leaf_dirty = bool(leaf_val & PTE_D)
        if gphys.set_ad:
            bits = 0 if leaf_val & PTE_A else PTE_A
            if write and not leaf_val & PTE_D:
                bits |= PTE_D
                leaf_dirty = True
            if bits:
                gphys.set_entry_bits(leaf_addr, esize, bits)
        dirty = dirty and leaf_dirty
    res.dirty = int(dirty)
    if not dirty:
        perms &= ~PROT_W        # vmlab TLB contract: a clean page is handed out read-only
    res.perms = perms
    return _check_bus(gphys.mem, res)


# ----------------------------------------------------------------- EPT
class _EptFault(Exception):
    """Unwinds a nested walk at an EPT fault; the WalkResult is already filled in."""


@dataclass
class EptTranslation:
    """One guest-physical to host-physical translation (SDM Vol. 3C 29.3.2)."""

    fault: int = OK
    hpa: int = 0
    page_size: int = 0     #: 0 until a leaf entry is reached
    perms: int = 0         #: EPT_R|W|X ANDed over the entries used; 0 if one is not present
    dirty: bool = True     #: the leaf's D is (now) set, or EPT A/D is off
    entries: list[tuple[int, int]] = field(default_factory=list)  #: (host-physical addr, value)


def eptp_valid(eptp: int, maxphyaddr: int = 40) -> bool:
    """EPTP as vmlab supports it (SDM Vol. 3C 25.6.11): memory type UC or WB,
    page-walk length 4, bits 11:7 and 63:MAXPHYADDR zero."""
    m = maxphyaddr or 40
    return (eptp & 7 in (EPT_MT_UC, EPT_MT_WB) and (eptp >> EPTP_WALK_LENGTH_SHIFT) & 7 == 3
            and not eptp & (_bits(11, 7) | _bits(63, m)))


def _ept_entry_format(level: int, e: int, m: int) -> tuple[int, int]:
    """Reserved bits of present EPT entry ``e`` at ``level`` (4: PML4E .. 1: PTE)
    and the page size it maps (0: it references a table).  SDM Vol. 3C
    Tables 29-1..29-6; vmlab supports 2 MiB and 1 GiB EPT pages."""
    hi = _bits(51, m)
    if level in (3, 2) and e & EPT_LARGE:
        low = _bits(29, 12) if level == 3 else _bits(20, 12)   # Tables 29-2, 29-4
        return hi | low, PAGE_1G if level == 3 else PAGE_2M
    if level == 1:
        return hi, PAGE_4K                                   # Table 29-6: bit 7 ignored
    return hi | _bits(7, 3), 0                               # Tables 29-1, 29-3, 29-5


def ept_walk(mem, gpa: int, *, eptp: int, maxphyaddr: int = 40, need: int = EPT_R,
             write: bool = False, set_ad: bool = False) -> EptTranslation:
    """Translate guest-physical ``gpa`` through the EPT at ``eptp``.

    ``need``: the EPT_R/W/X bits the access requires; ``write``: it is a write
    (EPT D); ``set_ad``: a real access, so with EPTP[6] the EPT A/D flags are
    written (A in every entry used, D in the leaf for a write, 29.3.5).
    Misconfigurations (29.3.3.1) are found on the way down; a missing
    permission (29.3.3.2) once the whole translation is known.
    """
    return _ept_walk(as_phys(mem), gpa, eptp, maxphyaddr or 40, need, write, set_ad)


def _ept_walk(mem: PhysMem, gpa: int, eptp: int, m: int, need: int, write: bool,
              set_ad: bool) -> EptTranslation:
    t = EptTranslation()
    if not eptp_valid(eptp, m):
        t.fault = FAULT_EPT_MISCONFIG
        return t
    ad = bool(eptp & EPTP_AD)
    addr_mask = _bits(m - 1, 12)
    table = eptp & addr_mask
    perms = EPT_R | EPT_W | EPT_X
    leaf_addr = leaf = 0
    for level in range(EPT_LEVELS, 0, -1):
        shift = 12 + 9 * (level - 1)
        ea = table + ((gpa >> shift) & 511) * 8
        e = _read_entry(mem, ea, 8)
        t.entries.append((ea, e))
        if not e & (EPT_R | EPT_W | EPT_X):
            t.fault = FAULT_EPT_VIOLATION        # not present: the AND of R/W/X is 0
            return t
        # Present but not readable: write-only and write/execute are always
        # misconfigurations, execute-only is one because vmlab does not
        # advertise it (IA32_VMX_EPT_VPID_CAP[0] = 0).
        if not e & EPT_R:
            t.fault = FAULT_EPT_MISCONFIG
            return t
        rsvd, page_size = _ept_entry_format(level, e, m)
        if e & rsvd or page_size and (e >> EPT_MEMTYPE_SHIFT) & 7 in (2, 3, 7):
            t.fault = FAULT_EPT_MISCONFIG
            return t
        perms &= e & 7
        if page_size:
            t.page_size = page_size
            t.hpa = (e & addr_mask & ~(page_size - 1)) | (gpa & (page_size - 1))
            leaf_addr, leaf = ea, e
            break
        if set_ad and ad and not e & EPT_A:
            _set_entry_bits(mem, ea, 8, EPT_A)
        table = e & addr_mask
    t.perms = perms
    if need & ~perms:
        t.fault = FAULT_EPT_VIOLATION
        return t
    t.dirty = not ad or bool(leaf & EPT_D)
    if set_ad and ad:
        bits = (0 if leaf & EPT_A else EPT_A) | (EPT_D if write and not leaf & EPT_D else 0)
        t.dirty = t.dirty or write
        if bits:
            _set_entry_bits(mem, leaf_addr, 8, bits)
    return t


def _ept_need(access: int) -> tuple[int, int]:
    """EPT permission an access needs and its Table 28-7 bits 2:0."""
    if access & ACC_WRITE:
        return EPT_W, EPTQ_WRITE
    if access & ACC_FETCH:
        return EPT_X, EPTQ_FETCH
    return EPT_R, EPTQ_READ


def _record_ept(res: WalkResult, t: EptTranslation) -> None:
    res.ept_levels = len(t.entries)
    res.ept_page_size = t.page_size
    res.ept_entry_addr = [a for a, _ in t.entries] + [0] * (EPT_LEVELS - len(t.entries))
    res.ept_entry_val = [v for _, v in t.entries] + [0] * (EPT_LEVELS - len(t.entries))


def _ept_report(res: WalkResult, t: EptTranslation, gpa: int, qacc: int, where: int) -> None:
    res.fault = t.fault
    res.perms = 0
    res.gpa = gpa
    res.gla = res.vaddr if where & EPTQ_GLA_VALID else 0
    # A misconfiguration has no exit qualification (SDM Vol. 3C 28.2.1).
    res.ept_qualification = (qacc | t.perms << 3 | where) if t.fault == FAULT_EPT_VIOLATION else 0
    _record_ept(res, t)


class _GuestPhys:
    """Guest-physical memory as one walk sees it: ``mem`` itself without EPT,
    else through the EPT, raising :class:`_EptFault` once ``res`` holds a fault."""

    def __init__(self, mem: PhysMem, res: WalkResult, eptp: int | None, m: int, set_ad: bool):
        self.mem, self.res, self.eptp, self.m, self.set_ad = mem, res, eptp, m, set_ad
        self.ad = eptp is not None and bool(eptp & EPTP_AD)
        self.entry_xlat: EptTranslation | None = None   # of the entry read last

    def read_entry(self, gpa: int, size: int) -> int:
        """A guest paging-structure entry (step 1 of :func:`walk`)."""
        if self.eptp is None:
            return _read_entry(self.mem, gpa, size)
        # Data read; with EPT A/D treated as a write, reported as read|write
        # (SDM Vol. 3C 29.3.5 and the note to Table 28-7).
        t = _ept_walk(self.mem, gpa, self.eptp, self.m, EPT_R | (EPT_W if self.ad else 0),
                      self.ad, self.set_ad)
        if t.fault:
            _ept_report(self.res, t, gpa, EPTQ_READ | (EPTQ_WRITE if self.ad else 0),
                        EPTQ_GLA_VALID)
            raise _EptFault
        self.entry_xlat = t
        return _read_entry(self.mem, t.hpa, size)

    def set_entry_bits(self, gpa: int, size: int, bits: int) -> None:
        """A/D update of the entry read last: a data write (SDM Vol. 3C 29.3.3.2)."""
        if self.eptp is None:
            _set_entry_bits(self.mem, gpa, size, bits)
            return
        t = self.entry_xlat
        if not t.perms & EPT_W:
            t.fault = FAULT_EPT_VIOLATION
            _ept_report(self.res, t, gpa, EPTQ_WRITE, EPTQ_GLA_VALID)
            raise _EptFault
        _set_entry_bits(self.mem, t.hpa, size, bits)

    def translate_final(self, gpa: int) -> tuple[int, int, bool]:
        """Step 3: (host-physical address, EPT_R/W/X, dirty) of the final page."""
        if self.eptp is None:
            return gpa, EPT_R | EPT_W | EPT_X, True
        access = self.res.access
        need, qacc = _ept_need(access)
        t = _ept_walk(self.mem, gpa, self.eptp, self.m, need, bool(access & ACC_WRITE),
                      self.set_ad)
        if t.fault:
            _ept_report(self.res, t, gpa, qacc, EPTQ_GLA_VALID | EPTQ_TRANSLATED)
            raise _EptFault
        _record_ept(self.res, t)
        return t.hpa, t.perms, t.dirty


def ept_translate(mem, gpa: int, access: int, *, eptp: int | None,
                  maxphyaddr: int = 40) -> WalkResult:
    """Twin of ``vmlab_ept_translate``: a guest-physical access with no linear
    address (Table 28-7 bit 7 = 0), through the EPT alone.  A real access: with
    EPTP[6] it sets EPT A/D flags.  ``eptp=None``: gpa is the physical address."""
    mem = as_phys(mem)
    res = WalkResult(vaddr=0, access=access, gpa=gpa)
    if eptp is None:
        res.paddr, res.page_size, res.perms, res.dirty = gpa, PAGE_4K, PROT_R | PROT_W | PROT_X, 1
        return _check_bus(mem, res)
    need, qacc = _ept_need(access)
    t = ept_walk(mem, gpa, eptp=eptp, maxphyaddr=maxphyaddr, need=need,
                 write=bool(access & ACC_WRITE), set_ad=True)
    if t.fault:
        _ept_report(res, t, gpa, qacc, 0)
        return res
    _record_ept(res, t)
    res.paddr, res.page_size, res.dirty = t.hpa, t.page_size, int(t.dirty)
    res.perms = t.perms if t.dirty else t.perms & ~PROT_W
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
    if not _is_ram(mem, res.paddr & ~0xFFF, 4096):
        res.fault = FAULT_BUS
    return res


def translate(mem, vaddr: int, *, cr0: int, cr3: int, cr4: int, efer: int, user: bool = False,
              write: bool = False, fetch: bool = False, implicit: bool = False, ac: bool = False,
              set_ad: bool = False, maxphyaddr: int = 40, pdpe1gb: bool = True,
              eptp: int | None = None) -> WalkResult:
    """Debugger convenience: the whole walk for one access, no TLB involved.

    Leaves ``mem`` untouched unless ``set_ad``; ``print(translate(...).describe())``
    shows every entry read and the outcome.
    """
    access = (ACC_WRITE if write else 0) | (ACC_FETCH if fetch else 0) | (ACC_USER if user else 0)
    flags = (WALK_SET_AD if set_ad else 0) | (WALK_IMPLICIT_SUP if implicit else 0) | \
        (WALK_AC if ac else 0)
    return walk(mem, vaddr, access, flags, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                maxphyaddr=maxphyaddr, pdpe1gb=pdpe1gb, eptp=eptp)


__all__ = [
    "ACC_READ", "ACC_WRITE", "ACC_USER", "ACC_FETCH", "WALK_SET_AD", "WALK_IMPLICIT_SUP",
    "WALK_AC", "PROT_R", "PROT_W", "PROT_X", "OK", "FAULT_PF", "FAULT_BUS", "PFEC_P", "PFEC_W",
    "PFEC_US", "PFEC_RSVD", "PFEC_ID", "PhysMem", "BufferMem", "WalkResult", "paging_mode",
    "walk", "translate", "as_phys", "FAULT_EPT_VIOLATION", "FAULT_EPT_MISCONFIG", "EPT_R", "EPT_W",
    "EPT_X", "EPT_LARGE", "EPT_A", "EPT_D", "EPTP_AD", "EPTQ_READ", "EPTQ_WRITE", "EPTQ_FETCH",
    "EPTQ_READABLE", "EPTQ_WRITABLE", "EPTQ_EXECUTABLE", "EPTQ_GLA_VALID", "EPTQ_TRANSLATED",
    "EptTranslation", "eptp_valid", "ept_walk", "ept_translate",
]
