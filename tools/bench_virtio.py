"""``vmlab bench virtio``: guests/virtio_blk.c (mode=bench) reading a 64 MiB
raw image through virtio-blk over virtio-mmio.

* blk_seq_read_mb_s   sequential 64 KiB reads, 32 in flight (one notify per 32)
* blk_rand_read_iops  random 4 KiB reads, 32 in flight
* blk_us_per_request  wall time per 4 KiB request (guest + exit + device)
* blk_us_device_per_request  of which the virtio-blk notify (fast path and
                      preadv included)
* net_frames_per_s    1514-byte frames (1500-byte payload) VM<->VM over an
                      in-process hub: guests/virtio_net.c ping sends 64 at a
                      time, pong echoes them; frames moved (both ways) / wall s
* net_us_device_per_frame  of which the virtio-net device and hub (Python)
* qemu_*, ratio_*     the same guest images on QEMU's microvm machine
                      (virtio-mmio version 2 devices, TCG), when
                      qemu-system-x86_64 is installed: the disk, and two QEMU
                      processes echoing frames over -netdev dgram; ratio =
                      vmlab / QEMU (> 1: vmlab faster).  QEMU's times include
                      its start-up.
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


def _run(kernel: str, image: str, cmd: str) -> tuple[float, float]:
    """(wall seconds, seconds inside the device's notify) for one blk run."""
    from vmlab.devices.backends.block import RawFile
    from vmlab.devices.virtio.blk import VirtioBlk
    from vmlab.emu.loaders import load
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.vm import Vm

    inside = [0.0]
    with Vm(64 << 20, serial=None, cmdline=cmd) as vm:
        dev = VirtioBlk(RawFile(image))
        notify = dev.notify

        def timed(index, notify=notify):
            t = time.perf_counter()
            notify(index)
            inside[0] += time.perf_counter() - t
        dev.notify = timed
        virtio_slots.attach(vm, dev)
        vm.load(load(kernel, ram_size=64 << 20, cmdline=cmd))
        t = time.perf_counter()
        res = vm.run(timeout=120)
        dt = time.perf_counter() - t
        out = vm.serial_output.decode(errors="replace")
        virtio_slots.close(vm)
    if res.status != 1 or "FAIL" in out:
        raise RuntimeError(f"bench guest failed: {res.message}\n{out}")
    return dt, inside[0]


QEMU_MACHINE = "microvm,rtc=off,isa-serial=on,pic=on,pit=on,ioapic2=off"
"""QEMU's microvm as the guests need it: COM1, the 8259s and the PIT, and
without the second I/O APIC its 8 virtio-mmio transports sit at 0xfeb00000 +
512 k on GSI 5 + k (guests/c/virtio.h probes them).  The default option ROMs
(x-option-roms=on) carry the Multiboot loader that boots the guests' ELF."""


def qemu_command(kernel: str, cmd: str) -> list | None:
    """qemu-system-x86_64 running ``kernel`` (a C guest) with command line
    ``cmd`` on microvm, serial on stdout; devices to be appended.  None when
    QEMU is not installed."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    # virtio-mmio on microvm is legacy (version 1) unless told otherwise; the
    # guests speak version 2 only (virtio 1.2 §4.2.2).
    return [qemu, "-M", QEMU_MACHINE, "-m", "64", "-nographic", "-no-reboot", "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", kernel, "-append", cmd]


def _qemu(kernel: str, image: str, cmd: str) -> float | None:
    """Wall seconds of one QEMU run of the blk guest (boot included), or None."""
    args = qemu_command(kernel, cmd)
    if args is None:
        return None
    args += ["-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"]
    t = time.perf_counter()
    try:
        p = subprocess.run(args, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    dt = time.perf_counter() - t
    # isa-debug-exit: status (0 << 1) | 1 when the guest passed
    return dt if p.returncode == 1 and b"FAIL" not in p.stdout else None


def _free_udp_ports(n: int) -> list:
    import socket
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _qemu_net(kernel: str, count: int, depth: int = 64) -> float | None:
    """Wall seconds for ``count`` frames echoed between two QEMU microvm
    processes joined by ``-netdev dgram`` (QEMU has no hub across processes),
    or None.  The guests poll (wait=poll): with wait=hlt the guest on microvm
    never takes its device's 8259 interrupt (see README.md, virtio)."""
    pa, pb = _free_udp_ports(2)
    procs = []
    try:
        for mode, local, remote, k in ((f"mode=pong count={count} bench wait=poll", pa, pb, 1),
                                       (f"mode=ping count={count} size=1514 depth={depth} bench wait=poll", pb, pa, 2)):
            args = qemu_command(kernel, mode)
            if args is None:
                return None
            args += ["-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={local},"
                                f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}",
                     "-device", f"virtio-net-device,netdev=n0,mac=52:54:00:00:00:0{k}"]
            if k == 2:
                time.sleep(0.3)            # pong listening first
                t = time.perf_counter()
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        outs = [p.communicate(timeout=120)[0] for p in procs]
        dt = time.perf_counter() - t
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ok = all(p.returncode == 1 and b"FAIL" not in o and b"DONE" in o for p, o in zip(procs, outs))
    return dt if ok else None


