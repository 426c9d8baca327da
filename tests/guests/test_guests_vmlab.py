"""Every guest in guests/ runs on vmlab, through the CLI and through the Python
API; the transcript must hold PASS lines, no FAIL line, DONE, and the guest's
debug-exit status 1 ((0 << 1) | 1).  Command lines and modules come from the
guests' own headers (; vmlab-cmdline:, ; vmlab-module:)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUESTS = sorted(p.name for p in (ROOT / "guests").glob("*.asm"))
def _check_transcript(text: str) -> None:
    assert "PASS" in text, text
    fails = [l for l in text.splitlines() if l.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    assert re.search(r"^DONE\s*$", text, re.M), text


def test_guest_list_is_not_empty():
    assert "hello.asm" in GUESTS


@pytest.mark.parametrize("guest", GUESTS)
def test_guest_passes_through_cli(guest, tmp_path):
    from vmlab.tools.guestbuild import boot_config
    cmd = [sys.executable, "-m", "vmlab.tools", "run", str(ROOT / "guests" / guest), "--timeout", "120",
           "-m", f"{boot_config(ROOT / 'guests' / guest).memory >> 20}M"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300)
    out = p.stdout.decode(errors="replace")
    _check_transcript(out)
    assert p.returncode == 1, (p.returncode, p.stderr.decode())


@pytest.mark.parametrize("guest", GUESTS)
def test_guest_passes_through_python_api(guest, tmp_path):
    from vmlab.emu.loaders import load
    from vmlab.tools.asm import build
    from vmlab.vmm.vm import Vm

    from vmlab.tools.guestbuild import boot_config
    config = boot_config(ROOT / "guests" / guest)
    cmdline = config.cmdline
    modules = [(pathlib.Path(path).read_bytes(), line) for path, line in config.modules]
    ram = config.memory
    vm = Vm(ram, serial=None, cmdline=cmdline)
    image_path = build(ROOT / "guests" / guest)
    vm.load(load(str(image_path), ram_size=ram, cmdline=cmdline, modules=modules))
    res = vm.run(max_insns=2_000_000_000, timeout=120)
    _check_transcript(vm.serial_output.decode(errors="replace"))
    assert res.reason == "debug-exit" and res.status == 1, res
