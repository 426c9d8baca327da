"""ACPI S5 (the hardware-reduced sleep control register at port 0x600, what
Linux's poweroff writes) ends a run with its own reason, and the CLI's status
is 0 with one line that says so (README, Exit status)."""
import subprocess
import sys

from support import Machine

POWEROFF = """
    mov dx, 0x600
    mov al, 0x34        ; SLP_TYP 5 (bits 4:2), SLP_EN (bit 5): ACPI 6.5 4.8.3.7
    out dx, al
    mov al, 0x7f        ; not reached
    out 0xf4, al
    hlt
"""


def test_s5_write_ends_the_run_with_poweroff():
    from vmlab.tools.asm import assemble
    m = Machine()
    try:
        m.boot(assemble(POWEROFF, 16, 0x7C00), 0x7C00, "real")
        res = m.vm.run(max_insns=10_000)
    finally:
        m.close()
    assert res.reason == "poweroff" and "ACPI S5" in res.message, res


def test_cli_status_of_a_poweroff_is_0(tmp_path):
    src = tmp_path / "off.asm"
    src.write_text("; vmlab-format: bootsector\n.code16\n" + POWEROFF)
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", str(src), "--serial", "none"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stderr.strip().splitlines() == [
        "vmlab: the guest powered the machine off: ACPI S5 (sleep control register <- 0x34: SLP_TYP 5, SLP_EN)"]
