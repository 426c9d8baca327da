"""QEMU's spellings on vmlab's command line, and the interactive console.

``vmlab run`` accepts what a QEMU user types for a tiny kernel, next to vmlab's
own long options: ``-kernel``, ``-initrd``, ``-append``, ``-m`` with QEMU's
size syntax, ``-serial stdio|mon:stdio|file:PATH|null|none``, ``-nographic``,
``-no-reboot``/``-no-shutdown``, ``-d`` lists (repeated flags merge), ``-D``,
``-device isa-debug-exit,iobase=…,iosize=…``, and a few display options that
mean nothing without a display (``-display none``, ``-vga none``,
``-monitor none``, ``-nodefaults``).  ``vmlab -kernel k.elf …`` (no
subcommand) is ``vmlab run -kernel k.elf …``.

Every bad value raises :class:`OptionError` with one line and status 2 (the
CLI prints it), before a machine exists.
"""
from __future__ import annotations

import math
import os
import re
import sys
import threading

EXIT_USAGE = 2


class OptionError(Exception):
    """A bad option value: one line, exit status 2."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- argv
SUBCOMMANDS = ("run", "debug", "bench")


def normalize_argv(argv: list[str]) -> list[str]:
    """QEMU-style invocations: no subcommand -> ``run``; ``-version`` ->
    ``--version``; ``-help`` -> ``--help``."""
    argv = list(argv)
    if not argv:
        return argv
    first = argv[0]
    if first in ("-version", "--version", "-V"):
        return ["--version"]
    if first in ("-help", "-h", "--help"):
        return ["--help"]
    if first not in SUBCOMMANDS and first.startswith("-"):
        return ["run", *argv]
    return argv


# ---------------------------------------------------------------------- -m
_SUFFIX = {"": 1 << 20, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
           "E": 1 << 60}


def parse_size(text: str, max_bytes: int | None = None) -> int:
    """QEMU's -m: ``[size=]N[suffix][,key=value…]``; a bare number is MiB,
    suffixes B, K, M, G, T, P, E (binary, either case), fractions allowed
    (``1.5G``).  Non-finite, non-positive or larger-than-the-machine values are
    refused."""
    t = text.strip()
    head = t.split(",")[0]
    if head.startswith("size="):
        head = head[5:]
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([bBkKmMgGtTpPeE]?)(?:[iI]?[bB])?", head.strip())
    if not m:
        raise OptionError(f"bad memory size {text!r} (use e.g. 64M or 1G)")
    val = float(m.group(1))
    if not math.isfinite(val):
        raise OptionError(f"bad memory size {text!r} (use e.g. 64M or 1G)")
    size = int(val * _SUFFIX[m.group(2).upper()])
    size &= ~0xFFF                       # whole pages, as QEMU rounds RAM
    if size < (1 << 20):
        raise OptionError(f"bad memory size {text!r}: at least 1M")
    if max_bytes is not None and size > max_bytes:
        raise OptionError(f"bad memory size {text!r}: vmlab supports at most {max_bytes >> 20}M")
    return size


def parse_positive(name: str, text: str, integer: bool = False):
    """--timeout SECONDS / --max-insns N: finite, > 0."""
    try:
        val = int(text, 0) if integer else float(text)
    except (ValueError, TypeError):
        raise OptionError(f"bad {name} {text!r}: expected a positive "
                          f"{'integer' if integer else 'number of seconds'}") from None
    if not integer and not math.isfinite(val):
        raise OptionError(f"bad {name} {text!r}: must be finite")
    if val <= 0:
        raise OptionError(f"bad {name} {text!r}: must be greater than 0")
    if integer and val >= 1 << 62:
        raise OptionError(f"bad {name} {text!r}: too large")
    if not integer and val > 1e9:
        raise OptionError(f"bad {name} {text!r}: too large")
    return val


# ---------------------------------------------------------------------- -serial
def parse_serial(values: list[str], nographic: bool) -> str:
    """The COM1 back-end: stdio, mon:stdio, file:PATH or none.  QEMU maps
    repeated -serial to COM1, COM2…; vmlab has one UART, so a second one that
    is not ``none`` is refused."""
    if not values:
        return "mon:stdio" if nographic else "stdio"
    out = []
    for v in values:
        if v in ("none", "null"):
            out.append("none")
        elif v in ("stdio", "mon:stdio") or (v.startswith("file:") and len(v) > 5):
            out.append(v)
        else:
            raise OptionError(f"bad -serial {v!r} (use stdio, mon:stdio, file:PATH or none)")
    if sum(1 for v in out[1:] if v != "none"):
        raise OptionError("vmlab has one serial port (COM1): give -serial once")
    return out[0]


# ---------------------------------------------------------------------- -device
def parse_debug_exit(spec: str) -> tuple[int, int]:
    """``isa-debug-exit[,iobase=N][,iosize=N]`` -> (iobase, iosize).  QEMU's
    defaults are iobase 0x501, iosize 2 (hw/misc/debugexit.c)."""
    iobase, iosize = 0x501, 2
    for item in spec.split(",")[1:]:
        if not item:
            continue
        key, eq, val = item.partition("=")
        if not eq or key not in ("iobase", "iosize", "id"):
            raise OptionError(f"-device isa-debug-exit: unknown parameter {item!r} (known: iobase, iosize)")
        if key == "id":
            continue
        try:
            num = int(val, 0)
        except ValueError:
            raise OptionError(f"-device isa-debug-exit: {key}={val!r} is not a number") from None
        if key == "iobase":
            iobase = num
        else:
            iosize = num
    if not 0 <= iobase <= 0xFFFF or not 1 <= iosize <= 0x10000 - iobase:
        raise OptionError(f"-device isa-debug-exit: ports {iobase:#x}+{iosize:#x} are outside 0-0xffff")
    return iobase, iosize


def split_devices(specs: list[str]) -> tuple[list[tuple[int, int]], list[str]]:
    """-device values: (the isa-debug-exit ports, the rest for other parsers)."""
    exits, rest = [], []
    for spec in specs:
        if spec.split(",")[0] == "isa-debug-exit":
            exits.append(parse_debug_exit(spec))
        elif spec in ("help", "?"):
            raise OptionError("devices: isa-debug-exit,iobase=N,iosize=N and the virtio devices in README.md",
                              EXIT_USAGE)
        else:
            rest.append(spec)
    return exits, rest


def attach_debug_exits(vm, ports: list[tuple[int, int]]) -> None:
    """Move the built-in isa-debug-exit (port 0xf4, 4 ports) to the first
    -device's ports; further ones share its behaviour at their own ports."""
    if not ports:
        return
    from vmlab.devices.debug_exit import DebugExit
    from vmlab.devices.errors import BusError
    vm.pio.unregister(vm.debug_exit)
    for k, (base, size) in enumerate(ports):
        dev = vm.debug_exit if k == 0 else DebugExit(vm.debug_exit._on_exit)
        try:
            vm.pio.register(base, size, dev, f"isa-debug-exit{k}")
        except BusError as exc:
            raise OptionError(f"-device isa-debug-exit,iobase={base:#x},iosize={size:#x}: {exc}") from None


