"""The VMX MSR areas of a guest hypervisor's VMCS: the VM-entry MSR-load area,
the VM-exit MSR-store area and the VM-exit MSR-load area (SDM Vol. 3C 25.7.2
"VM-Exit Controls for MSRs", 25.8.2 "VM-Entry Controls for MSRs").

Each area is a table of 16-byte entries in guest-physical memory (the format
of an MSR entry, 25.7.2): bits 31:0 the MSR index, bits 63:32 reserved (must
be 0), bits 127:64 the MSR data.  The VM-entry checks (vmm/entry_checks.py,
27.2.1.2/27.2.1.3) already require a nonzero count's address to be 16-byte
aligned and the whole area to lie within the physical-address width; what is
here is the processing:

* :func:`load_on_entry` -- 27.4 "Loading MSRs": after the guest state is
  loaded, each entry is written as WRMSR would; the first entry that fails
  makes the VM entry fail (27.8: exit reason 34 with bit 31, exit
  qualification = the entry's number, counting from 1);
* :func:`store_on_exit` -- 28.4 "Saving MSRs": after the guest state is
  saved, each entry's data is the MSR read as RDMSR would;
* :func:`load_on_exit` -- 28.6 "Loading MSRs": after the host state is loaded,
  as on entry; a failure of either exit step is a VMX abort (28.7).

The areas are guest input: every entry is read through the machine's
guest-memory accessors, never outside guest RAM.  Bytes that no RAM backs
read as all ones (vmlab's open bus), so such an entry has reserved bits set
and its processing fails, as it would on a machine that reads all ones there;
a store into such bytes is dropped.  Every loop is bounded by the count limit
IA32_VMX_MISC bits 27:25 advertise (A.6: 512 * (N + 1) entries): past it the
SDM promises nothing ("unpredictable processor behavior", 25.7.2), and vmlab
makes the entry after the limit fail, so a count of 2^32 - 1 costs at most
one entry more than the limit.
"""
from __future__ import annotations

import struct

from vmlab.emu.msr import MsrFault

from . import vmcs as F

#: IA32_FS_BASE, IA32_GS_BASE (SDM 27.4 / 28.6: processing of such an entry fails)
IA32_FS_BASE, IA32_GS_BASE = 0xC0000100, 0xC0000101
#: written only in SMM (27.4 / 28.6: "IA32_SMM_MONITOR_CTL is an MSR that can be written only in SMM")
IA32_SMM_MONITOR_CTL = 0x9B
#: read only in SMM (28.4: "IA32_SMBASE is an MSR that can be read only in SMM")
IA32_SMBASE = 0x9E
#: refused for "model-specific reasons" (27.4 / 28.6): the microcode-update
#: trigger IA32_BIOS_UPDT_TRIG, whose WRMSR starts a microcode update
IA32_BIOS_UPDT_TRIG = 0x79

#: VMX-abort indicators (SDM 28.7 "VMX Aborts")
ABORT_SAVING_GUEST_MSRS = 1
ABORT_LOADING_HOST_MSRS = 4

ENTRY_SIZE = 16


def max_entries(misc: int) -> int:
    """The recommended maximum number of entries of each list: 512 * (N + 1)
    with N = IA32_VMX_MISC bits 27:25 (SDM Vol. 3C A.6)."""
    return 512 * (((misc >> 25) & 7) + 1)


def counts_nonzero(mem) -> bool:
    """Any of the three MSR-area counts of a VMCS (its area, ``Vmcs.mem``) is nonzero."""
    return bool(mem[_ENTRY_LOAD_COUNT] or mem[_EXIT_STORE_COUNT] or mem[_EXIT_LOAD_COUNT])


# slots of the VMCS area (vmm/vmcs.py ``slot``)
_ENTRY_LOAD_COUNT, _ENTRY_LOAD_ADDR = F.slot(F.VM_ENTRY_MSR_LOAD_COUNT), F.slot(F.VM_ENTRY_MSR_LOAD_ADDR)
_EXIT_STORE_COUNT, _EXIT_STORE_ADDR = F.slot(F.VM_EXIT_MSR_STORE_COUNT), F.slot(F.VM_EXIT_MSR_STORE_ADDR)
_EXIT_LOAD_COUNT, _EXIT_LOAD_ADDR = F.slot(F.VM_EXIT_MSR_LOAD_COUNT), F.slot(F.VM_EXIT_MSR_LOAD_ADDR)


