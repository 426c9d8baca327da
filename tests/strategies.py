"""Hypothesis strategies: random but meaningful guest paging setups.

A :class:`PagingSetup` is a RAM image holding one page-table tree, the control
registers that select a paging mode (SDM Vol. 3A Table 4-1), and one access
(linear address, kind, privilege, walk flags) whose address lands on the tree.
The strategies know the *shape* of each mode (index widths, entry size, where a
leaf may sit) but not its rules: reserved bits, rights and A/D are left to the
walkers under test, so a strategy bug cannot hide a walker bug.

Bias: entries are mostly valid (present, writable, user, accessed, dirty) and
every draw shrinks toward that, so a failing example shrinks to the smallest
tree that still fails.  The rest is spread so that every outcome shows up in a
few thousand examples: not present, reserved bits (address bits at and above
MAXPHYADDR, PS where it is reserved, large-page low bits, XD without NXE, PAE
PDPTE and bits 62:52), U/S, R/W with CR0.WP, XD with EFER.NXE, SMEP, SMAP with
EFLAGS.AC and implicit supervisor accesses, frames outside RAM, and clean or
unaccessed entries for the A/D side effects.  Next to each path entry a decoy
entry is written at a neighbouring index, so a walker that computes an index
wrong reads something different instead of a harmless zero.

:class:`NestedSetup` (``nested_setups``) puts such a guest behind an EPT
(SDM Vol. 3C 29.3) drawn the same way: see its docstring.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from vmlab.emu import softmmu as sm

MODE_NONE = "none"
MODE_32 = "32-bit"
MODE_32_PSE = "32-bit+pse"
MODE_PAE = "pae"
MODE_4LEVEL = "4-level"
MODE_5LEVEL = "5-level"
MODES = (MODE_NONE, MODE_32, MODE_32_PSE, MODE_PAE, MODE_4LEVEL, MODE_5LEVEL)

#: Linear-address layout per mode: (index shift, index width) top level first.
LAYOUT = {
    MODE_32: ((22, 10), (12, 10)),
    MODE_32_PSE: ((22, 10), (12, 10)),
    MODE_PAE: ((30, 2), (21, 9), (12, 9)),
    MODE_4LEVEL: ((39, 9), (30, 9), (21, 9), (12, 9)),
    MODE_5LEVEL: ((48, 9), (39, 9), (30, 9), (21, 9), (12, 9)),
}
#: Which depths (0 = top) may hold a leaf, and the page size there.
LEAVES = {
    MODE_32: {1: sm.PAGE_4K},
    MODE_32_PSE: {1: sm.PAGE_4K, 0: sm.PAGE_4M},
    MODE_PAE: {2: sm.PAGE_4K, 1: sm.PAGE_2M},
    MODE_4LEVEL: {3: sm.PAGE_4K, 2: sm.PAGE_2M, 1: sm.PAGE_1G},
    MODE_5LEVEL: {4: sm.PAGE_4K, 3: sm.PAGE_2M, 2: sm.PAGE_1G},
}

MAX_DEPTH = 5
CR0_PE = 1
CR0_ET = 1 << 4
_PAGE = 4096
_MAX_RAM = 1 << 21
#: RAM that is not page tables: pseudo-random bytes, so a value read from a
#: wrong place is garbage (half of the "entries" present) and data read through
#: a translation identifies the physical address it came from.
PATTERN = random.Random(0x5EED).randbytes(_MAX_RAM)


def entry_size(mode: str) -> int:
    return 4 if mode in (MODE_32, MODE_32_PSE) else 8


def control_regs(mode: str, *, wp=False, pse=False, smep=False, smap=False, nxe=False) -> dict:
    """CR0/CR4/EFER for a mode (CR3 not included)."""
    cr0 = CR0_PE | CR0_ET | (sm.CR0_WP if wp else 0)
    if mode != MODE_NONE:
        cr0 |= sm.CR0_PG
    cr4 = (sm.CR4_PSE if pse or mode == MODE_32_PSE else 0) | (sm.CR4_SMEP if smep else 0) | \
        (sm.CR4_SMAP if smap else 0)
    if mode == MODE_32:
        cr4 &= ~sm.CR4_PSE
    if mode in (MODE_PAE, MODE_4LEVEL, MODE_5LEVEL):
        cr4 |= sm.CR4_PAE
    if mode == MODE_5LEVEL:
        cr4 |= sm.CR4_LA57
    efer = sm.EFER_NXE if nxe else 0
    if mode in (MODE_4LEVEL, MODE_5LEVEL):
        efer |= sm.EFER_LME | sm.EFER_LMA
    return {"cr0": cr0, "cr4": cr4, "efer": efer}


def put(ram: bytearray, addr: int, value: int, size: int) -> None:
    """Store a little-endian entry (size 4 or 8)."""
    struct.pack_into("<I" if size == 4 else "<Q", ram, addr, value & ((1 << (8 * size)) - 1))


def canonical(mode: str, vaddr: int) -> int:
    """Sign-extend a 48-bit (4-level) or 57-bit (5-level) linear address."""
    top = {MODE_4LEVEL: 47, MODE_5LEVEL: 56}.get(mode)
    if top is None:
        return vaddr & 0xFFFFFFFF
    vaddr &= (1 << (top + 1)) - 1
    return vaddr | (((1 << 64) - (1 << (top + 1))) if vaddr >> top & 1 else 0)


def map_path(ram: bytearray, mode: str, cr3: int, vaddr: int, entries: list[int]) -> list[int]:
    """Write ``entries`` (top level first, values verbatim) on the path of vaddr.

    Each entry's table is the one the previous entry points at (PDPT from
    CR3[31:5] in PAE mode).  Returns the entry addresses.  For hand-built trees
    in example tests.
    """
    size = entry_size(mode)
    if size == 4:
        table = cr3 & 0xFFFFF000
    elif mode == MODE_PAE:
        table = cr3 & 0xFFFFFFE0
    else:
        table = cr3 & 0x000FFFFFFFFFF000
    addrs = []
    for (shift, width), e in zip(LAYOUT[mode], entries):
        ea = table + ((vaddr >> shift) & ((1 << width) - 1)) * size
        put(ram, ea, e, size)
        addrs.append(ea)
        table = e & (0xFFFFF000 if size == 4 else 0x000FFFFFFFFFF000)
    return addrs


@dataclass
class PagingSetup:
    """One generated case: RAM with a tree, registers, and one access."""

    mode: str
    ram: bytearray
    cr0: int
    cr3: int
    cr4: int
    efer: int
    maxphyaddr: int
    pdpe1gb: bool
    vaddr: int
    access: int
    flags: int
    target: int        # physical address the tree means vaddr to reach
    page_size: int     # page size the tree means to use (0: paging off)
    entries: tuple     # (address, value) of every entry written, path first

    @property
    def regs(self) -> dict:
        return {"cr0": self.cr0, "cr3": self.cr3, "cr4": self.cr4, "efer": self.efer,
                "maxphyaddr": self.maxphyaddr, "pdpe1gb": self.pdpe1gb}

    def _repr_pretty_(self, p, cycle) -> None:    # hypothesis' printer: no 256 KiB RAM dump
        p.text(repr(self))

    def __repr__(self) -> str:  # RAM is too big to print; the tree is what matters
        ents = ", ".join(f"{a:#x}:{v:#x}" for a, v in self.entries)
        return (f"PagingSetup({self.mode}, vaddr={self.vaddr:#x}, access={self.access:#x}, "
                f"flags={self.flags}, cr0={self.cr0:#x}, cr3={self.cr3:#x}, cr4={self.cr4:#x}, "
                f"efer={self.efer:#x}, maxphyaddr={self.maxphyaddr}, pdpe1gb={self.pdpe1gb}, "
                f"target={self.target:#x}, page_size={self.page_size:#x}, entries=[{ents}])")


def _candidate_bits(mode: str, m: int) -> list[int]:
    """Bits worth setting on purpose: reserved in some entry of some mode, or
    ignored where a walker might wrongly check them."""
    if entry_size(mode) == 4:
        return [7, 8, 9, 11, 12, 13, 16, 17, 19, 20, 21]
    near_m = [b for b in (m - 1, m, m + 1) if b <= 63]
    return sorted({1, 2, 5, 6, 7, 8, 11, 12, 13, 20, 21, 29, 30, 39, 40, 51, 52, 58, 59, 62, 63,
                   *near_m})


def _flag_bits(word: int, *, size: int, pdpte_pae: bool) -> int:
    """Entry flags from one random word, biased: word 0 is a valid entry."""
    if pdpte_pae:   # Table 4-8: only P, PWT, PCD and ignored bits 11:9 exist
        bits = sm.PTE_P if (word & 31) < 31 else 0
        return bits | (word >> 22 & 3) << 3 | (word >> 25 & 7) << 9
    bits = 0
    bits |= sm.PTE_P if (word & 31) < 31 else 0
    bits |= sm.PTE_RW if (word >> 5 & 31) < 25 else 0
    bits |= sm.PTE_US if (word >> 10 & 31) < 25 else 0
    if size == 8 and (word >> 15 & 31) >= 29:
        bits |= sm.PTE_XD
    bits |= sm.PTE_A if not word >> 20 & 1 else 0
    bits |= sm.PTE_D if not word >> 21 & 1 else 0
    bits |= (word >> 22 & 3) << 3           # PWT, PCD
    bits |= (word >> 24 & 1) << 8           # G (ignored by the walk)
    bits |= (word >> 25 & 7) << 9           # bits 11:9 ignored
    return bits


def _field(word: int, lo: int, width: int) -> int:
    return (word >> lo) & ((1 << width) - 1)


@st.composite
def paging_setups(draw, modes=MODES, *, ram_frames: int = 64, first_frame: int = 1,
                  maxphyaddrs=(36, 39, 40, 40, 40, 40, 46, 52), pdpe1gb=None,
                  avoid_top_index: int | None = None, user=None, kinds=("read", "write", "fetch"),
                  implicit: bool = True, target_frames: tuple[int, int] | None = None,
                  outside_ram: bool = True):
    """Draw a :class:`PagingSetup`.

    ``modes``: modes to pick from.  ``ram_frames`` 4 KiB frames of RAM; tables
    and in-RAM targets use frames ``first_frame..ram_frames-1`` (or
    ``target_frames`` (lo, hi) for targets), so lower frames can hold a test
    harness.  ``avoid_top_index``: a top-level index the tree must not use.
    ``user``: None draws CPL 0 or 3, else fixed.  ``implicit``: may draw
    implicit supervisor accesses.  ``outside_ram``: may aim at frames past RAM.

    Speed: a draw costs tens of microseconds, so the many small choices come
    from one blob of random bytes (hypothesis draws bytes uniformly, unlike
    integers, which it biases toward small values), laid out so that all-zero
    bytes are the plain valid case: that is where a failure shrinks to.
    """
    size_blob = 8 * (3 + 2 * MAX_DEPTH)
    blob = draw(st.binary(min_size=size_blob, max_size=size_blob))
    c, g, fw, *words = (int.from_bytes(blob[i:i + 8], "little") for i in range(0, len(blob), 8))
    # word c: the structural choices, each list ordered simplest first
    mode = modes[_field(c, 0, 8) % len(modes)]
    m = maxphyaddrs[_field(c, 8, 8) % len(maxphyaddrs)]
    kind = kinds[_field(c, 16, 8) % len(kinds)]
    ram_size = ram_frames * _PAGE
    ram = bytearray(PATTERN[:ram_size])
    tlo, thi = target_frames or (first_frame, ram_frames)

    # ---- registers and the access (g == 0: CPL 0, SET_AD, explicit, AC=0)
    wp, smep, smap, nxe, pse_any = (bool(g >> i & 1) for i in range(5))
    regs = control_regs(mode, wp=wp, pse=pse_any, smep=smep, smap=smap, nxe=nxe)
    is_user = bool(g >> 5 & 1) if user is None else user
    access = {"read": sm.ACC_READ, "write": sm.ACC_WRITE, "fetch": sm.ACC_FETCH}[kind] | \
        (sm.ACC_USER if is_user else 0)
    fl = _field(g, 6, 6)
    flags = (0 if fl >= 54 else sm.WALK_SET_AD) | (sm.WALK_AC if fl & 3 == 3 else 0)
    if implicit and fl % 10 == 9:
        flags |= sm.WALK_IMPLICIT_SUP
    big = pdpe1gb if pdpe1gb is not None else _field(g, 12, 2) != 3
    alias = _field(g, 14, 5)
    in_ram = not outside_ram or _field(g, 19, 4) < 14      # 1 in 8 aims past RAM
    cr3_low = _field(g, 23, 12)

    def pick_target(limit: int) -> int:
        t = _field(c, 32, 32) | _field(g, 35, 29) << 32
        if in_ram:
            return tlo * _PAGE + t % ((thi - tlo) * _PAGE)
        if t & 1:                       # just past the end of RAM
            return ram_size + (t >> 1) % (16 * _PAGE)
        return ram_size + t % (limit - ram_size)

    if mode == MODE_NONE:
        target = pick_target(1 << 32)
        return PagingSetup(mode, ram, regs["cr0"], _field(fw, 0, 20) << 12, regs["cr4"],
                           regs["efer"], m, big, target, access, flags, target, 0, ())

    size = entry_size(mode)
    layout = LAYOUT[mode]
    leaf_depths = sorted(LEAVES[mode], reverse=True)                   # 4 KiB first
    leaf_depth = leaf_depths[_field(c, 24, 8) % len(leaf_depths)]
    page_size = LEAVES[mode][leaf_depth]
    pa_limit = 1 << (32 if page_size == sm.PAGE_4K and size == 4 else min(m + 1, 52))
    target = pick_target(pa_limit)

    # ---- tables: distinct frames (sometimes two levels share one)
    nlev = leaf_depth + 1
    span = ram_frames - first_frame
    frames: list[int] = []
    for i in range(nlev):
        f = first_frame + (_field(fw, 12 * i, 12) + i) % span
        while f in frames:
            f = first_frame + (f - first_frame + 1) % span
        frames.append(f)
    if alias >= 30 and nlev > 1:
        frames[alias % nlev] = frames[(alias + 1) % nlev]
    for f in frames:
        ram[f * _PAGE:(f + 1) * _PAGE] = bytes(_PAGE)
    if mode == MODE_PAE:   # the PDPT is 32-byte aligned anywhere in its frame
        cr3 = frames[0] * _PAGE + (cr3_low & ~31)
    else:
        cr3 = frames[0] * _PAGE + cr3_low
    top = cr3 & (0xFFFFFFE0 if mode == MODE_PAE else ~0xFFF)

    # ---- two words per level: flags (0-31) and index (32-41); injected bit
    # (0-11) and decoy (12-25)
    cands = _candidate_bits(mode, m)
    extras = words[MAX_DEPTH:MAX_DEPTH + nlev]
    words = words[:nlev]
    vaddr = target & (page_size - 1)
    indices = []
    for depth, word in enumerate(words):
        shift, width = layout[depth]
        idx = _field(word, 32, width)
        if depth == 0 and idx == avoid_top_index:
            idx = (idx + 1) % (1 << width)
        indices.append(idx)
        vaddr |= idx << shift
    vaddr = canonical(mode, vaddr)

    # ---- entries, decoys first so that a path entry is never overwritten
    path, decoys = [], []
    table = top
    for depth, word in enumerate(words):
        shift, width = layout[depth]
        leaf = depth == leaf_depth
        e = _flag_bits(word & 0xFFFFFFFF, size=size,
                       pdpte_pae=mode == MODE_PAE and depth == 0)
        if leaf:
            base = target & ~(page_size - 1)
            if page_size == sm.PAGE_4M:      # PSE-36: PA bits 39:32 in PDE bits 20:13
                e |= (base & 0xFFC00000) | ((base >> 32) & 0xFF) << 13 | sm.PTE_PS
                e |= (word >> 29 & 1) << 12                          # PAT
            elif page_size == sm.PAGE_4K:
                e |= base | (word >> 28 & 1) << 7                    # PAT
            else:
                e |= base | sm.PTE_PS | (word >> 29 & 1) << 12       # PAT
        else:
            e |= frames[depth + 1] * _PAGE
            if mode == MODE_32 and word >> 28 & 1:
                e |= sm.PTE_PS      # ignored without CR4.PSE (SDM 4.3)
        extra = extras[depth]
        if _field(extra, 0, 4) == 15:   # 1 entry in 16 gets one chosen bit set
            e |= 1 << cands[_field(extra, 4, 8) % len(cands)]
        ea = table + indices[depth] * size
        path.append((ea, e))
        # decoy: a present entry at index ^ (1 << k), pointing somewhere else
        dv = _field(extra, 12, 14)
        didx = indices[depth] ^ (1 << (dv % width))
        if dv >> 4 & 3 and not (depth == 0 and didx == avoid_top_index):
            dframe = first_frame + (dv >> 6) % span
            decoys.append((table + didx * size,
                           dframe * _PAGE | (e & 0xFFF & ~sm.PTE_PS) | sm.PTE_P))
        if not leaf:        # the intended table, even if an injected bit moves e's
            table = frames[depth + 1] * _PAGE
    for ea, e in decoys + path:
        put(ram, ea, e, size)
    return PagingSetup(mode, ram, regs["cr0"], cr3, regs["cr4"], regs["efer"], m, big, vaddr,
                       access, flags, target, page_size, tuple(path + decoys))


# ============================================================ nested (EPT) setups
#: Host RAM of a nested setup, in 4 KiB frames.  Guest frames land in
#: [0, EPT_TABLE_FRAME0) and the EPT's tables in [EPT_TABLE_FRAME0, EPT_HOST_FRAMES).
EPT_GUEST_FRAMES = 48
EPT_HOST_FRAMES = 128
EPT_TABLE_FRAME0 = 96
#: Guest frames [EPT_GUEST_FRAMES, EPT_MMIO_END) are mapped past host RAM (MMIO).
EPT_MMIO_END = 64
EPT_LAYOUTS = ("4k", "2m", "1g")
_EPT_RWX = sm.EPT_R | sm.EPT_W | sm.EPT_X
#: Strides coprime with EPT_TABLE_FRAME0 (96): frame g -> (g * k + shift) % 96 is one-to-one.
_STRIDES = (1, 5, 7, 11, 13, 17, 19, 23, 25, 29, 31, 35, 37, 41, 43, 47)


@dataclass
class NestedSetup:
    """A guest paging setup (guest-physical) placed in host RAM behind an EPT.

    ``ram`` is host-physical: the EPT's tables and, at their translations, the
    guest's frames.  ``host_frame`` maps each guest frame with RAM behind it to
    its host frame (layouts 2m/1g: identity).  ``ept_entries`` lists the EPT
    entries drawn at random (the other 4 KiB mappings are plain RWX WB).
    """

    guest: PagingSetup
    ram: bytearray
    eptp: int
    layout: str
    host_frame: dict
    ept_entries: tuple     # (host-physical address, value)

    mode = property(lambda self: self.guest.mode)
    vaddr = property(lambda self: self.guest.vaddr)
    access = property(lambda self: self.guest.access)
    flags = property(lambda self: self.guest.flags)

    @property
    def regs(self) -> dict:
        return self.guest.regs | {"eptp": self.eptp}

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))

    def __repr__(self) -> str:
        moved = {g: h for g, h in self.host_frame.items() if g != h}
        ents = ", ".join(f"{a:#x}:{v:#x}" for a, v in self.ept_entries)
        return (f"NestedSetup(eptp={self.eptp:#x}, layout={self.layout}, host_frame={moved}, "
                f"ept=[{ents}],\n  guest={self.guest!r})")


def _plain_ept_leaf(hpa: int) -> int:
    return hpa | _EPT_RWX | sm.EPT_MT_WB << sm.EPT_MEMTYPE_SHIFT | sm.EPT_A | sm.EPT_D


def _ept_candidate_bits(m: int) -> list[int]:
    """Bits worth setting on purpose in an EPT entry: reserved somewhere
    (7:3 of non-leaf entries, large-page address bits, 51:M) or ignored."""
    return sorted({3, 4, 5, 6, 7, 9, 12, 13, 20, 21, 29, 30, 51, m - 1, m})


def _ept_entry(word: int, base: int, *, leaf: bool, m: int) -> int:
    """An EPT entry from one random word; word 0 is a valid RWX entry with A
    (and, for a leaf, WB memory type and D)."""
    sel = _field(word, 0, 6)
    # ~1 in 10: fewer rights, not present, or the misconfigured 010b/100b/110b
    e = base | (_EPT_RWX if sel < 58 else (1, 3, 5, 0, 2, 4)[sel - 58])
    e |= 0 if _field(word, 6, 1) else sm.EPT_A
    if leaf:
        e |= 0 if _field(word, 7, 1) else sm.EPT_D
        mt = _field(word, 8, 6)      # ~1 in 9 not WB, half of those reserved
        e |= (sm.EPT_MT_WB if mt < 57 else (0, 1, 4, 5, 2, 3, 7)[mt - 57]) << sm.EPT_MEMTYPE_SHIFT
        e |= _field(word, 14, 1) * sm.EPT_IGNORE_PAT
    e |= {4: 1 << 52, 5: 1 << 11, 6: 1 << 10, 7: 1 << 63}.get(_field(word, 15, 3), 0)  # ignored
    if _field(word, 18, 5) == 31:       # 1 entry in 32 gets one chosen bit set
        cands = _ept_candidate_bits(m)
        e |= 1 << cands[_field(word, 23, 8) % len(cands)]
    return e


def _eptp_from(word: int, pml4: int, m: int) -> int:
    """EPTP: WB (UC 1 in 10, else invalid 1 in 64), walk length 4 (else 1 in
    64), EPT A/D 1 in 4, a reserved bit 1 in 64."""
    mt = _field(word, 0, 6)
    memtype = sm.EPT_MT_WB if mt < 57 else sm.EPT_MT_UC if mt < 63 else \
        (1, 2, 3, 4, 5, 7)[_field(word, 6, 3) % 6]
    walk_len = 3 if _field(word, 9, 6) < 63 else (0, 1, 2, 4, 5, 6, 7)[_field(word, 15, 3) % 7]
    eptp = pml4 | memtype | walk_len << sm.EPTP_WALK_LENGTH_SHIFT
    if _field(word, 18, 2) == 3:
        eptp |= sm.EPTP_AD
    if _field(word, 20, 6) == 63:
        eptp |= 1 << (7, 8, 11, m, 63)[_field(word, 26, 3) % 5]
    return eptp


@st.composite
def nested_setups(draw, modes=MODES, *, layouts=EPT_LAYOUTS):
    """Draw a :class:`NestedSetup`: a :func:`paging_setups` guest of
    EPT_GUEST_FRAMES frames, its frames scattered over host RAM (layout 4k,
    frames EPT_GUEST_FRAMES..EPT_MMIO_END mapped past host RAM) or
    identity-mapped by one 2 MiB / 1 GiB EPT page, with the EPT entries of
    every frame the walk can touch drawn like guest entries: mostly valid,
    sometimes fewer rights, not present, misconfigured (010b/100b/110b rights,
    memory types 2/3/7, reserved bits), ignored bits set, or A/D clear for the
    EPT A/D side effects.  EPTP is now and then invalid.  One layout-4k setup in
    16 puts the guest's top table on the EPT's page table, so that guest A/D
    writes and EPT reads meet in one frame (both walkers must agree on order).
    """
    guest = draw(paging_setups(modes, ram_frames=EPT_GUEST_FRAMES))
    blob = draw(st.binary(min_size=8 * 16, max_size=8 * 16))
    c, pw, *words = (int.from_bytes(blob[i:i + 8], "little") for i in range(0, len(blob), 8))
    m = guest.maxphyaddr
    layout = layouts[_field(c, 0, 8) % len(layouts)]
    host_size = EPT_HOST_FRAMES * _PAGE
    ram = bytearray(PATTERN[_MAX_RAM - host_size:])     # not the guest's garbage

    # ---- EPT table frames, distinct, in the table area
    area = EPT_HOST_FRAMES - EPT_TABLE_FRAME0
    first = _field(c, 8, 8) % area
    pml4_f, pdpt_f, pd_f, pt_f = (EPT_TABLE_FRAME0 + (first + 7 * i) % area for i in range(4))
    for f in (pml4_f, pdpt_f, pd_f, pt_f):
        ram[f * _PAGE:(f + 1) * _PAGE] = bytes(_PAGE)

    # ---- where each guest frame lives
    if layout == "4k":
        k, shift = _STRIDES[_field(c, 16, 4)], _field(c, 20, 7) % EPT_TABLE_FRAME0
        host_frame = {g: (g * k + shift) % EPT_TABLE_FRAME0 for g in range(EPT_GUEST_FRAMES)}
    else:
        host_frame = {g: g for g in range(EPT_GUEST_FRAMES)}
    top_frame = guest.cr3 >> 12
    alias = layout == "4k" and _field(c, 27, 4) == 15 and guest.mode != MODE_NONE
    if alias:
        host_frame[top_frame] = pt_f
    for g, h in host_frame.items():
        if not (alias and g == top_frame):
            ram[h * _PAGE:(h + 1) * _PAGE] = guest.ram[g * _PAGE:(g + 1) * _PAGE]

    # ---- entries: PML4E, PDPTE, PDE drawn; PTEs drawn for the frames a walk touches
    touched = sorted({a >> 12 for a, _ in guest.entries} | {guest.target >> 12, top_frame})
    word_of = dict(zip(touched, words[3:]))
    drawn = [(pml4_f * _PAGE, _ept_entry(words[0], pdpt_f * _PAGE, leaf=False, m=m))]
    plain = []
    if layout == "1g":
        drawn.append((pdpt_f * _PAGE, _ept_entry(words[1], sm.EPT_LARGE, leaf=True, m=m)))
    else:
        drawn.append((pdpt_f * _PAGE, _ept_entry(words[1], pd_f * _PAGE, leaf=False, m=m)))
        if layout == "2m":
            drawn.append((pd_f * _PAGE, _ept_entry(words[2], sm.EPT_LARGE, leaf=True, m=m)))
        else:
            drawn.append((pd_f * _PAGE, _ept_entry(words[2], pt_f * _PAGE, leaf=False, m=m)))
            for g in range(EPT_MMIO_END):
                hpa = host_frame[g] * _PAGE if g in host_frame else \
                    host_size + (g - EPT_GUEST_FRAMES) * _PAGE
                if g in word_of:
                    e = _ept_entry(word_of[g], hpa, leaf=True, m=m)
                    drawn.append((pt_f * _PAGE + 8 * g, e))
                else:
                    plain.append((pt_f * _PAGE + 8 * g, _plain_ept_leaf(hpa)))
    for a, e in plain + drawn:
        put(ram, a, e, 8)
    if alias:   # the guest's top table over the EPT's page table, guest entries on top
        src = guest.ram[top_frame * _PAGE:(top_frame + 1) * _PAGE]
        for off in range(0, _PAGE, 4):
            if src[off:off + 4] != b"\0\0\0\0":
                ram[pt_f * _PAGE + off:pt_f * _PAGE + off + 4] = src[off:off + 4]
    eptp = _eptp_from(pw, pml4_f * _PAGE, m)
    return NestedSetup(guest, ram, eptp, layout, host_frame, tuple(drawn))
