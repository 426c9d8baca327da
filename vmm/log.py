"""QEMU-style debug logging (``-d item,item -D file``).

Items (see ``vmlab run -d help``): exits, int, cpu, unimp, io, mmio, in_asm, exec, tb,
guest_errors.  Logging is
off by default and costs nothing then: callers test ``log.enabled(item)``
before formatting anything.
"""
from __future__ import annotations

import sys
from typing import TextIO

ITEMS = {
    "exits": "every exit of the vCPU run loop (kind, RIP, details)",
    "int": "every interrupt and exception delivered to the guest (like QEMU -d int)",
    "cpu": "the register file at every exit (like QEMU -d cpu)",
    "unimp": "accesses to ports and MMIO no device claims",
    "io": "every port I/O access with its value",
    "mmio": "every MMIO access with its value",
    "in_asm": "each new translation block's disassembly, once (like QEMU -d in_asm)",
    "exec": "each translation block executed (slow: logs every block)",
    "tb": "translation-block invalidations by stores to code (self-modifying code)",
    "guest_errors": "what the guest got wrong: accesses to unbacked memory (open bus), BIOS calls "
                    "without a BIOS (like QEMU -d guest_errors)",
}


class LogError(ValueError):
    """An unknown -d item."""


class DebugLog:
    """Enabled items and the destination stream."""

    def __init__(self, items=(), stream: TextIO | None = None):
        unknown = set(items) - ITEMS.keys()
        if unknown:
            raise LogError(f"unknown -d item(s): {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(ITEMS)})")
        self.items = frozenset(items)
        self.stream = stream or sys.stderr

    @classmethod
    def parse(cls, spec: str | None, stream: TextIO | None = None) -> "DebugLog":
        items = [s.strip() for s in (spec or "").split(",") if s.strip()]
        return cls(items, stream)

    def enabled(self, item: str) -> bool:
        return item in self.items

    #: set when the stream broke (a closed pipe): logging stops, the run goes on
    broken = False

    def __call__(self, item: str, text: str) -> None:
        if item in self.items and not self.broken:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                # A closed stderr pipe (| head) must not change the guest's
                # status: the log ends, the run does not.
                self.broken = True
