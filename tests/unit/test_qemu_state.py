"""Reaching Unicorn's CPU state without scanning memory, and freeing machines
without leaving them mapped (emu.qemu_state, Vcpu/Vm/GuestMemory close)."""
import builtins
import gc
import mmap
import os
import struct
import weakref

import pytest
import unicorn
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.x86_const import UC_X86_REG_RAX

from vmlab.emu import qemu_state as qs
from vmlab.emu.errors import ClosedError, NativeError
from vmlab.emu.memory import GuestMemory
from vmlab.vmm.vm import Vm


def _release(uc: Uc) -> None:
    uc._Uc__finalizer()


# ---------------------------------------------------------------------- the layout
def test_self_test_on_pinned_unicorn_passes_with_the_known_layout():
    lay = qs.self_test()
    assert lay == qs.LAYOUT
    # The offsets the earlier anchor search found in a context blob.
    assert (lay.env, lay.hflags, lay.segs, lay.ldt, lay.tr) == (40, 216, 224, 368, 392)
    assert (lay.error_code, lay.is_int, lay.old_exception) == (5424, 5428, 5536)


@pytest.mark.parametrize("name, delta, field", [
    ("ENV_HFLAGS", 4, "hflags"),
    ("ENV_SEGS", qs.SEG_SIZE, "segs"),
    ("ENV_SEGS", 8, "segs"),
    ("ENV_LDT", qs.SEG_SIZE, "ldt"),
    ("ENV_TR", -qs.SEG_SIZE, "tr"),
    ("ENV_ERROR_CODE", 4, ""),
    ("ENV_IS_INT", -4, ""),
    ("ENV_OLD_EXCEPTION", 8, "old_exception"),
])
def test_self_test_with_a_wrong_offset_raises_one_line(monkeypatch, name, delta, field):
    monkeypatch.setattr(qs, name, getattr(qs, name) + delta)
    with pytest.raises(NativeError) as err:
        qs.self_test()
    msg = str(err.value)
    assert "\n" not in msg and "self-test failed" in msg and field in msg


# ---------------------------------------------------------------------- per engine
def test_find_env_address_for_several_engines_gives_distinct_live_states():
    engines = [Uc(UC_ARCH_X86, UC_MODE_64) for _ in range(4)]
    try:
        envs = [qs.find_env_address(uc) for uc in engines]
        assert len(set(envs)) == len(envs)
        for i, uc in enumerate(engines):
            uc.reg_write(UC_X86_REG_RAX, 0xC0DE0000 + i)
        for i, env in enumerate(envs):
            assert struct.unpack("<Q", qs.peek(env, 8))[0] == 0xC0DE0000 + i
    finally:
        for uc in engines:
            _release(uc)


def test_find_env_address_reads_a_bounded_number_of_bytes(monkeypatch):
    reads = []
    real_peek = qs.peek
    monkeypatch.setattr(qs, "peek", lambda addr, size: reads.append(size) or real_peek(addr, size))
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        qs.find_env_address(uc)
    finally:
        _release(uc)
    assert len(reads) == 4 and sum(reads) == 8 + 8 + 32 + 32     # two pointers, two register checks


@pytest.mark.parametrize("name", ["UC_STRUCT_CPU", "CPUSTATE_ENV_PTR", "X86CPU_ENV"])
def test_find_env_address_with_a_wrong_structure_offset_raises(monkeypatch, name):
    monkeypatch.setattr(qs, name, getattr(qs, name) + 8)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        with pytest.raises(NativeError, match="CPU state is not where"):
            qs.find_env_address(uc)
    finally:
        _release(uc)


def test_peek_of_an_unmapped_address_returns_none():
    m = mmap.mmap(-1, 4096)
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert qs.peek(addr, 16) == bytes(16)
    gc.collect()
    m.close()
    assert qs.peek(addr, 16) is None
    assert qs.peek(0, 8) is None and qs.peek(addr, 0) is None


def test_vms_created_never_open_proc_self_mem_or_maps(monkeypatch):
    real_open, real_os_open = builtins.open, os.open

    def guard(path):
        p = os.fspath(path) if not isinstance(path, int) else ""
        if p.startswith("/proc/") and p.endswith(("/mem", "/maps")):
            raise AssertionError(f"opened {p}")

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: guard(f) or real_open(f, *a, **k))
    monkeypatch.setattr(os, "open", lambda f, *a, **k: guard(f) or real_os_open(f, *a, **k))
    vms = [Vm(4 << 20, serial=None) for _ in range(3)]
    try:
        envs = {vm.vcpu.env_address for vm in vms}
        assert len(envs) == 3
        for vm in vms:
            vm.vcpu.refresh()
            assert vm.vcpu.regs.seg[1].selector == 0xF000     # reset CS, read through env
    finally:
        for vm in vms:
            vm.close()


