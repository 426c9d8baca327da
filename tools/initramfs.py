"""Build a Linux initramfs with the Python standard library: a gzip-compressed
cpio archive in the "new ASCII" (newc) format, which is what the kernel
unpacks into its root file system (the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst).

newc entry: the magic "070701", then 13 fields of 8 hexadecimal digits (ino,
mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
rdevminor, namesize including the NUL, check = 0), the NUL-terminated name
padded so header + name is a multiple of 4, the data padded to 4.  The
archive ends with an entry named "TRAILER!!!".

:func:`busybox_initramfs` makes the archive the Linux tests and
``vmlab bench linux`` boot: a static busybox, ``/dev/console``, and an
``/init`` shell script that prints :data:`USERSPACE_MARKER` and powers the
machine off.
"""
from __future__ import annotations

import gzip
import io
import os
import pathlib
import stat

__all__ = ["CpioWriter", "busybox_initramfs", "find_kernel", "find_busybox", "kernel_modules",
           "virtio_blk_init", "USERSPACE_MARKER"]

#: printed by the initramfs' /init once userspace runs
USERSPACE_MARKER = "VMLAB-USERSPACE-OK"

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")


class CpioWriter:
    """newc archive writer (entries in the order added)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    @staticmethod
    def _pad4(n: int) -> bytes:
        return b"\0" * (-n % 4)

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(raw), 0)
        hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._out.write(hdr + raw + self._pad4(len(hdr) + len(raw)))
        self._out.write(data + self._pad4(len(data)))
        self._ino += 1

    def directory(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer (uncompressed)."""
        self.add("TRAILER!!!", 0)
        return self._out.getvalue()


def default_init(marker: str = USERSPACE_MARKER, extra: str = "") -> str:
    """/init: mount /proc and /sys, print the marker, run ``extra``, power off."""
    return ("#!/bin/sh\n"
            "/bin/busybox mount -t proc proc /proc\n"
            "/bin/busybox mount -t sysfs sysfs /sys\n"
            f"echo {marker}\n"
            f"{extra}"
            "/bin/busybox poweroff -f\n")


def busybox_initramfs(busybox: bytes, init: str | None = None, files: dict[str, bytes] | None = None) -> bytes:
    """A gzip'd newc initramfs: busybox as /bin/busybox (with /bin/sh), the
    console device (5, 1), /proc, /sys, /dev, ``files`` and ``/init``."""
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.file("bin/busybox", busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    made = {"bin", "dev", "proc", "sys", "tmp"}
    for name, data in (files or {}).items():
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):      # the kernel's cpio unpacker makes no parents
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                w.directory(d)
        w.file(name, data, 0o755)
    w.file("init", (init or default_init()).encode(), 0o755)
    return gzip.compress(w.finish(), compresslevel=6, mtime=0)


def find_kernel() -> pathlib.Path | None:
    """Debian's cloud kernel (linux-image-*-cloud-amd64), newest version first."""
    found = sorted(pathlib.Path("/boot").glob("vmlinuz-*-cloud-amd64"), reverse=True)
    return next((p for p in found if os.access(p, os.R_OK)), None)


def find_busybox() -> pathlib.Path | None:
    """A statically linked busybox (Debian's busybox-static)."""
    for p in BUSYBOX_PATHS:
        path = pathlib.Path(p)
        if path.is_file() and os.access(path, os.R_OK):
            return path
    return None


def kernel_modules(kernel: pathlib.Path, names, root: str = "/lib/modules") -> tuple[dict[str, bytes], list[str]] | None:
    """The modules ``names`` (e.g. "virtio_blk") of the kernel ``kernel``
    (``vmlinuz-VERSION``) and everything they depend on, from
    ``/lib/modules/VERSION/modules.dep``: ``(files, order)`` where ``files``
    maps ``lib/NAME.ko`` to its bytes (for :func:`busybox_initramfs`) and
    ``order`` lists those paths in load order (dependencies first).  None if
    the modules are not installed or are compressed (busybox's insmod takes
    plain .ko files)."""
    version = pathlib.Path(kernel).name.removeprefix("vmlinuz-")
    base = pathlib.Path(root) / version
    try:
        dep_text = (base / "modules.dep").read_text()
    except OSError:
        return None
    deps = {}
    for line in dep_text.splitlines():
        mod, _, rest = line.partition(":")
        deps[pathlib.Path(mod).name.removesuffix(".ko")] = (mod, [pathlib.Path(d).name.removesuffix(".ko")
                                                                 for d in rest.split()])
    order: list[str] = []
    files: dict[str, bytes] = {}

    def visit(name: str, depth: int = 0) -> bool:
        if name in order:
            return True
        if name not in deps or depth > 32 or not deps[name][0].endswith(".ko"):
            return False
        for d in deps[name][1]:
            if not visit(d, depth + 1):
                return False
        try:
            files[f"lib/{name}.ko"] = (base / deps[name][0]).read_bytes()
        except OSError:
            return False
        order.append(name)
        return True

    if not all(visit(n) for n in names):
        return None
    return files, [f"/lib/{n}.ko" for n in order]


def virtio_blk_init(order: list[str], marker: str = USERSPACE_MARKER) -> str:
    """/init for a virtio-blk smoke test: load the modules in ``order``, wait
    for /dev/vda (the device vmlab's ACPI tables announce), print its size and
    first 24 bytes, write ``VMLAB-WROTE-THIS`` at sector 8, sync, power off."""
    bb = "/bin/busybox"
    return default_init(marker, extra=(
        f"{bb} mount -t devtmpfs devtmpfs /dev\n"
        + "".join(f"{bb} insmod {m}\n" for m in order)
        + f"i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do {bb} sleep 0.1; i=$((i+1)); done\n"
        + f"echo VDA-SIZE $({bb} cat /sys/block/vda/size)\n"
        + f"echo VDA-READ $({bb} dd if=/dev/vda bs=512 count=1 2>/dev/null | {bb} head -c 24)\n"
        + f"echo VMLAB-WROTE-THIS | {bb} dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null\n"
        + f"{bb} sync\n"))
