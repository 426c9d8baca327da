"""``vmlab debug``: the debugger REPL (stdlib ``cmd`` + ``readline``).

Commands use gdb's names and syntax where gdb has one (stepi, nexti, continue,
break, tbreak, delete, info breakpoints, watch/rwatch/awatch, info registers,
x/FMT, disassemble, set $reg, set {type} addr, finish, until, info symbol,
print); vmlab's own are walk, pbreak, xp, info tlb|idt|gdt|ldt|tss|tb|mode|msr|
devices, log, vmcs, exits, break-exit, break-mode, break-int.  Output is
stable so scripts and tests can assert on it.  A bad command prints one line
and the session goes on.
"""
from __future__ import annotations

import cmd
import io
import re
import shlex
import sys

from vmlab.tools.debugger import Debugger, DebuggerError, type_size, write_register

HELP = """\
Running:      stepi|si [N]  nexti|ni [N]  continue|c  finish  until|u [LOC]  kill  quit|q
Breakpoints:  break|b LOC  tbreak LOC  hbreak LOC  pbreak PADDR  delete|d [N...]  info breakpoints
Watchpoints:  watch|rwatch|awatch [-phys] EXPR [LEN]
Stops:        break-mode [on|off]  break-int VECTOR [off]  break-exit REASON [qual=MASK/VALUE] | off
Registers:    info registers|i r [REG...]  set $REG = EXPR  print|p EXPR  info mode
Memory:       x/FMT ADDR  xp/FMT PADDR  set {TYPE} ADDR = EXPR  disassemble|disas [ADDR [N]]
Translation:  walk ADDR [read|write|fetch]  info tlb
Tables:       info gdt|ldt|idt|tss  info tb [ADDR]  info msr N  info devices  info symbol ADDR
VMX:          vmcs [FIELD...]  exits [N]
Other:        log ITEMS (like -d)  help
LOC is *ADDRESS, a symbol, or an expression ($rip+4, kmain+0x10)."""

_X_RE = re.compile(r"^/(\d*)([xduotacsi]?)([bhwg]?)$")
_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


