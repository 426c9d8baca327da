"""tools/initramfs.py: a newc cpio the kernel can unpack (read back here)."""
import gzip
import stat

from vmlab.tools.initramfs import CpioWriter, busybox_initramfs, default_init


def parse_newc(data: bytes) -> dict:
    out, off = {}, 0
    while off < len(data):
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i:off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off:off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], body, (f[9], f[10]))
    raise AssertionError("no trailer")


def test_initramfs_archive_has_init_busybox_console_and_trailer():
    arc = parse_newc(gzip.decompress(busybox_initramfs(b"\x7fELF-busybox")))
    assert arc["bin/busybox"][1] == b"\x7fELF-busybox" and arc["bin/busybox"][0] & 0o111
    assert stat.S_ISLNK(arc["bin/sh"][0]) and arc["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(arc["dev/console"][0]) and arc["dev/console"][2] == (5, 1)
    assert arc["init"][1].decode() == default_init() and "poweroff" in default_init()


def test_initramfs_entries_are_four_byte_aligned():
    w = CpioWriter()
    w.file("a", b"x" * 5)
    w.file("bb", b"y" * 3)
    data = w.finish()
    assert len(data) % 4 == 0 and list(parse_newc(data)) == ["a", "bb"]
