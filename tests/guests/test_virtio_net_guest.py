"""guests/virtio_net.c on vmlab: two machines ping-pong Ethernet frames over
virtio-net, in one process over a hub (vmm.together) and in two vmlab
processes over UDP (QEMU's -netdev dgram wire format)."""
import pathlib
import socket
import subprocess
import sys

import pytest

from vmlab.tools.cguest import build, have_gcc

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not have_gcc(), reason="gcc is not installed (C guests)")


def machine(kernel, cmdline, backend, mac):
    from vmlab.devices.virtio.net import VirtioNet
    from vmlab.emu.loaders import load
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.vm import Vm

    vm = Vm(64 << 20, serial=None, cmdline=cmdline)
    t = virtio_slots.attach(vm, VirtioNet(backend, mac=mac))
    vm.load(load(str(kernel), ram_size=64 << 20, cmdline=cmdline))
    return vm, t


def check(out):
    assert "FAIL" not in out and "DONE" in out, out


@pytest.mark.parametrize("size,depth", [(1514, 1), (60, 8)])
def test_virtio_net_guests_hub_ping_pong_pass(size, depth):
    from vmlab.devices.backends.net import Hub
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.together import run_together

    kernel = build(ROOT / "guests" / "virtio_net.c")
    hub = Hub()
    pong, tp = machine(kernel, "mode=pong count=24", hub.port(), bytes.fromhex("525400000001"))
    ping, ti = machine(kernel, f"mode=ping count=24 size={size} depth={depth}", hub.port(),
                       bytes.fromhex("525400000002"))
    try:
        res = run_together([pong, ping], timeout=60)
        outs = [vm.serial_output.decode(errors="replace") for vm in (pong, ping)]
        for r, out in zip(res, outs):
            check(out)
            assert r.status == 1, (r, out)
        assert "ping: every frame came back" in outs[1] and "INFO: mac=52:54:00:00:00:02" in outs[1]
        assert ti.device.stats["tx_frames"] == 24 and tp.device.stats["rx_frames"] == 24
        assert ti.device.stats["rx_bytes"] == 24 * size
    finally:
        for vm in (pong, ping):
            virtio_slots.close(vm)
            vm.close()


def test_virtio_net_guests_hub_pong_alone_ends_halted():
    """Nobody to talk to: the machine waits in HLT and run_together ends it
    (no frame can ever arrive), instead of spinning."""
    from vmlab.devices.backends.net import Hub
    from vmlab.vmm import virtio_slots
    from vmlab.vmm.together import run_together

    kernel = build(ROOT / "guests" / "virtio_net.c")
    vm, _ = machine(kernel, "mode=pong count=4", Hub().port(), bytes.fromhex("525400000001"))
    try:
        (res,) = run_together([vm], timeout=30)
        assert str(res.reason) == "halted" and "Status = " in vm.serial_output.decode()
    finally:
        virtio_slots.close(vm)
        vm.close()


def _free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cli_has_device_option() -> bool:
    """QEMU's -device spelling lands with the CLI work of issue 10."""
    import inspect
    import vmlab.tools.cli
    return '"-device"' in inspect.getsource(vmlab.tools.cli)


@pytest.mark.skipif(not _cli_has_device_option(), reason="the CLI has no -device option yet (issue 10)")
def test_virtio_net_guests_udp_two_processes_pass():
    """Two `vmlab run` processes joined by -netdev dgram on 127.0.0.1."""
    pa, pb = _free_port(), _free_port()

    def args(mode, local, remote, mac):
        nd = (f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={local},"
              f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}")
        return [sys.executable, "-m", "vmlab.tools", "run", "guests/virtio_net.c", "--format", "multiboot", "-netdev", nd,
                "-device", f"virtio-net,netdev=n0,mac={mac}", "--append", f"{mode} count=16 wait=poll",
                "--timeout", "60"]

    pong = subprocess.Popen(args("mode=pong", pa, pb, "52:54:00:00:00:01"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ping = subprocess.Popen(args("mode=ping size=1000", pb, pa, "52:54:00:00:00:02"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out_i, err_i = ping.communicate(timeout=90)
        out_o, err_o = pong.communicate(timeout=90)
    finally:
        for p in (ping, pong):
            if p.poll() is None:
                p.kill()
                p.wait()
    check(out_i)
    check(out_o)
    assert ping.returncode == 1 and pong.returncode == 1, err_i + err_o
    assert "ping: every frame came back" in out_i and "INFO: mac=52:54:00:00:00:02" in out_i
