"""The debugger: REPL in batch mode on real guests, the Python API, the gdbstub
(real gdb when installed, fuzzed packets always)."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmlab.emu.loaders import load
from vmlab.tools.asm import build
from vmlab.tools.debugger import Debugger
from vmlab.tools.debugrepl import execute, run_repl
from vmlab.tools.gdbstub import GdbServer, PacketReader, frame
from vmlab.tools.symbols import load_symbols
from vmlab.vmm.vm import Vm

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "guests" / "hello.asm"
PAGING64 = ROOT / "guests" / "paging64.asm"


def machine(src: Path, ram: int = 64 << 20):
    vm = Vm(ram, serial=None)
    vm.load(load(str(build(src)), ram_size=ram))
    return vm, Debugger(vm, load_symbols(src))


def repl(dbg, script: str) -> str:
    out = io.StringIO()
    run_repl(dbg, stdin=io.StringIO(script), stdout=out)
    return out.getvalue()


def test_repl_stdin_batch_hello_breakpoint_step_registers_stable_output():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = "b puts\nc\ninfo registers rip\nsi\nx/2xb 0x7c00\ninfo breakpoints\ndelete\nc\n"
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "debug", str(HELLO), "--serial", "none"], input=script,
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == 1, p.stderr          # the guest's own status after the last continue
    assert p.stdout.splitlines() == [
        "0x0000000000007c00 in start ()",
        "=> 0x7c00 <start>:\tcli",
        "Breakpoint 1 at 0x7d1c <puts>",
        "Continuing.",
        "Breakpoint 1, 0x0000000000007d1c in puts ()",
        "rip            0x7d1c             32028",
        "=> 0x7d1d <puts+1>:\ttest al, al",
        "0x7c00 <start>:\t0xfa\t0xfc",
        "Num     Type            Disp Enb Address            What",
        "1       breakpoint      keep y   0x0000000000007d1c <puts>",
        "\tbreakpoint already hit 1 time",
        "Continuing.",
        "[Inferior 1 (vmlab) exited with code 01]",
    ]


def test_breakpoint_set_guest_memory_unchanged_and_hit_once_per_pass():
    vm, dbg = machine(HELLO)
    before = vm.mem.read(0x7c00, 0x200)
    dbg.break_at(0x7d1c)
    assert vm.mem.read(0x7c00, 0x200) == before       # no INT3 written
    st = dbg.cont()
    assert st.reason == "breakpoint" and vm.vcpu.linear_rip() == 0x7d1c
    st = dbg.cont()                                    # steps off it, stops at the next pass
    assert st.reason == "breakpoint" and st.point.hits == 2
    vm.close()


def test_watch_write_reports_old_and_new_value_after_the_store():
    vm, dbg = machine(HELLO)
    text = repl(dbg, "watch *(int*)0x10000\nc\nx/1xw 0x10000\n")
    assert "Hardware watchpoint 1: *(int*)0x10000" in text
    assert "Old value = 0\nNew value = 69635\n" in text
    assert "0x10000:\t0x00011003" in text
    vm.close()


def test_rwatch_read_of_a_string_stops_in_puts():
    vm, dbg = machine(HELLO)
    text = repl(dbg, "rwatch 0x7d85\nc\n")
    assert "Hardware read watchpoint 1: 0x7d85" in text
    assert re.search(r"Value = \d+\n0x0000000000007d1d in puts \(\)", text), text
    vm.close()


def test_break_mode_stops_at_each_mode_switch_of_hello():
    vm, dbg = machine(HELLO)
    text = repl(dbg, "break-mode\nc\nc\nc\nc\ninfo mode\n")
    modes = re.findall(r"Mode changed to ([\w -]+),", text)
    assert modes == ["protected 16-bit", "protected 32-bit", "compatibility 32-bit", "long 64-bit"], text
    assert "mode: long 64-bit, CPL 0" in text and "paging: 4-level" in text
    vm.close()


def test_paging64_walk_tlb_gdt_and_symbols():
    vm, dbg = machine(PAGING64)
    sym = next(n for n in dbg.symbols.names() if "long" in n.lower())
    text = repl(dbg, f"b {sym}\nc\nwalk $rip fetch\ninfo tlb\ninfo gdt\ninfo symbol $rip\nx/2i $rip\n"
                     "walk 0xdead000000000\n")
    assert f"in {sym} ()" in text
    assert re.search(r"4-level fetch supervisor of 0x[0-9a-f]+\n  PML4E +@", text), text
    assert "#PF error code" in text                      # the unmapped address faults at some level
    assert re.search(r"^[0-9a-f]{16}: [0-9a-f]{16} 0x", text, re.M)
    assert "code 64-bit" in text and f"{sym} in section .text" in text
    vm.close()


def test_step_set_register_and_memory_through_the_api():
    vm, dbg = machine(HELLO)
    st = dbg.step(3)
    assert st.reason == "step" and vm.vcpu.linear_rip() == 0x7c04
    text = repl(dbg, "set $rax = 0x1234\np/x $rax\nset {short} 0x500 = 0xbeef\nx/1xh 0x500\nset $bogus = 1\n")
    assert "$1 = 0x1234" in text and "0x500:\t0xbeef" in text and "Invalid register `bogus'" in text
    assert vm.vcpu.regs.gpr[0] == 0x1234
    vm.close()


def test_bad_commands_print_one_line_and_the_session_goes_on():
    vm, dbg = machine(HELLO)
    text = repl(dbg, "frobnicate\nx/4q 0\nb nosuchsym\nx/4xw 0xffffffff00000\ndelete 99\ninfo registers rip\n")
    lines = text.splitlines()
    assert lines[0] == 'Undefined command: "frobnicate".  Try "help".'
    assert any("No symbol \"nosuchsym\"" in l for l in lines)
    assert any("Cannot access memory" in l for l in lines)
    assert "No breakpoint number 99." in lines and lines[-1].startswith("rip ")
    vm.close()


def test_interrupt_from_another_thread_stops_a_spinning_guest(tmp_path):
    import threading
    vm = Vm(16 << 20, serial=None)
    vm.load(load(_spin_image(tmp_path), fmt="flat", ram_size=16 << 20, flat_addr=0x7c00, flat_mode="real"))
    dbg = Debugger(vm)
    threading.Timer(0.2, dbg.interrupt).start()
    st = dbg.cont(timeout=20)
    assert st.reason == "interrupted" and vm.vcpu.linear_rip() in (0x7c00, 0x7c01)
    assert dbg.step().reason == "step"                  # the machine goes on afterwards
    vm.close()


def _spin_image(tmp_path) -> str:
    p = tmp_path / "spin.bin"
    p.write_bytes(b"\x90\xeb\xfd")                      # nop; jmp back to it
    return str(p)


def test_vmx_harness_break_exit_exits_and_vmcs(vmx):
    from vmlab.vmm.exit_reasons import ExitReason
    g = vmx("mov eax, 1\ncpuid\nmov eax, 2\ncpuid\nvmcall\n", mode="long64")
    g.use_default_handlers()
    dbg = Debugger(g)
    text = repl(dbg, "break-exit CPUID\nc\nexits 1\nvmcs GUEST_RIP\nbreak-exit off\nc\nexits 3\n")
    assert text.count("VM exit CPUID (10)") == 1
    assert re.search(r"GUEST_RIP +0x[0-9a-f]+", text)
    assert "VM exit without a handler: VMCALL (18)" in text
    assert g.trace[-1].reason == ExitReason.VMCALL
    g.vm.close()


# ---------------------------------------------------------------------- gdbstub
def _server(src: Path):
    vm, dbg = machine(src)
    return vm, dbg, GdbServer(dbg, "127.0.0.1", 0)


def _rsp(sock, payload: str, reader: PacketReader, timeout: float = 20) -> bytes:
    sock.sendall(frame(payload.encode()))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        for item in reader.feed(data):
            if isinstance(item, bytes):
                return item
    raise TimeoutError(payload)


def test_gdbstub_fuzzed_packets_never_crash_and_leave_state_intact():
    import random
    import threading
    vm, dbg, srv = _server(HELLO)
    t = threading.Thread(target=srv.serve, kwargs={"start_stopped": True}, daemon=True)
    t.start()
    rng = random.Random(9)
    regs_before = vm.vcpu.regs.gpr[0].to_bytes(8, "little")
    junk = [b"$g#00", b"$m7c00,ffffffffffffff#00", b"$" + b"A" * 70000, b"$mzz,1#" + b"%02x" % (sum(b"mzz,1") & 0xFF),
            b"$Z0,#" + b"%02x" % (sum(b"Z0,") & 0xFF), b"$P99=00#" + b"%02x" % (sum(b"P99=00") & 0xFF),
            b"}}}}#$$$", b"$qXfer:features:read:target.xml:zz#00", b"\x00\xff" * 100, b"$M0,4:zz#00"]
    for _ in range(60):
        junk.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    for k in range(3):                                  # cut mid-packet, then drop the connection
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        for j in junk:
            s.sendall(j)
        s.sendall(b"$qSupp")
        s.close()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    r = PacketReader()
    for bad in ("mzz,1", "Z0,", "P99=00", "M0,4:zz", "X0,0:", "vCont;q", "qRcmd,zz"):
        assert _rsp(s, bad, r) in (b"", b"E01", b"E00", b"E14", b"OK")
    g = _rsp(s, "g", r)
    assert bytes.fromhex(g[:16].decode()) == regs_before[:8]    # rax unchanged
    assert _rsp(s, "p10", r) == (0x7c00).to_bytes(8, "little").hex().encode()
    s.sendall(frame(b"k"))
    s.close()
    t.join(20)
    assert not t.is_alive()
    vm.close()


@given(st.binary(max_size=400))
@settings(max_examples=200, deadline=None)
def test_packet_reader_random_bytes_never_raise(data):
    r = PacketReader()
    for i in range(0, len(data), 7):
        for item in r.feed(data[i:i + 7]):
            assert item is None or item == "interrupt" or isinstance(item, bytes)


def test_gdbstub_interrupt_0x03_stops_a_running_guest(tmp_path):
    import threading
    vm = Vm(16 << 20, serial=None)
    vm.load(load(_spin_image(tmp_path), fmt="flat", ram_size=16 << 20, flat_addr=0x7c00, flat_mode="real"))
    srv = GdbServer(Debugger(vm), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    r = PacketReader()
    s.sendall(frame(b"c"))
    time.sleep(0.3)
    s.sendall(b"\x03")
    assert _rsp(s, "?", r).startswith(b"T02")            # the stop reply to c
    assert _rsp(s, "?", r).startswith(b"T02")
    s.sendall(frame(b"k"))
    s.close()
    t.join(20)
    vm.close()


GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (tools/install-system-deps.sh installs it)")


def _vmlab_gdb(src: Path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "vmlab.tools", "run", str(src), "--serial", "none", "-gdb", "tcp::0",
                          "-S", *extra], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True)
    line = p.stderr.readline()
    m = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert m, line
    return p, int(m.group(1))


def _gdb(port: int, *cmds: str) -> str:
    args = [GDB, "-batch", "-nx", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{port}"]
    for c in cmds:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


@needs_gdb
def test_gdb_breakpoint_registers_watchpoint_and_monitor_against_hello():
    p, port = _vmlab_gdb(HELLO)
    try:
        out = _gdb(port, "break *0x7d1c", "c", "info registers rip cs cr0", "monitor info mode",
                   "watch *(int*)0x10000", "delete 1", "c", "monitor walk 0x7c00", "delete", "detach")
        assert "Breakpoint 1, 0x0000000000007d1c in ?? ()" in out
        assert re.search(r"rip +0x7d1c", out) and re.search(r"cr0 +0x60000011", out)
        assert "mode: protected 32-bit, CPL 0" in out
        assert "Hardware watchpoint 2: *(int*)0x10000" in out
        assert "Old value = 0" in out and "New value = 69635" in out
        assert "-> 0x7c00 (RAM)" in out
        assert p.wait(30) == 1                           # detached: the guest ran to its end
    finally:
        p.kill()


@needs_gdb
def test_gdb_stepi_across_real_protected_long_switch_and_second_connection():
    p, port = _vmlab_gdb(HELLO)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)   # a first client that just goes away
        assert _rsp(s, "p1b", PacketReader()) == (0x60000010).to_bytes(8, "little").hex().encode()
        s.close()
        steps = ["stepi"] * 10
        out = _gdb(port, "break *0x7c51", "c", "delete", *steps, "info registers cr0 cs",
                   "break *0x7ccd", "c", "delete", "stepi", "stepi", "info registers efer cs", "kill")
        assert re.search(r"cr0 +0x60000011", out), out       # protected mode reached by stepping
        assert re.search(r"efer +0x500", out), out           # LME|LMA: long mode after the far jump
        assert re.search(r"cs +0x18", out), out
        p.wait(30)
    finally:
        p.kill()


def test_gdbstub_binary_write_x_packet_unescapes_and_writes():
    """gdb's X packet (binary data, '#', '$', '}' and '*' escaped as } x^0x20):
    the bytes land in guest memory exactly."""
    import threading
    vm, dbg, srv = _server(HELLO)
    t = threading.Thread(target=srv.serve, kwargs={"start_stopped": True}, daemon=True)
    t.start()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    r = PacketReader()
    data = b"\x23\x24\x7d\x2a\x00\xff"
    s.sendall(frame(b"X9000,6:" + data))
    reply = None
    end = time.monotonic() + 20
    while reply is None and time.monotonic() < end:
        for item in r.feed(s.recv(65536)):
            if isinstance(item, bytes):
                reply = item
    assert reply == b"OK"
    assert _rsp(s, "m9000,6", r) == data.hex().encode()
    assert _rsp(s, "X9000,0:", r) == b"OK"                      # gdb's probe for X support
    assert _rsp(s, "X9000,9:ab", r) == b"E01"                   # length mismatch
    s.sendall(frame(b"k"))
    s.close()
    t.join(20)
    vm.close()


def test_symbols_from_a_system_map(tmp_path):
    """--symbols FILE takes nm-style ``ADDRESS TYPE NAME`` lines (Linux's
    System.map): a breakpoint by one of its names stops there, and addresses
    print with its names."""
    from vmlab.tools.asm import compile_guest
    from vmlab.tools.symbols import from_system_map
    puts = compile_guest(HELLO).labels["puts"]
    smap = tmp_path / "System.map"
    smap.write_text(f"0000000000007c00 T boot_entry\n{puts:016x} t early_puts\n"
                    "ffffffffffffffff B The real System.map is in the linux-image-dbg package\n"
                    "zzzz T not_an_address\n")
    syms = from_system_map(smap.read_text())
    assert syms.lookup("early_puts") == puts and len(syms) == 2      # the junk lines are skipped
    script = "b early_puts\nc\ninfo registers rip\n"
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "debug", str(HELLO), "--serial", "none",
                        "--symbols", str(smap)], input=script, capture_output=True, text=True, timeout=60, cwd=ROOT)
    lines = p.stdout.splitlines()
    assert lines[0] == "0x0000000000007c00 in boot_entry ()", p.stdout + p.stderr
    assert f"Breakpoint 1 at {puts:#x} <early_puts>" in lines
    assert f"Breakpoint 1, 0x{puts:016x} in early_puts ()" in lines


def test_symbols_option_refuses_an_unreadable_file(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vmlab.tools", "debug", str(HELLO), "--serial", "none",
                        "--symbols", str(tmp_path / "missing.map"), "--batch"], input="", capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"vmlab: error: cannot read --symbols {tmp_path / 'missing.map'}: No such file or directory"]
