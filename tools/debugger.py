"""The vmlab debugger: a Python API (``Debugger``) over the one run loop.

``Debugger(vm)`` (or ``Debugger(vmx_guest)``) attaches breakpoints, watchpoints
and the debugger's stops to a machine; every way of running it goes through
``Vm.run`` (vmm/runloop.py) and reads the RunResult -- there is no second loop.
The REPL (tools/debugrepl.py) and the gdbstub (tools/gdbstub.py) are front-ends
of this class.

How the stops work (emu/debugpoints.py, native/debug.c):
* breakpoints are one-address code hooks: guest memory is never written, code
  that does not run pays nothing;
* watchpoints: the TLB fill hands a watched page out without the watched
  right; an access to the page stops before the instruction, the debugger
  checks its exact operands, runs it once with watchpoints off, and reports
  the hit (or goes on);
* stepping: ``Vm.run(step=True)`` executes one instruction (no interrupt is
  taken first, as QEMU's gdbstub does by default);
* ``interrupt()`` (Ctrl-C, gdb's 0x03) is safe from another thread.
"""
from __future__ import annotations

import contextlib

import ast
import operator
import struct
import threading
from dataclasses import dataclass, field

from vmlab.emu import x86
from vmlab.emu.cpu import GPR_INDEX, GPR_NAMES, GuestFault, EptFault, _cs
from vmlab.emu.debugpoints import WATCH_READ, WATCH_WRITE, DebugPointError, DebugPoints
from vmlab.vmm.runloop import RunResult, StopReason

from vmlab.tools.symbols import Symbols


class DebuggerError(Exception):
    """A user error in a debugger command: one line, the session goes on."""


#: stops after which the guest cannot be resumed (like gdb's "exited")
FINAL = frozenset({StopReason.DEBUG_EXIT, StopReason.HALTED, StopReason.SHUTDOWN, StopReason.ERROR})
#: when nothing else bounds a run: instructions per slice between checks
SLICE = 50_000_000


@dataclass
class Point:
    """A breakpoint or watchpoint as the user set it (gdb numbers them in one series)."""
    num: int
    kind: str                     # break, tbreak, pbreak, watch, rwatch, awatch
    addr: int
    length: int = 1
    physical: bool = False
    hits: int = 0
    expr: str = ""

    @property
    def is_watch(self) -> bool:
        return self.kind.endswith("watch")

    @property
    def watch_kinds(self) -> int:
        return {"watch": WATCH_WRITE, "rwatch": WATCH_READ, "awatch": WATCH_READ | WATCH_WRITE}.get(self.kind, 0)


@dataclass
class Stop:
    """Why the debugger stopped: ``reason`` (a StopReason), the RunResult, and
    what the front-ends print (``lines``)."""
    reason: str
    result: RunResult | None = None
    point: Point | None = None
    old: int | None = None
    new: int | None = None
    lines: list[str] = field(default_factory=list)
    watch_addr: int | None = None

    @property
    def final(self) -> bool:
        return self.reason in FINAL


# ---------------------------------------------------------------------- registers
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
_SUBREGS = {}
for _i, _n in enumerate(("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")):
    _SUBREGS["e" + _n] = (_i, 4)
    _SUBREGS[_n] = (_i, 2)
for _i in range(8, 16):
    _SUBREGS[f"r{_i}d"] = (_i, 4)
for _i, _n in enumerate(("al", "cl", "dl", "bl")):
    _SUBREGS[_n] = (_i, 1)
