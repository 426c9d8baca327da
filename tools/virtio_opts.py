"""QEMU-shaped command-line options for virtio devices (``vmlab run``):

  -drive file=PATH,if=virtio[,format=raw][,readonly=on|off][,snapshot=on|off]

Each option becomes one virtio-mmio device, in the order given, in the slots
of devices/virtio/mmio.py (0xd0000000 + 4 KiB * k, IRQ 5, 6, 7, 9, …).
Parsing happens before the machine exists (``parse``), so a bad value ends the
run with one line and status 2 before anything starts; ``attach`` builds the
devices once the Vm exists and ``cmdline`` gives the ``virtio_mmio.device=``
entries a Linux guest needs (Firecracker's way of declaring them).
"""
from __future__ import annotations

import dataclasses
import os

from devices.virtio.mmio import IRQS, linux_cmdline, slot_address


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


def parse(drives: list[str]) -> list:
    """Every device spec, in slot order; OptionError for a bad value."""
    specs = [parse_drive(d) for d in drives]
    if len(specs) > len(IRQS):
        raise OptionError(f"at most {len(IRQS)} virtio devices")
    return specs


def cmdline(specs: list) -> str:
    """``virtio_mmio.device=4K@ADDR:IRQ`` for each device, slot order."""
    return " ".join(linux_cmdline(slot_address(k), IRQS[k]) for k in range(len(specs)))


def attach(vm, specs: list) -> None:
    """Build the devices and put them in ``vm``'s virtio-mmio slots."""
    from devices.backends.block import BlockIOError, open_image
    from devices.virtio.blk import VirtioBlk, serial_for
    from vmm import virtio_slots

    for spec in specs:
        if isinstance(spec, DriveSpec):
            try:
                backend = open_image(spec.file, read_only=spec.read_only, snapshot=spec.snapshot)
            except BlockIOError as exc:
                raise OptionError(str(exc), 4) from None
            virtio_slots.attach(vm, VirtioBlk(backend, read_only=spec.read_only, serial=serial_for(spec.file)),
                                f"virtio-blk{len(virtio_slots.transports(vm))}")
