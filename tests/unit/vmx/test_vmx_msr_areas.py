"""The VMX MSR areas (vmm/vmx_msr_areas.py; SDM Vol. 3C 27.4, 28.4, 28.6, 28.7):
the entry rules on a live machine's MSR model and guest RAM, hostile areas
(outside RAM, huge counts), and a VMX abort reached by a guest hypervisor.
guests/nested_vmx.c checks the areas from L1 (tests/guests/test_nested_vmx.py)."""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmlab.emu.msr import IA32_KERNEL_GS_BASE, IA32_SYSENTER_CS
from vmlab.vmm import vmcs as F
from vmlab.vmm import vmx_msr_areas as A

AREA = 0x40000


@pytest.fixture
def vm():
    from vmlab.vmm.vm import Vm
    with Vm(16 << 20, serial=None) as v:
        v.enable_nested_vmx()
        yield v


def _put(vm, addr, entries):
    for i, (index, reserved, data) in enumerate(entries):
        vm.mem.write(addr + 16 * i, struct.pack("<IIQ", index, reserved, data))


def _mem(fields):
    """A VMCS area (``Vmcs.mem``) holding ``fields`` ({encoding: value})."""
    v = F.Vmcs()
    for enc, value in fields.items():
        v.write(enc, value)
    return v.mem


def _entry(count, addr=AREA):
    return _mem({int(F.VM_ENTRY_MSR_LOAD_COUNT): count, int(F.VM_ENTRY_MSR_LOAD_ADDR): addr})


MISC = 0          # IA32_VMX_MISC bits 27:25 = 0: 512 entries


def test_entry_load_writes_each_msr_as_wrmsr_would(vm):
    _put(vm, AREA, [(IA32_KERNEL_GS_BASE, 0, 0x7F00_1234_5000), (IA32_SYSENTER_CS, 0, 0xFFFF_FFFF_0000_0010)])
    assert A.load_on_entry(vm, _entry(2), MISC) == 0
    assert vm.msrs.read(IA32_KERNEL_GS_BASE) == 0x7F00_1234_5000
    assert vm.msrs.read(IA32_SYSENTER_CS) == 0x10          # WRMSR keeps bits 31:0 of SYSENTER_CS


@pytest.mark.parametrize("bad, why", [
    ((0xC0000100, 0, 0), "IA32_FS_BASE"), ((0xC0000101, 0, 0), "IA32_GS_BASE"),
    ((0x808, 0, 0), "x2APIC TPR (bits 31:8 = 000008H)"), ((0x8FF, 0, 0), "last x2APIC MSR"),
    ((0x9B, 0, 0), "IA32_SMM_MONITOR_CTL"), ((0x79, 0, 0), "IA32_BIOS_UPDT_TRIG"),
    ((IA32_KERNEL_GS_BASE, 1, 0), "reserved bits 63:32"),
    ((IA32_KERNEL_GS_BASE, 0, 0x8000_0000_0000), "non-canonical: WRMSR would #GP"),
    ((0x12345678, 0, 0), "no such MSR: WRMSR would #GP"),
])
def test_entry_load_fails_at_the_entry_that_may_not_be_loaded(vm, bad, why):
    _put(vm, AREA, [(IA32_KERNEL_GS_BASE, 0, 0x1000), bad, (IA32_KERNEL_GS_BASE, 0, 0x2000)])
    assert A.load_on_entry(vm, _entry(3), MISC) == 2, why
    assert vm.msrs.read(IA32_KERNEL_GS_BASE) == 0x1000     # entry 1 stays loaded, entry 3 never ran


def test_an_area_outside_ram_reads_as_all_ones_and_fails_at_its_first_entry(vm):
    top = 16 << 20                       # the end of this machine's RAM
    assert vm.mem.contains(top - 1) and not vm.mem.contains(top)
    assert A.load_on_entry(vm, _entry(4, top), MISC) == 1
    # straddling the end of RAM: the entry's last bytes are open bus (reserved bits all ones)
    assert A.load_on_entry(vm, _entry(1, top - 8), MISC) == 1