FLAG_BITS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"),
             (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID"))
CR0_BITS = ((0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"), (18, "AM"),
            (29, "NW"), (30, "CD"), (31, "PG"))
CR4_BITS = ((0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"), (7, "PGE"),
            (8, "PCE"), (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"), (12, "LA57"), (13, "VMXE"),
            (16, "FSGSBASE"), (17, "PCIDE"), (18, "OSXSAVE"), (20, "SMEP"), (21, "SMAP"), (22, "PKE"))
EFER_BITS = ((0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE"))


def decode_bits(value: int, bits) -> str:
    return "[ " + " ".join(n for b, n in bits if value >> b & 1) + " ]"


def read_register(cpu, name: str) -> int:
    """A register by gdb name ($rax, $eip, $pc, $cs, $cr3, $efer…)."""
    r = cpu.regs
    name = name.lower().lstrip("$")
    if name in GPR_INDEX:
        return r.gpr[GPR_INDEX[name]]
    if name in _SUBREGS:
        i, size = _SUBREGS[name]
        return r.gpr[i] & ((1 << (8 * size)) - 1)
    if name in ("rip", "pc"):
        return r.rip
    if name in ("eip", "ip"):
        return r.rip & (0xFFFFFFFF if name == "eip" else 0xFFFF)
    if name in ("eflags", "rflags", "flags"):
        return r.rflags
    if name in SEG_NAMES:
        return r.seg[SEG_NAMES.index(name)].selector
    if name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "fs_base", "gs_base", "kernel_gs_base"):
        return getattr(r, name)
    if name == "k_gs_base":
        return r.kernel_gs_base
    if name.startswith("dr") and name[2:].isdigit() and int(name[2:]) in (0, 1, 2, 3, 6, 7):
        return r.dr[int(name[2:])]
    if name == "linear_pc":
        return cpu.linear_rip()
    raise DebuggerError(f"Invalid register `{name}'")


def write_register(cpu, name: str, value: int) -> None:
    name = name.lower().lstrip("$")
    if name in GPR_INDEX:
        cpu.set_gpr(GPR_INDEX[name], value)
    elif name in _SUBREGS:
        i, size = _SUBREGS[name]
        cpu.set_gpr(i, value, size)
    elif name in ("rip", "pc", "eip", "ip"):
        cpu.set_rip(value)
    elif name in ("eflags", "rflags", "flags"):
        cpu.set_rflags(value | 2)
    elif name in ("cr0", "cr3", "cr4"):
        cpu.write_cr(int(name[2]), value)
    elif name in ("cr2", "cr8"):
        cpu.write_cr(int(name[2]), value)
    elif name == "efer":
        cpu.write_efer(value)
    elif name in ("fs_base", "gs_base", "kernel_gs_base", "k_gs_base"):
        cpu.set_reg("kernel_gs_base" if name == "k_gs_base" else name, value)
    elif name.startswith("dr") and name[2:].isdigit() and int(name[2:]) in (0, 1, 2, 3, 6, 7):
        cpu.set_dr(int(name[2:]), value)
    elif name in SEG_NAMES:
        if cpu.regs.cr0 & x86.CR0_PE:
            raise DebuggerError(f"cannot load ${name} in protected mode (the guest loads segments)")
        i = SEG_NAMES.index(name)
        s = cpu.regs.seg[i]
        cpu.load_segments({i: (value & 0xFFFF, (value & 0xFFFF) << 4, s.limit, s.flags)})
    else:
        raise DebuggerError(f"Invalid register `{name}'")


# ---------------------------------------------------------------------- expressions
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv, ast.Mod: operator.mod, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor, ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_TYPES = {"char": 1, "unsigned char": 1, "uint8_t": 1, "int8_t": 1, "short": 2, "unsigned short": 2,
          "uint16_t": 2, "int16_t": 2, "int": 4, "unsigned": 4, "unsigned int": 4, "uint32_t": 4, "int32_t": 4,
          "long": 8, "unsigned long": 8, "long long": 8, "unsigned long long": 8, "uint64_t": 8, "int64_t": 8}


def type_size(name: str) -> int:
    t = " ".join(name.replace("*", " * ").split())
    if t.endswith("*"):
        return 8
    if t not in _TYPES:
        raise DebuggerError(f"No symbol \"{name}\" in current context.")
    return _TYPES[t]


# ---------------------------------------------------------------------- descriptors
def decode_descriptor(lo: int, hi: int) -> dict:
    """A GDT/LDT descriptor (SDM Vol. 3A 3.4.5, Figure 3-8)."""
    d = (hi << 32) | lo
    base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)
    limit = (d & 0xFFFF) | (((d >> 48) & 0xF) << 16)
    g = (d >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    typ = (d >> 40) & 0xF
    s = (d >> 44) & 1
    return {"base": base, "limit": limit, "type": typ, "s": s, "dpl": (d >> 45) & 3, "p": (d >> 47) & 1,
            "l": (d >> 53) & 1, "db": (d >> 54) & 1, "g": g, "raw": d}


_SYS_TYPES = {1: "TSS16 avail", 2: "LDT", 3: "TSS16 busy", 4: "call gate16", 5: "task gate",
              6: "int gate16", 7: "trap gate16", 9: "TSS avail", 0xB: "TSS busy", 0xC: "call gate",
              0xE: "int gate", 0xF: "trap gate"}


def describe_descriptor(desc: dict) -> str:
    if not desc["p"] and desc["raw"] == 0:
        return "null"
    if desc["s"]:
        t = desc["type"]
        if t & 8:
            kind = "code " + ("64-bit" if desc["l"] else "32-bit" if desc["db"] else "16-bit")
            kind += (" conforming" if t & 4 else "") + (" readable" if t & 2 else " exec-only")
        else:
            kind = "data " + ("rw" if t & 2 else "ro") + (" expand-down" if t & 4 else "") + \
                   (" 32-bit" if desc["db"] else " 16-bit")
    else:
        kind = _SYS_TYPES.get(desc["type"], f"system type {desc['type']}")
    return (f"base={desc['base']:#x} limit={desc['limit']:#x} dpl={desc['dpl']} "
            f"{'present' if desc['p'] else 'not-present'} {kind}")


def _seg_attr(flags: int) -> str:
    """QEMU SegmentCache.flags (descriptor bits 8..23 in place) -> short text."""
    d = decode_descriptor(0, flags)
    return f"type={d['type']:#x} dpl={d['dpl']} s={d['s']} p={d['p']} l={d['l']} db={d['db']} g={d['g']}"


# ---------------------------------------------------------------------- the debugger
class Debugger:
    """Step and inspect a machine (``Vm``) or a VMX guest (``VmxGuest``).

    Every run goes through the machine's one run loop; results are ``Stop``
    values whose ``lines`` are what the REPL prints.
    """

    def __init__(self, target, symbols: Symbols | None = None):
        self.vmx = target if hasattr(target, "vmcs") and hasattr(target, "vm") else None
        self.vm = target.vm if self.vmx is not None else target
        self.cpu = self.vm.vcpu
        self.points = DebugPoints(self.cpu)
        self.symbols = symbols or Symbols()
        self.table: dict[int, Point] = {}
        self._next_num = 1
        self.final: Stop | None = None
        self.last_stop: Stop | None = None
        self._lock = threading.Lock()
        self._running = False
        self.break_exit: tuple[int, int, int] | None = None   # (reason, mask, value)
        self.vm.break_vectors = set()
        self.vm.resume_outcome = None
        self._vmx_needs_entry = True
        self._stepping = False
        #: guest-visible VMX (vmm/nested.py): the guest's own hypervisor's current
        #: VMCS is what `vmcs` shows and break-exit matches the L2 exits reflected to it
        self.nested = getattr(self.vm, "nested", None) if self.vmx is None else None
        if self.vmx is not None:
            self.vmx.record = True
            # a VMX guest is in non-root operation once the harness entered it
            self.vm.exit_break = self._exit_matches
        elif self.nested is not None:
            self.nested.record = True
            self.vm.exit_break = self._exit_matches

    # ------------------------------------------------------------------ addresses
    def evaluate(self, text: str) -> int:
        """An integer expression: numbers, $registers, symbols, + - * / % & | ^ << >> ~."""
        src = text.strip()
        if not src:
            raise DebuggerError("Argument required (expression to compute).")
        names: dict[str, int] = {}
        out = []
        i = 0
        while i < len(src):
            c = src[i]
            if c == "$":
                j = i + 1
                while j < len(src) and (src[j].isalnum() or src[j] == "_"):
                    j += 1
                reg = src[i + 1:j]
                key = f"__reg_{reg}"
                names[key] = read_register(self.cpu, reg)
                out.append(key)
                i = j
            else:
                out.append(c)
                i += 1
        try:
            tree = ast.parse("".join(out), mode="eval")
        except SyntaxError:
            raise DebuggerError(f"A syntax error in expression, near `{text}'.") from None
        return self._eval(tree.body, names) & 0xFFFFFFFFFFFFFFFF

    def _eval(self, node, names):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            v = self.symbols.lookup(node.id)
            if v is None:
                raise DebuggerError(f"No symbol \"{node.id}\" in current context.")
            return v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = self._eval(node.left, names), self._eval(node.right, names)
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise DebuggerError("Division by zero")
            if isinstance(node.op, (ast.LShift, ast.RShift)) and not 0 <= b < 128:
                raise DebuggerError("shift count out of range")
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, names)
            if isinstance(node.op, ast.USub):
                return -v
            if isinstance(node.op, ast.Invert):
                return ~v
            if isinstance(node.op, ast.UAdd):
                return v
        raise DebuggerError("unsupported expression (numbers, $registers, symbols and + - * / % & | ^ << >> ~)")

    def location(self, text: str) -> int:
        """gdb's LOCATION: ``*EXPR`` (an address) or a symbol or an expression."""
        t = text.strip()
        if t.startswith("*"):
            t = t[1:]
        return self.evaluate(t)

    def describe(self, addr: int) -> str:
        """``0x7c00 <start+3>`` (or just the address)."""
        s = self.symbols.describe(addr)
        return f"{addr:#x} <{s}>" if s else f"{addr:#x}"

    # ------------------------------------------------------------------ memory
    def read(self, addr: int, length: int, physical: bool = False) -> bytes:
        """Guest memory: linear (through the guest's page tables, no A/D
        updates) or physical.  Raises DebuggerError where nothing is mapped."""
        if length < 0 or length > 1 << 24:
            raise DebuggerError(f"bad length {length}")
        if physical:
            mem = self.vm.mem
            if not mem.contains(addr, length):
                raise DebuggerError(f"Cannot access memory at physical address {addr:#x}")
            return mem.read(addr, length)
        out = bytearray()
        a, left = addr, length
        while left > 0:
            n = min(left, 4096 - (a & 0xFFF))
            w = self.cpu.translate(a, implicit=True)
            if w.fault != 0 or not self.vm.mem.contains(w.paddr, n):
                raise DebuggerError(f"Cannot access memory at address {a:#x}")
            out += self.vm.mem.read(w.paddr, n)
            a, left = (a + n) & 0xFFFFFFFFFFFFFFFF, left - n
        return bytes(out)

    def write(self, addr: int, data: bytes, physical: bool = False) -> None:
        if physical:
            mem = self.vm.mem
            if not mem.contains(addr, len(data)):
                raise DebuggerError(f"Cannot access memory at physical address {addr:#x}")
            mem.write(addr, data)
            from vmlab.emu.native import lib
            for page in range(addr & ~0xFFF, addr + len(data), 0x1000):
                lib.vmlab_code_page_written(self.cpu.native, page)
            self.cpu.uc.ctl_flush_tb()
            return
        try:
            self.cpu.write_linear(addr, data, user=False, implicit=True)
        except (GuestFault, EptFault):
            raise DebuggerError(f"Cannot access memory at address {addr:#x}") from None

    # ------------------------------------------------------------------ breakpoints
    def _new(self, kind: str, addr: int, **kw) -> Point:
        p = Point(self._next_num, kind, addr, **kw)
        self._next_num += 1
        self.table[p.num] = p
        return p

    def break_at(self, addr: int, *, temporary: bool = False, physical: bool = False) -> Point:
        """A breakpoint at a linear (or physical) address; it never writes guest memory."""
        try:
            self.points.add_break(addr, physical=physical)
        except DebugPointError as exc:
            raise DebuggerError(str(exc)) from None
        return self._new("pbreak" if physical else "tbreak" if temporary else "break", addr, physical=physical)

    def watch(self, addr: int, length: int = 1, kind: str = "watch", physical: bool = False,
              expr: str = "") -> Point:
        if kind not in ("watch", "rwatch", "awatch"):
            raise DebuggerError(f"unknown watchpoint kind {kind}")
        if not 1 <= length <= 4096:
            raise DebuggerError("watch length must be 1..4096 bytes")
        p = Point(self._next_num, kind, addr, length=length, physical=physical, expr=expr)
        try:
            self.points.set_watches(self._watch_specs() + [(addr, length, p.watch_kinds, physical)])
        except DebugPointError as exc:
            raise DebuggerError(str(exc)) from None
        self._next_num += 1
        self.table[p.num] = p
        return p

    def _watch_specs(self):
        return [(p.addr, p.length, p.watch_kinds, p.physical) for p in self.table.values() if p.is_watch]

    def delete(self, num: int | None = None) -> None:
        """Delete breakpoint/watchpoint ``num`` (all of them if None)."""
        nums = list(self.table) if num is None else [num]
        for n in nums:
            p = self.table.pop(n, None)
            if p is None:
                raise DebuggerError(f"No breakpoint number {n}.")
            if not p.is_watch and not any(q.addr == p.addr and q.physical == p.physical and not q.is_watch
                                          for q in self.table.values()):
                self.points.remove_break(p.addr, physical=p.physical)
        self.points.set_watches(self._watch_specs())

    def breakpoint_at(self, addr: int) -> Point | None:
        for p in self.table.values():
            if not p.is_watch and not p.physical and p.addr == addr:
                return p
        return None

    def _phys_break_at(self, lin: int) -> Point | None:
        phys = [p for p in self.table.values() if p.kind == "pbreak"]
        if not phys:
            return None
        w = self.cpu.translate(lin, implicit=True)
        if w.fault:
            return None
        for p in phys:
            if p.addr == w.paddr:
                return p
        return None

    # ------------------------------------------------------------------ debugger stops
    def set_break_mode(self, on: bool) -> None:
        self.points.set_break_mode(on)

    def break_int(self, vector: int, on: bool = True) -> None:
        if not 0 <= vector <= 255:
            raise DebuggerError("vector must be 0..255")
        (self.vm.break_vectors.add if on else self.vm.break_vectors.discard)(vector)

    def set_break_exit(self, reason: int | None, mask: int = 0, value: int = 0) -> None:
        if self.vmx is None and self.nested is None:
            raise DebuggerError("not a VMX guest (break-exit needs one, or run with -cpu MODEL,+vmx)")
        self.break_exit = None if reason is None else (reason, mask, value)

    def _exit_matches(self, vmexit) -> bool:
        b = self.break_exit
        if b is None:
            return False
        reason, mask, value = b
        return int(vmexit.reason) & 0xFFFF == reason and (vmexit.qualification & mask) == value

    def interrupt(self) -> None:
        """Stop a running guest at the next block boundary (any thread)."""
        self.points.request_stop()

    # ------------------------------------------------------------------ running
    def _run(self, *, step: bool = False, max_insns: int | None = None, timeout: float | None = None) -> RunResult:
        if self.final is not None:
            raise DebuggerError("The program is not being run.")
        vm = self.vm
        g = self.vmx
        self._running = True
        try:
            if g is not None and self._vmx_needs_entry:
                # VM entry (VMLAUNCH/VMRESUME) before the guest's first run and
                # after a VM exit that went back to the VMM.
                self._vmx_needs_entry = False
                exit_ = g.enter()
                if exit_ is not None:
                    return RunResult(StopReason.VMEXIT, message="VM entry failed", exit=exit_)
            # (Entering one-instruction mode, Vcpu.run drops the blocks a
            # continue translated, so a step is one instruction.)
            self._stepping = step
            with g.nonroot() if g is not None else contextlib.nullcontext():
                try:
                    res = vm.run(max_insns=max_insns, timeout=timeout, step=step)
                finally:
                    if g is not None and len(g.trace) > 1000:
                        del g.trace[:-1000]
            if g is not None and res.reason == StopReason.VMEXIT:
                self._vmx_needs_entry = True
            return res
        finally:
            self._running = False
            self.points.clear_stop()

    def _finish(self, res: RunResult, stop: Stop) -> Stop:
        if res.reason in FINAL:
            self.final = stop
        self.last_stop = stop
        return stop

    def _stop_from(self, res: RunResult) -> Stop | None:
        """Turn a RunResult into a Stop (None: a watchpoint miss, keep going)."""
        reason = res.reason
        if reason == StopReason.WATCHPOINT:
            return self._watch_hit(res)
        st = Stop(reason, res)
        if reason == StopReason.STEP:
            self.last_stop = st
            return st
        pc = self.cpu.linear_rip()
        if reason == StopReason.BREAKPOINT:
            p = self.breakpoint_at(res.exit.addr) or self._phys_break_at(res.exit.addr)
            if p is None:
                return None           # a hook left by a deleted physical breakpoint
            p.hits += 1
            st.point = p
            if p.kind == "tbreak":
                self.delete(p.num)
                st.lines.append(f"Temporary breakpoint {p.num}, {self._where(pc)}")
            else:
                st.lines.append(f"Breakpoint {p.num}, {self._where(pc)}")
        elif reason == StopReason.STEP:
            pass
        elif reason == StopReason.INTERRUPTED:
            st.lines.append("")
            st.lines.append("Program received signal SIGINT, Interrupt.")
            st.lines.append(self._where(pc))
        elif reason == StopReason.MODE_CHANGE:
            st.lines.append(f"Mode changed to {self.mode_name()}, {self._where(pc)}")
        elif reason == StopReason.BREAK_INT:
            st.lines.append(f"Interrupt/exception delivered ({res.message}), {self._where(pc)}")
        elif reason == StopReason.BREAK_EXIT:
            st.lines.append(f"VM exit {self._exit_text(res.exit)}")
        elif reason == StopReason.VMEXIT:
            st.lines.append(f"VM exit without a handler: {self._exit_text(res.exit)}")
        elif reason == StopReason.DEBUG_EXIT:
            st.lines.append(f"[Inferior 1 (vmlab) exited with code {res.status:02o}]"
                            if res.status is not None else "[Inferior 1 (vmlab) exited]")
        elif reason == StopReason.LIMIT:
            st.lines.append(f"Stopped: {res.message}, {self._where(pc)}")
        elif reason == StopReason.TIMEOUT:
            st.lines.append(f"Stopped: {res.message}, {self._where(pc)}")
        else:
            st.lines.append(f"[Inferior 1 (vmlab) {reason}: {res.message}]")
        return self._finish(res, st)

    def _watch_hit(self, res: RunResult) -> Stop | None:
        ex = res.exit
        hits = []
        for p in self.table.values():
            if not p.is_watch:
                continue
            want = p.watch_kinds & (WATCH_WRITE if ex.is_write else WATCH_READ)
            if not want:
                continue
            if p.physical:
                ranges = []
                for a, n in ex.accesses:
                    w = self.cpu.translate(a, implicit=True)
                    if not w.fault:
                        ranges.append((w.paddr, n))
            else:
                ranges = ex.accesses
            if any(a < p.addr + p.length and a + n > p.addr for a, n in ranges):
                hits.append(p)
        watches = [p for p in self.table.values() if p.is_watch]
        olds = {p.num: self._value(p) for p in watches}
        # Run the instruction once with watchpoints (and breakpoints) off.
        with self.points.suspended(breaks=True, watches=True):
            res2 = self._run(step=True)
        if res2.reason != StopReason.STEP:
            return self._stop_from(res2)
        # A watched value that changed counts too: Unicorn's one-instruction
        # run can finish a REP string instruction and run the next one.
        for p in watches:
            new = self._value(p)
            old = olds[p.num]
            if p not in hits and (p.kind == "rwatch" or old == new):
                continue
            if p.kind == "watch" and old == new:
                continue
            p.hits += 1
            st = Stop(StopReason.WATCHPOINT, res, point=p, old=old, new=new, watch_addr=p.addr)
            name = {"watch": "Hardware watchpoint", "rwatch": "Hardware read watchpoint",
                    "awatch": "Hardware access (read/write) watchpoint"}[p.kind]
            st.lines += ["", f"{name} {p.num}: {p.expr or self._watch_expr(p)}", ""]
            if p.kind == "watch":
                st.lines += [f"Old value = {old}", f"New value = {new}"]
            elif p.kind == "awatch" and old != new:
                st.lines += [f"Old value = {old}", f"New value = {new}"]
            else:
                st.lines += [f"Value = {new}"]
            st.lines.append(self._where(self.cpu.linear_rip()))
            return self._finish(res2, st)
        return None

    def _watch_expr(self, p: Point) -> str:
        return f"{'-phys ' if p.physical else ''}*{p.addr:#x}" + (f" ({p.length} bytes)" if p.length != 1 else "")

    def _value(self, p: Point) -> int | None:
        n = min(p.length, 8)
        try:
            return int.from_bytes(self.read(p.addr, n, physical=p.physical), "little")
        except DebuggerError:
            return None

    def _where(self, lin: int) -> str:
        s = self.symbols.describe(lin)
        if s:
            name = s.split("+")[0]
            return f"{lin:#018x} in {name} ()"
        return f"{lin:#018x} in ?? ()"

    def _at_break(self) -> bool:
        lin = self.cpu.linear_rip()
        return self.breakpoint_at(lin) is not None or self._phys_break_at(lin) is not None

    def step(self, n: int = 1, show: bool = False) -> Stop:
        """stepi: n instructions (breakpoints do not stop a step).  ``show``:
        put the next instruction in ``lines`` (what the REPL prints)."""
        st = None
        d = self.points.native
        for _ in range(max(1, n)):
            d.suspend_breaks = 1
            try:
                res = self._run(step=True)
            finally:
                d.suspend_breaks = 0
            st = self._stop_from(res)
            if st is None:               # a watched page, not a watched byte: the step is done
                st = self._finish(res, Stop(StopReason.STEP, res))
            if st.reason != StopReason.STEP:
                return st
        if show:
            st.lines.append(self.format_insn_line(self.cpu.linear_rip(), current=True))
        return st

    def cont(self, max_insns: int | None = None, timeout: float | None = None) -> Stop:
        """continue: until a breakpoint, watchpoint, debugger stop or the guest ends."""
        if self._at_break():
            with self.points.suspended(breaks=True):
                res = self._run(step=True)
            st = self._stop_from(res)
            if st is not None and st.reason != StopReason.STEP:
                return st
        while True:
            res = self._run(max_insns=max_insns, timeout=timeout)
            st = self._stop_from(res)
            if st is not None:
                return st

    def next(self, n: int = 1) -> Stop:
        """nexti: like stepi, but a CALL runs until it returns."""
        st = None
        for _ in range(max(1, n)):
            insn = self.cpu.fetch_insn(self.cpu.linear_rip())
            if insn is None or not insn.mnemonic.startswith("call"):
                st = self.step(1, show=True)
                if st.reason != StopReason.STEP:
                    return st
                continue
            st = self._run_to(self.cpu.linear_rip() + insn.size, self.cpu.regs.gpr[4])
            if st.reason != StopReason.STEP:
                return st
        return st

    def _run_to(self, target: int, sp: int) -> Stop:
        """Run until the instruction at ``target`` with RSP >= sp (a call returned)."""
        had = self.breakpoint_at(target) is not None
        if not had:
            self.points.add_break(target)
        try:
            while True:
                with self.points.suspended(breaks=True):
                    res = self._run(step=True)
                st = self._stop_from(res)
                if st is not None and st.reason != StopReason.STEP:
                    return st
                while True:
                    res = self._run()
                    if res.reason == StopReason.BREAKPOINT and res.exit.addr == target:
                        break
                    st = self._stop_from(res)
                    if st is not None:
                        return st
                if self.cpu.regs.gpr[4] >= sp:
                    st = Stop(StopReason.STEP, res)
                    st.lines.append(self.format_insn_line(target, current=True))
                    return self._finish(res, st)
        finally:
            if not had:
                self.points.remove_break(target)

    def finish(self, limit: int = 5_000_000) -> Stop:
        """Run until the current function returns (a RET that leaves its frame)."""
        sp0 = self.cpu.regs.gpr[4]
        for _ in range(limit):
            insn = self.cpu.fetch_insn(self.cpu.linear_rip())
            is_ret = insn is not None and insn.mnemonic.startswith(("ret", "iret"))
            st = self.next(1) if insn is not None and insn.mnemonic.startswith("call") else self.step(1, show=True)
            if st.reason != StopReason.STEP:
                return st
            if is_ret and self.cpu.regs.gpr[4] > sp0:
                st.lines.insert(0, "Run till exit")
                return st
            st.lines.clear()
        raise DebuggerError(f"finish: no return within {limit} instructions")

    def until(self, addr: int | None = None) -> Stop:
        """until LOCATION: run to it (or until the current frame returns);
        without one: like nexti, but never stop at a lower address (a loop's back edge)."""
        if addr is not None:
            return self._run_to(addr, 0)
        start = self.cpu.linear_rip()
        while True:
            st = self.next(1)
            if st.reason != StopReason.STEP or self.cpu.linear_rip() > start:
                return st

    # ------------------------------------------------------------------ inspection
    def mode_name(self) -> str:
        r = self.cpu.regs
        if not r.cr0 & x86.CR0_PE:
            m = "real"
        elif r.rflags & x86.RFLAGS_VM:
            m = "virtual-8086"
        elif r.hflags & x86.HF_LMA:
            m = "long 64-bit" if r.hflags & x86.HF_CS64 else \
                "compatibility " + ("32-bit" if r.hflags & x86.HF_CS32 else "16-bit")
        else:
            m = "protected " + ("32-bit" if r.hflags & x86.HF_CS32 else "16-bit")
        return m

    def info_mode(self) -> list[str]:
        from vmlab.emu.softmmu import paging_mode
        r = self.cpu.regs
        lines = [f"mode: {self.mode_name()}, CPL {r.hflags & 3}",
                 f"paging: {paging_mode(r.cr0, r.cr4, r.efer) or 'off'}",
                 f"cs.base={r.seg[1].base:#x} rip={r.rip:#x} linear pc={self.cpu.linear_rip():#x}"]
        if self.vmx is not None:
            lines.append("VMX: non-root guest (vmcs, exits, break-exit available)")
        elif self.nested is not None:
            n = self.nested
            if n.vmxon is None:
                state = "not in VMX operation"
            else:
                state = ("L2 (VMX non-root, under the guest hypervisor's VMCS)" if n.l2 is not None
                         else "L1 (VMX root operation)")
            lines.append(f"VMX: guest-visible (-cpu ...,+vmx), now {state}; "
                         f"{n.reflected} L2 exits reflected to L1 (vmcs, exits, break-exit available)")
        return lines

    def walk(self, addr: int, access: str = "read", user: bool | None = None) -> str:
        """The whole 2D translation of a linear address, level by level."""
        from vmlab.emu.softmmu import WalkResult, paging_mode
        from vmlab.emu.cpu import ACC_FETCH, ACC_READ, ACC_WRITE
        acc = {"read": ACC_READ, "write": ACC_WRITE, "fetch": ACC_FETCH, "exec": ACC_FETCH}.get(access)
        if acc is None:
            raise DebuggerError(f"bad access {access!r} (read, write or fetch)")
        r = self.cpu.regs
        w = self.cpu.translate(addr, acc, user=user)
        mode = paging_mode(r.cr0, r.cr4, r.efer) or "paging off"
        res = WalkResult.from_native(w, mode)
        text = res.describe()
        if not r.cr0 & x86.CR0_PG:
            text += "\n  (paging is off: linear = guest-physical)"
        if self.cpu.native.ept_enabled:
            text += f"\n  EPT on, EPTP={self.cpu.native.eptp:#x}"
        return text

    def info_tlb(self, limit: int = 64) -> list[str]:
        """The current page-table mappings (QEMU's ``info tlb``) and soft-MMU statistics."""
        from vmlab.emu.softmmu import paging_mode
        r = self.cpu.regs
        mode = paging_mode(r.cr0, r.cr4, r.efer)
        lines = []
        st = self.cpu.tlb_stats()
        lines.append("soft-MMU: " + " ".join(f"{k}={v}" for k, v in st.items()))
        if not mode:
            lines.append("paging is off: linear = physical")
            return lines
        for va, pa, size, flags in self._mappings(mode, limit):
            lines.append(f"{va:016x}: {pa:016x} {size:#x} {flags}")
        return lines

    def _mappings(self, mode: str, limit: int):
        """Leaf mappings by walking the guest's tables (bounded by ``limit``)."""
        r = self.cpu.regs
        mem = self.vm.mem
        out = []

        def rd(pa, size):
            if not mem.contains(pa, size):
                return 0
            return int.from_bytes(mem.read(pa, size), "little")

        def flags(e):
            # QEMU's info tlb letters: NX, G(lobal), PS(page size), D(irty), A(ccessed), U(ser), W(ritable)
            return "".join(c if e >> b & 1 else "-" for b, c in
                           ((63, "X"), (8, "G"), (7, "S"), (6, "D"), (5, "A"), (2, "U"), (1, "W")))

        if mode == "32-bit":
            base = r.cr3 & ~0xFFF
            for i in range(1024):
                pde = rd(base + 4 * i, 4)
                if not pde & 1:
                    continue
                if pde & 0x80 and r.cr4 & 0x10:
                    out.append((i << 22, pde & 0xFFC00000, 4 << 20, flags(pde)))
                else:
                    for j in range(1024):
                        pte = rd((pde & ~0xFFF) + 4 * j, 4)
                        if pte & 1:
                            out.append(((i << 22) | (j << 12), pte & ~0xFFF, 4096, flags(pte)))
                            if len(out) >= limit:
                                return out
                if len(out) >= limit:
                    return out
            return out
        levels = 5 if "5" in mode else 4 if "4" in mode else 3
        mask = 0x000FFFFFFFFFF000

        def rec(table, level, va):
            n = 4 if levels == 3 and level == 3 else 512
            for i in range(n):
                e = rd(table + 8 * i, 8)
                if not e & 1:
                    continue
                shift = 12 + 9 * (level - 1)
                v = va | (i << shift)
                if level == 1 or (e & 0x80 and level in (2, 3)):
                    if v >> 47 & 1:
                        v |= 0xFFFF000000000000
                    out.append((v, e & mask & ~((1 << shift) - 1), 1 << shift, flags(e)))
                    if len(out) >= limit:
                        return True
                elif rec(e & mask, level - 1, v):
                    return True
            return False

        top = (r.cr3 & ~0x1F) if levels == 3 else (r.cr3 & mask)
        rec(top, levels, 0)
        return out

    def descriptor_table(self, which: str, limit: int = 64) -> list[str]:
        """info gdt|ldt|idt|tss, decoded."""
        r = self.cpu.regs
        lm = bool(r.hflags & x86.HF_LMA)
        if which == "gdt":
            base, lim = r.gdtr_base, r.gdtr_limit
            lines = [f"GDT: base={base:#x} limit={lim:#x}"]
            return lines + self._descs(base, lim, limit, lm)
        if which == "ldt":
            base, lim = r.ldtr.base, r.ldtr.limit
            lines = [f"LDT: selector={r.ldtr.selector:#x} base={base:#x} limit={lim:#x}"]
            if not r.ldtr.selector and not lim:
                return lines + ["(no LDT loaded)"]
            return lines + self._descs(base, lim, limit, lm)
        if which == "idt":
            base, lim = r.idtr_base, r.idtr_limit
            lines = [f"IDT: base={base:#x} limit={lim:#x}"]
            if not r.cr0 & x86.CR0_PE:
                for v in range(min((lim + 1) // 4, limit)):
                    try:
                        off, seg = struct.unpack("<HH", self.read(base + 4 * v, 4))
                    except DebuggerError:
                        break
                    lines.append(f"IDT[{v:#04x}] {seg:04x}:{off:04x} (real-mode vector)")
                return lines
            size = 16 if lm else 8
            for v in range(min((lim + 1) // size, limit, 256)):
                try:
                    raw = self.read(base + size * v, size)
                except DebuggerError:
                    lines.append(f"IDT[{v:#04x}] <unreadable>")
                    break
                lo, hi = struct.unpack_from("<II", raw)
                if not (hi >> 15) & 1:
                    continue
                off = (lo & 0xFFFF) | (hi & 0xFFFF0000)
                if lm:
                    off |= struct.unpack_from("<I", raw, 8)[0] << 32
                sel = lo >> 16
                typ = (hi >> 8) & 0xF
                dpl = (hi >> 13) & 3
                ist = hi & 7 if lm else 0
                tname = _SYS_TYPES.get(typ, f"type {typ}")
                sym = self.symbols.describe(off)
                lines.append(f"IDT[{v:#04x}] {tname} {sel:04x}:{off:#x}{' <' + sym + '>' if sym else ''} "
                             f"dpl={dpl}{f' ist={ist}' if ist else ''}")
            return lines
        if which == "tss":
            tr = r.tr
            lines = [f"TR: selector={tr.selector:#x} base={tr.base:#x} limit={tr.limit:#x} ({_seg_attr(tr.flags)})"]
            if not tr.limit:
                return lines + ["(no TSS loaded)"]
            try:
                if lm:
                    raw = self.read(tr.base, 104)
                    rsp = struct.unpack_from("<3Q", raw, 4)
                    ist = struct.unpack_from("<7Q", raw, 0x24)
                    lines.append("rsp0={:#x} rsp1={:#x} rsp2={:#x}".format(*rsp))
                    lines.append(" ".join(f"ist{i + 1}={v:#x}" for i, v in enumerate(ist)))
                    lines.append(f"iomap_base={struct.unpack_from('<H', raw, 0x66)[0]:#x}")
                else:
                    raw = self.read(tr.base, 104)
                    f = struct.unpack_from("<26I", raw)
                    lines.append(f"link={f[0] & 0xFFFF:#x} esp0={f[1]:#x} ss0={f[2] & 0xFFFF:#x} "
                                 f"esp1={f[3]:#x} ss1={f[4] & 0xFFFF:#x} esp2={f[5]:#x} ss2={f[6] & 0xFFFF:#x}")
                    lines.append(f"cr3={f[7]:#x} eip={f[8]:#x} eflags={f[9]:#x} esp={f[14]:#x}")
            except DebuggerError as exc:
                lines.append(str(exc))
            return lines
        raise DebuggerError(f"unknown table {which!r}")

    def _descs(self, base: int, lim: int, limit: int, lm: bool) -> list[str]:
        lines = []
        i = 0
        while i * 8 + 7 <= lim and i < limit:
            try:
                lo, hi = struct.unpack("<II", self.read(base + 8 * i, 8))
            except DebuggerError:
                lines.append(f"[{i * 8:#06x}] <unreadable>")
                break
            d = decode_descriptor(lo, hi)
            if d["raw"]:
                text = describe_descriptor(d)
                if lm and not d["s"] and d["type"] in (2, 9, 0xB, 0xC, 0xE, 0xF) and (i + 1) * 8 + 7 <= lim:
                    try:
                        upper = struct.unpack("<I", self.read(base + 8 * (i + 1), 4))[0]
                        d["base"] |= upper << 32
                        text = describe_descriptor(d) + " (16-byte)"
                    except DebuggerError:
                        pass
                    lines.append(f"[{i * 8:#06x}] {text}")
                    i += 2
                    continue
                lines.append(f"[{i * 8:#06x}] {text}")
            i += 1
        return lines

    def info_tb(self, addr: int | None = None, limit: int = 32) -> list[str]:
        tbs = self.vm.tbs
        if addr is not None:
            blocks = [b for b in tbs.blocks() if b.pc <= addr < b.pc + b.size or
                      (b.paddr & ~0xFFF) == (addr & ~0xFFF)]
        else:
            blocks = tbs.blocks(valid_only=True)
        st = tbs.stats()
        lines = ["blocks: " + " ".join(f"{k}={v}" for k, v in st.items())]
        for b in blocks[:limit]:
            sym = self.symbols.describe(b.pc)
            lines.append(f"{b.pc:#x}{' <' + sym + '>' if sym else ''} phys={b.paddr:#x} size={b.size} "
                         f"insns={b.ninsn} mode={b.mode} cpl={b.cpl} exec={b.exec_count} "
                         f"{'valid' if b.valid else 'invalid'} translations={b.translations}")
        if len(blocks) > limit:
            lines.append(f"... {len(blocks) - limit} more")
        return lines

    def info_devices(self) -> list[str]:
        lines = []
        for bus in (self.vm.pio, self.vm.mmio):
            for rng, dev in bus.ranges():
                lines.append(f"{bus.name:<4} {rng}  {type(dev).__name__}")
        return lines

    def info_msr(self, msr: int) -> str:
        try:
            val = self.vm.msrs.read(msr)
        except Exception as exc:        # the model raises a guest fault for an unknown MSR
            raise DebuggerError(f"MSR {msr:#x}: not readable ({type(exc).__name__})") from None
        return f"MSR {msr:#x} = {val:#018x}"

    # ---- VMX
    def vmcs_fields(self, names=()) -> list[str]:
        from vmlab.vmm import vmcs as F
        lines = []
        if self.vmx is not None:
            v = self.vmx.vmcs
        elif self.nested is not None:
            # The guest hypervisor's (L1's) current VMCS, as vmm/nested.py caches it.
            n = self.nested
            if n.vmxon is None:
                raise DebuggerError("the guest is not in VMX operation (no VMXON yet): no current VMCS")
            if n.vmcs is None:
                raise DebuggerError("the guest hypervisor has no current VMCS (no VMPTRLD yet)")
            v = n.vmcs
            if not names:
                launched = "launched" if v.launch_state == F.LaunchState.LAUNCHED else "clear"
                lines.append(f"L1's current VMCS at {n.current:#x} (revision {v.revision_id:#x}, {launched}"
                             f"{', L2 running: guest-state fields are as of the last VM entry' if n.l2 else ''})")
        else:
            raise DebuggerError("not a VMX guest (no VMCS; run with -cpu MODEL,+vmx for the guest's own)")
        if names:
            for n in names:
                try:
                    fld, _ = F.field_by_name(n.upper())
                except Exception:
                    raise DebuggerError(f"unknown VMCS field {n!r}") from None
                lines.append(f"{fld.name:<40} {v.read(fld.encoding):#x}")
            return lines
        for name, val in sorted(v.snapshot(nonzero=True).items()):
            lines.append(f"{name:<40} {val:#x}")
        return lines

    def exits(self, n: int = 10) -> list[str]:
        if self.vmx is None and self.nested is None:
            raise DebuggerError("not a VMX guest (no VM exits)")
        trace = self.vmx.trace if self.vmx is not None else list(self.nested.trace)
        tr = trace[-n:] if n > 0 else []
        if not tr:
            return ["no VM exits recorded"]
        return [self._exit_text(e) for e in tr]

    @staticmethod
    def _exit_text(e) -> str:
        if e is None:
            return "?"
        reason = getattr(e, "reason", None)
        name = reason.name if hasattr(reason, "name") else str(reason)
        text = f"{name} ({int(reason) if reason is not None else '?'}) qualification={e.qualification:#x}"
        dec = getattr(e, "decoded", None)
        if dec is not None:
            text += f" {dec}"
        if getattr(e, "instruction_length", 0):
            text += f" length={e.instruction_length}"
        return text

    # ---- registers and disassembly
    def info_registers(self, names=()) -> list[str]:
        r = self.cpu.regs
        if names:
            return [self._reg_line(n.lstrip("$"), read_register(self.cpu, n)) for n in names]
        lines = []
        for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16)):
            lines.append(self._reg_line(n, r.gpr[GPR_INDEX[n]]))
        sym = self.symbols.describe(self.cpu.linear_rip())
        lines.append(f"{'rip':<15}{r.rip:#018x}  {('<' + sym + '>') if sym else ''}".rstrip())
        lines.append(f"{'eflags':<15}{r.rflags:#018x}  {decode_bits(r.rflags, FLAG_BITS)} IOPL={r.rflags >> 12 & 3}")
        for i, n in enumerate(SEG_NAMES):
            s = r.seg[i]
            lines.append(f"{n:<15}{s.selector:#06x}  base={s.base:#x} limit={s.limit:#x} {_seg_attr(s.flags)}")
        lines.append(f"{'fs_base':<15}{r.fs_base:#018x}")
        lines.append(f"{'gs_base':<15}{r.gs_base:#018x}")
        lines.append(f"{'k_gs_base':<15}{r.kernel_gs_base:#018x}")
        lines.append(f"{'cr0':<15}{r.cr0:#018x}  {decode_bits(r.cr0, CR0_BITS)}")
        lines.append(f"{'cr2':<15}{r.cr2:#018x}")
        lines.append(f"{'cr3':<15}{r.cr3:#018x}")
        lines.append(f"{'cr4':<15}{r.cr4:#018x}  {decode_bits(r.cr4, CR4_BITS)}")
        lines.append(f"{'cr8':<15}{r.cr8:#018x}")
        lines.append(f"{'efer':<15}{r.efer:#018x}  {decode_bits(r.efer, EFER_BITS)}")
        for i in (0, 1, 2, 3, 6, 7):
            lines.append(f"{'dr' + str(i):<15}{r.dr[i]:#018x}")
        lines.append(f"{'gdtr':<15}base={r.gdtr_base:#x} limit={r.gdtr_limit:#x}")
        lines.append(f"{'idtr':<15}base={r.idtr_base:#x} limit={r.idtr_limit:#x}")
        lines.append(f"{'ldtr':<15}{r.ldtr.selector:#06x}  base={r.ldtr.base:#x} limit={r.ldtr.limit:#x}")
        lines.append(f"{'tr':<15}{r.tr.selector:#06x}  base={r.tr.base:#x} limit={r.tr.limit:#x} "
                     f"{_seg_attr(r.tr.flags)}")
        lines.append(f"{'mode':<15}{self.mode_name()} cpl={r.hflags & 3}")
        return lines

    def _reg_line(self, name: str, value: int) -> str:
        if name in ("eflags", "rflags", "flags"):
            return f"{name:<15}{value:#x}{'':<10}{decode_bits(value, FLAG_BITS)}"
        signed = value - (1 << 64) if value >> 63 else value
        return f"{name:<15}{value:#x}{'':<{max(1, 19 - len(hex(value)))}}{signed}"

    def disassemble(self, addr: int, count: int, bits: int | None = None) -> list[tuple[int, int, str]]:
        """(address, length, text) of ``count`` instructions at a linear address,
        decoded in the CPU's current mode (or ``bits``)."""
        bits = bits or self.cpu.mode_bits
        try:
            code = self.read(addr, 15 * count)
        except DebuggerError:
            code = b""
            # shorten to what is readable (up to the next unmapped page)
            n = 4096 - (addr & 0xFFF)
            while not code and n > 0:
                try:
                    code = self.read(addr, min(n, 15 * count))
                except DebuggerError:
                    break
            if not code:
                raise
        out = []
        # Capstone decodes relative targets from the instruction's address; show the
        # linear address (in real mode the IP is the linear address minus CS.base).
        for insn in _cs(bits).disasm(code, addr):
            out.append((insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip()))
            if len(out) >= count:
                break
        return out

    def format_insn_line(self, addr: int, current: bool = False) -> str:
        try:
            ins = self.disassemble(addr, 1)
        except DebuggerError:
            return f"{'=> ' if current else '   '}{self.describe(addr)}:\t<unreadable>"
        text = ins[0][2] if ins else "(bad)"
        return f"{'=> ' if current else '   '}{self.describe(addr)}:\t{text}"


__all__ = ["Debugger", "DebuggerError", "Point", "Stop", "read_register", "write_register", "type_size",
           "GPR_NAMES"]
