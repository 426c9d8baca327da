"""Exception kinds of the kernel loaders.

All derive from :class:`emu.errors.LoaderError`, so a caller that only cares
whether the image loaded catches that one type.  The CLI tells the three kinds
apart to choose its exit status:

* :class:`LoaderFileError` - the image could not be read at all (missing,
  unreadable, a directory or device, too big to read).
* :class:`LoaderFormatError` - the bytes are not a loadable image of the
  requested or detected format (truncated, malformed, unsupported feature,
  inconsistent headers, segments overlapping each other).
* :class:`LoaderConfigError` - the image is well formed but cannot be loaded
  with these options (it does not fit in guest RAM, a command line or modules
  given for a format that cannot receive them, an unknown format name).
"""

from vmlab.emu.errors import LoaderError

__all__ = ["LoaderError", "LoaderFileError", "LoaderFormatError", "LoaderConfigError"]


class LoaderFileError(LoaderError):
    """The kernel image or a module file could not be read."""


class LoaderFormatError(LoaderError):
    """The image is truncated, malformed or uses a feature vmlab cannot honour."""


class LoaderConfigError(LoaderError):
    """The image is valid but does not fit the machine or the loader options."""
