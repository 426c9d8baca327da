"""Build vmlab's test guests and run them on QEMU, the reference emulator.

    python -m vmlab.tools.guestbuild                 # build every guests/*.asm
    python -m vmlab.tools.guestbuild --qemu [GUEST]  # build and run under QEMU

(elf64 guests run on QEMU through guests/shim/elf64_shim.asm.)

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

from vmlab.tools import asm

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


#: QEMU refuses ELF64 Multiboot kernels: an elf64 guest is booted as the module
#: of this Multiboot kernel, which loads it the way vmlab's loader does.
ELF64_SHIM = asm.GUESTS_DIR / "shim" / "elf64_shim.asm"


@dataclasses.dataclass(frozen=True)
class BootConfig:
    """How a guest wants to be booted, from its header.

    ``modules`` are (file, command line) pairs; a module's command line is
    "<path> <args>", the way QEMU and GRUB pass it.
    """

    cmdline: str
    modules: tuple[tuple[Path, str], ...]
    #: guest RAM in bytes (header ``vmlab-memory``, as -m reads it; default 64 MiB)
    memory: int = 64 << 20


def boot_config(source: Path) -> BootConfig:
    """Command line and modules the guest's header asks for (module paths are
    relative to the source's directory)."""
    header = asm.read_header(source)
    modules = []
    for module in header.modules:
        path, _, args = module.partition(" ")
        full = (Path(source).parent / path).resolve()
        if not full.is_file():
            raise asm.AsmError(f"module file {full} not found", str(source))
        modules.append((full, f"{full} {args}".strip()))
    memory = 64 << 20
    if header.memory:
        from vmlab.tools.qemu_opts import OptionError, parse_size
        try:
            memory = parse_size(header.memory, 1 << 40)
        except OptionError as exc:
            raise asm.AsmError(f"bad vmlab-memory {header.memory!r}: {exc}", str(source)) from None
    return BootConfig(header.cmdline or "", tuple(modules), memory)


def qemu_command(source: Path, image: Path) -> list[str]:
    """The QEMU command line that boots ``image`` built from ``source``."""
    header = asm.read_header(source)
    cmd = [QEMU, *QEMU_BASE_ARGS]
    if header.memory:
        cmd[cmd.index("-m") + 1] = f"{boot_config(source).memory >> 20}M"
    if header.format == "bootsector":
        cmd += ["-drive", f"format=raw,file={image}"]
    elif header.format in ("multiboot-aout", "multiboot-elf"):
        config = boot_config(source)
        cmd += ["-kernel", str(image)]
        append = " ".join(x for x in (config.cmdline, header.qemu_append) if x)
        if append:
            cmd += ["-append", append]
        if config.modules:
            for path, _ in config.modules:
                if "," in str(path) or " " in str(path):
                    raise asm.AsmError(f"module path {path} has a comma or space (QEMU -initrd)", str(source))
            cmd += ["-initrd", ",".join(line for _, line in config.modules)]
    elif header.format == "elf64":
        if "," in str(image) or " " in str(image):
            raise asm.AsmError(f"image path {image} has a comma or space (QEMU -initrd)", str(source))
        cmd += ["-kernel", str(asm.build(ELF64_SHIM)), "-initrd", str(image)]
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
    def skips(self) -> list[str]:
        return [line for line in self.lines if line.startswith("SKIP:")]

    @property
    def done(self) -> bool:
        return "DONE" in self.lines


def unexpected_fails(run: GuestRun, header: asm.GuestHeader) -> list[str]:
    """FAIL lines not declared as known QEMU deviations in the guest's header."""
    known = tuple(f"FAIL: {text}" for text in header.qemu_known_fails)
    return [line for line in run.fails if not line.startswith(known)]


def qemu_verdict(run: GuestRun, header: asm.GuestHeader) -> str | None:
    """None if the QEMU run is as expected, else why not.

    Expected: DONE, no FAIL line except declared deviations, exit status 1 (3 if
    declared deviations showed up: the guest then counts them as failures).
    """
    if run.status is None:
        return "timed out"
    if not run.done:
        return f"no DONE line (exit status {run.status})"
    bad = unexpected_fails(run, header)
    if bad:
        return "unexpected " + "; ".join(bad)
    want = EXIT_FAILED if run.fails else EXIT_PASSED
    if run.status != want:
        return f"exit status {run.status}, expected {want}"
    return None


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
        run = run_qemu(source, args.timeout)
        for line in run.lines:
            if line.startswith(("PASS:", "FAIL:", "SKIP:", "DONE", "INFO:")):
                print("  " + line)
        verdict = qemu_verdict(run, asm.read_header(source))
        print(f"  exit status {run.status}: {verdict or 'as expected'}")
        status |= verdict is not None
    return status


if __name__ == "__main__":
    sys.exit(main())
