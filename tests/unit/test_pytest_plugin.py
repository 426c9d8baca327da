"""vmlab's pytest plugin works outside this repository: a test file in an
empty folder (no conftest) uses the `vmx` and `vm` fixtures."""
from __future__ import annotations

import re
import subprocess
import sys

OUTSIDE_TEST = '''
from vmm.exit_reasons import ExitReason


def test_outside_vmx_fixture(vmx):
    g = vmx("cpuid\\n vmcall")
    ex = g.run()
    assert ex.reason == ExitReason.CPUID
    ex.skip()
    assert g.run().reason == ExitReason.VMCALL


def test_outside_vm_fixture(vm):
    assert vm.mem.size == 64 << 20 and not vm.mem.closed
'''


def test_pytest_plugin_fixtures_work_in_a_project_without_conftest(tmp_path):
    (tmp_path / "test_outside.py").write_text(OUTSIDE_TEST)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(tmp_path / "test_outside.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


FAILING_TEST = '''
from vmm.exit_reasons import ExitReason


def test_fails_at_an_exit(vmx):
    g = vmx("mov rax, 0x1234\\n cpuid\\n vmcall")
    ex = g.run()
    assert ex.reason == ExitReason.VMCALL        # wrong on purpose: it is CPUID
'''


def test_pytest_plugin_vmlab_repl_opens_the_debugger_on_a_failing_test(tmp_path):
    (tmp_path / "test_failing.py").write_text(FAILING_TEST)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "--vmlab-repl", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(tmp_path / "test_failing.py")],
                          cwd=tmp_path, input="info registers rax\nvmcs VM_EXIT_REASON\nquit\n", capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "[vmlab] test failed: debugger on VmxGuest" in out
    assert "0x1234" in out                                   # RAX as the guest left it at the failure
    assert re.search(r"VM_EXIT_REASON\s+0xa\b", out)          # the VMCS at the failure: CPUID (10)
    assert "1 failed" in out
