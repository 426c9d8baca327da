"""L1's VMREAD/VMWRITE of its current VMCS served in C (native/nested.c), and
the pure-Python twin of that routine.

While the guest hypervisor (L1) runs in VMX root operation with a current
VMCS, :class:`VmcsCache` copies the fields an exit handler typically reads or
writes (``HOT_FIELDS``) into a native table; ``vmlab_run_exit_vmx`` then serves
a VMREAD or VMWRITE between registers, in 64-bit mode at CPL 0, of one of those
fields -- or of any other supported field, in the VMCS's native area itself
(``Vmcs.area``; such a VMWRITE is marked per slot and joins the VMCS's tracked
writes at ``sync``) -- without returning to Python: SDM Vol. 3C 31.3 "VMREAD"/"VMWRITE"
Operation once every #UD, #GP and VMfail condition is known not to hold (the
register gets the field, or the field the register truncated to the field's
width; "VMsucceed" clears CF, PF, AF, ZF, SF and OF, 31.2).  Every other
instruction reaches vmm/nested.py, which first calls :meth:`VmcsCache.sync`:
the values VMWRITE stored in the table go into the VMCS as ``Vmcs.write``
would (tracked, so VM entry checks them).

:func:`shadow_insn` is the C routine ``vmlab_vmx_shadow_insn`` in Python;
tests compare the two on random instructions, registers and tables.
"""
from __future__ import annotations

import struct

from vmlab.emu.native import ffi, lib

from . import vmcs as F

#: the fields served from the table: the exit information, the guest state a
#: handler advances or inspects, event injection, a few controls
HOT_FIELDS = tuple(int(f) for f in (
    F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN, F.VM_EXIT_INSTRUCTION_INFO,
    F.VM_EXIT_INTR_INFO, F.VM_EXIT_INTR_ERROR_CODE, F.IDT_VECTORING_INFO, F.IDT_VECTORING_ERROR_CODE,
    F.GUEST_PHYSICAL_ADDRESS, F.GUEST_LINEAR_ADDRESS, F.VM_INSTRUCTION_ERROR,
    F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_INTERRUPTIBILITY_STATE, F.GUEST_ACTIVITY_STATE,
    F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
    F.VM_ENTRY_INTR_INFO, F.VM_ENTRY_EXCEPTION_ERROR_CODE, F.VM_ENTRY_INSTRUCTION_LEN,
    F.CPU_BASED_VM_EXEC_CONTROL, F.EXCEPTION_BITMAP, F.CR0_READ_SHADOW, F.CR4_READ_SHADOW))
#: where they live in a VMCS area (vmm/vmcs.py ``slot``)
HOT_SLOTS = tuple(F.slot(e) for e in HOT_FIELDS)
MAX = lib.VMLAB_VMX_SHADOW_MAX
#: the field encoding of each slot of the VMCS area that holds one
_ENC_OF_SLOT = {f.slot: f.encoding for f in F.FIELDS}
_PACK = struct.Struct(f"<{len(HOT_FIELDS)}Q").pack       # the table's values, one memmove
_VMSUCCEED_CLEAR = 0x8D5            # CF PF AF ZF SF OF (SDM Vol. 3C 31.2)


