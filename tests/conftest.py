"""Shared fixtures (helpers live in tests/support.py) and hypothesis profiles."""
import os

import pytest
from hypothesis import settings

# No per-example deadline (shared, noisy machines); in CI (CI=true) the examples
# are derandomized so a run is reproducible.
settings.register_profile("vmlab", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "vmlab")

from support import Machine


@pytest.fixture
def machine():
    m = Machine()
    yield m
    m.close()


# The `vmx` and `vm` fixtures come from vmlab's pytest plugin (tools/pytest_plugin.py,
# registered through the pytest11 entry point when vmlab is installed).


@pytest.fixture(autouse=True)
def _close_harness_guests():
    """Close the VMs vmm.harness.vmx_guest made during the test (the vmx fixture's
    and direct calls alike): their engines and guest RAM go when the test ends."""
    yield
    from vmlab.vmm import harness
    harness.close_guests()
