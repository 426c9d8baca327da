"""Guest-visible VMX: guests/nested_vmx.c, a hypervisor of our own (L1), runs
its guest (L2) with the VMX instructions on vmlab's VMCS model and checks
every exit field and VMfail convention it meets (vmm/nested.py)."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    from vmlab.tools.bench_nested import build
    return build(tmp_path_factory.mktemp("nested") / "nested_vmx.elf")


def _run(image, nested: bool):
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    with Vm(64 << 20, serial=None) as vm:
        n = vm.enable_nested_vmx() if nested else None
        vm.load(load(str(image), fmt="elf64", ram_size=64 << 20))
        res = vm.run(max_insns=20_000_000)
        return res, vm.serial_output.decode(errors="replace"), (n.reflected if n else 0)


def test_nested_vmx_guest_hypervisor_runs_l2_and_every_check_passes(hypervisor):
    res, out, reflected = _run(hypervisor, nested=True)
    assert "FAIL" not in out, out
    assert out.count("PASS:") == 60 and out.rstrip().endswith("DONE"), out
    assert res.reason == "debug-exit" and res.status == 1, (res, out)
    assert reflected == 12                    # CPUID, HLT, OUT, RDMSR, EPT violation, #GP, two VMCALLs, four task switches


def test_nested_vmx_off_the_guest_sees_no_vmx_and_vmxon_faults(hypervisor):
    res, out, _ = _run(hypervisor, nested=False)
    assert "FAIL: CPUID.1:ECX.VMX" in out
    # CR4.VMXE is reserved without VMX: setting it is #GP(0), which L1's handler reports
    assert "FAIL: no unexpected #GP in L1" in out and "VMXON succeeds" not in out, out
    assert res.reason == "debug-exit" and res.status == 3, (res, out)


def test_nested_vmx_exit_log_names_the_level(hypervisor):
    """-d exits: machine exits carry L1/L2, and each reflected VM exit is a line."""
    import io

    from vmlab.emu.loaders import load
    from vmlab.vmm.log import DebugLog
    from vmlab.vmm.vm import Vm
    buf = io.StringIO()
    with Vm(64 << 20, serial=None, log=DebugLog(["exits"], buf)) as vm:
        vm.enable_nested_vmx()
        vm.load(load(str(hypervisor), fmt="elf64", ram_size=64 << 20))
        assert vm.run(max_insns=20_000_000).status == 1
    text = buf.getvalue()
    assert " L1 " in text and " L2 " in text
    assert "L2 VM exit CPUID (10) qualification=0x0 length=2 -> L1 at HOST_RIP" in text
    assert "L2 VM exit EPT_VIOLATION (48)" in text


# ---------------------------------------------------------------------- the CLI switch
def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "vmlab.tools", *args], capture_output=True, text=True, timeout=300)


NESTED_SRC = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "guests" / "nested_vmx.c")


@pytest.mark.parametrize("switch", [["-cpu", "broadwell,+vmx"], ["--nested-vmx"], ["-cpu", "broadwell,vmx=on"]])
def test_cli_switch_runs_the_guest_hypervisor_from_its_source(switch):
    """QEMU's spelling (-cpu MODEL,+vmx) or --nested-vmx: vmlab run builds
    guests/nested_vmx.c (vmlab-target: elf64) and every check passes; the
    guest's isa-debug-exit status 0 is vmlab's status 1, as QEMU's."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    p = _cli("run", *switch, NESTED_SRC)
    assert "FAIL" not in p.stdout, p.stdout + p.stderr
    assert p.stdout.count("PASS:") == 60 and p.stdout.rstrip().endswith("DONE"), p.stdout + p.stderr
    assert p.returncode == 1, (p.returncode, p.stderr)


def test_cli_without_the_switch_or_with_minus_vmx_the_guest_sees_no_vmx():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    for switch in ([], ["--nested-vmx", "-cpu", "broadwell,-vmx"]):
        p = _cli("run", *switch, NESTED_SRC)
        assert "FAIL: CPUID.1:ECX.VMX" in p.stdout, (switch, p.stdout, p.stderr)
        assert "FAIL: no unexpected #GP in L1" in p.stdout and p.returncode == 3, (p.stdout, p.returncode)


