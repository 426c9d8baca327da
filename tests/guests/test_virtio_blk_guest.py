"""guests/virtio_blk.c on vmlab: a real guest driver exercising every
virtio-blk request type over virtio-mmio against real image files (read-write,
read-only, snapshot=on), checked from both sides (transcript and image)."""
import pathlib
import re
import subprocess
import sys

import pytest

from vmlab.tools.cguest import build, have_gcc

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTORS = 64
pytestmark = pytest.mark.skipif(not have_gcc(), reason="gcc is not installed (C guests)")


def make_image(path, sectors=SECTORS):
    path.write_bytes(b"".join(bytes((s + j) & 0xFF for j in range(512)) for s in range(sectors)))
    return path


def run_blk(image, cmdline, read_only=False, snapshot=False, max_insns=200_000_000):
    from vmlab.devices.backends.block import open_image
    from vmlab.devices.virtio.blk import VirtioBlk
    from vmlab.emu.loaders import load
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.vm import Vm

    kernel = build(ROOT / "guests" / "virtio_blk.c")
    with Vm(64 << 20, serial=None, cmdline=cmdline) as vm:
        t = virtio_slots.attach(vm, VirtioBlk(open_image(str(image), read_only, snapshot), read_only=read_only,
                                              serial=b"vmlab-test-disk"))
        vm.load(load(str(kernel), ram_size=64 << 20, cmdline=cmdline))
        res = vm.run(max_insns=max_insns, timeout=60)
        out = vm.serial_output.decode(errors="replace")
        virtio_slots.close(vm)
        return res, out, t


def check_transcript(out):
    fails = [l for l in out.splitlines() if l.startswith("FAIL")]
    assert not fails, out
    assert re.search(r"^DONE$", out, re.M), out


def test_virtio_blk_guest_rw_every_request_type_passes(tmp_path):
    img = make_image(tmp_path / "disk.img")
    before = img.read_bytes()
    res, out, t = run_blk(img, f"mode=rw cap={SECTORS}")
    check_transcript(out)
    assert res.status == 1, out
    assert "INFO: id=vmlab-test-disk" in out
    assert out.count("PASS") >= 25
    after = img.read_bytes()
    assert after[2 * 512:3 * 512] == b"\xa5" * 512                     # the guest's write landed
    assert after[6 * 512:8 * 512] == bytes(1024)                       # write zeroes
    assert after[:2 * 512] == before[:2 * 512] and after[8 * 512:] == before[8 * 512:]
    assert t.device.stats["flushes"] >= 1


def test_virtio_blk_guest_read_only_refuses_writes(tmp_path):
    img = make_image(tmp_path / "disk.img")
    before = img.read_bytes()
    res, out, _ = run_blk(img, f"mode=ro cap={SECTORS}", read_only=True)
    check_transcript(out)
    assert res.status == 1 and img.read_bytes() == before


def test_virtio_blk_guest_snapshot_leaves_image_untouched(tmp_path):
    img = make_image(tmp_path / "disk.img")
    before = img.read_bytes()
    res, out, _ = run_blk(img, f"mode=rw cap={SECTORS}", snapshot=True)
    check_transcript(out)                       # reads see the guest's own writes
    assert res.status == 1 and img.read_bytes() == before


def test_virtio_blk_guest_wrong_capacity_fails(tmp_path):
    """The guest's checks can fail: a disk of the wrong size is reported."""
    img = make_image(tmp_path / "disk.img", sectors=32)
    res, out, _ = run_blk(img, f"mode=ro cap={SECTORS}", read_only=True)
    assert "FAIL: capacity in sectors" in out and res.status == 3
