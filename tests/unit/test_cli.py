"""`vmlab run` errors a user can cause: one line on stderr, a documented status,
never a traceback (README "Exit status")."""
import pathlib
import struct
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def vmlab(*args, cwd=ROOT):
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", *map(str, args)], cwd=cwd, capture_output=True,
                       timeout=120)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_kernel_is_status_4(tmp_path):
    status, _, err = vmlab("run", tmp_path / "nope.bin")
    assert status == 4 and "does not exist" in one_line_error(err)


def test_unknown_format_is_usage_status_2(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4")
    status, _, err = vmlab("run", k, "--format", "coff")
    assert status == 2 and "invalid choice" in one_line_error(err)


def test_truncated_elf_is_status_6(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 9)
    status, _, err = vmlab("run", k)
    assert status == 6
    one_line_error(err)


def test_segment_outside_ram_is_status_8(tmp_path):
    # A flat binary loaded past the end of a 2 MiB guest.
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4" * 16)
    status, _, err = vmlab("run", k, "-m", "2M", "--flat-addr", "0x300000", "--flat-mode", "protected32")
    assert status == 8 and "outside" in one_line_error(err)


def test_bad_memory_size_is_status_2(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4")
    status, _, err = vmlab("run", k, "-m", "lots")
    assert status == 2 and "memory size" in one_line_error(err)


def test_unknown_log_item_is_status_2(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4")
    status, _, err = vmlab("run", k, "-d", "int,everything")
    assert status == 2 and "everything" in one_line_error(err)


def test_guest_triple_fault_is_status_10(tmp_path):
    # Protected mode with an empty IDT (limit 0): #DE -> #GP -> #DF -> shutdown.
    code = bytes.fromhex("31c9f7f1f4")            # xor ecx, ecx; div ecx; hlt
    k = tmp_path / "k.bin"
    k.write_bytes(code)
    status, _, err = vmlab("run", k, "--flat-addr", "0x100000", "--flat-mode", "protected32")
    assert status == 10 and "triple fault" in one_line_error(err)


def test_instruction_limit_is_status_12(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xeb\xfe")                      # jmp $
    status, _, err = vmlab("run", k, "--format", "flat", "--max-insns", "100000")
    assert status == 12 and "limit" in one_line_error(err)


def test_timeout_is_status_124(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xeb\xfe")
    status, _, err = vmlab("run", k, "--format", "flat", "--timeout", "0.3")
    assert status == 124 and "timeout" in one_line_error(err)


def test_cli_halt_with_interrupts_off_is_status_16(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xfa\xf4")                      # cli; hlt
    status, _, err = vmlab("run", k, "--format", "flat")
    assert status == 16 and "halted" in one_line_error(err)


def test_debug_exit_status_follows_qemu_convention(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(bytes.fromhex("b02ae6f4"))        # mov al, 42; out 0xf4, al
    status, _, _ = vmlab("run", k, "--format", "flat")
    assert status == (42 << 1) | 1


def test_serial_to_file_and_d_log_to_file(tmp_path):
    out, log = tmp_path / "serial.txt", tmp_path / "log.txt"
    status, stdout, _ = vmlab("run", ROOT / "guests" / "hello.asm", "--serial", f"file:{out}",
                              "-d", "int,exits,in_asm", "-D", log)
    assert status == 1
    assert "Hello from long mode" in out.read_text()
    assert "Hello" not in stdout
    text = log.read_text()
    assert "IoExit" in text and "IN: [real" in text


def test_bad_serial_spec_is_status_2(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4")
    status, _, err = vmlab("run", k, "--serial", "tcp:1234")
    assert status == 2 and "-serial" in one_line_error(err)


def test_bench_unknown_name_is_status_2():
    status, _, err = vmlab("bench", "nosuch")
    assert status == 2 and "unknown benchmark" in one_line_error(err)
