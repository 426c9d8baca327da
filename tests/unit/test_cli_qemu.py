"""`vmlab run` as a QEMU user types it (issue 10): QEMU spellings, the exit-status
table row by row, an honest --timeout, format detection that refuses what it does
not know, open bus, the reset ports, and a malformed-input corpus that must give
one stderr line, a documented status and no hang.  Most runs are in-process
(tools.cli.main); a handful are real subprocesses, each bounded by a timeout."""
import os
import pathlib
import random
import struct
import subprocess
import sys
import time

import pytest

from vmlab.tools import cli

from .loaders.elfbuild import Seg, build_elf, multiboot_header

ROOT = pathlib.Path(__file__).resolve().parents[2]
HELLO = str(ROOT / "guests" / "hello.asm")
#: every status README's table documents (odd ones are the guest's own)
DOCUMENTED = {0, 2, 4, 6, 8, 10, 12, 14, 16, 124, 130}


def run_cli(capfd, *args):
    """cli.main in-process: (status, stdout, stderr)."""
    status = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def flat(tmp_path, code: bytes, name="k.bin"):
    k = tmp_path / name
    k.write_bytes(code)
    return k


# ---------------------------------------------------------------------- spellings
def test_cli_qemu_command_line_runs_unchanged(capfd):
    status, out, err = run_cli(capfd, "-kernel", HELLO, "-serial", "stdio", "-display", "none", "-nographic",
                               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-no-reboot", "-no-shutdown",
                               "-m", "size=64M", "-d", "int", "-d", "unimp", "-D", os.devnull)
    assert status == 1 and "Hello from long mode" in out and err == ""


