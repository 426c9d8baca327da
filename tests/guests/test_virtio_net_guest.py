"""guests/virtio_net.c on vmlab: two machines ping-pong Ethernet frames over
virtio-net, in one process over a hub (vmm.together), in two vmlab
processes over UDP (QEMU's -netdev dgram wire format), and with the same
guest on QEMU's microvm at the other end of the UDP link."""
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


@pytest.mark.parametrize("qemu_mode", ["pong", "ping"])
def test_virtio_net_guest_on_qemu_talks_to_guest_on_vmlab_over_dgram(qemu_mode):
    """The same guest image on QEMU's microvm (its virtio-net-device on
    -netdev dgram) and on vmlab (VirtioNet over UdpSocket): one pings, the
    other echoes, 16 frames of 1000 bytes, both pass."""
    from vmlab.devices.backends.net import UdpSocket
    from vmlab.tools.bench_virtio import qemu_command
    from vmlab.vmm import virtio_slots

    kernel = str(build(ROOT / "guests" / "virtio_net.c"))
    modes = {"ping": "mode=ping count=16 size=1000 wait=poll", "pong": "mode=pong count=16 wait=poll"}
    vmlab_mode = "ping" if qemu_mode == "pong" else "pong"
    pq, pv = _free_port(), _free_port()
    args = qemu_command(kernel, modes[qemu_mode])
    if args is None:
        pytest.skip("qemu-system-x86_64 is not installed (tools/install-system-deps.sh)")
    args += ["-netdev", f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={pq},"
                        f"remote.type=inet,remote.host=127.0.0.1,remote.port={pv}",
             "-device", "virtio-net-device,netdev=n0,mac=52:54:00:00:00:0a"]
    qemu = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        vm, t = machine(kernel, modes[vmlab_mode], UdpSocket(("127.0.0.1", pv), ("127.0.0.1", pq)),
                        bytes.fromhex("52540000000b"))
        with vm:
            res = vm.run(timeout=60)
            out = vm.serial_output.decode(errors="replace")
            stats = dict(t.device.stats)
            virtio_slots.close(vm)
        q_out, q_err = qemu.communicate(timeout=60)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    q_out = q_out.decode(errors="replace")
    check(out)
    check(q_out)
    assert res.status == 1, res
    assert qemu.returncode == 1, q_err       # isa-debug-exit: (0 << 1) | 1
    assert stats["rx_frames"] >= 16 and stats["tx_frames"] >= 16
    ping_out = out if vmlab_mode == "ping" else q_out
    assert "PASS: ping: every frame came back" in ping_out
