"""Exception tree of the devices package."""


class DeviceError(Exception):
    """Base class of every error raised by devices/."""


class BusError(DeviceError):
    """A bus registration was refused (overlap, bad range)."""
