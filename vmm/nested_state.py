"""The L1<->L2 level switch of guest-visible VMX in bulk (native/nested.c) and
its pure-Python twin.

A VM exit stores the guest state into the VMCS (SDM Vol. 3C 28.3 "Saving
Guest State") and loads the host-state area (28.5 "Loading Host State"); a VM
entry checks the guest-state area (27.3.1) and loads it (27.3.2 "Loading Guest State").
vmm/nested.py moves the fields between L1's VMCS and an *image* -- one value
per field in the order of ``GUEST_IMAGE`` (vmlab.h ``VMLAB_LV_*``) -- and one
native call moves the image into or out of the vCPU:

* ``vmlab_level_save`` (twin :func:`level_save`): the register file -> image,
  segment caches as VMX access rights (Table 25-2); ``vmlab_vmcs_store_guest``
  (native/vmcs.c, twin :func:`store_guest`) puts that image into a VMCS
  area's guest-state fields, as a VM exit stores them;
* ``vmlab_level_load``: CR0/CR3/CR4/EFER when they differ (in the order
  vmm/vmx.py ``load_paging_state`` writes them; every cached translation is
  dropped then), then ``vmlab_level_compose`` (twin :func:`level_compose`):
  RIP, RSP, RFLAGS, GDTR, IDTR and the eight segment caches with the
  segment-derived hflags, written in one register batch and one segment store.

What a level switch used to do in Python (vmm/vmx.py ``_load_guest_state``,
``_store_guest_state``, vmm/nested.py ``_load_host_state``) is what these do;
tests compare the twins with the C routines on random images, and a native
load with the Python path on a live vCPU.
"""
from __future__ import annotations

from vmlab.emu import x86
from vmlab.emu.cpu import compute_hflags
from vmlab.emu.errors import NativeError
from vmlab.emu.native import ffi, lib

from . import vmcs as F
from .vmx import ar_to_flags, flags_to_ar, load_paging_state

N = lib.VMLAB_LV_N
RIP, RSP, RFLAGS, CR0, CR3, CR4, EFER = 0, 1, 2, 3, 4, 5, 6
SEG = lib.VMLAB_LV_SEG
GDTR_BASE, GDTR_LIMIT, IDTR_BASE, IDTR_LIMIT = 39, 40, 41, 42

#: VMCS field order of the segments (ES CS SS DS FS GS = the vCPU's 0-5, LDTR 6, TR 7)
_SEGS = ((F.GUEST_ES_SELECTOR, F.GUEST_ES_BASE, F.GUEST_ES_LIMIT, F.GUEST_ES_ACCESS_RIGHTS),
         (F.GUEST_CS_SELECTOR, F.GUEST_CS_BASE, F.GUEST_CS_LIMIT, F.GUEST_CS_ACCESS_RIGHTS),
         (F.GUEST_SS_SELECTOR, F.GUEST_SS_BASE, F.GUEST_SS_LIMIT, F.GUEST_SS_ACCESS_RIGHTS),
         (F.GUEST_DS_SELECTOR, F.GUEST_DS_BASE, F.GUEST_DS_LIMIT, F.GUEST_DS_ACCESS_RIGHTS),
         (F.GUEST_FS_SELECTOR, F.GUEST_FS_BASE, F.GUEST_FS_LIMIT, F.GUEST_FS_ACCESS_RIGHTS),
         (F.GUEST_GS_SELECTOR, F.GUEST_GS_BASE, F.GUEST_GS_LIMIT, F.GUEST_GS_ACCESS_RIGHTS),
         (F.GUEST_LDTR_SELECTOR, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT, F.GUEST_LDTR_ACCESS_RIGHTS),
         (F.GUEST_TR_SELECTOR, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT, F.GUEST_TR_ACCESS_RIGHTS))

#: the guest-state fields of the image, in its order
GUEST_IMAGE = tuple(int(e) for e in (
    [F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4, F.GUEST_IA32_EFER]
    + [e for seg in _SEGS for e in seg]
    + [F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT]))
assert len(GUEST_IMAGE) == N

_M32 = 0xFFFFFFFF
#: where the image's fields live in a VMCS area (vmm/vmcs.py ``slot``)
IMAGE_SLOTS = tuple(F.slot(e) for e in GUEST_IMAGE)
_INTR_SLOT = F.slot(F.GUEST_INTERRUPTIBILITY_STATE)


