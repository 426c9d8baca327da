"""vmlab's pytest plugin works outside this repository: a test file in an
empty folder (no conftest) uses the `vmx` and `vm` fixtures."""
from __future__ import annotations

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