# ---------------------------------------------------------------------- the console
CTRL_A, CTRL_C = 0x01, 0x03
ESCAPE_HELP = ("C-a h    print this help\r\nC-a x    exit vmlab\r\nC-a C-a  send C-a\r\n"
               "(vmlab has no monitor: C-a c does nothing)\r\n")


class Console:
    """Host stdin as the UART's input while stdin is a terminal.

    The terminal goes to raw mode (no line editing, no echo, no signals; output
    post-processing stays on so the guest's "\\n" starts a new line, as QEMU's
    stdio character device does) and is restored on every exit path
    (:meth:`close`, called from a ``finally``; ``atexit`` as a last resort).
    A reader thread queues what is typed; the run loop moves it into the UART
    no faster than the guest drains the receiver (``Vm.feed_input``).  Keys:
    Ctrl-A x quits (status 0), Ctrl-A h helps, Ctrl-A Ctrl-A sends Ctrl-A;
    Ctrl-C goes to the guest with ``mon:stdio`` (``-nographic``), and ends
    vmlab (status 130) with plain ``stdio``, as QEMU's signal=on default."""

    def __init__(self, vm, fd: int = 0, ctrl_c_to_guest: bool = False, out=None):
        import atexit
        import termios
        from vmlab.vmm import runloop
        self.vm, self.fd, self.ctrl_c_to_guest = vm, fd, ctrl_c_to_guest
        self.out = out or sys.stdout
        self.quit_reason: str | None = None
        self._saved = termios.tcgetattr(fd)
        runloop.enable_async(vm)
        vm.input_event = threading.Event()
        raw = termios.tcgetattr(fd)
        raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                    | termios.IGNCR | termios.ICRNL | termios.IXON)
        raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        raw[6] = list(raw[6])
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        self._closed = False
        atexit.register(self.close)
        self._escape = False
        threading.Thread(target=self._reader, name="vmlab-console", daemon=True).start()

    def close(self) -> None:
        """Restore the terminal (idempotent)."""
        if self._closed:
            return
        self._closed = True
        import termios
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        except (OSError, termios.error):
            pass

    def _reader(self) -> None:
        from vmlab.vmm import runloop
        from vmlab.vmm.runloop import Stop, StopReason
        while not self._closed:
            try:
                data = os.read(self.fd, 256)
            except OSError:
                return
            if not data:
                return
            out = bytearray()
            for b in data:
                if self._escape:
                    self._escape = False
                    if b in (ord("x"), ord("X")):
                        self.quit_reason = "terminated (C-a x)"
                    elif b in (ord("h"), ord("H"), ord("?")):
                        self._say(ESCAPE_HELP)
                    elif b == CTRL_A:
                        out.append(CTRL_A)
                    continue
                if b == CTRL_A:
                    self._escape = True
                elif b == CTRL_C and not self.ctrl_c_to_guest:
                    self.quit_reason = "interrupted (C-c)"
                else:
                    out.append(b)
                if self.quit_reason:
                    break
            if out:
                self.vm.post_input(bytes(out))
                runloop.request_async(self.vm, "input")
            if self.quit_reason:
                self.vm.pending_stop = Stop(StopReason.STOPPED, self.quit_reason)
                runloop.request_async(self.vm, "stop")
                return

    def _say(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass


# ---------------------------------------------------------------------- broken pipes
class SafeStream:
    """stdout/stderr writes that survive a closed pipe: the first failure is
    remembered (``broken``), later writes are dropped.  A reader that went
    away (``vmlab … | head``) must not change the guest's exit status."""

    def __init__(self, binary):
        self.binary = binary
        self.broken: str | None = None

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.binary.write(data)
            self.binary.flush()
        except (OSError, ValueError) as exc:
            self.broken = type(exc).__name__


def silence_broken_stdio() -> None:
    """Point stdout/stderr at /dev/null if their pipe is gone, so the
    interpreter's final flush cannot turn the status into 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
