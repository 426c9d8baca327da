"""Shared fixtures (helpers live in tests/support.py)."""
import pytest

from support import Machine


@pytest.fixture
def machine():
    m = Machine()
    yield m
