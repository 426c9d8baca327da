"""``vmlab run -drive …``: a real guest through the CLI, and one clear line with
status 2 (bad value) or 4 (missing image) for bad options."""
import pathlib
import subprocess
import sys

import pytest

from vmlab.tools.cguest import have_gcc

ROOT = pathlib.Path(__file__).resolve().parents[3]


def vmlab(*args):
    return subprocess.run([sys.executable, "-m", "vmlab.tools", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(bytes((s + j) & 0xFF for j in range(512)) for s in range(64)))
    return p


@pytest.mark.skipif(not have_gcc(), reason="gcc is not installed (C guests)")
def test_cli_drive_readonly_guest_passes(image):
    p = vmlab("guests/virtio_blk.c", "-drive", f"file={image},if=virtio,format=raw,readonly=on",
              "--append", "mode=ro cap=64", "--timeout", "60")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL" not in p.stdout and "DONE" in p.stdout


@pytest.mark.parametrize("value,status,text", [
    ("file={img},if=virtio,readonly=maybe", 2, "readonly='maybe' must be on or off"),
    ("file={img},if=ide", 2, "only if=virtio"),
    ("file={img},format=qcow2", 2, "only format=raw"),
    ("file={img},bogus=1", 2, "unknown parameter"),
    ("if=virtio", 2, "file=PATH is required"),
    ("file={img}x,if=virtio", 4, "not found"),
])
def test_cli_drive_bad_value_one_line_status(image, value, status, text):
    p = vmlab("guests/hello.asm", "-drive", value.format(img=image))
    assert p.returncode == status
    assert p.stderr.count("\n") == 1 and text in p.stderr and "Traceback" not in p.stderr
