"""Interrupt request lines between devices and interrupt controllers.

An :class:`IrqLine` is a one-method trigger, like vm-superio's ``Trigger``: a
device model calls ``set_level(True/False)`` on its output pin and does not know
what is wired to it. Whether an edge or the level matters is the receiver's
business (the 8259 decides per input via ELCR).
"""

from __future__ import annotations

from typing import Callable, Protocol


class IrqController(Protocol):
    """Anything with numbered level inputs (e.g. :class:`Pic8259Pair`)."""

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive input ``irq`` to ``level``."""
        ...


class IrqLine:
    """A wire: ``set_level`` forwards the new level to ``sink(level)``.

    Every call is forwarded, including repeats of the current level; the
    receiver does its own edge detection. :attr:`level` remembers the last
    level driven, for inspection.
    """

    def __init__(self, sink: Callable[[bool], None] | None = None,
                 name: str = "") -> None:
        self._sink = sink
        self.name = name
        self.level = False

    def __repr__(self) -> str:
        return f"IrqLine({self.name!r}, level={self.level})"

    def set_level(self, level: bool) -> None:
        """Drive the line high (asserted) or low."""
        self.level = bool(level)
        if self._sink is not None:
            self._sink(self.level)

    def pulse(self) -> None:
        """Drive a low-to-high edge, leaving the line high."""
        self.set_level(False)
        self.set_level(True)


def line_to(controller: IrqController, irq: int, name: str = "") -> IrqLine:
    """Build an :class:`IrqLine` wired to input ``irq`` of ``controller``.

    ``controller`` is typically a :class:`devices.pic8259.Pic8259Pair`, so
    ``line_to(pic, 4)`` is the COM1 interrupt wire.
    """
    return IrqLine(lambda level: controller.set_irq(irq, level),
                   name or f"irq{irq}")


def disconnected(name: str = "nc") -> IrqLine:
    """A line wired to nothing (an unconnected output pin)."""
    return IrqLine(None, name)
