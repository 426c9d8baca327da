"""QEMU-shaped command-line options for virtio devices (``vmlab run``):

  -drive file=PATH,if=virtio[,format=raw][,readonly=on|off][,snapshot=on|off]
  -netdev hub,id=ID
  -netdev dgram,id=ID,local.type=inet,local.host=H,local.port=P,
                      remote.type=inet,remote.host=H,remote.port=P
  -device virtio-net,netdev=ID[,mac=52:54:00:xx:xx:xx]
  -object filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]

Each -drive and each -device virtio-net becomes one virtio-mmio device (the
drives first, then the network devices, each in the order given), in the
slots of devices/virtio/mmio.py (0xd0000000 + 4 KiB * k, IRQ 5, 6, 7, 9, …).
A ``-netdev hub`` connects every network device naming it (and nothing else:
one vmlab process runs one machine); ``-netdev dgram`` is QEMU's UDP
transport (one frame per datagram), so a vmlab machine talks to another
vmlab process or to a QEMU with the mirror-image ``-netdev dgram``.
Parsing happens before the machine exists (``parse``), so a bad value ends the
run with one line and status 2 before anything starts; ``attach`` builds the
devices once the Vm exists and ``cmdline`` gives the ``virtio_mmio.device=``
entries a Linux guest needs (Firecracker's way of declaring them).
"""
from __future__ import annotations

import dataclasses
import os
import socket

from vmlab.devices.virtio.mmio import IRQS, linux_cmdline, slot_address