def _net(kernel: str, count: int, depth: int = 64) -> tuple[float, float]:
    """(wall seconds, seconds inside the device's transmit path, which
    includes the hub and the peer's receive) for ``count`` echoed frames."""
    from vmlab.devices.backends.net import Hub
    from vmlab.devices.virtio.net import VirtioNet
    from vmlab.emu.loaders import load
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.together import run_together
    from vmlab.vmm.vm import Vm

    hub = Hub()
    vms, devs = [], []
    inside = [0.0]
    for k, cmd in enumerate((f"mode=pong count={count} bench",
                             f"mode=ping count={count} size=1514 depth={depth} bench")):
        vm = Vm(64 << 20, serial=None, cmdline=cmd)
        dev = VirtioNet(hub.port(), mac=bytes((0x52, 0x54, 0, 0, 0, k + 1)))
        tx = dev._transmit

        def timed(tx=tx):
            t = time.perf_counter()
            tx()
            inside[0] += time.perf_counter() - t
        dev._transmit = timed
        virtio_slots.attach(vm, dev)
        vm.load(load(kernel, ram_size=64 << 20, cmdline=cmd))
        vms.append(vm)
        devs.append(dev)
    t = time.perf_counter()
    res = run_together(vms, timeout=120)
    dt = time.perf_counter() - t
    outs = [vm.serial_output.decode(errors="replace") for vm in vms]
    for vm in vms:
        virtio_slots.close(vm)
        vm.close()
    if any(r.status != 1 for r in res) or any("FAIL" in o for o in outs):
        raise RuntimeError(f"net bench guests failed: {res}\n{outs}")
    return dt, inside[0]


def bench_net(count: int = 40000) -> dict:
    from vmlab.tools.cguest import build
    kernel = str(build(ROOT / "guests" / "virtio_net.c"))
    dt, inside = min(_net(kernel, count) for _ in range(2))
    frames = 2 * count
    out = {"net_frames_per_s": round(frames / dt), "net_us_per_frame": round(dt / frames * 1e6, 2),
           "net_us_device_per_frame": round(inside / frames * 1e6, 2)}
    q = _qemu_net(kernel, count // 2)
    if q is not None:
        # whole-process time (boot included), two polling QEMUs over UDP
        out["qemu_net_frames_per_s"] = round(count / q)
        out["ratio_net_frames"] = round(out["net_frames_per_s"] / out["qemu_net_frames_per_s"], 2)
    return out


def bench_virtio(seq_count: int = 4000, rand_count: int = 40000) -> dict:
    from vmlab.tools.cguest import build
    out_net = bench_net()
    kernel = str(build(ROOT / "guests" / "virtio_blk.c"))
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "bench.img")
        with open(image, "wb") as f:
            f.write(os.urandom(1 << 20) * IMAGE_MB)
        cap = IMAGE_MB * 2048
        seq = f"mode=bench kind=seq count={seq_count} size=65536 depth=32 cap={cap}"
        rnd = f"mode=bench kind=rand count={rand_count} size=4096 depth=32 cap={cap}"
        t_seq = min(_run(kernel, image, seq) for _ in range(2))[0]
        t_rnd, inside = min(_run(kernel, image, rnd) for _ in range(2))
        out = {"blk_seq_read_mb_s": round(seq_count * 65536 / t_seq / 1e6, 1),
               "blk_rand_read_iops": round(rand_count / t_rnd),
               "blk_us_per_request": round(t_rnd / rand_count * 1e6, 2),
               "blk_us_device_per_request": round(inside / rand_count * 1e6, 2)}
        q = _qemu(kernel, image, seq)
        if q is not None:
            # whole-process time (QEMU boot included), so the ratio favours vmlab slightly
            q = min(q, _qemu(kernel, image, seq) or q)
            out["qemu_seq_read_mb_s"] = round(seq_count * 65536 / q / 1e6, 1)
            out["ratio_seq_read"] = round(out["blk_seq_read_mb_s"] / out["qemu_seq_read_mb_s"], 2)
            q = _qemu(kernel, image, rnd)
            if q is not None:
                q = min(q, _qemu(kernel, image, rnd) or q)
                out["qemu_rand_read_iops"] = round(rand_count / q)
                out["ratio_rand_iops"] = round(out["blk_rand_read_iops"] / out["qemu_rand_read_iops"], 2)
    out.update(out_net)
    return out
