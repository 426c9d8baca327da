"""CMOS RTC/NVRAM (devices/rtc.py; MC146818A registers) on a fake clock."""
import calendar

from vmlab.devices.rtc import DEFAULT_EPOCH, CmosRtc


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def rd(rtc, reg):
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def wr(rtc, reg, value):
    rtc.write(0, 1, reg)
    rtc.write(1, 1, value)


def test_rtc_reads_the_epoch_in_bcd_24h_at_power_on():
    rtc = CmosRtc(Clock(), epoch=calendar.timegm((2026, 3, 14, 15, 9, 26)))
    assert [rd(rtc, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [0x26, 0x09, 0x15, 0x14, 0x03, 0x26, 0x20]
    assert rd(rtc, 6) == 7                          # 2026-03-14 is a Saturday (Sunday = 1)


def test_rtc_follows_the_machine_clock():
    clock = Clock()
    rtc = CmosRtc(clock, epoch=DEFAULT_EPOCH)
    clock.ns = 61 * 10**9 + 5
    assert (rd(rtc, 0), rd(rtc, 2)) == (0x01, 0x01)


def test_rtc_binary_and_12_hour_modes():
    rtc = CmosRtc(Clock(), epoch=calendar.timegm((2026, 1, 1, 13, 5, 0)))
    wr(rtc, 0x0B, 0x04)                             # DM = binary, 12-hour
    assert rd(rtc, 2) == 5 and rd(rtc, 4) == 0x80 | 1


def test_rtc_status_registers_uip_clear_vrt_set_c_zero():
    rtc = CmosRtc(Clock())
    assert rd(rtc, 0x0A) & 0x80 == 0 and rd(rtc, 0x0D) == 0x80 and rd(rtc, 0x0C) == 0


def test_rtc_set_bit_freezes_time_and_writes_run_on_after_clear():
    clock = Clock()
    rtc = CmosRtc(clock)
    wr(rtc, 0x0B, 0x82)                             # SET, 24-hour, BCD
    wr(rtc, 0x04, 0x23)
    wr(rtc, 0x02, 0x59)
    wr(rtc, 0x00, 0x58)
    clock.ns = 10 * 10**9
    assert rd(rtc, 0) == 0x58                       # frozen while SET
    wr(rtc, 0x0B, 0x02)
    clock.ns = 13 * 10**9
    assert (rd(rtc, 4), rd(rtc, 2), rd(rtc, 0)) == (0x00, 0x00, 0x01)


def test_rtc_hostile_time_values_are_clamped_not_raised():
    rtc = CmosRtc(Clock())
    wr(rtc, 0x0B, 0x86)
    for reg in (0, 2, 4, 7, 8, 9, 0x32):
        wr(rtc, reg, 0xFF)
    wr(rtc, 0x0B, 0x06)
    assert 0 <= rd(rtc, 0) < 60


def test_rtc_nvram_keeps_bytes_and_index_port_masks_nmi_bit():
    rtc = CmosRtc(Clock())
    rtc.write(0, 1, 0x80 | 0x40)
    rtc.write(1, 1, 0xA5)
    assert rtc.nmi_masked and rd(rtc, 0x40) == 0xA5