def _read_entry(mem, addr: int) -> tuple[int, int, int]:
    """(index, reserved, data) of the entry at guest-physical ``addr``; bytes
    outside RAM read as all ones."""
    if mem.contains(addr) and mem.contains(addr + ENTRY_SIZE - 1):
        raw = mem.read(addr, ENTRY_SIZE)
    else:
        raw = bytes(mem.read(a, 1)[0] if mem.contains(a) else 0xFF for a in range(addr, addr + ENTRY_SIZE))
    index, reserved, data = struct.unpack("<IIQ", raw)
    return index, reserved, data


def _load_refused(index: int) -> bool:
    """The index checks of SDM 27.4 (VM entry) and 28.6 (VM exit), which list
    the same cases: IA32_FS_BASE or IA32_GS_BASE; bits 31:8 = 000008H (an
    x2APIC register MSR); an MSR written only in SMM (IA32_SMM_MONITOR_CTL);
    an MSR refused for model-specific reasons (IA32_BIOS_UPDT_TRIG)."""
    return (index in (IA32_FS_BASE, IA32_GS_BASE, IA32_SMM_MONITOR_CTL, IA32_BIOS_UPDT_TRIG)
            or index >> 8 == 0x8)


def _load(vm, count: int, addr: int, misc: int) -> int:
    """Load ``count`` entries from ``addr``: 0 when all loaded, else the
    1-based number of the entry whose processing failed."""
    if not count:
        return 0
    mem, msrs = vm.mem, vm.msrs
    limit = max_entries(misc)
    for i in range(min(count, limit + 1)):
        if i == limit:
            return i + 1                    # past the advertised maximum (see the module docstring)
        index, reserved, data = _read_entry(mem, addr + ENTRY_SIZE * i)
        # "Bits 63:32 are not all 0" and the index checks, then "An attempt to
        # write bits 127:64 to the MSR indexed by bits 31:0 of the entry would
        # cause a general-protection exception if executed via WRMSR with CPL = 0".
        if reserved or _load_refused(index):
            return i + 1
        try:
            msrs.write(index, data)
        except MsrFault:
            return i + 1
    return 0


def load_on_entry(vm, mem, misc: int) -> int:
    """SDM 27.4: process the VM-entry MSR-load area of a VMCS (its area,
    ``Vmcs.mem``).  0: every entry loaded; n > 0: entry n failed -- the VM
    entry fails with exit reason 34 and exit qualification n (27.8); the
    entries before it stay loaded."""
    return _load(vm, mem[_ENTRY_LOAD_COUNT] & 0xFFFFFFFF, mem[_ENTRY_LOAD_ADDR], misc)


def load_on_exit(vm, mem, misc: int) -> int:
    """SDM 28.6: process the VM-exit MSR-load area after the host state is
    loaded.  0, or the 1-based number of the entry that failed (a VMX abort,
    indicator 4, 28.7)."""
    return _load(vm, mem[_EXIT_LOAD_COUNT] & 0xFFFFFFFF, mem[_EXIT_LOAD_ADDR], misc)


def store_on_exit(vm, mem, misc: int) -> int:
    """SDM 28.4: store the MSRs the VM-exit MSR-store area names into its
    entries' data (bits 127:64).  Processing of an entry fails when bits 31:8
    are 000008H (x2APIC), the MSR is read only in SMM (IA32_SMBASE), bits
    63:32 are not all 0, or RDMSR at CPL 0 would fault.  0, or the 1-based
    number of the entry that failed (a VMX abort, indicator 1, 28.7)."""
    count = mem[_EXIT_STORE_COUNT] & 0xFFFFFFFF
    if not count:
        return 0
    addr = mem[_EXIT_STORE_ADDR]
    mem, msrs = vm.mem, vm.msrs
    limit = max_entries(misc)
    for i in range(min(count, limit + 1)):
        if i == limit:
            return i + 1
        at = addr + ENTRY_SIZE * i
        index, reserved, _ = _read_entry(mem, at)
        if reserved or index >> 8 == 0x8 or index == IA32_SMBASE:
            return i + 1
        try:
            value = msrs.read(index)
        except MsrFault:
            return i + 1
        data = struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
        if mem.contains(at + 8) and mem.contains(at + 15):
            mem.write(at + 8, data)
        else:
            for k in range(8):              # byte by byte: the RAM part is written, open bus drops the rest
                if mem.contains(at + 8 + k):
                    mem.write(at + 8 + k, data[k:k + 1])
    return 0
