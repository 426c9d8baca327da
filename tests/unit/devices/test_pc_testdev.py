"""QEMU's pc-testdev (hw/misc/pc-testdev.c) as `-device pc-testdev`: the register
model, the guest guests/devices/pc_testdev.asm on vmlab (with and without the
device) and on QEMU, and the -device spec."""
import pathlib
import shutil
import subprocess
import sys

import pytest

from vmlab.devices.pc_testdev import IOMEM_BASE, IOMEM_LEN, PcTestdev
from vmlab.devices.bus import Bus
from vmlab.tools import virtio_opts

ROOT = pathlib.Path(__file__).resolve().parents[3]
GUEST = ROOT / "guests" / "devices" / "pc_testdev.asm"


@pytest.fixture
def dev():
    lines = []
    d = PcTestdev(lambda n, level: lines.append((n, level)))
    d.lines = lines
    pio, mmio = Bus("pio", 0x10000), Bus("mmio", 1 << 64)
    d.attach(pio, mmio)
    d.pio, d.mmio = pio, mmio
    return d


def test_pc_testdev_ioport_partial_writes_replace_only_their_bytes(dev):
    dev.pio.write(0xE0, 4, 0x12345678)
    dev.pio.write(0xE2, 2, 0xBEEF)
    dev.pio.write(0xE1, 1, 0xAA)
    assert dev.pio.read(0xE0, 4) == 0xBEEFAA78
    assert dev.pio.read(0xE3, 1) == 0xBE and dev.pio.read(0xE1, 2) == 0xEFAA


def test_pc_testdev_byte_port_is_the_same_register(dev):
    dev.pio.write(0xE8, 4, 0xCAFEF00D)
    assert dev.pio.read(0xE0, 4) == 0xCAFEF00D and dev.pio.read(0xEA, 2) == 0xCAFE


def test_pc_testdev_irq_port_drives_line_n_and_ignores_lines_above_15(dev):
    dev.pio.write(0x2005, 1, 7)
    dev.pio.write(0x2005, 1, 0)
    dev.pio.write(0x2014, 1, 1)             # line 20: IOAPIC-only on QEMU's pc
    assert dev.lines == [(5, True), (5, False)]
    assert dev.irq.levels[20] and dev.pio.read(0x2005, 1) == 0


def test_pc_testdev_iomem_is_64k_of_little_endian_storage(dev):
    dev.mmio.write(IOMEM_BASE, 8, 0x1122334455667788)
    dev.mmio.write(IOMEM_BASE + 1, 2, 0xABCD)
    assert dev.mmio.read(IOMEM_BASE, 8) == 0x1122334455ABCD88
    dev.mmio.write(IOMEM_BASE + IOMEM_LEN - 1, 1, 0x5A)
    assert dev.iomem.buf[-1] == 0x5A and dev.mmio.read(IOMEM_BASE + IOMEM_LEN - 1, 1) == 0x5A


def test_pc_testdev_flush_port_accepts_writes_and_reads_zero(dev):
    dev.pio.write(0xE4, 4, 0x123456)
    assert dev.flush.last_page == 0x123000 and dev.pio.read(0xE4, 4) == 0


def _run_guest(with_device: bool):
    from vmlab.emu.loaders import load
    from vmlab.tools.asm import build
    from vmlab.vmm.vm import Vm
    with Vm(64 << 20, serial=None) as vm:
        specs = virtio_opts.parse([], ["pc-testdev"] if with_device else [])
        virtio_opts.attach(vm, specs)
        vm.load(load(str(build(GUEST)), ram_size=64 << 20))
        res = vm.run(max_insns=20_000_000)
        return res, vm.serial_output.decode(errors="replace")


def test_pc_testdev_guest_passes_with_the_device():
    res, out = _run_guest(True)
    assert res.reason == "debug-exit" and res.status == 1, out
    assert "FAIL" not in out and out.count("PASS:") == 14 and "DONE" in out


def test_pc_testdev_guest_fails_without_the_device():
    res, out = _run_guest(False)
    assert res.status == 3 and "FAIL: pc-testdev ioport 0xe0" in out


def test_pc_testdev_spec_takes_no_slot_and_no_parameters():
    specs = virtio_opts.parse([], ["pc-testdev"])
    assert len(specs) == 1 and virtio_opts.cmdline(specs) == ""
    with pytest.raises(virtio_opts.OptionError):
        virtio_opts.parse([], ["pc-testdev,iobase=0x10"])
    with pytest.raises(virtio_opts.OptionError):
        virtio_opts.parse([], ["pc-testdev", "pc-testdev"])


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not on PATH")
def test_pc_testdev_guest_passes_on_qemu():
    from vmlab.tools import guestbuild
    run = guestbuild.run_qemu(GUEST, timeout=20, extra_args=("-device", "pc-testdev"))
    assert run.status == 1 and not run.fails and len(run.passes) == 14, run.output[-3000:]


def _cli_has_device_option() -> bool:
    from vmlab.tools.cli import build_parser
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    return any("-device" in a.option_strings for a in run._actions)


@pytest.mark.skipif(not _cli_has_device_option(), reason="this vmlab run has no -device option yet")
def test_cli_device_pc_testdev_guest_passes():
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", str(GUEST), "-device", "pc-testdev", "--timeout", "60"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "FAIL" not in p.stdout, (p.stdout[-2000:], p.stderr)
