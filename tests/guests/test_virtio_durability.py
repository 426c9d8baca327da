"""Durability of virtio-blk FLUSH under SIGKILL: guests/virtio_blk.c (mode=
durable) writes sector k % 64 filled with k, FLUSHes, and prints "ACK k" only
after the flush completed.  A vmlab process running it is killed with SIGKILL
at a random point, 100 times; afterwards every acknowledged block must be in
the image (its sector holds k, or a later k' written to the same sector).

The processes are forked from one parent that has imported vmlab already, so
each run costs a fork instead of an interpreter start (keeps the test fast);
each child is a complete vmlab machine that dies by SIGKILL mid-run."""
import os
import pathlib
import random
import shutil
import signal
import struct
import tempfile
import time

import pytest

from vmlab.devices.backends.block import RawFile
from vmlab.devices.virtio.blk import VirtioBlk
from vmlab.emu.loaders import load
from vmlab.tools.cguest import build, have_gcc
from vmlab.vmm import virtio_slots
from vmlab.vmm.vm import Vm

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAP = 64
RUNS = 100


def _child(kernel: str, image: str, serial: str) -> None:
    try:
        fd = os.open(serial, os.O_WRONLY | os.O_APPEND)
        cmd = f"mode=durable cap={CAP} n=1000000"
        vm = Vm(64 << 20, serial=lambda data: os.write(fd, data), cmdline=cmd)
        virtio_slots.attach(vm, VirtioBlk(RawFile(image)))
        vm.load(load(kernel, ram_size=64 << 20, cmdline=cmd))
        vm.run(timeout=30)
    finally:
        os._exit(0)


@pytest.mark.skipif(not have_gcc(), reason="gcc is not installed (C guests)")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_virtio_blk_flush_acked_blocks_survive_sigkill(tmp_path):
    kernel = str(build(ROOT / "guests" / "virtio_blk.c"))
    Vm(2 << 20, serial=None).close()      # the once-per-process CPU-state self-test, before forking
    # tmpfs when there is one: fsync there is instant, and what SIGKILL can lose
    # (an acknowledgement given before the write reached the kernel) is the same.
    shm = pathlib.Path("/dev/shm")
    base = pathlib.Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    image, serial = base / "disk.img", base / "serial.txt"
    rng = random.Random(1234)
    total_acks = 0
    for run in range(RUNS):
        image.write_bytes(bytes(512 * CAP))
        serial.write_bytes(b"")
        pid = os.fork()
        if pid == 0:
            _child(kernel, str(image), str(serial))
        # Kill at a random point after the guest got going: wait for its first
        # ACK (bounded; a loaded machine is slow to start it), then a random
        # further 0-60 ms, so every run kills mid-stream whatever the load.
        deadline = time.monotonic() + 10
        while b"ACK " not in serial.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, st = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL, f"run {run}: the child ended on its own"
        acks = [int(l[4:]) for l in serial.read_text().split("\n")[:-1] if l.startswith("ACK ")]
        assert acks == list(range(1, len(acks) + 1))
        total_acks += len(acks)
        data = image.read_bytes()
        latest = {}
        for k in acks:
            latest[k % CAP] = k
        for sector, k in latest.items():
            got = struct.unpack_from("<I", data, 512 * sector)[0]
            assert got >= k and got % CAP == sector, f"run {run}: sector {sector} holds {got}, ACK {k} was given"
    if base != tmp_path:
        shutil.rmtree(base, ignore_errors=True)
    assert total_acks > RUNS, "the guest hardly ever got a FLUSH acknowledged: the test did not test"
