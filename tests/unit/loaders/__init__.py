"""Unit tests of emu.loaders."""