def shadow_insn(code: bytes, gpr: list[int], rflags: int, table: dict) -> tuple[int, int]:
    """The twin of vmlab_vmx_shadow_insn: ``table`` holds lists ``enc``,
    ``writable``, ``mask``, ``value`` and ints ``dirty``, ``hits`` (changed in
    place, as ``gpr``), and optionally ``vmcs`` (the VMCS area, indexable by
    slot) with ``readable`` (per slot), ``vmwrite_any`` and ``vmcs_dirty``
    (16 ints): a field outside the table is read and written in the area.
    Returns (length or 0, rflags)."""
    i, rex = 0, 0
    if len(code) >= 1 and (code[0] & 0xF0) == 0x40:
        rex, i = code[0], 1
    if len(code) < i + 3 or code[i] != 0x0F or code[i + 1] not in (0x78, 0x79) or code[i + 2] >> 6 != 3:
        return 0, rflags
    is_write = code[i + 1] == 0x79
    m = code[i + 2]
    reg = (rex >> 2 & 1) << 3 | (m >> 3 & 7)
    rm = (rex & 1) << 3 | (m & 7)
    enc = gpr[reg] & 0xFFFFFFFF
    encs = table["enc"][:min(table["n"], MAX)]
    if enc not in encs:
        # any supported field, full access, from the VMCS area (its layout: index below 64)
        area = table.get("vmcs")
        if (area is None or enc >= 0x8000 or enc & 0x1001 or (enc >> 1) & 0x1FF >= 64
                or not table["readable"][F.slot(enc)]):
            return 0, rflags
        slot = F.slot(enc)
        if is_write:
            if (enc >> 10) & 3 == 1 and not table["vmwrite_any"]:
                return 0, rflags           # a VM-exit information field: VMfailValid 13 is Python's
            area[slot] = gpr[rm] & (0xFFFF, (1 << 64) - 1, 0xFFFFFFFF, (1 << 64) - 1)[(enc >> 13) & 3]
            table["vmcs_dirty"][slot >> 6] |= 1 << (slot & 63)
        else:
            gpr[rm] = area[slot]
        table["hits"] += 1
        return i + 3, rflags & ~_VMSUCCEED_CLEAR
    k = encs.index(enc)
    if is_write:
        if not table["writable"][k]:
            return 0, rflags
        table["value"][k] = gpr[rm] & table["mask"][k]
        table["dirty"] |= 1 << k
    else:
        gpr[rm] = table["value"][k]
    table["hits"] += 1
    return i + 3, rflags & ~_VMSUCCEED_CLEAR


_TRAP_IRET = 1 << lib.VMLAB_TRAP_IRET


def resume_ok(code: bytes, irq_window: int, trap_kinds: int, table: dict) -> int:
    """The twin of vmlab_vmx_resume_ok: 3 when C may execute this VMRESUME
    (``table``: ``entry_ready``, ``dirty``, ``entry_rip_rsp``, ``entry_cheap``,
    ``rip_k``, ``rip_bits``, ``value``), else 0."""
    if not table["entry_ready"] or code[:3] != b"\x0f\x01\xc3":
        return 0
    if irq_window or trap_kinds & _TRAP_IRET:
        return 0
    if any(table.get("vmcs_dirty", ())):
        return 0                    # a field outside the table was written: Python checks the entry
    d = table["dirty"]
    rr, cheap = d & table["entry_rip_rsp"], d & table["entry_cheap"]
    if d & ~(rr | cheap) or (rr and cheap):
        return 0
    if rr and table["rip_k"] < MAX:
        rip, bits = table["value"][table["rip_k"]], table["rip_bits"]
        if not bits:
            if rip >> 32:
                return 0
        elif bits < 64:
            top = rip >> (bits - 1)
            if top not in (0, (1 << (65 - bits)) - 1):
                return 0
    return 3


#: the exit-information fields an L2 VM exit reflected in C stores (x_k order)
EXIT_FIELDS = tuple(int(f) for f in (F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN,
                                     F.VM_EXIT_INTR_INFO, F.IDT_VECTORING_INFO))
_INTR = int(F.GUEST_INTERRUPTIBILITY_STATE)


def reflect_ok(r, trap_kinds: int, table: dict) -> int:
    """The twin of vmlab_vmx_reflect_ok: 1 when C may reflect the L2 VM exit
    the fast path just decided (``table``: ``reflect_ready``, ``in_l2``,
    ``active``, ``host_efer``; ``r`` has ``efer``), else 0."""
    if not table["reflect_ready"] or not table["in_l2"] or table["active"]:
        return 0
    if trap_kinds & _TRAP_IRET:
        return 0
    return 1 if r.efer == table["host_efer"] else 0


