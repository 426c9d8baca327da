"""What a virtio device front-end provides to its transport (virtio 1.2 §2).

A front-end (virtio-blk, virtio-net) knows its Device ID, its feature bits,
its queues and its configuration space; the transport (virtio-mmio,
devices/virtio/mmio.py) owns the registers, the status state machine, feature
negotiation and the interrupt, and calls the front-end at a few points:

* ``activate(mem, queues, features)`` when the driver sets DRIVER_OK,
* ``notify(index)`` when the driver notifies a queue (QueueNotify),
* ``reset()`` when the driver writes 0 to Status,
* ``config_read`` / ``config_write`` for the device-specific configuration.

The front-end reports back through two callbacks the transport installs:
``signal_used(index)`` (a used buffer notification, §2.3) and
``signal_config()`` (a configuration change notification); a malformed
request that leaves the device unusable raises :class:`DeviceNeedsReset`, and
the transport sets DEVICE_NEEDS_RESET (§2.1.2).  A device that finds the
driver's rings broken outside a notification (virtio-net receiving a frame
from its back-end) calls ``signal_needs_reset(why)`` instead.
"""
from __future__ import annotations

# virtio 1.2 §2.1 "Device Status Field"
ACKNOWLEDGE = 1
DRIVER = 2
FAILED = 128
FEATURES_OK = 8
DRIVER_OK = 4
DEVICE_NEEDS_RESET = 64

# virtio 1.2 §6 "Reserved Feature Bits"
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# virtio 1.2 §5 "Device Types" (Device ID)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2


class DeviceNeedsReset(Exception):
    """The driver broke the device's rules; the device stops until reset."""


class VirtioDevice:
    """Base class of the front-ends (see the module docstring)."""

    device_id = 0
    num_queues = 1
    queue_max_size = 256
    #: feature bits every vmlab device offers: version 1 (§6: "This indicates
    #: compliance with this specification"), indirect descriptors, EVENT_IDX
    common_features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

    def __init__(self) -> None:
        self.signal_used = lambda index: None
        self.signal_config = lambda: None
        self.signal_needs_reset = lambda why: None
        self.mem = None
        self.queues: list = []
        self.features = 0
        self.active = False

    @property
    def device_features(self) -> int:
        """All feature bits the device offers (device-specific | common)."""
        return self.common_features | self.specific_features()

    def specific_features(self) -> int:
        return 0

    def has(self, bit: int) -> bool:
        """Was feature ``bit`` negotiated?"""
        return bool(self.features >> bit & 1)

    def config(self) -> bytes:
        """The device-specific configuration space, as bytes."""
        return b""

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write to the configuration space (read-only by default)."""

    def activate(self, mem, queues: list, features: int) -> None:
        self.mem, self.queues, self.features = mem, queues, features
        self.active = True

    def notify(self, index: int) -> None:
        """The driver made buffers available in queue ``index``."""

    def reset(self) -> None:
        self.active = False
        self.mem = None
        self.queues = []
        self.features = 0

    def close(self) -> None:
        """Release host resources (files, sockets)."""
