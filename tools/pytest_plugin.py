"""vmlab's pytest plugin: fixtures for testing hypervisor and kernel code.

Installed with vmlab and registered through the ``pytest11`` entry point, so any
project that installed vmlab gets these fixtures without a conftest:

* ``vmx`` -- the :func:`vmm.harness.vmx_guest` factory: ``g = vmx("cpuid\\n vmcall",
  proc=(set, clear))`` gives a guest in VMX non-root operation under a VMCS
  that passes every VM-entry check; guests made through it are closed (engine
  and guest RAM freed) when the test ends;
* ``vm`` -- a fresh :class:`vmm.vm.Vm` (64 MiB, serial output collected in
  ``vm.serial_output``), closed when the test ends;
* ``debugger`` -- a factory: ``debugger(vm_or_vmx_guest)`` is a
  :class:`tools.debugger.Debugger` on it (the REPL's commands as a Python API).

``pytest --vmlab-repl`` (with ``-s``, like ``--pdb``) drops into the debugger
REPL (``vmlab debug``'s commands) on the machine of a test that failed, one
REPL per machine the test's fixtures made, before they are closed: a failing
hypervisor test can be inspected where it failed (``info registers``,
``vmcs``, ``exits``, ``walk``…; ``quit`` or end of input goes on).
"""
from __future__ import annotations

import sys

import pytest

_MACHINES = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption("--vmlab-repl", action="store_true", default=False,
                     help="open vmlab's debugger REPL on the machines of a failing test (use with -s)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or not item.config.getoption("--vmlab-repl"):
        return
    from vmlab.tools.debugger import Debugger
    from vmlab.tools.debugrepl import run_repl
    for target in item.stash.get(_MACHINES, []):
        print(f"\n[vmlab] test failed: debugger on {type(target).__name__} "
              f"(quit or end of input to go on)", file=sys.stdout, flush=True)
        try:
            run_repl(Debugger(target))
        except Exception as exc:   # a broken session must not hide the test's own failure
            print(f"[vmlab] debugger: {type(exc).__name__}: {exc}", file=sys.stdout)


def _remember(request, target) -> None:
    request.node.stash.setdefault(_MACHINES, []).append(target)


@pytest.fixture
def vmx(request):
    """The vmx_guest factory (guest code + VMCS controls -> VmxGuest); the
    guests it made are closed when the test ends."""
    from vmlab.vmm.harness import vmx_guest

    made = []

    def factory(*args, **kwargs):
        g = vmx_guest(*args, **kwargs)
        made.append(g)
        _remember(request, g)
        return g

    yield factory
    for g in made:
        g.close()


@pytest.fixture
def vm(request):
    """A fresh 64 MiB Vm with no devices on stdout (serial output is kept in
    ``vm.serial_output``), closed when the test ends."""
    from vmlab.vmm.vm import Vm

    with Vm(64 << 20, serial=None) as machine:
        _remember(request, machine)
        yield machine


@pytest.fixture
def debugger():
    """``debugger(target)``: a Debugger on a Vm or VmxGuest (the REPL's
    commands as methods: step, walk, break…)."""
    from vmlab.tools.debugger import Debugger
    return Debugger