def reflect_store(r, f, table: dict) -> None:
    """The twin of vmlab_vmx_reflect_store (SDM Vol. 3C 28.2, 28.3): the
    image of register file ``r`` into ``table["l2_img"]`` and the table's
    guest-state fields, blocking by NMI cleared, the exit information of the
    fast-path decision ``f`` (``exit_reason``, ``exit_qual``, ``exit_len``);
    the table serves L1 with its VMRESUME armed (changed in place)."""
    from .nested_state import level_save, store_guest
    count = min(table["n"], MAX)
    img = level_save(r)
    if table.get("vmcs") is not None:
        store_guest(r, table["vmcs"], 0)          # the fields served from the area
    table["l2_img"] = img
    value = table["value"]
    for i, k in enumerate(table["img_k"]):
        if k < count:
            value[k] = img[i]
    if table["intr_k"] < count:
        value[table["intr_k"]] &= ~8
    for k, x in zip(table["x_k"], (f.exit_reason, f.exit_qual, f.exit_len, 0, 0)):
        if k < count:
            value[k] = x
    table.update(dirty=0, active=1, entry_ready=1, in_l2=0, entered=1,
                 reflections=table["reflections"] + 1, reflected_total=table["reflected_total"] + 1)


class VmcsCache:
    """The native table for one NestedVmx (see the module docstring)."""

    def __init__(self, caps):
        s = self.native = ffi.new("vmlab_vmx_shadow *")
        by_enc = F.FIELDS_BY_ENCODING
        for k, enc in enumerate(HOT_FIELDS):
            f = by_enc[enc]
            s.enc[k], s.mask[k] = enc, f.mask
            s.writable[k] = 1 if (not f.read_only or caps.vmwrite_any_field) else 0
        s.n = len(HOT_FIELDS)
        s.rip_k, s.rsp_k = HOT_FIELDS.index(int(F.GUEST_RIP)), HOT_FIELDS.index(int(F.GUEST_RSP))
        s.entry_rip_rsp = 1 << s.rip_k | 1 << s.rsp_k
        s.entry_cheap = sum(1 << k for k, enc in enumerate(HOT_FIELDS) if by_enc[enc].read_only)
        from .nested_state import GUEST_IMAGE
        for i, enc in enumerate(GUEST_IMAGE):
            s.img_k[i] = HOT_FIELDS.index(enc) if enc in HOT_FIELDS else MAX
        for i, enc in enumerate(EXIT_FIELDS):
            s.x_k[i] = HOT_FIELDS.index(enc)
        s.intr_k = HOT_FIELDS.index(_INTR)
        for f in by_enc.values():
            s.readable[f.slot] = 1
        s.vmwrite_any = 1 if caps.vmwrite_any_field else 0
        self.vmcs = None

    def fill(self, vmcs) -> None:
        """Serve ``vmcs`` (materialized: no deferred guest-state store)."""
        s = self.native
        m = vmcs.mem
        ffi.memmove(s.value, _PACK(*[m[k] for k in HOT_SLOTS]), 8 * len(HOT_FIELDS))
        s.dirty = 0
        s.vmcs_dirty[0:16] = [0] * 16
        s.entry_ready = s.reflect_ready = 0
        s.vmcs = vmcs.area                # the other fields' VMREADs (self.vmcs keeps it alive)
        s.active = 1
        self.vmcs = vmcs

    def store_all(self) -> None:
        """Every value of the table into the VMCS area, untracked: after C
        reflected L2 exits (the exit information and guest state it stored)
        and executed VMRESUMEs (which consumed the VMWRITEs before them)."""
        if self.vmcs is not None:
            m = self.vmcs.mem
            for k, value in zip(HOT_SLOTS, ffi.unpack(self.native.value, len(HOT_FIELDS))):
                m[k] = value

    def sync(self) -> None:
        """Stop serving; the VMWRITEs served go into the VMCS (tracked)."""
        s = self.native
        s.active = s.entry_ready = s.reflect_ready = 0
        d = s.dirty
        if d and self.vmcs is not None:
            v = self.vmcs
            m, dirty = v.mem, v.dirty
            while d:
                k = (d & -d).bit_length() - 1          # the lowest field written
                d &= d - 1
                if k < len(HOT_FIELDS):
                    enc = HOT_FIELDS[k]
                    m[HOT_SLOTS[k]] = s.value[k]
                    dirty.add(enc)
        if self.vmcs is not None:
            # fields outside the table, written in the area itself
            dirty = self.vmcs.dirty
            for w in range(16):
                d = s.vmcs_dirty[w]
                while d:
                    b = (d & -d).bit_length() - 1
                    d &= d - 1
                    dirty.add(_ENC_OF_SLOT[w << 6 | b])
        s.vmcs_dirty[0:16] = [0] * 16
        s.dirty = 0
        s.vmcs = ffi.NULL
        self.vmcs = None
