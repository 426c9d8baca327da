"""Build vmlab's test guests and run them on QEMU, the reference emulator.

    python -m tools.guestbuild                 # build every guests/*.asm
    python -m tools.guestbuild --qemu [GUEST]  # build and run under QEMU

A guest reports over COM1: ``PASS: ...`` / ``FAIL: ...`` lines, then ``DONE``,
then writes 0 (all passed) or 1 to the isa-debug-exit port 0xf4, which makes
QEMU exit with status 1 or 3 (see guests/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

from tools import asm

QEMU = "qemu-system-x86_64"
QEMU_BASE_ARGS = (
    "-nographic", "-no-reboot", "-display", "none", "-monitor", "none",
    "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-m", "64", "-net", "none",
)
#: QEMU exit status for "guest wrote v to port 0xf4" is (v << 1) | 1.
EXIT_PASSED = 1
EXIT_FAILED = 3


def guest_sources(guests_dir: Path = asm.GUESTS_DIR) -> list[Path]:
    """Every guest source (``guests/*.asm``), sorted by name."""
    return sorted(guests_dir.glob("*.asm"))


def runs_on_qemu(source: Path) -> bool:
    """QEMU boots boot sectors and Multiboot v1 kernels; it cannot boot an ELF64."""
    return asm.read_header(source).format != "elf64"


def qemu_command(source: Path, image: Path) -> list[str]:
    """The QEMU command line that boots ``image`` built from ``source``.

    Module paths in the header are relative to the source's directory.
    """
    header = asm.read_header(source)
    cmd = [QEMU, *QEMU_BASE_ARGS]
    if header.format == "bootsector":
        cmd += ["-drive", f"format=raw,file={image}"]
    elif header.format in ("multiboot-aout", "multiboot-elf"):
        cmd += ["-kernel", str(image)]
        if header.cmdline is not None:
            cmd += ["-append", header.cmdline]
        if header.modules:
            mods = []
            for module in header.modules:
                path, _, args = module.partition(" ")
                full = (source.parent / path).resolve()
                if "," in str(full) or " " in str(full):
                    raise asm.AsmError(f"module path {full} has a comma or space (QEMU -initrd)", str(source))
                mods.append(f"{full} {args}".strip())
            cmd += ["-initrd", ",".join(mods)]
    else:
        raise asm.AsmError(f"QEMU cannot boot a {header.format} guest", str(source))
    return cmd


@dataclasses.dataclass(frozen=True)
class GuestRun:
    """What a guest printed and how the emulator ended."""

    status: int | None  # None: killed on timeout
    output: str

    @property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.output.replace("\r", "\n").split("\n")]

    @property
    def passes(self) -> list[str]:
        return [line for line in self.lines if line.startswith("PASS:")]

    @property
    def fails(self) -> list[str]:
        return [line for line in self.lines if line.startswith("FAIL:")]

    @property
    def done(self) -> bool:
        return "DONE" in self.lines


def run_qemu(source: Path, timeout: float = 20.0, extra_args: tuple[str, ...] = ()) -> GuestRun:
    """Build ``source`` and run it under QEMU with a timeout."""
    image = asm.build(source)
    cmd = qemu_command(source, image) + list(extra_args)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        return GuestRun(None, out.decode("utf-8", "replace"))
    return GuestRun(proc.returncode, proc.stdout.decode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("guests", nargs="*", type=Path, help="guest sources (default: guests/*.asm)")
    parser.add_argument("--qemu", action="store_true", help="run each guest under QEMU")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    sources = args.guests or guest_sources()
    status = 0
    for source in sources:
        try:
            image = asm.build(source)
        except asm.AsmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{source}: {image}")
        if not args.qemu:
            continue
        if shutil.which(QEMU) is None:
            print(f"error: {QEMU} not found", file=sys.stderr)
            return 1
        if not runs_on_qemu(source):
            print("  (not runnable on QEMU)")
            continue
        run = run_qemu(source, args.timeout)
        for line in run.lines:
            if line.startswith(("PASS:", "FAIL:", "DONE", "INFO:")):
                print("  " + line)
        ok = run.status == EXIT_PASSED and run.done and not run.fails
        print(f"  exit status {run.status}: {'ok' if ok else 'FAILED'}")
        status |= not ok
    return status


if __name__ == "__main__":
    sys.exit(main())
