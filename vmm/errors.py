"""Exception tree of the vmm package."""


class VmmError(Exception):
    """Base class of every error raised by vmm/."""


class VmConfigError(VmmError):
    """The VM was configured with something it cannot do."""
