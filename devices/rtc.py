"""CMOS real-time clock and NVRAM: a Motorola MC146818A register model at
ports 0x70 (index) and 0x71 (data), as on every PC.

Register numbers and bits are the MC146818A datasheet's ("Address Map",
"Register A/B/C/D"); the century byte at 0x32 is the PC convention the ACPI
FADT's CENTURY field names (ACPI 6.5 §5.2.9):

* 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday),
  0x07 day of month, 0x08 month, 0x09 year (two digits), 0x32 century; BCD or
  binary per register B's DM bit, 12- or 24-hour per its 24/12 bit;
* register A (0x0A): UIP (bit 7) reads 0 -- the clock is read from virtual
  time at each access, so there is never an update in progress to wait for;
  divider and rate bits are stored;
* register B (0x0B): SET (bit 7) freezes the time the guest sees and lets it
  write the time registers (the new time then runs from the moment SET is
  cleared); PIE/AIE/UIE (bits 6/5/4) are stored, and no interrupt is raised
  (IRQ 8 is not modelled); DM (bit 2), 24/12 (bit 1);
* register C (0x0C) reads 0 (no interrupt flags), register D (0x0D) has VRT
  (bit 7, "valid RAM and time") set;
* 0x0E-0x7F battery-backed NVRAM, zero at power-on.

Bit 7 of the index written to port 0x70 is the NMI mask on PC hardware; it is
stored and ignored.

Time is the machine's clock (virtual time, 1 instruction = 1 ns, unless the
machine follows the host clock) plus an epoch, fixed by default, so that a
boot is deterministic: the guest reads the same date at the same instruction.
"""
from __future__ import annotations

import calendar
import time
from typing import Callable

__all__ = ["CmosRtc", "RTC_PORT", "DEFAULT_EPOCH"]

RTC_PORT = 0x70
#: 2026-01-01 00:00:00 UTC: the time the guest reads at power-on by default.
DEFAULT_EPOCH = calendar.timegm((2026, 1, 1, 0, 0, 0))

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
B_SET, B_DM, B_24H = 0x80, 0x04, 0x02
A_UIP = 0x80
D_VRT = 0x80
_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR,
              REG_CENTURY)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    """Ports 0x70-0x71 (register with size 2).  ``now_ns()`` is the machine's
    clock in nanoseconds; ``epoch`` the Unix time at clock 0."""

    def __init__(self, now_ns: Callable[[], int], epoch: int = DEFAULT_EPOCH) -> None:
        self._now_ns = now_ns
        self.epoch = epoch
        self.index = 0
        self.nmi_masked = False
        self.nvram = bytearray(128)
        self.nvram[REG_A] = 0x26            # 32.768 kHz time base, 1024 Hz rate
        self.nvram[REG_B] = B_24H           # 24-hour, BCD (power-on value)
        self._frozen: int | None = None     # Unix time while SET is on

    # -- time --------------------------------------------------------------
    def unix_time(self) -> int:
        """Seconds since 1970 that the clock shows now."""
        if self._frozen is not None:
            return self._frozen
        return self.epoch + self._now_ns() // 1_000_000_000

    def _encode(self, v: int) -> int:
        return v if self.nvram[REG_B] & B_DM else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.nvram[REG_B] & B_DM else _from_bcd(v)

    def _time_register(self, reg: int) -> int:
        t = time.gmtime(self.unix_time())
        if reg == REG_HOURS:
            h = t.tm_hour
            if self.nvram[REG_B] & B_24H:
                return self._encode(h)
            pm = 0x80 if h >= 12 else 0
            return self._encode(h % 12 or 12) | pm
        value = {REG_SECONDS: t.tm_sec, REG_MINUTES: t.tm_min,
                 REG_WEEKDAY: (t.tm_wday + 1) % 7 + 1,      # tm_wday: Monday = 0; RTC: Sunday = 1
                 REG_DAY: t.tm_mday, REG_MONTH: t.tm_mon, REG_YEAR: t.tm_year % 100,
                 REG_CENTURY: t.tm_year // 100}[reg]
        return self._encode(value)

    def _set_time_register(self, reg: int, value: int) -> None:
        """A write while SET is on: change the frozen time's field."""
        t = list(time.gmtime(self.unix_time())[:6])   # year, mon, mday, hour, min, sec
        if reg == REG_HOURS and not self.nvram[REG_B] & B_24H:
            pm = value & 0x80
            h = self._decode(value & 0x7F) % 12
            v = h + (12 if pm else 0)
        else:
            v = self._decode(value)
        if reg == REG_SECONDS:
            t[5] = v
        elif reg == REG_MINUTES:
            t[4] = v
        elif reg == REG_HOURS:
            t[3] = v
        elif reg == REG_DAY:
            t[2] = v
        elif reg == REG_MONTH:
            t[1] = v
        elif reg == REG_YEAR:
            t[0] = t[0] // 100 * 100 + v % 100
        elif reg == REG_CENTURY:
            t[0] = v * 100 + t[0] % 100
        else:                              # day of week: derived, not stored
            return
        # Out-of-range guest values (month 13, hour 99...) are clamped, never raised.
        t[0] = min(max(t[0], 1970), 9999)
        t[1] = min(max(t[1], 1), 12)
        t[2] = min(max(t[2], 1), calendar.monthrange(max(t[0], 1), t[1])[1])
        t[3], t[4], t[5] = min(max(t[3], 0), 23), min(max(t[4], 0), 59), min(max(t[5], 0), 59)
        self._frozen = calendar.timegm(tuple(t))

    # -- registers ---------------------------------------------------------
    def read_register(self, reg: int) -> int:
        reg &= 0x7F
        if reg in _TIME_REGS:
            return self._time_register(reg)
        if reg == REG_A:
            return self.nvram[REG_A] & ~A_UIP
        if reg == REG_C:
            return 0
        if reg == REG_D:
            return D_VRT
        return self.nvram[reg]

    def write_register(self, reg: int, value: int) -> None:
        reg &= 0x7F
        value &= 0xFF
        if reg in _TIME_REGS:
            if self._frozen is not None:
                self._set_time_register(reg, value)
            return
        if reg == REG_B:
            was_set = bool(self.nvram[REG_B] & B_SET)
            if value & B_SET and not was_set:
                self._frozen = self.unix_time()
            elif was_set and not value & B_SET and self._frozen is not None:
                # the time set runs on from now
                self.epoch = self._frozen - self._now_ns() // 1_000_000_000
                self._frozen = None
            self.nvram[REG_B] = value
            return
        if reg in (REG_C, REG_D):          # read-only
            return
        if reg == REG_A:
            value &= ~A_UIP
        self.nvram[reg] = value

    # -- bus ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF                    # the index port reads back as open bus on PCs
        return self.read_register(self.index)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
        else:
            self.write_register(self.index, value)