def test_a_huge_count_is_bounded_by_the_advertised_maximum(vm):
    _put(vm, AREA, [(IA32_KERNEL_GS_BASE, 0, i) for i in range(512)])
    assert A.max_entries(MISC) == 512 and A.max_entries(1 << 25) == 1024
    assert A.load_on_entry(vm, _entry(0xFFFF_FFFF), MISC) == 513
    assert A.load_on_entry(vm, _entry(512), MISC) == 0 and vm.msrs.read(IA32_KERNEL_GS_BASE) == 511


def test_exit_store_reads_each_msr_and_refuses_what_rdmsr_cannot(vm):
    vm.msrs.write(IA32_KERNEL_GS_BASE, 0xABC000)
    st = _mem({int(F.VM_EXIT_MSR_STORE_COUNT): 1, int(F.VM_EXIT_MSR_STORE_ADDR): AREA})
    _put(vm, AREA, [(IA32_KERNEL_GS_BASE, 0, 0x5A5A)])
    assert A.store_on_exit(vm, st, MISC) == 0
    assert struct.unpack_from("<IIQ", vm.mem.read(AREA, 16)) == (IA32_KERNEL_GS_BASE, 0, 0xABC000)
    for bad in ((0x9E, 0, 0), (0x802, 0, 0), (IA32_KERNEL_GS_BASE, 2, 0), (0x12345678, 0, 0)):
        _put(vm, AREA, [bad])
        assert A.store_on_exit(vm, st, MISC) == 1, bad


def test_exit_store_into_an_area_straddling_the_end_of_ram_writes_only_ram(vm):
    top = 16 << 20
    assert vm.mem.contains(top - 1) and not vm.mem.contains(top)
    at = top - 12               # index and reserved in RAM, then 4 data bytes in RAM, 4 past it
    vm.mem.write(at, struct.pack("<II", IA32_KERNEL_GS_BASE, 0) + b"\0" * 4)
    vm.msrs.write(IA32_KERNEL_GS_BASE, 0x1122334455)
    st = _mem({int(F.VM_EXIT_MSR_STORE_COUNT): 1, int(F.VM_EXIT_MSR_STORE_ADDR): at})
    # reading the entry: bits 127:64 partly open bus, but only index and reserved matter for a store
    assert A.store_on_exit(vm, st, MISC) == 0
    assert vm.mem.read(at + 8, 4) == struct.pack("<I", 0x22334455)


def test_a_failing_exit_msr_load_is_a_vmx_abort_that_shuts_the_machine_down(tmp_path):
    """guests/nested_vmx.c with -DVMX_ABORT_TEST: after its checks, L1 puts
    IA32_FS_BASE in the VM-exit MSR-load area and resumes L2, whose VMCALL
    exit cannot load it: VMX abort 4 in the VMCS region, shutdown (SDM 28.7)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    from vmlab.emu.loaders import load
    from vmlab.tools.bench_nested import CFLAGS, ROOT   # the flags the guest is built with
    from vmlab.vmm.vm import Vm
    image = tmp_path / "abort.elf"
    subprocess.run(["gcc", *CFLAGS, "-DVMX_ABORT_TEST", "-o", str(image), str(ROOT / "guests" / "nested_vmx.c")],
                   check=True, capture_output=True, timeout=120)
    with Vm(64 << 20, serial=None) as vm:
        n = vm.enable_nested_vmx()
        vm.load(load(str(image), fmt="elf64", ram_size=64 << 20))
        res = vm.run(max_insns=20_000_000)
        out = vm.serial_output.decode(errors="replace")
        assert "FAIL" not in out and "VMX ABORT NEXT" in out and "DONE" not in out, out
        assert res.reason == "shutdown" and "VMX abort 4" in res.message, res
        assert struct.unpack("<I", vm.mem.read(n.current + 4, 4))[0] == 4


# ------------------------------------------------------------------ the Python harness (VmxGuest)
def _harness(code: str, entry=(), store=(), load=()):
    """A harness guest whose VMCS names the three MSR areas (at 0x40000,
    0x41000, 0x42000) with the given entries; the MSR bitmaps are all clear,
    so the guest's own RDMSR/WRMSR do not exit."""
    from vmlab.vmm.controls import PrimaryProcBasedControls as PP
    from vmlab.vmm.harness import vmx_guest
    fields = {"MSR_BITMAP": 0x43000}
    for (count, addr), name in (((len(entry), 0x40000), "VM_ENTRY_MSR_LOAD"),
                                ((len(store), 0x41000), "VM_EXIT_MSR_STORE"),
                                ((len(load), 0x42000), "VM_EXIT_MSR_LOAD")):
        fields[name + "_COUNT"], fields[name + "_ADDR"] = count, addr
    g = vmx_guest(code, proc=(PP.USE_MSR_BITMAPS, 0), fields=fields)
    for addr, entries in ((0x40000, entry), (0x41000, store), (0x42000, load)):
        _put(g.vm, addr, entries)
    return g


