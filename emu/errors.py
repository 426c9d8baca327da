"""Exception tree of the emu package.

Everything the machine raises derives from :class:`EmuError`, so callers (the VMM,
the CLI) can catch one type and turn it into a one-line message.  Guest misbehaviour
is *not* reported with these: a hostile guest gets a fault injected or an exit value;
these are for errors of the user or of the host (bad file, bad configuration, a
machine state that cannot be represented).
"""


class EmuError(Exception):
    """Base class of every error raised by emu/."""


class ConfigError(EmuError):
    """The machine was asked for something it cannot be (RAM size, mode, option)."""


class GuestMemoryError(EmuError):
    """A host-side access to guest-physical memory fell outside guest RAM."""


class LoaderError(EmuError):
    """A kernel image could not be loaded (missing, truncated, malformed, too big)."""


class UnsupportedError(EmuError):
    """The guest used a feature vmlab does not model (e.g. a task gate)."""


class NativeError(EmuError):
    """The native module is missing or its self-test against Unicorn failed."""


class ClosedError(EmuError):
    """A machine (Vm, Vcpu, guest RAM) was used after close()."""