def _seg(r, k):
    return r.seg[k] if k < 6 else (r.ldtr if k == 6 else r.tr)


def level_save(r) -> list[int]:
    """The twin of vmlab_level_save: the image of register file ``r``."""
    img = [r.rip, r.gpr[4], r.rflags, r.cr0, r.cr3, r.cr4, r.efer]
    for k in range(8):
        s = _seg(r, k)
        img += [s.selector, s.base, s.limit, flags_to_ar(s.flags, s.selector, k in (1, 7))]
    return img + [r.gdtr_base, r.gdtr_limit, r.idtr_base, r.idtr_limit]


def store_guest(r, vmcs, nmi_blocked: int) -> None:
    """The twin of vmlab_vmcs_store_guest (native/vmcs.c): a VM exit's
    guest-state store (SDM Vol. 3C 28.3) into the VMCS area ``vmcs`` (a cffi
    ``uint64_t *`` or a memoryview of ``Vmcs.mem``): the image of register
    file ``r`` into its fields, and bit 3 of the interruptibility state
    (blocking by NMI, Table 25-3) from ``nmi_blocked``."""
    for k, value in zip(IMAGE_SLOTS, level_save(r)):
        vmcs[k] = value
    vmcs[_INTR_SLOT] = (vmcs[_INTR_SLOT] & ~8) | (8 if nmi_blocked else 0)


def level_compose(r, img) -> None:
    """The twin of vmlab_level_compose: ``r`` (changed in place) with the
    image's RIP, RSP, RFLAGS (as Vcpu.set_rflags keeps them), descriptor
    tables and segment caches, and the segment-derived hflags recomputed on
    r's CR0 and hflags (the paging registers are taken as loaded)."""
    r.rip, r.gpr[4] = img[RIP], img[RSP]
    r.rflags = (img[RFLAGS] | 2) & 0x3F7FD7
    for k in range(8):
        s = _seg(r, k)
        sel, base, limit, ar = img[SEG + 4 * k:SEG + 4 * k + 4]
        s.selector, s.base, s.limit, s.flags = sel & _M32, base, limit & _M32, ar_to_flags(ar) & _M32
    r.gdtr_base, r.gdtr_limit = img[GDTR_BASE], img[GDTR_LIMIT] & _M32
    r.idtr_base, r.idtr_limit = img[IDTR_BASE], img[IDTR_LIMIT] & _M32
    r.hflags = compute_hflags(r.hflags, r.cr0, r.efer, r.rflags, r.seg)