# ---------------------------------------------------------------------- the pin
def test_check_unicorn_version_on_another_release_raises_one_line(monkeypatch):
    monkeypatch.setattr(unicorn, "__version__", "2.1.3")
    with pytest.raises(NativeError) as err:
        qs.check_unicorn_version()
    assert "\n" not in str(err.value) and "unicorn==2.1.4" in str(err.value) and "2.1.3" in str(err.value)


def test_vm_on_another_unicorn_release_refuses_to_start(monkeypatch):
    monkeypatch.setattr(unicorn, "__version__", "2.2.0")
    with pytest.raises(NativeError, match="vmlab needs unicorn==2.1.4"):
        Vm(4 << 20, serial=None)


def test_cli_on_another_unicorn_release_prints_one_line(monkeypatch, capsys):
    from vmlab.tools import cli
    monkeypatch.setattr(unicorn, "__version__", "2.0.1")
    status = cli.main(["run", "guests/hello.asm", "--serial", "none"])
    err = capsys.readouterr().err
    assert status != 0 and err.count("\n") == 1
    assert err.startswith("vmlab: error: vmlab needs unicorn==2.1.4")


# ---------------------------------------------------------------------- closing
def test_vm_close_unmaps_guest_ram_and_is_idempotent():
    vm = Vm(8 << 20, serial=None)
    mem = vm.mem
    uc = vm.vcpu.uc
    mm = weakref.ref(mem._mm)
    start, end = mem.address, mem.address + mem.size
    vm.close()
    vm.close()
    assert vm.closed and mem.closed and mm() is None
    assert not uc._Uc__finalizer.alive              # uc_close has run
    with open("/proc/self/maps") as f:
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]
    assert (start, end) not in spans
    with pytest.raises(ClosedError):
        mem.read(0, 4)


def test_closed_vm_use_raises_closed_error():
    vm = Vm(4 << 20, serial=None)
    cpu = vm.vcpu
    vm.close()
    for use in (lambda: vm.run(max_insns=10), lambda: vm.vcpu, lambda: vm.load(None),
                lambda: cpu.refresh(), lambda: cpu.run(100)):
        with pytest.raises(ClosedError, match="is closed"):
            use()
    assert cpu.closed and repr(vm) == "<closed Vm>"


def test_with_statement_closes_the_vm_on_exit_and_on_error():
    with Vm(4 << 20, serial=None) as vm:
        mem = vm.mem
        assert not vm.closed
    assert vm.closed and mem.closed
    with pytest.raises(RuntimeError):
        with Vm(4 << 20, serial=None) as vm2:
            mem2 = vm2.mem
            raise RuntimeError("boom")
    assert mem2.closed


def test_dropped_vm_without_close_frees_ram_with_gc_disabled():
    from vmlab.emu.loaders import load, read_image
    from vmlab.tools.asm import build
    data = read_image(str(build("guests/hello.asm")))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        vm = Vm(64 << 20, serial=None)
        vm.load(load(data, ram_size=64 << 20))
        assert vm.run(max_insns=50_000_000).reason == "debug-exit"
        refs = weakref.ref(vm), weakref.ref(vm.mem), weakref.ref(vm.mem._mm), weakref.ref(vm.vcpu)
        del vm
        assert [r() for r in refs] == [None] * 4
    finally:
        if was_enabled:
            gc.enable()


def test_vcpu_close_frees_native_state_and_engine():
    from vmlab.emu.cpu import Vcpu
    from vmlab.emu.native import ffi
    mem = GuestMemory(4 << 20)
    cpu = Vcpu(mem)
    v, uc = cpu.native, cpu.uc
    cpu.close()
    cpu.close()
    assert v.priv == ffi.NULL and not uc._Uc__finalizer.alive
    assert not mem.closed                  # RAM stays the caller's
    mem.close()


def test_harness_close_guests_closes_what_vmx_guest_made():
    from vmlab.vmm import harness
    g = harness.vmx_guest("hlt")
    mem = g.vm.mem
    assert harness.close_guests() >= 1
    assert g.vm.closed and mem.closed
    g.close()                              # idempotent
    with pytest.raises(ClosedError):
        g.run()
