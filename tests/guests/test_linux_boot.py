"""Debian's cloud kernel (linux-image-*-cloud-amd64, installed by
tools/install-system-deps.sh) on vmlab, with an initramfs built here from
busybox-static (tools/initramfs.py: newc cpio + gzip, standard library only).

* test_linux_bzimage_early_boot_*: the boot protocol, the e820 map and the ACPI
  tables as the kernel reports them (160 M instructions, ~15 s).
* test_linux_boots_to_userspace_from_the_cli: the README's command line
  (`vmlab run vmlinuz --initrd initrd.gz --append console=ttyS0`): the kernel
  log, the userspace marker, the ACPI power-off and status 0 (~1.4 G guest
  instructions, 11-40 s here).
* test_linux_reads_and_writes_a_virtio_blk_disk: the same with
  `-drive file=disk.img,if=virtio`; the initramfs loads virtio_mmio and
  virtio_blk from the kernel's own modules, the guest reads the disk's first
  sector and writes one, which the test finds in the image afterwards.

Every test skips with the reason when the kernel or busybox is absent.
"""
import os
import subprocess
import sys

import pytest

from vmlab.tools.initramfs import (USERSPACE_MARKER, busybox_initramfs, find_busybox, find_kernel, kernel_modules,
                                   virtio_blk_init)

KERNEL = find_kernel()
BUSYBOX = find_busybox()
needs_linux = pytest.mark.skipif(
    KERNEL is None or BUSYBOX is None,
    reason="Debian's cloud kernel and busybox-static are not installed (tools/install-system-deps.sh)")
RAM = 256 << 20


def _boot(cmdline: str, max_insns: int, initrd: bytes | None = None):
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    vm = Vm(RAM, serial=None)
    modules = [(initrd, "")] if initrd else []
    vm.load(load(str(KERNEL), ram_size=RAM, cmdline=cmdline, modules=modules))
    return vm, vm.run(max_insns=max_insns)


@needs_linux
def test_linux_bzimage_early_boot_reports_e820_cmdline_and_acpi_tables():
    vm, res = _boot("console=ttyS0 earlyprintk=serial nokaslr", 160_000_000)
    try:
        log = vm.serial_output.decode(errors="replace")
        assert "Linux version" in log, log[-2000:]
        assert "Command line: console=ttyS0 earlyprintk=serial nokaslr" in log
        assert "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable" in log
        assert "ACPI: RSDP 0x00000000000E0000" in log and "ACPI: FACP" in log and "ACPI: APIC" in log
        assert "tsc: Detected 1000.000 MHz processor" in log       # CPUID 15H, no PIT calibration
    finally:
        vm.close()


def _cli(tmp_path, initrd: bytes, *extra, timeout=900):
    (tmp_path / "initrd.gz").write_bytes(initrd)
    return subprocess.run([sys.executable, "-m", "vmlab.tools", "run", str(KERNEL), "--initrd",
                           str(tmp_path / "initrd.gz"), "--append", "console=ttyS0", "-m", "256M", *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


POWEROFF_LINE = "vmlab: the guest powered the machine off: ACPI S5 (sleep control register <- 0x34: SLP_TYP 5, SLP_EN)"


@needs_linux
@pytest.mark.slow
def test_linux_boots_to_userspace_from_the_cli(tmp_path):
    p = _cli(tmp_path, busybox_initramfs(BUSYBOX.read_bytes()))
    assert "Linux version 6." in p.stdout and "Run /init as init process" in p.stdout, p.stdout[-3000:]
    assert USERSPACE_MARKER in p.stdout.splitlines(), p.stdout[-3000:]
    assert p.returncode == 0 and p.stderr.strip().splitlines() == [POWEROFF_LINE], (p.returncode, p.stderr)


@needs_linux
@pytest.mark.slow
def test_linux_reads_and_writes_a_virtio_blk_disk(tmp_path):
    mods = kernel_modules(KERNEL, ["virtio_mmio", "virtio_blk"])
    if mods is None:
        pytest.skip(f"the modules of {KERNEL.name} are not installed as plain .ko files")
    files, order = mods
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"VMLAB-DISK-HELLO-0123456".ljust(512, b"\0"))
    os.truncate(disk, 8 << 20)
    p = _cli(tmp_path, busybox_initramfs(BUSYBOX.read_bytes(), init=virtio_blk_init(order), files=files),
             "-drive", f"file={disk},if=virtio,format=raw")
    out = p.stdout
    assert "virtio_blk virtio0: [vda] 16384 512-byte logical blocks" in out, out[-3000:]
    assert "VDA-SIZE 16384" in out.splitlines() and "VDA-READ VMLAB-DISK-HELLO-0123456" in out.splitlines(), \
        out[-3000:]
    assert p.returncode == 0, (p.returncode, p.stderr)
    with open(disk, "rb") as f:
        f.seek(8 * 512)
        assert f.read(17) == b"VMLAB-WROTE-THIS\n"
