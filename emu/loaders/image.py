"""The plan a loader produces: :class:`BootImage`.

Loaders are pure.  They read an image and describe what the machine must do to
boot it: which bytes go where in guest-physical memory, which ranges to clear,
and the CPU state at the first instruction.  They never touch a CPU, Unicorn or
guest RAM themselves; the machine applies the plan.
"""

from dataclasses import dataclass, field

__all__ = ["BootImage", "FORMATS", "MODES"]

#: Image formats a loader can produce, in the order auto-detection tries them.
FORMATS = ("multiboot", "elf64", "bzimage", "pvh", "bootsector", "flat")

#: CPU modes at entry.
MODES = ("real", "protected32", "long64")


@dataclass
class BootImage:
    """How to start a guest.

    Attributes:
        format: ``"bootsector" | "flat" | "multiboot" | "elf64" | "bzimage" | "pvh"``.
        mode: CPU mode at entry, ``"real" | "protected32" | "long64"``.
        entry: in real mode the linear address reached with CS:IP = 0:entry
            (so it is below 0x10000); otherwise EIP/RIP.
        regs: initial general-purpose registers by lowercase name (``"eax"``,
            ``"edx"``, ``"rsp"``, ``"rdi"``...).  Registers not named here are
            zero at entry.
        writes: guest-physical ``(address, bytes)`` to copy into RAM, in order.
            The ranges never overlap each other nor the ``zero`` ranges.
        zero: guest-physical ``(address, length)`` ranges to clear (bss).
        cr3: ``long64`` only: the PML4 the loader built (identity map of
            [0, 4 GiB) with 2 MiB pages), else None.
        gdt: ``(base, limit)`` of the GDT the loader wrote, if any; its
            selectors are in :mod:`emu.loaders.x86` (0x08 64-bit code,
            0x10 flat data, 0x18 32-bit code).
        selectors: ``(cs, ds)`` selectors in ``gdt`` the CPU enters with,
            when the boot protocol names them (Linux: __BOOT_CS 0x10 and
            __BOOT_DS 0x18); None for the machine's defaults.
        firmware: the kernel expects firmware tables (ACPI) from the machine,
            as Linux does on a machine without a BIOS.
        info: human-readable facts for ``-d`` logs (segments, modules, where
            the loader put its structures, warnings).
    """

    format: str
    mode: str
    entry: int
    regs: dict[str, int]
    writes: list[tuple[int, bytes]]
    zero: list[tuple[int, int]]
    cr3: int | None = None
    gdt: tuple[int, int] | None = None
    selectors: tuple[int, int] | None = None
    firmware: bool = False
    info: dict = field(default_factory=dict)