class Repl(cmd.Cmd):
    """The command interpreter; ``onecmd(line)`` runs one command."""

    prompt = "(vmlab) "
    identchars = cmd.Cmd.identchars + "-"

    def __init__(self, dbg: Debugger, stdin=None, stdout=None):
        super().__init__(stdin=stdin, stdout=stdout)
        self.dbg = dbg
        self.errors = 0
        self.quit = False
        self.last_fmt = ("x", 4)

    # ---- plumbing
    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def emptyline(self):
        return False          # gdb repeats the last command; a script must not

    def default(self, line):
        word = line.split()[0] if line.split() else line
        self.error(f'Undefined command: "{word}".  Try "help".')

    def error(self, text: str) -> None:
        self.errors += 1
        self.say(text)

    def onecmd(self, line):
        line = line.strip()
        if not line or line.startswith("#"):
            return False
        # gdb's x/FMT, p/x and disassemble/r forms: the slash glues to the command
        m = re.match(r"^(x|xp|p|print|output)(/\S*)?(\s.*)?$", line)
        try:
            if m:
                name = {"print": "p", "output": "p"}.get(m.group(1), m.group(1))
                return getattr(self, f"do_{name}")(((m.group(2) or "") + " " + (m.group(3) or "")).strip())
            return super().onecmd(line)
        except DebuggerError as exc:
            self.error(str(exc))
        except (ValueError, OverflowError) as exc:
            self.error(f"error: {exc}")
        return False

    def precmd(self, line):
        # gdb aliases that are not identifiers cmd.Cmd understands
        return line

    def _show(self, st) -> None:
        for line in st.lines:
            self.say(line)
        if st.final:
            self.dbg.final = st

    def _count(self, arg: str) -> int:
        return self.dbg.evaluate(arg) if arg.strip() else 1

    # ---- running
    def do_stepi(self, arg):
        """stepi [N]: execute N instructions."""
        self._show(self.dbg.step(self._count(arg), show=True))
    do_si = do_stepi

    def do_nexti(self, arg):
        """nexti [N]: like stepi, but run called functions to their return."""
        st = self.dbg.next(self._count(arg))
        if st.reason == "step" and not st.lines:
            st.lines.append(self.dbg.format_insn_line(self.dbg.cpu.linear_rip(), current=True))
        self._show(st)
    do_ni = do_nexti

    def do_continue(self, arg):
        """continue: run until a breakpoint, watchpoint or stop."""
        self.say("Continuing.")
        self._show(self.dbg.cont())
    do_c = do_cont = do_continue

    def do_finish(self, arg):
        """finish: run until the current function returns."""
        self._show(self.dbg.finish())

    def do_until(self, arg):
        """until [LOCATION]: run to LOCATION, or past the current loop."""
        addr = self.dbg.location(arg) if arg.strip() else None
        self._show(self.dbg.until(addr))
    do_u = do_until

    def do_kill(self, arg):
        """kill: stop the guest for good."""
        self.quit = True
        return True

    def do_quit(self, arg):
        """quit: leave the debugger."""
        self.quit = True
        return True
    do_q = do_exit = do_quit

    def do_EOF(self, arg):
        self.quit = True
        return True

    # ---- breakpoints
    def _break(self, arg, **kw):
        if not arg.strip():
            raise DebuggerError("Argument required (a location).")
        addr = self.dbg.location(arg)
        p = self.dbg.break_at(addr, **kw)
        kind = "Temporary breakpoint" if kw.get("temporary") else "Breakpoint"
        if kw.get("physical"):
            self.say(f"Physical breakpoint {p.num} at {addr:#x}")
        else:
            self.say(f"{kind} {p.num} at {self.dbg.describe(addr)}")

    def do_break(self, arg):
        """break LOCATION: stop before the instruction at a linear address (*ADDR or a symbol)."""
        self._break(arg)
    do_b = do_br = do_hbreak = do_break

    def do_tbreak(self, arg):
        """tbreak LOCATION: a breakpoint deleted when hit."""
        self._break(arg, temporary=True)

    def do_pbreak(self, arg):
        """pbreak PADDR: stop before any instruction whose bytes are at this physical address."""
        self._break(arg, physical=True)

    def do_delete(self, arg):
        """delete [N...]: delete breakpoints/watchpoints (all without N)."""
        words = arg.split()
        if words and words[0] in ("breakpoints", "br", "b"):
            words = words[1:]
        if not words:
            self.dbg.delete(None)
            return
        for w in words:
            self.dbg.delete(self.dbg.evaluate(w))
    do_d = do_delete

    def _watch(self, kind, arg):
        words = arg.split()
        phys = False
        if words and words[0] in ("-p", "-phys", "-physical"):
            phys, words = True, words[1:]
        if words and words[0] in ("-l", "-location"):
            words = words[1:]
        if not words:
            raise DebuggerError("Argument required (expression to compute).")
        text = " ".join(words)
        length = 1
        m = re.match(r"^\*\s*\(\s*([\w ]+?)\s*\*\s*\)\s*(.+)$", text)
        if m:                                  # watch *(int *) 0x1000
            length = type_size(m.group(1))
            addr = self.dbg.evaluate(m.group(2))
        else:
            parts = text.split()
            if len(parts) > 1 and not any(c in parts[-1] for c in "+-*/()$"):
                length = self.dbg.evaluate(parts[-1])
                text_addr = " ".join(parts[:-1])
            else:
                text_addr = text
            addr = self.dbg.evaluate(text_addr.lstrip("*"))
        p = self.dbg.watch(addr, length, kind, physical=phys, expr=text)
        name = {"watch": "Hardware watchpoint", "rwatch": "Hardware read watchpoint",
                "awatch": "Hardware access (read/write) watchpoint"}[kind]
        self.say(f"{name} {p.num}: {text}")

    def do_watch(self, arg):
        """watch [-phys] ADDR [LEN]: stop after a write that changes it."""
        self._watch("watch", arg)

    def do_rwatch(self, arg):
        """rwatch [-phys] ADDR [LEN]: stop after a read."""
        self._watch("rwatch", arg)

    def do_awatch(self, arg):
        """awatch [-phys] ADDR [LEN]: stop after a read or a write."""
        self._watch("awatch", arg)

    def do_break_mode(self, arg):
        """break-mode [on|off]: stop when the CPU mode changes (real/protected/long, paging)."""
        on = arg.strip() not in ("off", "0")
        self.dbg.set_break_mode(on)
        self.say(f"break-mode {'on' if on else 'off'}")

    def do_break_int(self, arg):
        """break-int VECTOR [off]: stop when an interrupt/exception with VECTOR is delivered."""
        words = arg.split()
        if not words:
            raise DebuggerError("Argument required (a vector).")
        vec = self.dbg.evaluate(words[0])
        on = not (len(words) > 1 and words[1] == "off")
        self.dbg.break_int(vec, on)
        self.say(f"break-int {vec:#x} {'on' if on else 'off'}")

    def do_break_exit(self, arg):
        """break-exit REASON [qual=MASK/VALUE] | off: stop at a VM exit (before its handler;
        with -cpu MODEL,+vmx, an L2 exit before it is reflected to L1)."""
        words = arg.split()
        if not words:
            raise DebuggerError("Argument required (an exit reason name or number).")
        if words[0] == "off":
            self.dbg.set_break_exit(None)
            self.say("break-exit off")
            return
        from vmlab.vmm.exit_reasons import ExitReason
        w = words[0].upper()
        if w in ExitReason.__members__:
            reason = int(ExitReason[w])
        else:
            try:
                reason = int(words[0], 0)
            except ValueError:
                raise DebuggerError(f"unknown exit reason {words[0]!r}") from None
        mask = value = 0
        for extra in words[1:]:
            m = re.match(r"^qual=([^/]+)/(.+)$", extra)
            if not m:
                raise DebuggerError(f"bad filter {extra!r} (qual=MASK/VALUE)")
            mask, value = int(m.group(1), 0), int(m.group(2), 0)
        self.dbg.set_break_exit(reason, mask, value)
        self.say(f"break-exit {reason}" + (f" qual & {mask:#x} == {value:#x}" if mask else ""))

    # cmd.Cmd maps "break-mode" to do_break (identchars include '-' for completion only)
    def parseline(self, line):
        cmd_, arg, line = super().parseline(line)
        if cmd_ and "-" in cmd_:
            cmd_ = cmd_.replace("-", "_")
        return cmd_, arg, line

    # ---- info
    def do_info(self, arg):
        """info registers|breakpoints|symbol|tlb|idt|gdt|ldt|tss|tb|mode|msr|devices"""
        words = arg.split()
        if not words:
            raise DebuggerError('"info" must be followed by the name of an info command.')
        what, rest = words[0], words[1:]
        d = self.dbg
        if "registers".startswith(what) and what[0] == "r" or what == "all-registers":
            lines = d.info_registers(rest)
        elif "breakpoints".startswith(what) and what[0] == "b" or what in ("watchpoints",):
            lines = self._info_breakpoints()
        elif what == "symbol":
            addr = d.evaluate(" ".join(rest))
            hit = d.symbols.find(addr)
            if hit is None:
                lines = [f"No symbol matches {' '.join(rest)}."]
            else:
                name, off = hit
                lines = [f"{name} + {off} in section .text" if off else f"{name} in section .text"]
        elif what == "tlb":
            lines = d.info_tlb()
        elif what in ("idt", "gdt", "ldt", "tss"):
            lines = d.descriptor_table(what)
        elif what == "tb":
            lines = d.info_tb(d.evaluate(" ".join(rest)) if rest else None)
        elif what == "mode":
            lines = d.info_mode()
        elif what == "msr":
            if not rest:
                raise DebuggerError("Argument required (an MSR number).")
            lines = [d.info_msr(d.evaluate(rest[0]))]
        elif what == "devices":
            lines = d.info_devices()
        else:
            raise DebuggerError(f'Undefined info command: "{what}".  Try "help info".')
        for line in lines:
            self.say(line)
    do_i = do_info

    def _info_breakpoints(self):
        d = self.dbg
        if not d.table:
            return ["No breakpoints or watchpoints."]
        lines = ["Num     Type            Disp Enb Address            What"]
        for p in d.table.values():
            typ = {"break": "breakpoint", "tbreak": "breakpoint", "pbreak": "phys breakpoint",
                   "watch": "hw watchpoint", "rwatch": "read watchpoint", "awatch": "acc watchpoint"}[p.kind]
            disp = "del " if p.kind == "tbreak" else "keep"
            if p.is_watch:
                lines.append(f"{p.num:<8}{typ:<16}{disp} y                      "
                             f"{p.expr or hex(p.addr)}{' (physical)' if p.physical else ''}")
            else:
                sym = d.symbols.describe(p.addr)
                lines.append(f"{p.num:<8}{typ:<16}{disp} y   {p.addr:#018x} {('<' + sym + '>') if sym else ''}".rstrip())
            if p.hits:
                lines.append(f"\tbreakpoint already hit {p.hits} time{'s' if p.hits > 1 else ''}")
        return lines

    # ---- memory and registers
    def _x(self, arg, physical):
        fmt, _, rest = arg.partition(" ") if arg.startswith("/") else ("", "", arg)
        count, letter, size = 1, self.last_fmt[0], self.last_fmt[1]
        if fmt:
            m = _X_RE.match(fmt)
            if not m:
                raise DebuggerError(f"Invalid format {fmt!r} (x/NFU: N count, F x d u o t a c s i, U b h w g)")
            count = int(m.group(1)) if m.group(1) else 1
            letter = m.group(2) or letter
            if m.group(3):
                size = _SIZES[m.group(3)]
            elif letter == "c":
                size = 1
            elif letter == "a":
                size = 8
        if not rest.strip():
            raise DebuggerError("Argument required (starting display address).")
        if count > 4096:
            raise DebuggerError("count too large (at most 4096)")
        addr = self.dbg.location(rest)
        d = self.dbg
        if letter == "i":
            if physical:
                raise DebuggerError("xp/i: disassemble physical memory by its linear address")
            for a, n, text in d.disassemble(addr, count):
                marker = "=> " if a == d.cpu.linear_rip() else "   "
                self.say(f"{marker}{d.describe(a)}:\t{text}")
            return
        if letter == "s":
            for _ in range(count):
                data = bytearray()
                while len(data) < 4096:
                    b = d.read(addr + len(data), 1, physical)
                    if b == b"\0":
                        break
                    data += b
                self.say(f"{d.describe(addr)}:\t{bytes(data).decode('latin-1')!r}")
                addr += len(data) + 1
            return
        self.last_fmt = (letter, size)
        per_line = {1: 8, 2: 8, 4: 4, 8: 2}[size]
        data = d.read(addr, count * size, physical)
        for i in range(0, count, per_line):
            vals = []
            for j in range(i, min(count, i + per_line)):
                v = int.from_bytes(data[j * size:(j + 1) * size], "little")
                vals.append(_fmt_value(v, letter, size))
            a = addr + i * size
            label = f"{a:#x}" if physical else d.describe(a)
            self.say(f"{label}:\t" + "\t".join(vals))

    def do_x(self, arg):
        """x/NFU ADDR: examine linear memory (through the guest's page tables)."""
        self._x(arg, physical=False)

    def do_xp(self, arg):
        """xp/NFU PADDR: examine physical memory."""
        self._x(arg, physical=True)

    def do_p(self, arg):
        """print EXPR (p/x EXPR for hex)."""
        fmt = ""
        if arg.startswith("/"):
            fmt, _, arg = arg.partition(" ")
        v = self.dbg.evaluate(arg)
        letter = fmt[1:2] or "d"
        if letter == "d":
            self.say(f"$1 = {v - (1 << 64) if v >> 63 else v}")
        elif letter == "x":
            self.say(f"$1 = {v:#x}")
        else:
            self.say(f"$1 = {_fmt_value(v, letter, 8)}")

    def do_set(self, arg):
        """set $REG = EXPR | set {TYPE} ADDR = EXPR | set var ..."""
        text = arg.strip()
        if text.startswith("var "):
            text = text[4:].strip()
        lhs, eq, rhs = text.partition("=")
        if not eq:
            raise DebuggerError("set: expected `=' (set $rax = 1, set {int} 0x1000 = 5)")
        lhs = lhs.strip()
        value = self.dbg.evaluate(rhs)
        if lhs.startswith("$"):
            write_register(self.dbg.cpu, lhs, value)
            return
        m = re.match(r"^\{\s*([\w *]+?)\s*\}\s*(.+)$", lhs) or re.match(r"^\*\s*\(\s*([\w ]+?)\s*\*\s*\)\s*(.+)$", lhs)
        if m:
            size = type_size(m.group(1))
            addr = self.dbg.evaluate(m.group(2))
            self.dbg.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return
        raise DebuggerError(f"set: cannot assign to {lhs!r}")

    def do_disassemble(self, arg):
        """disassemble [ADDR [N]]: N instructions (default 8) in the CPU's current mode."""
        words = arg.replace(",", " ").split()
        d = self.dbg
        addr = d.location(words[0]) if words else d.cpu.linear_rip()
        n = d.evaluate(words[1].lstrip("+")) if len(words) > 1 else 8
        self.say(f"Dump of assembler code from {addr:#x} ({d.cpu.mode_bits}-bit):")
        pc = d.cpu.linear_rip()
        for a, size, text in d.disassemble(addr, min(n, 1024)):
            self.say(f"{'=> ' if a == pc else '   '}{d.describe(a)}:\t{text}")
        self.say("End of assembler dump.")
    do_disas = do_disassemble

    def do_walk(self, arg):
        """walk ADDR [read|write|fetch]: the whole 2D translation, every level."""
        words = arg.split()
        if not words:
            raise DebuggerError("Argument required (a linear address).")
        access = "read"
        if len(words) > 1 and words[-1] in ("read", "write", "fetch", "exec"):
            access = words.pop()
        self.say(self.dbg.walk(self.dbg.evaluate(" ".join(words)), access))

    def do_log(self, arg):
        """log ITEMS: turn on -d log items (comma-separated; 'log none' turns them off)."""
        from vmlab.vmm.log import ITEMS, DebugLog, LogError
        items = arg.strip()
        if items in ("", "help"):
            for name, text in ITEMS.items():
                self.say(f"{name:<8} {text}")
            return
        try:
            log = DebugLog.parse("" if items == "none" else items, self.dbg.vm.log.stream)
        except LogError as exc:
            raise DebuggerError(str(exc)) from None
        vm = self.dbg.vm
        vm.log = log
        vm.log_blocks = any(log.enabled(i) for i in ("in_asm", "exec", "tb"))
        vm.vcpu.keep_block_logs = vm.log_blocks
        vm.tbs.set_exec_logging(log.enabled("exec"))
        self.say(f"logging: {', '.join(sorted(log.items)) or 'off'}")

    def do_vmcs(self, arg):
        """vmcs [FIELD...]: VMCS fields by name (all non-zero fields without names); with
        -cpu MODEL,+vmx, the guest hypervisor's (L1's) current VMCS."""
        for line in self.dbg.vmcs_fields(arg.split()):
            self.say(line)

    def do_exits(self, arg):
        """exits [N]: the last N VM exits (default 10), qualification decoded."""
        for line in self.dbg.exits(self.dbg.evaluate(arg) if arg.strip() else 10):
            self.say(line)

    def do_help(self, arg):
        """help: the command list."""
        if arg.strip():
            fn = getattr(self, "do_" + arg.strip().replace("-", "_"), None)
            self.say((fn.__doc__ or "no help") if fn else f'Undefined command: "{arg.strip()}".')
            return
        self.say(HELP)

    def completenames(self, text, *ignored):
        names = [n[3:].replace("_", "-") for n in self.get_names() if n.startswith("do_")]
        return sorted(n for n in set(names) if n.startswith(text))

    def completedefault(self, text, line, begidx, endidx):
        return [n for n in self.dbg.symbols.names() if n.startswith(text)][:200]