@pytest.mark.parametrize("spec, message", [("broadwell,+svm", "unsupported CPU flag '+svm'"),
                                           ("broadwell,vmx=maybe", "must be on or off"),
                                           ("nosuchcpu,+vmx", "unknown CPU model 'nosuchcpu'")])
def test_cli_cpu_flags_refused_with_one_line(spec, message):
    p = _cli("run", "-cpu", spec, NESTED_SRC)
    assert p.returncode == 2 and message in p.stderr, (p.returncode, p.stderr)


def test_switching_levels_rearms_no_trap_sites(hypervisor, tmp_path):
    """L1 and L2 share one trap-kind set (vmm/nested.py): after the first
    entry, an L1<->L2 switch does not call set_traps (each call drops every
    translated block).  The bench build's 200 extra CPUID exits add none."""
    from vmlab.emu.loaders import load
    from vmlab.tools.bench_nested import build
    from vmlab.vmm.vm import Vm
    counts = []
    for loops in (None, 200):
        image = hypervisor if loops is None else build(tmp_path / "bench.elf", loops)
        with Vm(64 << 20, serial=None) as vm:
            n = vm.enable_nested_vmx()
            vm.load(load(str(image), fmt="elf64", ram_size=64 << 20))
            calls = []
            real = vm.vcpu.set_traps
            vm.vcpu.set_traps = lambda kinds: (calls.append(frozenset(kinds)), real(kinds))[1]
            res = vm.run(max_insns=50_000_000)
            assert res.status == 1, (res, vm.serial_output.decode(errors="replace"))
            counts.append((len(calls), n.reflected))
    (few, r0), (same, r1) = counts
    assert r1 == r0 + 200
    assert same == few and few <= 6, counts


# ---------------------------------------------------------------------- the debugger on L1's VMCS
def _debugger(image):
    from vmlab.emu.loaders import load
    from vmlab.tools.debugger import Debugger
    from vmlab.tools.symbols import load_symbols
    from vmlab.vmm.vm import Vm
    vm = Vm(64 << 20, serial=None)
    vm.enable_nested_vmx()
    vm.load(load(str(image), fmt="elf64", ram_size=64 << 20))
    return vm, Debugger(vm, load_symbols(image))


def _repl(dbg, script: str) -> list[str]:
    import io

    from vmlab.tools.debugrepl import run_repl
    out = io.StringIO()
    run_repl(dbg, stdin=io.StringIO(script), stdout=out)
    return out.getvalue().splitlines()


def test_repl_break_exit_stops_at_the_l2_exit_reflected_to_l1_and_vmcs_shows_l1s_fields(hypervisor):
    vm, dbg = _debugger(hypervisor)
    try:
        lines = _repl(dbg, "vmcs\nbreak-exit 48\nc\n"
                           "vmcs VM_EXIT_REASON EXIT_QUALIFICATION GUEST_PHYSICAL_ADDRESS GUEST_RIP\n"
                           "info mode\nexits 1\n")
        assert lines[0] == "the guest is not in VMX operation (no VMXON yet): no current VMCS"
        assert lines[1:3] == ["break-exit 48", "Continuing."]
        assert lines[3].startswith("VM exit EPT_VIOLATION (48) qualification=0x181 ")
        assert lines[4:8] == ["VM_EXIT_REASON                           0x30",
                              "EXIT_QUALIFICATION                       0x181",
                              "GUEST_PHYSICAL_ADDRESS                   0x40000000",
                              f"GUEST_RIP                                {vm.vcpu.regs.rip:#x}"], lines
        assert vm.vcpu.regs.rip == dbg.evaluate("l2_ept_load")
        assert any("now L2 (VMX non-root" in ln and "4 L2 exits reflected to L1" in ln for ln in lines), lines
        assert lines[-1].startswith("RDMSR (31) qualification=0x0 length=2"), lines
        # Continuing runs L1's handler (the exit is reflected), up to the next matching exit.
        lines = _repl(dbg, "break-exit 18\nc\nvmcs VM_EXIT_REASON VM_EXIT_INSTRUCTION_LEN\ninfo registers rip\n")
        assert lines[2].startswith("VM exit VMCALL (18)"), lines
        assert lines[3:5] == ["VM_EXIT_REASON                           0x12",
                              "VM_EXIT_INSTRUCTION_LEN                  0x3"], lines
        assert vm.vcpu.regs.rip == dbg.evaluate("l2_vmcall")        # still L2, before the reflection
    finally:
        vm.close()