class OptionError(Exception):
    """A bad option value; ``status`` is the CLI exit status (2 usage, 4 file)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _kv(text: str, what: str) -> dict:
    out = {}
    for item in text.split(","):
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq:
            raise OptionError(f"{what}: expected key=value, got {item!r}")
        if key in out:
            raise OptionError(f"{what}: {key} given twice")
        out[key] = val
    return out


def _onoff(val: str, key: str, what: str) -> bool:
    if val in ("on", "yes", "true"):
        return True
    if val in ("off", "no", "false"):
        return False
    raise OptionError(f"{what}: {key}={val!r} must be on or off")


@dataclasses.dataclass
class DriveSpec:
    file: str
    read_only: bool = False
    snapshot: bool = False


def parse_drive(text: str) -> DriveSpec:
    what = f"-drive {text}"
    kv = _kv(text, "-drive")
    unknown = set(kv) - {"file", "if", "format", "readonly", "snapshot", "id"}
    if unknown:
        raise OptionError(f"-drive: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(known: file, if, format, readonly, snapshot)")
    if not kv.get("file"):
        raise OptionError("-drive: file=PATH is required")
    if kv.get("if", "virtio") != "virtio":
        raise OptionError(f"-drive: if={kv['if']!r} is not supported (only if=virtio)")
    if kv.get("format", "raw") != "raw":
        raise OptionError(f"-drive: format={kv['format']!r} is not supported (only format=raw)")
    spec = DriveSpec(kv["file"], _onoff(kv.get("readonly", "off"), "readonly", what),
                     _onoff(kv.get("snapshot", "off"), "snapshot", what))
    if not os.path.isfile(spec.file):
        raise OptionError(f"-drive: disk image {spec.file!r} not found", 4)
    if not os.access(spec.file, os.R_OK) or (not spec.read_only and not spec.snapshot
                                               and not os.access(spec.file, os.W_OK)):
        raise OptionError(f"-drive: disk image {spec.file!r} is not "
                          f"{'readable' if not os.access(spec.file, os.R_OK) else 'writable (use readonly=on or snapshot=on)'}", 4)
    return spec


@dataclasses.dataclass
class NetdevSpec:
    id: str
    kind: str                                   # "hub" or "dgram"
    local: tuple | None = None                  # (host, port) for dgram
    remote: tuple | None = None
    dumps: list = dataclasses.field(default_factory=list)     # DumpSpecs on this netdev


@dataclasses.dataclass
class NicSpec:
    netdev: NetdevSpec
    mac: bytes


@dataclasses.dataclass
class DumpSpec:
    id: str
    netdev: str
    file: str
    maxlen: int = 65536


def _port(val: str, key: str) -> int:
    if not val.isdigit() or not 0 <= int(val) <= 65535:
        raise OptionError(f"-netdev: {key}={val!r} is not a port number (0-65535)")
    return int(val)


def parse_netdev(text: str) -> NetdevSpec:
    kind, _, rest = text.partition(",")
    kv = _kv(rest, "-netdev")
    if not kv.get("id"):
        raise OptionError(f"-netdev {kind}: id=NAME is required")
    if kind == "hub":
        unknown = set(kv) - {"id"}
        if unknown:
            raise OptionError(f"-netdev hub: unknown parameter(s) {', '.join(sorted(unknown))} (known: id)")
        return NetdevSpec(kv["id"], "hub")
    if kind != "dgram":
        raise OptionError(f"-netdev: type {kind!r} is not supported (hub or dgram)")
    known = {"id", "local.type", "local.host", "local.port", "remote.type", "remote.host", "remote.port"}
    unknown = set(kv) - known
    if unknown:
        raise OptionError(f"-netdev dgram: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(known: id, local.type/host/port, remote.type/host/port)")
    ends = []
    for end in ("local", "remote"):
        if kv.get(f"{end}.type", "inet") != "inet":
            raise OptionError(f"-netdev dgram: {end}.type={kv[end + '.type']!r} is not supported (only inet)")
        for key in ("host", "port"):
            if not kv.get(f"{end}.{key}"):
                raise OptionError(f"-netdev dgram: {end}.{key}= is required")
        host, port = kv[f"{end}.host"], _port(kv[f"{end}.port"], f"{end}.port")
        try:
            socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError):
            raise OptionError(f"-netdev dgram: {end}.host={host!r} is not an IPv4 address or known host") from None
        ends.append((host, port))
    if ends[1][1] == 0:
        raise OptionError("-netdev dgram: remote.port=0 is not a port to send to")
    return NetdevSpec(kv["id"], "dgram", ends[0], ends[1])


NET_DEVICES = ("virtio-net", "virtio-net-device")


def parse_device(text: str, netdevs: dict | None = None, index: int = 0) -> NicSpec:
    """``-device virtio-net,netdev=ID[,mac=…]`` (``netdevs``: id -> NetdevSpec;
    ``index`` picks the default MAC 52:54:00:12:34:56+index, as QEMU counts)."""
    from vmlab.devices.virtio.net import parse_mac
    name, _, rest = text.partition(",")
    if name not in NET_DEVICES:
        raise OptionError(f"-device {name!r}: unknown device (vmlab has isa-debug-exit, virtio-net; "
                          f"disks are -drive)")
    kv = _kv(rest, f"-device {name}")
    unknown = set(kv) - {"netdev", "mac", "id"}
    if unknown:
        raise OptionError(f"-device {name}: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(known: netdev, mac, id)")
    if not kv.get("netdev"):
        raise OptionError(f"-device {name}: netdev=ID is required")
    nd = (netdevs or {}).get(kv["netdev"])
    if nd is None:
        raise OptionError(f"-device {name}: no -netdev with id={kv['netdev']!r}")
    if "mac" in kv:
        try:
            mac = parse_mac(kv["mac"])
        except ValueError as exc:
            raise OptionError(f"-device {name}: {exc}") from None
        if mac[0] & 1:
            raise OptionError(f"-device {name}: mac={kv['mac']} is a multicast address")
    else:
        mac = bytes((0x52, 0x54, 0x00, 0x12, 0x34, (0x56 + index) & 0xFF))
    return NicSpec(nd, mac)


def parse_object(text: str, netdevs: dict) -> DumpSpec:
    name, _, rest = text.partition(",")
    if name != "filter-dump":
        raise OptionError(f"-object {name!r}: unknown object (vmlab has filter-dump)")
    kv = _kv(rest, "-object filter-dump")
    unknown = set(kv) - {"id", "netdev", "file", "maxlen", "queue"}
    if unknown:
        raise OptionError(f"-object filter-dump: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(known: id, netdev, file, maxlen)")
    for key in ("id", "netdev", "file"):
        if not kv.get(key):
            raise OptionError(f"-object filter-dump: {key}= is required")
    if kv["netdev"] not in netdevs:
        raise OptionError(f"-object filter-dump: no -netdev with id={kv['netdev']!r}")
    if kv.get("queue", "all") != "all":
        raise OptionError(f"-object filter-dump: queue={kv['queue']!r} is not supported (only all)")
    maxlen = kv.get("maxlen", "65536")
    if not maxlen.isdigit() or not 1 <= int(maxlen) <= 1 << 24:
        raise OptionError(f"-object filter-dump: maxlen={maxlen!r} must be a number of bytes (1..16777216)")
    d = os.path.dirname(os.path.abspath(kv["file"]))
    if not os.path.isdir(d):
        raise OptionError(f"-object filter-dump: directory {d!r} of file= does not exist", 4)
    return DumpSpec(kv["id"], kv["netdev"], kv["file"], int(maxlen))


@dataclasses.dataclass
class PcTestdevSpec:
    """``-device pc-testdev``: QEMU's test device (devices/pc_testdev.py); not
    a virtio device, it takes no slot."""


def parse_pc_testdev(text: str) -> PcTestdevSpec:
    """``-device pc-testdev`` (QEMU's hw/misc/pc-testdev.c has no properties)."""
    if text != "pc-testdev":
        raise OptionError(f"-device {text!r}: pc-testdev takes no parameters")
    return PcTestdevSpec()


def parse(drives: list[str], devices: list[str] = (), netdevs: list[str] = (), objects: list[str] = ()) -> list:
    """Every device spec, in slot order (a pc-testdev last: it takes no slot);
    OptionError for a bad value.  ``devices`` are the -device values other
    parsers did not take."""
    testdevs = [parse_pc_testdev(t) for t in devices if t.split(",")[0] == "pc-testdev"]
    if len(testdevs) > 1:
        raise OptionError("-device pc-testdev: given more than once")
    devices = [t for t in devices if t.split(",")[0] != "pc-testdev"]
    specs = [parse_drive(d) for d in drives]
    nds: dict = {}
    for text in netdevs:
        nd = parse_netdev(text)
        if nd.id in nds:
            raise OptionError(f"-netdev: id={nd.id!r} given twice")
        nds[nd.id] = nd
    nics = [parse_device(text, nds, k) for k, text in enumerate(devices)]
    for nic in nics:
        if nic.netdev.kind == "dgram" and sum(n.netdev is nic.netdev for n in nics) > 1:
            raise OptionError(f"-netdev dgram,id={nic.netdev.id}: used by more than one -device")
    ids = set()
    for text in objects:
        dump = parse_object(text, nds)
        if dump.id in ids:
            raise OptionError(f"-object: id={dump.id!r} given twice")
        ids.add(dump.id)
        nds[dump.netdev].dumps.append(dump)
    specs += nics
    if len(specs) > len(IRQS):
        raise OptionError(f"at most {len(IRQS)} virtio devices")
    return specs + testdevs


def cmdline(specs: list) -> str:
    """``virtio_mmio.device=4K@ADDR:IRQ`` for each device, slot order."""
    n = sum(not isinstance(s, PcTestdevSpec) for s in specs)
    return " ".join(linux_cmdline(slot_address(k), IRQS[k]) for k in range(n))


def attach(vm, specs: list) -> None:
    """Build the devices and put them in ``vm``'s virtio-mmio slots."""
    from vmlab.devices.backends.block import BlockIOError, open_image
    from vmlab.devices.virtio.blk import VirtioBlk, serial_for
    from vmlab.vmm import virtio_slots

    hubs: dict = {}
    captured: set = set()
    for spec in specs:
        if isinstance(spec, PcTestdevSpec):
            from vmlab.devices.pc_testdev import attach as attach_testdev
            attach_testdev(vm)
        if isinstance(spec, NicSpec):
            _attach_nic(vm, spec, hubs, captured)
        if isinstance(spec, DriveSpec):
            try:
                backend = open_image(spec.file, read_only=spec.read_only, snapshot=spec.snapshot)
            except BlockIOError as exc:
                raise OptionError(str(exc), 4) from None
            virtio_slots.attach(vm, VirtioBlk(backend, read_only=spec.read_only, serial=serial_for(spec.file)),
                                f"virtio-blk{len(virtio_slots.transports(vm))}")


def _attach_nic(vm, spec: NicSpec, hubs: dict, captured: set) -> None:
    from vmlab.devices.backends.net import Capture, Hub, NetBackendError, UdpSocket
    from vmlab.devices.virtio.net import VirtioNet
    from vmlab.vmm import virtio_slots

    nd = spec.netdev
    try:
        if nd.kind == "hub":
            backend = hubs.setdefault(nd.id, Hub(nd.id)).port()
        else:
            backend = UdpSocket(nd.local, nd.remote)
        if nd.id not in captured:
            # A capture sees one device's traffic: on a hub, the first device's port.
            captured.add(nd.id)
            for dump in nd.dumps:
                backend = Capture(backend, dump.file, dump.maxlen)
    except NetBackendError as exc:
        raise OptionError(f"-netdev {nd.kind},id={nd.id}: {exc}") from None
    virtio_slots.attach(vm, VirtioNet(backend, mac=spec.mac), f"virtio-net{len(virtio_slots.transports(vm))}")
