"""vmlab's pytest plugin works outside this repository: a test file in an
empty folder (no conftest) uses the `vmx` and `vm` fixtures."""
from __future__ import annotations

import re
import subprocess
import sys

OUTSIDE_TEST = '''
from vmlab.vmm.exit_reasons import ExitReason


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
from vmlab.vmm.exit_reasons import ExitReason


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


def test_installed_under_one_namespace(tmp_path):
    """Outside the repository (no top-level folders on sys.path) vmlab's packages
    are reachable only as vmlab.*: nothing named `tools`, `emu`, `vmm`, `devices`
    or `native` leaks into site-packages; the console script and plugin point
    into the namespace."""
    code = ("import importlib.util, importlib.metadata as md\n"
            "import vmlab.emu.cpu, vmlab.vmm.vm, vmlab.devices.uart16550, vmlab.tools.cli, vmlab.native\n"
            "print([n for n in ('emu', 'vmm', 'devices', 'native', 'tools') if importlib.util.find_spec(n)])\n"
            "eps = md.distribution('vmlab').entry_points\n"
            "print(sorted(f'{e.group}={e.value}' for e in eps))\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    leaked, eps = proc.stdout.splitlines()
    assert leaked == "[]"
    assert eps == "['console_scripts=vmlab.tools.cli:main', 'pytest11=vmlab.tools.pytest_plugin']"


def test_no_module_imports_the_top_level_folders_by_their_bare_names():
    """The folders are importable only as vmlab.* once installed: a bare
    `import emu` would work in the repository and break in site-packages."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2]
    bare = re.compile(r"^\s*(from|import) (emu|vmm|devices|native|tools)\b", re.M)
    offenders = [str(p.relative_to(root)) for d in ("emu", "vmm", "devices", "native", "tools", "tests")
                 for p in (root / d).rglob("*.py") if bare.search(p.read_text())]
    assert offenders == []