def test_repl_break_exit_on_an_entry_failure_stops_with_l1_at_host_rip(hypervisor):
    vm, dbg = _debugger(hypervisor)
    try:
        lines = _repl(dbg, "break-exit 33\nc\ninfo registers rip\ninfo mode\nvmcs\nbreak-exit off\nc\n")
        assert lines[2] == "VM exit ENTRY_FAIL_GUEST_STATE (33) qualification=0x0", lines
        assert lines[3].split()[:2] == ["rip", f"{dbg.evaluate('vmexit_entry'):#x}"], lines   # HOST_RIP
        assert any("now L1 (VMX root operation)" in ln for ln in lines), lines
        head = [ln for ln in lines if ln.startswith("L1's current VMCS at ")]
        assert head and "launched" in head[0], lines
        assert "VM_EXIT_REASON                           0x80000021" in lines
        assert any(ln.startswith("HOST_RIP ") and ln.endswith(f"{dbg.evaluate('vmexit_entry'):#x}") for ln in lines)
        assert lines[-1] == "[Inferior 1 (vmlab) exited with code 01]", lines
    finally:
        vm.close()


def test_repl_without_nested_vmx_vmcs_and_break_exit_say_how_to_get_them(hypervisor):
    from vmlab.emu.loaders import load
    from vmlab.tools.debugger import Debugger
    from vmlab.vmm.vm import Vm
    with Vm(64 << 20, serial=None) as vm:
        vm.load(load(str(hypervisor), fmt="elf64", ram_size=64 << 20))
        lines = _repl(Debugger(vm), "vmcs\nbreak-exit 10\n")
        assert all("+vmx" in ln for ln in lines), lines


def test_cli_debug_with_nested_vmx_breaks_on_the_l2_cpuid_exit():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "debug", "-cpu", "broadwell,+vmx", "--serial", "none",
                        NESTED_SRC], input="break-exit 10\nc\nvmcs VM_EXIT_REASON\nbreak-exit off\nc\n",
                       capture_output=True, text=True, timeout=300)
    out = p.stdout.splitlines()
    assert out[0].endswith("in _start ()"), p.stdout + p.stderr
    assert "VM exit CPUID (10) qualification=0x0 length=2" in out
    assert "VM_EXIT_REASON                           0xa" in out
    assert out[-1] == "[Inferior 1 (vmlab) exited with code 01]" and p.returncode == 1, (p.stdout, p.stderr)


def test_short_vmresume_path_keeps_every_check(tmp_path, monkeypatch):
    """With -DBENCH_LOOPS, L2's CPUID loop is resumed by L1 after a VMWRITE of
    GUEST_RIP only: those VM entries are executed in C (native/nested.c) or
    take _L2Guest._enter's short path, never the full one (which comes back
    after L1 writes controls, injects an event or changes guest state), and
    every check of the run afterwards still passes."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    from vmlab.tools.bench_nested import build
    from vmlab.vmm import nested
    from vmlab.vmm.vmx import VmxGuest
    full = []
    orig = VmxGuest._enter

    def counting(self):
        full.append(1)
        return orig(self)
    monkeypatch.setattr(VmxGuest, "_enter", counting)
    entries = []
    orig_entered = nested.NestedVmx._entered_natively

    def entered(self):
        entries.append(self._cache.native.entries)
        return orig_entered(self)
    monkeypatch.setattr(nested.NestedVmx, "_entered_natively", entered)
    res, out, reflected = _run(build(tmp_path / "loop.elf", 40), nested=True)
    assert "FAIL" not in out, out
    assert out.count("PASS:") == 60 and res.status == 1, (res, out)
    assert reflected == 52
    assert 1 <= len(full) <= 10, len(full)     # the launch, the injection, the entry failure...
    # most of the loop's VMRESUMEs were executed by native/nested.c (vmlab_vmx_resume_ok),
    # and most of its exits reflected there too (vmlab_vmx_reflect_ok), Python
    # told of both at a few level changes only
    assert entries and entries[-1] >= 35, entries
    assert 1 <= len(entries) <= 12, entries
    assert nested._L2Guest._enter is not VmxGuest._enter