def test_cli_version_and_bare_usage_print_and_return():
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "--version"], cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith(b"vmlab ")
    p = subprocess.run([sys.executable, "-m", "vmlab.tools"], cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == 2 and b"usage: vmlab" in p.stdout and p.stderr == b""


def test_cli_d_help_alone_lists_items(capfd):
    status, out, _ = run_cli(capfd, "-d", "help")
    assert status == 0 and "guest_errors" in out and "exits" in out


def test_cli_repeated_d_flags_merge(capfd, tmp_path):
    log = tmp_path / "log"
    status, _, _ = run_cli(capfd, "run", HELLO, "--serial", "none", "-d", "exits", "-d", "cpu", "-D", log)
    text = log.read_text()
    assert status == 1 and "IoExit" in text and "RFL=" in text      # exits and cpu both logged


@pytest.mark.parametrize("opt", ["-machine", "-smp", "-enable-kvm", "-cdrom", "--frobnicate"])
def test_cli_unknown_qemu_option_named_in_one_line(capfd, opt):
    status, _, err = run_cli(capfd, "-kernel", HELLO, opt, "x")
    assert status == 2 and f"unknown option {opt}" in one_line(err)


@pytest.mark.parametrize("text,size", [("64", 64 << 20), ("64M", 64 << 20), ("1G", 1 << 30), ("512k", None), ("2M", 2 << 20),
                                       ("1.5G", 3 << 29), ("size=32M", 32 << 20), ("32M,slots=2,maxmem=1G", 32 << 20),
                                       ("2048KiB", 2 << 20)])
def test_cli_memory_sizes_follow_qemu_suffixes(text, size):
    if size is None:
        with pytest.raises(cli.CliError):
            cli.parse_size(text)
        return
    assert cli.parse_size(text) == size


def test_cli_debug_exit_device_moves_the_port(capfd, tmp_path):
    k = flat(tmp_path, bytes.fromhex("b005ba0105eefaf4"))   # mov al,5; mov dx,0x501; out dx,al; cli; hlt
    status, _, _ = run_cli(capfd, "run", k, "--format", "flat", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                           "--max-insns", "10000")
    assert status == (5 << 1) | 1
    k2 = flat(tmp_path, bytes.fromhex("b005e6f4faf4"), "k2.bin")          # out 0xf4 is unclaimed now
    status, _, _ = run_cli(capfd, "run", k2, "--format", "flat", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                           "--max-insns", "10000")
    assert status == 16


# ---------------------------------------------------------------------- the table, row by row
def test_cli_table_row_odd_guest_status(capfd):
    assert run_cli(capfd, "run", HELLO, "--serial", "none")[0] == 1


@pytest.mark.parametrize("code", [bytes.fromhex("b0fee664ebfe"),           # mov al,0xfe; out 0x64,al
                                  bytes.fromhex("b006baf90cee ebfe".replace(" ", ""))])   # out 0xcf9, 6
def test_cli_table_row_0_reset_under_no_reboot(capfd, tmp_path, code):
    status, _, err = run_cli(capfd, "run", flat(tmp_path, code), "--format", "flat", "-no-reboot",
                             "--max-insns", "100000")
    assert status == 0 and "reset" in one_line(err)


def test_cli_reset_without_no_reboot_reboots_the_machine(capfd, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "MAX_REBOOTS", 3)
    status, _, err = run_cli(capfd, "run", flat(tmp_path, bytes.fromhex("b0fee664ebfe")), "--format", "flat",
                             "--max-insns", "100000")
    assert status == 14 and "3 times" in one_line(err)


def test_cli_table_rows_2_4_6_8(capfd, tmp_path):
    assert run_cli(capfd, "run", HELLO, "-m", "lots")[0] == 2
    assert run_cli(capfd, "run", tmp_path / "missing")[0] == 4
    assert run_cli(capfd, "run", flat(tmp_path, os.urandom(300)))[0] == 6
    status, _, err = run_cli(capfd, "run", flat(tmp_path, b"\xf4"), "-m", "2M", "--flat-addr", "0x300000",
                             "--flat-mode", "protected32")
    assert status == 8 and "outside" in one_line(err)


def test_cli_table_row_10_triple_fault(capfd, tmp_path):
    k = flat(tmp_path, bytes.fromhex("31c9f7f1f4"))
    assert run_cli(capfd, "run", k, "--flat-addr", "0x100000", "--flat-mode", "protected32")[0] == 10


def test_cli_table_row_12_limit_and_16_halt(capfd, tmp_path):
    assert run_cli(capfd, "run", flat(tmp_path, b"\xeb\xfe"), "--format", "flat", "--max-insns", "1000")[0] == 12
    status, _, err = run_cli(capfd, "run", flat(tmp_path, b"\xfa\xf4", "h.bin"), "--format", "flat")
    assert status == 16 and "nothing can wake it" in one_line(err)
    status, _, err = run_cli(capfd, "run", flat(tmp_path, b"\xfb\xf4", "h2.bin"), "--format", "flat")
    assert status == 16 and "no interrupt pending" in one_line(err)


def test_cli_table_row_14_cannot_continue(capfd, tmp_path, monkeypatch):
    from vmlab.vmm.runloop import RunResult, StopReason
    from vmlab.vmm.vm import Vm
    monkeypatch.setattr(Vm, "run", lambda self, **kw: RunResult(StopReason.ERROR, message="unsupported thing"))
    status, _, err = run_cli(capfd, "run", HELLO, "--serial", "none")
    assert status == 14 and "unsupported thing" in one_line(err)


def test_cli_table_row_124_timeout_is_honest(capfd, tmp_path):
    t0 = time.monotonic()
    status, _, err = run_cli(capfd, "run", flat(tmp_path, b"\xeb\xfe"), "--format", "flat", "--timeout", "0.4")
    elapsed = time.monotonic() - t0
    assert status == 124 and "timeout after" in one_line(err)
    assert elapsed < 0.4 + 0.5


def test_runloop_timeout_on_fresh_code_fires_within_half_a_second():
    """A guest that rewrites the code it runs (every block is translated and
    scanned afresh) used to overrun --timeout by tens of seconds."""
    from support import Machine, asm
    m = Machine()
    try:
        # loop: bump an immediate inside the next instruction, jump to it
        code = asm("""
        start:
            inc dword ptr [patch + 1]
            jmp patch
        patch:
            mov eax, 0x12345678
            jmp start
        """, 0x100000)
        m.boot(code, 0x100000, "protected32")
        t0 = time.monotonic()
        res = m.vm.run(timeout=0.5)
        elapsed = time.monotonic() - t0
    finally:
        m.close()
    assert res.reason == "timeout" and 0.5 <= elapsed < 1.0, (res, elapsed)


def test_cli_table_row_130_sigint(tmp_path):
    k = flat(tmp_path, b"\xeb\xfe")
    log = tmp_path / "in_asm.log"
    p = subprocess.Popen([sys.executable, "-m", "vmlab.tools", "run", str(k), "--format", "flat", "--timeout", "30",
                          "-d", "in_asm", "-D", str(log)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # SIGINT once the guest runs (its first block is in the log): a fixed sleep
    # could land in the interpreter's start-up on a loaded machine
    deadline = time.monotonic() + 30
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(2)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in one_line(err.decode())


# ---------------------------------------------------------------------- broken pipes (issue 11 item 8)
def test_cli_closed_stdout_does_not_change_guest_status():
    p = subprocess.Popen([sys.executable, "-m", "vmlab.tools", "run", HELLO], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_cli_closed_stderr_while_logging_does_not_change_guest_status():
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "run", HELLO, "--serial", "none", "-d", "exits"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=w, timeout=60)
    os.close(w)
    assert p.returncode == 1


# ---------------------------------------------------------------------- format detection and BIOS
def test_cli_bootsector_calling_int10_warns_once(capfd, tmp_path):
    # mov ah,0x0e; mov al,'A'; int 0x10; int 0x10; cli; hlt -- padded, signed
    code = bytes.fromhex("b40eb041cd10cd10faf4").ljust(510, b"\0") + b"\x55\xaa"
    status, _, err = run_cli(capfd, "run", flat(tmp_path, code, "boot.img"), "--max-insns", "200000")
    assert "int 0x10 (BIOS video)" in err and "no BIOS" in err and err.count("int 0x10") == 1
    assert status in DOCUMENTED


# ---------------------------------------------------------------------- open bus (item 4, issue 11 item 6)
def test_open_bus_string_instructions_read_ones_and_drop_writes():
    from support import Machine, asm
    m = Machine()
    try:
        code = asm("""
            mov esi, 0x8000000
            mov edi, 0x200000
            mov ecx, 100
            cld
            rep movsb byte ptr es:[edi], byte ptr [esi]
            mov esi, 0x200000
            mov edi, 0x8000010
            mov ecx, 10
            rep movsd dword ptr es:[edi], dword ptr [esi]
            mov esi, 0x200000
            mov edi, 0x9000000
            mov ecx, 50
            repe cmpsb byte ptr [esi], byte ptr es:[edi]
            mov ebx, ecx
            mov esi, 0x9000000
            lodsd eax, dword ptr [esi]
            hlt
        """, 0x100000)
        m.boot(code, 0x100000, "protected32")
        res = m.run(max_insns=100000)
        r = m.cpu.regs
        assert res.reason == "halted", res
        assert m.mem.read(0x200000, 100) == b"\xff" * 100 and m.mem.read(0x200000 + 100, 1) == b"\0"
        assert r.gpr[3] == 0 and r.gpr[0] == 0xFFFFFFFF and r.rflags & 0x40
    finally:
        m.close()


def test_open_bus_repe_cmpsb_against_lapic_window_stops_at_difference():
    from support import Machine, asm
    m = Machine()
    try:
        # The LAPIC version register (0xfee00030) is not all ones: REPE CMPSB
        # against 4 bytes of 0xff in RAM stops at the first differing byte.
        code = asm("""
            mov dword ptr [0x200000], 0xffffffff
            mov esi, 0x200000
            mov edi, 0xfee00030
            mov ecx, 4
            repe cmpsb byte ptr [esi], byte ptr es:[edi]
            hlt
        """, 0x100000)
        m.boot(code, 0x100000, "protected32")
        res = m.run(max_insns=100000)
        assert res.reason == "halted", res
        assert m.cpu.regs.gpr[1] == 3 and not m.cpu.regs.rflags & 0x40
    finally:
        m.close()


def test_open_bus_gdt_beyond_ram_loads_all_ones_descriptor():
    from support import Machine, asm
    m = Machine()
    try:
        code = bytes.fromhex("0f011500011000") + asm("""
            mov ax, 0x10
            mov ds, ax
            mov esp, 0x8001000
            push 0x1234
            pop ecx
            hlt
        """, 0x100007)
        m.boot(code, 0x100000, "protected32")
        m.mem.write(0x100100, struct.pack("<HI", 0x17, 0x8000000))
        res = m.run(max_insns=100000)
        r = m.cpu.regs
        assert res.reason == "halted", res
        assert r.seg[3].selector == 0x10 and r.seg[3].base == 0xFFFFFFFF and r.gpr[1] == 0xFFFFFFFF
    finally:
        m.close()


# ---------------------------------------------------------------------- console input pacing
def test_vm_feed_input_paces_to_the_receiver_room():
    from vmlab.vmm.vm import Vm
    with Vm(16 << 20, serial=None) as vm:
        vm.post_input(b"ab\r")
        vm.feed_input()
        assert list(vm.uart.rx_fifo) == [ord("a")] and vm.host_input   # 16450 mode: one byte of RBR
        assert not vm.uart.lsr & 0x02                                  # no overrun
        vm.uart.rx_fifo.clear()
        vm.feed_input()
        assert list(vm.uart.rx_fifo) == [ord("b")]


# ---------------------------------------------------------------------- the malformed corpus (item 9)
def _corpus(tmp: pathlib.Path):
    """(name, argv, allowed statuses) for >= 100 malformed files and options."""
    rnd = random.Random(10)
    cases = []

    def f(name, data):
        p = tmp / name
        p.write_bytes(data)
        return str(p)

    cases.append(("empty", ["run", f("empty", b"")], {6}))
    for i, n in enumerate([1, 2, 100, 511, 512, 513, 1000, 4096, 9000, 70000]):
        data = bytes(rnd.randrange(256) for _ in range(n))
        if n == 512:
            data = data[:510] + b"\x55\xab"
        cases.append((f"random{n}", ["run", f(f"random{i}", data)], {6}))
    elf32 = build_elf(32, [Seg(0x100000, multiboot_header(0x3) + b"\xf4" * 64, memsz=0x2000)], entry=0x10000C)
    elf64 = build_elf(64, [Seg(0x200000, b"\xfa\xf4" * 16, memsz=0x2000)], entry=0x200000)
    for cls, elf in ((32, elf32), (64, elf64)):
        for cut in [4, 5, 16, 20, 40, 52, 63, 64, 80, 100, 120]:
            cases.append((f"elf{cls}-cut{cut}", ["run", f(f"elf{cls}c{cut}", elf[:cut])], {6}))
        for off in [4, 5, 6, 16, 18, 24, 28, 32, 40, 42, 44, 46, 48, 56, 60]:
            bad = bytearray(elf)
            struct.pack_into("<I", bad, min(off, len(bad) - 4), 0xFFFFFFFF)
            cases.append((f"elf{cls}-corrupt{off}", ["run", f(f"elf{cls}o{off}", bytes(bad)),
                                                     "--max-insns", "100000", "--serial", "none"],
                          DOCUMENTED | {1}))
    aout = lambda a: (b"\xfa" * 16 + multiboot_header(0x10003, aout=a)).ljust(0x100, b"\xf4")
    for i, a in enumerate([(0x100010, 0x200000, 0x100100, 0x102000, 0x100000),      # load after header
                           (0x100010, 0x100000, 0x100000 - 1, 0x102000, 0x100000),  # end before load
                           (0x100010, 0x100000, 0x100100, 0x100000 - 16, 0x100000),
                           (0xFFFFFFF0, 0xFFFFFF00, 0, 0, 0xFFFFFF00),
                           (0x100010, 0x100000, 0x100100, 0x102000, 0x90000000),   # entry outside
                           (0x100010, 0x100000, 0xF0000000, 0xF0001000, 0x100000)]):
        cases.append((f"aout-addr{i}", ["run", f(f"aout{i}", aout(a)), "--max-insns", "100000",
                                        "--serial", "none"], {6, 8, 12, 10, 16}))
    good = bytearray(aout((0x100010, 0x100000, 0x100100, 0x102000, 0x100000)))
    for i, delta in enumerate([1, -1, 0x100, 0x80000000]):
        bad = bytearray(good)
        struct.pack_into("<I", bad, 24, (struct.unpack_from("<I", bad, 24)[0] + delta) & 0xFFFFFFFF)
        cases.append((f"aout-checksum{i}", ["run", f(f"aoutck{i}", bytes(bad))], {6}))
    for off in (8192, 8196, 12288):
        data = bytes(off) + multiboot_header(0x10003, aout=(0x100000 + off, 0x100000, 0, 0, 0x100000))
        cases.append((f"mb-past-8k-{off}", ["run", f(f"mb{off}", data)], {6}))
    bz = bytearray(0x400)
    bz[0x202:0x206] = b"HdrS"
    cases.append(("bzimage", ["run", f("bz", bytes(bz))], {6}))
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    cases.append(("fifo", ["run", str(fifo)], {4}))
    cases.append(("directory", ["run", str(tmp)], {4}))
    cases.append(("missing", ["run", str(tmp / "nope")], {4}))
    cases.append(("devnull", ["run", "/dev/null"], {4}))
    cases.append(("missing-asm", ["run", str(tmp / "nope.asm")], {4}))
    for m in ["nan", "inf", "-inf", "1e30", "99999999999999999999", "4T", "0", "-1", "0.1", "lots", "", "1Q",
              "64X", "size=", "NaNG"]:
        cases.append((f"mem{m!r}", ["run", HELLO, "-m", m], {2}))
    for opt in ["--timeout", "--max-insns"]:
        for v in ["nan", "inf", "-inf", "0", "-5", "x", "", "1e400"]:
            cases.append((f"{opt}{v!r}", ["run", HELLO, opt, v], {2}))
    for args in (["-d", "bogus"], ["-d", "int,,bogus"], ["-serial", "tcp:1"], ["-serial", "stdio", "-serial", "stdio"],
                 ["-device", "isa-debug-exit,iobase=0x10000"], ["-device", "isa-debug-exit,iobase=x"],
                 ["-device", "isa-debug-exit,iobase=0x3f8,iosize=8"], ["-device", "isa-debug-exit,foo=1"],
                 ["-device", "nosuch"], ["--format", "coff"], ["--flat-mode", "v86"], ["--flat-addr", "zz"],
                 ["-kernel", "/other"], ["-display", "gtk"], ["-machine", "pc"], ["-smp", "2"], ["-snapshot"],
                 ["--append", "x", "--format", "flat"], ["--initrd", str(tmp / "nomod")]):
        cases.append((" ".join(args), ["run", HELLO, *args, "--serial", "none"], {2, 4, 8}))
    cases.append(("no-kernel", ["run"], {2}))
    cases.append(("debug-no-kernel", ["debug"], {2}))
    cases.append(("unknown-sub", ["frob"], {2}))
    return cases


def test_cli_malformed_corpus_gives_one_line_and_documented_status(capfd, tmp_path):
    cases = _corpus(tmp_path)
    assert len(cases) >= 100
    failures = []
    for name, argv, allowed in cases:
        t0 = time.monotonic()
        try:
            status = cli.main(argv)
        except SystemExit as exc:         # argparse's own exits, through _Parser.error
            status = exc.code
        out, err = capfd.readouterr()
        lines = err.strip().splitlines()
        ok_lines = len(lines) == 1 or (status in (1,) and len(lines) == 0)
        if status not in allowed or not ok_lines or "Traceback" in err or time.monotonic() - t0 > 10:
            failures.append((name, status, err[-300:]))
    assert not failures, failures


def test_cli_non_utf8_command_line_is_one_line_status_2(tmp_path):
    for argv in ([b"run", HELLO.encode(), b"--append", b"a\xff\xfeb"],
                 [b"run", str(tmp_path).encode() + b"/k\xff.bin"],
                 [b"-kernel", HELLO.encode(), b"-d", b"int,\xff"],
                 [b"-kernel", HELLO.encode(), b"-\xff"]):
        p = subprocess.run([sys.executable.encode(), b"-m", b"tools", *argv], cwd=ROOT, capture_output=True, timeout=60)
        err = p.stderr.decode(errors="replace")
        assert p.returncode in (2, 4) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


# ---------------------------------------------------------------------- the interactive console (pty)
ECHO_GUEST = """
    mov dx, 0x3fd
wait:
    in al, dx
    test al, 1
    jz wait
    mov dx, 0x3f8
    in al, dx
    cmp al, 0x71
    je done
    out dx, al
    mov dx, 0x3fd
    jmp wait
done:
    mov al, 0
    out 0xf4, al
"""


def _pty_run(tmp_path, keys: list[bytes], *extra):
    """vmlab on a pseudo-terminal running the echo guest: type ``keys`` (one
    write each, no pause inside one), return (status, output, the terminal's
    lflag after the exit)."""
    import pty
    import termios
    from support import asm
    k = flat(tmp_path, asm(ECHO_GUEST, 0x100000), "echo.bin")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)[3]
    p = subprocess.Popen([sys.executable, "-m", "vmlab.tools", "run", str(k), "--flat-addr", "0x100000",
                          "--flat-mode", "protected32", "--timeout", "60", *extra],
                         cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    out = b""
    deadline = time.monotonic() + 30
    import select
    # wait until the console is in raw mode
    while time.monotonic() < deadline and termios.tcgetattr(slave)[3] & termios.ICANON:
        time.sleep(0.05)
    for key in keys:
        os.write(master, key)
        time.sleep(0.3)
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            out += chunk
        elif p.poll() is not None:
            break
    status = p.wait(timeout=30)
    after = termios.tcgetattr(slave)[3]
    os.close(master)
    os.close(slave)
    assert after == before, "terminal settings not restored"
    return status, out


def test_console_pty_paces_typed_input_and_quits_with_ctrl_a_x(tmp_path):
    status, out = _pty_run(tmp_path, [b"hello world\r", b"\x01x"])
    assert b"hello world" in out          # 12 bytes typed at once, one-byte RBR: nothing lost
    assert status == 0 and b"C-a x" in out


def test_console_pty_ctrl_c_goes_to_guest_with_mon_stdio_and_q_exits(tmp_path):
    status, out = _pty_run(tmp_path, [b"ab\x03", b"q"], "-serial", "mon:stdio")
    assert status == 1 and b"ab" in out
    status, out = _pty_run(tmp_path, [b"ab", b"\x03"])
    assert status == 130