def _fmt_value(v: int, letter: str, size: int) -> str:
    bits = 8 * size
    if letter == "x":
        return f"{v:#0{2 + 2 * size}x}"
    if letter == "d":
        return str(v - (1 << bits) if v >> (bits - 1) else v)
    if letter == "u":
        return str(v)
    if letter == "o":
        return f"0{v:o}"
    if letter == "t":
        return f"{v:0{bits}b}"
    if letter == "c":
        return f"{v} {chr(v)!r}" if v < 128 else str(v)
    if letter == "a":
        return f"{v:#x}"
    return f"{v:#x}"


def run_repl(dbg: Debugger, *, script: str | None = None, batch: bool = False, stdin=None, stdout=None) -> int:
    """Run commands from a script file (-x), then from stdin (interactive with
    readline when it is a terminal) unless ``batch``.  Returns the number of
    commands that failed."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    repl = Repl(dbg, stdin=stdin, stdout=stdout)
    if script is not None:
        try:
            with open(script) as fh:
                lines = fh.read().splitlines()
        except OSError as exc:
            raise DebuggerError(f"cannot read {script}: {exc.strerror}") from None
        for line in lines:
            repl.onecmd(line)
            if repl.quit:
                return repl.errors
    if batch:
        return repl.errors
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (history and completion for cmd.Cmd)
        except ImportError:
            pass
        _interactive_loop(repl)
    else:
        for line in stdin:
            repl.onecmd(line)
            if repl.quit:
                break
    return repl.errors


def _interactive_loop(repl: Repl) -> None:
    """cmd.Cmd's loop with Ctrl-C: during a run it stops the guest (a helper
    thread sees the signal through a wakeup fd while the run is in C), at the
    prompt it discards the line."""
    import os
    import signal
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old_handler = signal.signal(signal.SIGINT, lambda *a: None)

    def watcher():
        while True:
            try:
                data = os.read(r, 16)
            except OSError:
                return
            if not data:
                return
            if repl.dbg._running:
                repl.dbg.interrupt()
    threading.Thread(target=watcher, daemon=True).start()
    try:
        while not repl.quit:
            try:
                line = input(repl.prompt)
            except EOFError:
                repl.say()
                break
            except KeyboardInterrupt:
                repl.say("Quit")
                continue
            repl.onecmd(line)
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_handler)
        os.close(w)


def execute(dbg: Debugger, line: str) -> str:
    """Run one REPL command, return its output (the gdbstub's ``monitor``)."""
    out = io.StringIO()
    Repl(dbg, stdout=out).onecmd(line)
    return out.getvalue()


__all__ = ["Repl", "run_repl", "execute", "HELP", "shlex"]
