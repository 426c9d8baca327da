"""Shared fixtures (helpers live in tests/support.py)."""
import pytest

from support import Machine


@pytest.fixture
def machine():
    m = Machine()
    yield m


@pytest.fixture
def vmx():
    """The vmx_guest factory of vmm.harness (guest code + VMCS controls -> VmxGuest)."""
    from vmm.harness import vmx_guest
    return vmx_guest
