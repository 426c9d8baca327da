"""``vmlab bench virtio``: guests/virtio_blk.c (mode=bench) reading a 64 MiB
raw image through virtio-blk over virtio-mmio.

* blk_seq_read_mb_s   sequential 64 KiB reads, 32 in flight (one notify per 32)
* blk_rand_read_iops  random 4 KiB reads, 32 in flight
* blk_us_per_request  wall time per 4 KiB request (guest + exit + device)
* qemu_*              the same guest image on QEMU's microvm machine with a
                      virtio-mmio disk, when qemu-system-x86_64 is installed
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE_MB = 64


def _run(kernel: str, image: str, cmd: str) -> float:
    from devices.backends.block import RawFile
    from devices.virtio.blk import VirtioBlk
    from emu.loaders import load
    from vmm import virtio_slots
    from vmm.vm import Vm

    with Vm(64 << 20, serial=None, cmdline=cmd) as vm:
        virtio_slots.attach(vm, VirtioBlk(RawFile(image)))
        vm.load(load(kernel, ram_size=64 << 20, cmdline=cmd))
        t = time.perf_counter()
        res = vm.run(timeout=120)
        dt = time.perf_counter() - t
        out = vm.serial_output.decode(errors="replace")
        virtio_slots.close(vm)
    if res.status != 1 or "FAIL" in out:
        raise RuntimeError(f"bench guest failed: {res.message}\n{out}")
    return dt


def _qemu(kernel: str, image: str, cmd: str) -> float | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    args = [qemu, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,pic=on,pit=on", "-m", "64",
            "-nographic", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", kernel, "-append", cmd,
            "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"]
    t = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    dt = time.perf_counter() - t
    return dt if p.returncode == 1 else None


def bench_virtio(seq_count: int = 4000, rand_count: int = 40000) -> dict:
    from tools.cguest import build
    kernel = str(build(ROOT / "guests" / "virtio_blk.c"))
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "bench.img")
        with open(image, "wb") as f:
            f.write(os.urandom(1 << 20) * IMAGE_MB)
        cap = IMAGE_MB * 2048
        seq = f"mode=bench kind=seq count={seq_count} size=65536 depth=32 cap={cap}"
        rnd = f"mode=bench kind=rand count={rand_count} size=4096 depth=32 cap={cap}"
        t_seq = min(_run(kernel, image, seq) for _ in range(2))
        t_rnd = min(_run(kernel, image, rnd) for _ in range(2))
        out = {"blk_seq_read_mb_s": round(seq_count * 65536 / t_seq / 1e6, 1),
               "blk_rand_read_iops": round(rand_count / t_rnd),
               "blk_us_per_request": round(t_rnd / rand_count * 1e6, 2)}
        q = _qemu(kernel, image, seq)
        if q is not None:
            # whole-process time (QEMU boot included), so the ratio favours vmlab slightly
            out["qemu_seq_read_mb_s"] = round(seq_count * 65536 / q / 1e6, 1)
            q = _qemu(kernel, image, rnd)
            if q is not None:
                out["qemu_rand_read_iops"] = round(rand_count / q)
                out["ratio_rand_iops"] = round(out["blk_rand_read_iops"] / out["qemu_rand_read_iops"], 2)
    return out