class LevelSwitch:
    """The image buffer of one vCPU and the two native calls."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.img = ffi.new("uint64_t[]", N)

    def load(self, values) -> None:
        """Load the image ``values`` (N ints, each within its field's width)."""
        cpu = self.cpu
        cpu.flush()
        self.img[0:N] = values
        err = lib.vmlab_level_load(cpu._v, cpu._uch, cpu.regs, self.img)
        if err:
            raise NativeError(f"VMX level switch: loading the state failed ({err})")

    def load_image(self, img) -> None:
        """Load a native image (a cffi ``uint64_t[N]`` the caller keeps)."""
        cpu = self.cpu
        cpu.flush()
        err = lib.vmlab_level_load(cpu._v, cpu._uch, cpu.regs, img)
        if err:
            raise NativeError(f"VMX level switch: loading the state failed ({err})")

    def save(self) -> list[int]:
        """The image of the vCPU's register file (as last read)."""
        lib.vmlab_level_save(self.cpu.regs, self.img)
        return ffi.unpack(self.img, N)


def load_py(cpu, img) -> None:
    """The twin of vmlab_level_load on a live vCPU: the image loaded the way
    vmm/vmx.py VmxGuest._load_guest_state does it, one Vcpu call per part."""
    cpu.refresh()
    load_paging_state(cpu, img[CR0], img[CR3], img[CR4], img[EFER])
    segs = {k: (img[SEG + 4 * k], img[SEG + 4 * k + 1], img[SEG + 4 * k + 2], ar_to_flags(img[SEG + 4 * k + 3]))
            for k in range(8)}
    cpu.set_descriptor_tables(gdtr=(img[GDTR_BASE], img[GDTR_LIMIT]), idtr=(img[IDTR_BASE], img[IDTR_LIMIT]))
    cpu.set_rflags(img[RFLAGS])
    cpu.set_reg("rsp", img[RSP])
    cpu.set_rip(img[RIP])
    cpu.load_segments(segs, clear_exception=True)


def host_image(get, exit_ctls: int, efer_now: int) -> list[int]:
    """The host-state area as an image (SDM Vol. 3C 28.5.1-28.5.2): CR0, CR3,
    CR4; EFER from HOST_IA32_EFER with "load IA32_EFER", else LMA and LME
    from "host address-space size"; CS with the fixed code attributes (L from
    host address-space size), SS/DS/ES/FS/GS with the fixed data attributes
    (unusable when the selector is null, SS excepted), base 0 but FS/GS,
    limit 0xFFFFFFFF; TR a busy 64-bit TSS with limit 0x67; LDTR unusable;
    GDTR/IDTR limits 0xFFFF; RFLAGS = 2.  ``get(encoding, 0)`` reads a field."""
    host64 = bool(exit_ctls & _EXIT_HOST_64)
    if exit_ctls & _EXIT_LOAD_EFER:
        efer = get(_H_EFER, 0)
    else:
        efer = efer_now & ~(x86.EFER_LMA | x86.EFER_LME)
        if host64:
            efer |= x86.EFER_LME
    es, ss, ds, fs, gs = (get(e, 0) for e in _H_DATA)
    return [get(_H_RIP, 0), get(_H_RSP, 0), 2, get(_H_CR0, 0), get(_H_CR3, 0), get(_H_CR4, 0), efer,
            es, 0, _M32, _AR_DATA if es & ~3 else _AR_UNUSABLE,
            get(_H_CS, 0), 0, _M32, _AR_CODE64 if host64 else _AR_CODE32,
            ss, 0, _M32, _AR_DATA,
            ds, 0, _M32, _AR_DATA if ds & ~3 else _AR_UNUSABLE,
            fs, get(_H_FS_BASE, 0), _M32, _AR_DATA if fs & ~3 else _AR_UNUSABLE,
            gs, get(_H_GS_BASE, 0), _M32, _AR_DATA if gs & ~3 else _AR_UNUSABLE,
            0, 0, 0, _AR_UNUSABLE,
            get(_H_TR, 0), get(_H_TR_BASE, 0), 0x67, _AR_TSS_BUSY,
            get(_H_GDTR_BASE, 0), 0xFFFF, get(_H_IDTR_BASE, 0), 0xFFFF]


#: VM-exit controls used when loading host state (SDM Vol. 3C Table 25-14)
_EXIT_HOST_64, _EXIT_LOAD_EFER = 1 << 9, 1 << 21
_H_EFER = int(F.HOST_IA32_EFER)
_H_CR0, _H_CR3, _H_CR4 = int(F.HOST_CR0), int(F.HOST_CR3), int(F.HOST_CR4)
_H_CS, _H_TR, _H_TR_BASE = int(F.HOST_CS_SELECTOR), int(F.HOST_TR_SELECTOR), int(F.HOST_TR_BASE)
_H_FS_BASE, _H_GS_BASE = int(F.HOST_FS_BASE), int(F.HOST_GS_BASE)
_H_GDTR_BASE, _H_IDTR_BASE = int(F.HOST_GDTR_BASE), int(F.HOST_IDTR_BASE)
_H_RSP, _H_RIP = int(F.HOST_RSP), int(F.HOST_RIP)
_H_DATA = tuple(int(e) for e in (F.HOST_ES_SELECTOR, F.HOST_SS_SELECTOR, F.HOST_DS_SELECTOR,
                                 F.HOST_FS_SELECTOR, F.HOST_GS_SELECTOR))
#: the segment attributes host-state loading gives (SDM Vol. 3C 28.5.2), as access rights
_HOST_CODE = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A | x86.DESC_G
_AR_CODE64 = flags_to_ar(_HOST_CODE | x86.DESC_L, 8, True)
_AR_CODE32 = flags_to_ar(_HOST_CODE | x86.DESC_B, 8, True)
_AR_DATA = flags_to_ar(x86.DESC_P | x86.DESC_S | x86.DESC_W | x86.DESC_A | x86.DESC_G | x86.DESC_B, 0x10)
_AR_TSS_BUSY = flags_to_ar(x86.DESC_P | (11 << 8), 0x18, True)      # type 11: busy 64-bit TSS
_AR_UNUSABLE = 1 << 16
