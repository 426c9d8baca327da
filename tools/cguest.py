"""Build vmlab's C test guests (guests/*.c) with gcc into Multiboot v1 ELF32
images: ``gcc -m32 -ffreestanding -nostdlib`` against guests/c/guest.h (entry,
serial, PASS/FAIL, debug-exit) and guests/c/guest.ld.

``build(path)`` caches the image in guests/build/ under a name hashing the
source, every header in guests/c/, the flags and this file, so a stale image
never runs.  ``CGuestError`` carries gcc's message; ``have_gcc()`` says whether
a C guest can be built here (tests skip with that reason otherwise).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
BUILD_DIR = GUESTS / "build"
CFLAGS = ["-m32", "-march=i686", "-O2", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-no-pie",
          "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only", "-static",
          "-Wall", "-Wno-unused-function", "-Wl,--build-id=none", "-Wl,-n"]


#: a guest whose source says ``vmlab-target: elf64`` (guests/nested_vmx.c) is an
#: x86-64 ELF entered in long mode at 0x200000, with its own _start
CFLAGS_ELF64 = ["-m64", "-O1", "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-mno-red-zone",
                "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-Wl,-Ttext=0x200000", "-e", "_start"]


def is_elf64_source(src: pathlib.Path) -> bool:
    return b"vmlab-target: elf64" in src.read_bytes()[:4096]


class CGuestError(Exception):
    """gcc failed (its message) or is missing."""


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


def _digest(src: pathlib.Path) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for dep in sorted((GUESTS / "c").iterdir()):
        h.update(dep.name.encode() + dep.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(pathlib.Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def build(path: str | os.PathLike) -> pathlib.Path:
    """Compile and link ``path``; return the ELF image (cached)."""
    src = pathlib.Path(path)
    if not have_gcc():
        raise CGuestError("gcc is not installed")
    out = BUILD_DIR / f"{src.stem}-{_digest(src)}.elf"
    if out.is_file():
        return out
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=BUILD_DIR, prefix=f".{src.stem}-")
    os.close(fd)
    if is_elf64_source(src):
        cmd = ["gcc", *CFLAGS_ELF64, "-o", tmp, str(src)]
    else:
        cmd = ["gcc", *CFLAGS, "-I", str(GUESTS), "-T", str(GUESTS / "c" / "guest.ld"), "-o", tmp, str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        os.unlink(tmp)
        raise CGuestError(f"cannot build {src}: {p.stderr.strip()}")
    os.replace(tmp, out)
    return out