def test_harness_processes_the_three_areas_at_entry_and_exit():
    # SDM 27.4: KERNEL_GS_BASE loaded for the guest at entry; the guest reads
    # it back into RAX:RDX and writes another value; 28.4: that value stored
    # at the exit; 28.6: the "host" value loaded into the vCPU after it.
    from vmlab.vmm.exit_reasons import ExitReason
    from vmlab.vmm.harness import close_guests
    g = _harness("mov ecx, 0xC0000102\n rdmsr\n mov r8, rax\n mov eax, 0x5678\n xor edx, edx\n wrmsr\n vmcall",
                 entry=[(IA32_KERNEL_GS_BASE, 0, 0x1234)], store=[(IA32_KERNEL_GS_BASE, 0, 0)],
                 load=[(IA32_KERNEL_GS_BASE, 0, 0x9999)])
    try:
        ex = g.run()
        assert ex.reason == ExitReason.VMCALL
        assert g.cpu.regs.gpr[8] == 0x1234                                      # loaded at entry
        assert struct.unpack("<Q", g.vm.mem.read(0x41008, 8))[0] == 0x5678      # stored at the exit
        assert g.vm.msrs.read(IA32_KERNEL_GS_BASE) == 0x9999                    # loaded at the exit
    finally:
        close_guests()


def test_harness_entry_load_failure_is_exit_34_with_the_entry_number():
    from vmlab.vmm.exit_reasons import ExitReason
    from vmlab.vmm.harness import close_guests
    g = _harness("vmcall", entry=[(IA32_SYSENTER_CS, 0, 8), (0xC0000100, 0, 1)],   # FS_BASE: refused (27.4)
                 load=[(IA32_KERNEL_GS_BASE, 0, 0x77)])
    try:
        ex = g.run()
        assert ex.entry_failure and ex.reason == ExitReason.ENTRY_FAIL_MSR_LOADING and ex.qualification == 2
        assert g.vmcs.read(F.VM_EXIT_REASON) == 34 | (1 << 31) and g.vmcs.read(F.EXIT_QUALIFICATION) == 2
        assert g.vm.msrs.read(IA32_SYSENTER_CS) == 8                # the entries before it stay loaded
        assert g.vm.msrs.read(IA32_KERNEL_GS_BASE) == 0x77           # 27.8: the exit-load area is processed
    finally:
        close_guests()


def test_harness_exit_store_failure_is_a_vmx_abort():
    from vmlab.vmm.harness import close_guests
    from vmlab.vmm.runloop import StopReason
    from vmlab.vmm.vmx import RunStopped
    g = _harness("vmcall", store=[(0x808, 0, 0)])                 # an x2APIC MSR: processing fails (28.4)
    try:
        res = g.run()
        assert isinstance(res, RunStopped) and res.result.reason == StopReason.SHUTDOWN
        assert "VMX abort (indicator 1)" in res.result.message
    finally:
        close_guests()
