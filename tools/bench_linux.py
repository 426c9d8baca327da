"""``vmlab bench linux``: Debian's cloud kernel with a busybox initramfs
(tools/initramfs.py) booted to the userspace marker, on vmlab and on QEMU TCG.

Keys: ``vmlab_wall_s`` and ``vmlab_insns`` to the marker (or, when it is not
reached within ``VMLAB_BENCH_LINUX_TIMEOUT`` seconds (default 600),
``reached`` = False with the instructions run and the last kernel log line);
``vmlab_host_clock_wall_s`` the same under ``--clock host`` when
``VMLAB_BENCH_LINUX_HOST=1``; ``qemu_wall_s`` for ``qemu-system-x86_64 -M q35
-cpu max`` (TCG) to the marker, and ``ratio`` = vmlab / QEMU (target <= 2.0).
Needs the packages tools/install-system-deps.sh installs; reports
``skipped`` otherwise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from vmlab.tools.initramfs import USERSPACE_MARKER, busybox_initramfs, find_busybox, find_kernel

CMDLINE = "console=ttyS0"
RAM = 256 << 20


def _vmlab(kernel, initrd: bytes, timeout: float, clock: str = "virtual") -> dict:
    from vmlab.emu.loaders import load
    from vmlab.vmm.vm import Vm
    seen = bytearray()
    vm = Vm(RAM, serial=None, clock=clock)
    try:
        vm.load(load(str(kernel), ram_size=RAM, cmdline=CMDLINE, modules=[(initrd, "")]))
        marker = USERSPACE_MARKER.encode()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            res = vm.run(max_insns=vm.vcpu.native.icount + 50_000_000)
            if marker in vm.serial_output or res.reason != "limit":
                break
        wall = time.monotonic() - t0
        out = bytes(vm.serial_output)
        reached = marker in out
        lines = [l for l in out.decode(errors="replace").splitlines() if l.strip()]
        seen += out
        return {"reached": reached, "wall_s": round(wall, 2), "insns": vm.vcpu.native.icount,
                "last_line": lines[-1] if lines else ""}
    finally:
        vm.close()


def _qemu(kernel, initrd_path: str, timeout: float) -> float | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    cmd = [qemu, "-M", "q35", "-cpu", "max", "-m", "256", "-kernel", str(kernel), "-initrd", initrd_path,
           "-append", CMDLINE, "-nographic", "-no-reboot", "-display", "none", "-nodefaults", "-serial", "stdio"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    try:
        while time.monotonic() - t0 < timeout:
            chunk = p.stdout.read1(4096)
            if not chunk:
                return None
            buf += chunk
            if USERSPACE_MARKER.encode() in buf:
                return round(time.monotonic() - t0, 2)
        return None
    finally:
        p.kill()
        p.wait()


def bench_linux() -> dict:
    kernel, busybox = find_kernel(), find_busybox()
    if kernel is None or busybox is None:
        return {"skipped": "linux-image-*-cloud-amd64 or busybox-static not installed"}
    timeout = float(os.environ.get("VMLAB_BENCH_LINUX_TIMEOUT", "600"))
    initrd = busybox_initramfs(busybox.read_bytes())
    out: dict = {"kernel": kernel.name}
    with tempfile.NamedTemporaryFile(suffix=".gz") as f:
        f.write(initrd)
        f.flush()
        out["qemu_wall_s"] = _qemu(kernel, f.name, 120)
    v = _vmlab(kernel, initrd, timeout)
    out.update({"reached": v["reached"], "vmlab_wall_s": v["wall_s"], "vmlab_insns": v["insns"],
                "vmlab_last_line": v["last_line"]})
    if os.environ.get("VMLAB_BENCH_LINUX_HOST") == "1":
        h = _vmlab(kernel, initrd, timeout, clock="host")
        out["vmlab_host_clock_wall_s"] = h["wall_s"] if h["reached"] else None
    q = out["qemu_wall_s"]
    out["ratio"] = round(v["wall_s"] / q, 2) if v["reached"] and q else None
    return out
