"""Test harness: a guest under a VMCS in a few lines, for pytest or plain Python.

    from vmlab.vmm.harness import vmx_guest
    g = vmx_guest('''
        mov eax, 1
        cpuid
        hlt
    ''', mode="long64")
    ex = g.run()
    assert ex.reason == ExitReason.CPUID and ex.instruction_length == 2

``vmx_guest`` builds a Vm, writes the guest code at GUEST_RIP (0x100000), builds
what the baseline VMCS's guest state points at (identity page tables for
[0, 4 GiB) at CR3 0x2000 for long64, a GDT at 0x6000, a busy TSS at 0x5000, an empty IDT at
0x7000, an identity EPT for [0, 4 GiB) at the top of RAM, ``vmx.ept_tables``)
and returns a VmxGuest whose VMCS is ``entry_checks.baseline_vmcs(mode)``
with the control changes given by keyword.  Installed as a pytest plugin
(entry point ``pytest11``), it also provides the fixture ``vmx_guest``.
``close_guests()`` closes every guest ``vmx_guest`` made that is still open
(the fixtures call it when a test ends).
"""
from __future__ import annotations

import struct
import weakref

from .entry_checks import baseline_vmcs
from .errors import VmmError
from .vm import Vm
from .vmx import VmxGuest
from . import vmcs as F

GUEST_CODE = 0x100000
_BITS = {"long64": 64, "protected32": 32, "real-unrestricted": 16}
#: guests made by vmx_guest and not yet collected (close_guests closes them)
_made: weakref.WeakSet = weakref.WeakSet()


def close_guests() -> int:
    """Close every guest made by vmx_guest that is still alive (their engines
    and guest RAM are freed now); returns how many there were."""
    guests = list(_made)
    _made.clear()
    for g in guests:
        g.close()
    return len(guests)


def _assemble(text: str, base: int, bits: int) -> bytes:
    """Intel-syntax text to bytes with Keystone (``;`` starts a comment)."""
    from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks, KsError
    src = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    try:
        enc, _ = Ks(KS_ARCH_X86, {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}[bits]).asm(src, base)
    except KsError as exc:
        raise VmmError(f"cannot assemble the guest code: {exc}") from exc
    return bytes(enc or b"")


def vmx_guest(code: str | bytes, mode: str = "long64", *, ram: int = 32 << 20, caps=None,
              pin: tuple[int, int] = (0, 0), proc: tuple[int, int] = (0, 0), proc2: tuple[int, int] = (0, 0),
              exception_bitmap: int | None = None, fields: dict | None = None, serial=None) -> VmxGuest:
    """A VmxGuest running ``code`` (assembly text or bytes) in ``mode``.
    ``pin``/``proc``/``proc2`` are (set, clear) bit masks applied to the
    baseline controls; ``fields`` writes any VMCS field by name or encoding."""
    vm = Vm(ram, serial=serial)
    try:
        vmx = _build(vm, code, mode, caps, pin, proc, proc2, exception_bitmap, fields)
    except BaseException:
        vm.close()
        raise
    _made.add(vmx)
    return vmx


def _build(vm: Vm, code, mode, caps, pin, proc, proc2, exception_bitmap, fields) -> VmxGuest:
    ram = vm.mem.size
    vmx = VmxGuest(vm, caps)
    vmcs = baseline_vmcs(mode, vmx.caps)
    vmx.vmcs = vmcs
    vmcs = vmx.vmcs                 # the tracked copy
    for enc, (on, off) in ((F.PIN_BASED_VM_EXEC_CONTROL, pin), (F.CPU_BASED_VM_EXEC_CONTROL, proc),
                           (F.SECONDARY_VM_EXEC_CONTROL, proc2)):
        vmcs.write(enc, (vmcs.read(enc) | int(on)) & ~int(off))
    if exception_bitmap is not None:
        vmcs.write(F.EXCEPTION_BITMAP, exception_bitmap)
    for name, value in (fields or {}).items():
        vmcs[name] = value
    mem = vm.mem
    if mode == "long64":
        # Identity map of [0, 4 GiB) with 2 MiB pages (so the LAPIC at 0xfee00000
        # is reachable): PML4 0x2000 -> PDPT 0x3000 -> PDs at 0x10000-0x13fff.
        mem.write(0x2000, struct.pack("<Q", 0x3000 | 7))
        mem.write(0x3000, b"".join(struct.pack("<Q", (0x10000 + 0x1000 * i) | 7) for i in range(4)))
        mem.write(0x10000, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(2048)))
    # EPT (the baseline enables it): identity map of guest-physical [0, 4 GiB)
    # with 2 MiB pages, WB, R/W/X; its tables sit at the top of RAM.
    ept = ram - 0x6000
    mem.write(ept, struct.pack("<Q", (ept + 0x1000) | 7))
    mem.write(ept + 0x1000, b"".join(struct.pack("<Q", (ept + 0x2000 + 0x1000 * i) | 7) for i in range(4)))
    mem.write(ept + 0x2000, b"".join(struct.pack("<Q", (i << 21) | 0xB7) for i in range(2048)))
    vmcs.write(F.EPT_POINTER, ept | (3 << 3) | 6)          # walk length 4, WB (SDM 25.6.11)
    vmx.ept_tables = ept
    gdt = [0, 0x00AF9B000000FFFF if mode == "long64" else 0x00CF9B000000FFFF, 0x00CF93000000FFFF,
           0x00008B0050000067]
    mem.write(0x6000, b"".join(struct.pack("<Q", d) for d in gdt))
    if isinstance(code, str):
        base = vmcs.read(F.GUEST_CS_BASE) + vmcs.read(F.GUEST_RIP)
        code = _assemble(code, base, _BITS[mode])
    mem.write(vmcs.read(F.GUEST_CS_BASE) + vmcs.read(F.GUEST_RIP), code)
    return vmx


try:  # the pytest plugin part (optional: only when pytest is installed)
    import pytest

    @pytest.fixture
    def vmx_guest_factory():
        """Fixture: the vmx_guest factory (call it with code and controls); the
        guests it made are closed when the test ends."""
        yield vmx_guest
        close_guests()
except ImportError:  # pragma: no cover
    pass
