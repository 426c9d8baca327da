"""Wiring virtio devices into a Vm: one virtio-mmio transport per device, in
4 KiB slots from 0xd0000000 with their own 8259 input (devices/virtio/mmio.py:
MMIO_BASE, IRQS), the Firecracker layout.

``attach(vm, device)`` maps the next free slot (and, for a network device
whose back-end is fed by host I/O, arms a timer that polls it every
:data:`POLL_NS` of machine time); ``cmdline(vm)`` is the Linux
command line that declares every attached device
(``virtio_mmio.device=4K@0xd0000000:5 …``); ``close(vm)`` releases the
back-ends (files, sockets) -- call it before ``Vm.close()``.
"""
from __future__ import annotations

from vmlab.devices.irq import line_to
from vmlab.devices.virtio.mmio import IRQS, MMIO_SLOT, MmioTransport, linux_cmdline, slot_address


POLL_NS = 100_000
"""How often (machine time) a polled net back-end (UDP) is asked for frames:
0.1 ms, so a frame waits at most that long before the guest sees it."""


class SlotError(Exception):
    """No virtio-mmio slot (IRQ line) is left."""


def transports(vm) -> list:
    """The virtio transports attached to ``vm``, in slot order."""
    return vm.__dict__.setdefault("virtio", [])


def attach(vm, device, name: str | None = None) -> MmioTransport:
    """Put ``device`` (a devices.virtio.device.VirtioDevice) behind a
    virtio-mmio transport in the next slot of ``vm``; returns the transport
    (``.base``, ``.irq_number`` say where it sits)."""
    slots = transports(vm)
    k = len(slots)
    if k >= len(IRQS):
        raise SlotError(f"at most {len(IRQS)} virtio devices (one free 8259 input each)")
    base, irq = slot_address(k), IRQS[k]
    t = MmioTransport(device, vm.mem, line_to(vm.isa_irqs, irq, f"virtio{k}"))
    t.base, t.irq_number = base, irq
    vm.mmio.register(base, MMIO_SLOT, t, name or f"virtio-mmio{k}")
    slots.append(t)
    image = getattr(vm, "image", None)
    if image is not None and image.firmware:
        vm.install_firmware_tables()    # the DSDT lists the virtio slots (devices/acpi.py)
    backend = getattr(device, "backend", None)
    if getattr(backend, "needs_poll", False):
        def poll(deadline: int) -> None:
            backend.poll()
            timer.arm(deadline + POLL_NS)
        timer = vm.timers.timer(poll, f"virtio{k}-poll")
        timer.arm(vm.now_ns() + POLL_NS)
        t.poll_timer = timer
    return t


def cmdline(vm) -> str:
    """``virtio_mmio.device=4K@ADDR:IRQ`` for every attached device."""
    return " ".join(linux_cmdline(t.base, t.irq_number) for t in transports(vm))


def close(vm) -> None:
    """Release every attached device's back-end (idempotent)."""
    for t in transports(vm):
        t.device.close()
    transports(vm).clear()
