"""Command-line glue of the debugger: ``vmlab debug`` and ``vmlab run -s/-S/-gdb``.

Exit statuses are those of ``vmlab run`` (tools/cli.py): the guest's
isa-debug-exit status if it ended that way, 0 if it halted for good or the
session was quit/killed with the guest still alive, 10/12/14/124 as for run,
and 2 for a bad ``-gdb`` device or an unreadable ``-x`` script.
"""
from __future__ import annotations

import re
import sys

from vmlab.vmm.runloop import StopReason


def add_gdb_options(p) -> None:
    p.add_argument("-s", dest="gdb", action="store_const", const="tcp::1234",
                   help="gdbstub on tcp::1234 (shorthand for -gdb tcp::1234), as QEMU")
    p.add_argument("-gdb", dest="gdb", default=None, metavar="tcp::PORT",
                   help="gdbstub on 127.0.0.1:PORT")
    p.add_argument("-S", dest="wait_gdb", action="store_true",
                   help="with -s/-gdb: wait for gdb with the CPU stopped before its first instruction")


def add_debug_options(p) -> None:
    p.add_argument("-x", dest="script", default=None, metavar="FILE", help="run the commands in FILE first")
    p.add_argument("--symbols", default=None, metavar="FILE",
                   help="symbols from FILE (an ELF or a System.map) instead of the kernel's own")
    p.add_argument("--batch", action="store_true",
                   help="run -x FILE (and nothing from stdin), then exit, like gdb -batch")


def exit_status(res) -> int:
    """The process status of a final RunResult (as ``vmlab run``)."""
    if res is None:
        return 0
    if res.reason == StopReason.DEBUG_EXIT and res.status is not None:
        return res.status & 0xFF
    return {StopReason.HALTED: 0, StopReason.POWEROFF: 0, StopReason.SHUTDOWN: 10, StopReason.LIMIT: 12,
            StopReason.TIMEOUT: 124}.get(res.reason, 14)


def parse_gdb_device(spec: str) -> int:
    """QEMU's -gdb device: tcp::PORT or tcp:127.0.0.1:PORT (port 0: any free port)."""
    from vmlab.tools.cli import EXIT_USAGE, CliError
    m = re.fullmatch(r"tcp:(?:127\.0\.0\.1|localhost)?:(\d{1,5})", spec.strip())
    if not m or int(m.group(1)) > 65535:
        raise CliError(f"bad -gdb device {spec!r} (use tcp::PORT; vmlab listens on 127.0.0.1 only)", EXIT_USAGE)
    return int(m.group(1))


def debug_session(vm, args, kernel: str):
    """Run the REPL (``vmlab debug``) or the gdbstub (``-s``/``-gdb``).  Returns
    the final RunResult (mapped to a status by the caller) or a status."""
    from vmlab.tools.cli import EXIT_USAGE, CliError
    from vmlab.tools.debugger import Debugger, DebuggerError
    from vmlab.tools.symbols import load_symbols

    from vmlab.tools.symbols import load_symbol_file
    sym_file = getattr(args, "symbols", None)
    if sym_file is not None:
        try:
            syms = load_symbol_file(sym_file)
        except OSError as exc:
            raise CliError(f"cannot read --symbols {sym_file}: {exc.strerror}", EXIT_USAGE) from None
    else:
        syms = load_symbols(kernel)
    dbg = Debugger(vm, syms)
    if args.cmd == "debug":
        from vmlab.tools.debugrepl import run_repl
        if args.batch and not args.script and sys.stdin.isatty():
            raise CliError("--batch needs -x FILE (or commands on stdin)", EXIT_USAGE)
        sys.stdout.write(f"{dbg._where(dbg.cpu.linear_rip())}\n{dbg.format_insn_line(dbg.cpu.linear_rip(), True)}\n")
        try:
            run_repl(dbg, script=args.script, batch=args.batch and bool(args.script))
        except DebuggerError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        sys.stdout.flush()
        if dbg.final is not None and dbg.final.result is not None:
            return exit_status(dbg.final.result)
        return 0
    from vmlab.tools.gdbstub import GdbServer
    port = parse_gdb_device(args.gdb)
    try:
        server = GdbServer(dbg, "127.0.0.1", port)
    except OSError as exc:
        raise CliError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}", EXIT_USAGE) from None
    sys.stderr.write(f"vmlab: gdbstub listening on 127.0.0.1:{server.port}\n")
    sys.stderr.flush()
    st = server.serve(start_stopped=args.wait_gdb, max_insns=args.max_insns, timeout=args.timeout)
    if st is None:
        return 0
    return st.result
