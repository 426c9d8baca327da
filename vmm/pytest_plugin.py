"""vmlab's pytest plugin: fixtures for testing hypervisor and kernel code.

Installed with vmlab and registered through the ``pytest11`` entry point, so any
project that installed vmlab gets these fixtures without a conftest:

* ``vmx`` -- the :func:`vmm.harness.vmx_guest` factory: ``g = vmx("cpuid\\n vmcall",
  proc=(set, clear))`` gives a guest in VMX non-root operation under a VMCS
  that passes every VM-entry check; guests made through it are closed (engine
  and guest RAM freed) when the test ends;
* ``vm`` -- a fresh :class:`vmm.vm.Vm` (64 MiB, serial output collected in
  ``vm.serial_output``), closed when the test ends.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def vmx():
    """The vmx_guest factory (guest code + VMCS controls -> VmxGuest); the
    guests it made are closed when the test ends."""
    from vmm.harness import vmx_guest

    made = []

    def factory(*args, **kwargs):
        g = vmx_guest(*args, **kwargs)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.close()


@pytest.fixture
def vm():
    """A fresh 64 MiB Vm with no devices on stdout (serial output is kept in
    ``vm.serial_output``), closed when the test ends."""
    from vmm.vm import Vm

    with Vm(64 << 20, serial=None) as machine:
        yield machine
