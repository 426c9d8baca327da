"""A gdbstub: gdb's remote serial protocol over TCP, driving a ``Debugger``.

``vmlab run KERNEL -s`` listens on 127.0.0.1:1234 (``-gdb tcp::PORT`` for
another port), ``-S`` waits for gdb with the CPU stopped before its first
instruction -- QEMU's options.  The packets are those of the gdb manual,
appendix E "GDB Remote Serial Protocol": E.1 Overview (``$data#cs``
framing, ``+``/``-`` acknowledgments, 0x03 interrupt), E.2 Packets (``?``, ``g``,
``G``, ``p``, ``P``, ``m``, ``M``, ``c``, ``s``, ``vCont``, ``Z0``-``Z4``, ``D``,
``k``), E.3 Stop Reply Packets (``T05``, ``watch:``, ``swbreak:``, ``W``), E.4
General Query Packets (``qSupported``, ``qXfer:features:read``, ``qRcmd``,
``QStartNoAckMode``) and E.11 "Interrupts".

The guest is hostile and so is the network: a malformed packet gets an error
reply or is dropped (a bad checksum gets ``-``), a connection that goes away
leaves the machine as it was, and the next connection is accepted.  The
server binds where it is told (the CLI binds 127.0.0.1 only).
"""
from __future__ import annotations

import select
import socket
import threading

from vmlab.vmm.runloop import StopReason

from vmlab.tools.debugger import Debugger, DebuggerError, read_register, write_register

#: largest packet accepted (qSupported PacketSize; longer input is dropped)
MAX_PACKET = 0x4000
SIGINT, SIGTRAP = 2, 5

# (name, bits) in the order of the 'g' packet; QEMU's i386-64bit description
# puts the segment bases, control registers and EFER after the segment
# selectors, then the x87 and SSE state (vmlab reports those as zero).
REGS = ([(n, 64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")]
        + [("eflags", 32)] + [(s, 32) for s in ("cs", "ss", "ds", "es", "fs", "gs")]
        + [(n, 64) for n in ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
        + [(f"st{i}", 80) for i in range(8)]
        + [(n, 32) for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
        + [(f"xmm{i}", 128) for i in range(16)] + [("mxcsr", 32)])
_REG_INDEX = {n: i for i, (n, _) in enumerate(REGS)}
_LIVE = set(n for n, _ in REGS[:_REG_INDEX["efer"] + 1])


def _reg_xml() -> str:
    out = []
    for name, bits in REGS:
        extra = ""
        if name in ("rbp", "rsp"):
            typ = "data_ptr"
        elif name == "rip":
            typ = "code_ptr"
        elif name == "eflags":
            typ = "i386_eflags"
        elif name.startswith("st"):
            typ = "i387_ext"
        elif name.startswith("xmm"):
            typ = "vec128"
        elif name == "mxcsr":
            typ = "i386_mxcsr"
            extra = ' group="vector"'
        elif name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"):
            typ = "int"
            extra = ' group="float"'
        else:
            typ = "int64" if bits == 64 else "int32"
        if name == "xmm0":
            out.append('</feature><feature name="org.gnu.gdb.i386.sse">' + _SSE_TYPES)
        out.append(f'<reg name="{name}" bitsize="{bits}" type="{typ}"{extra}/>')
    return "\n".join(out)


_EFLAGS = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in (
    (0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF"),
    (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID")))
_SSE_TYPES = (
    '<vector id="v8bf16" type="bfloat16" count="8"/><vector id="v4f" type="ieee_single" count="4"/>'
    '<vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/>'
    '<vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/>'
    '<vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v8_bfloat16" type="v8bf16"/><field name="v4_float" type="v4f"/>'
    '<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>'
    '<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>'
    '<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>'
    '<flags id="i386_mxcsr" size="4">' + "".join(
        f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in (
            (0, "IE"), (1, "DE"), (2, "ZE"), (3, "OE"), (4, "UE"), (5, "PE"), (6, "DAZ"), (7, "IM"),
            (8, "DM"), (9, "ZM"), (10, "OM"), (11, "UM"), (12, "PM"), (15, "FZ"))) + '</flags>')

TARGET_XML = ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              '<target><architecture>i386:x86-64</architecture>'
              '<feature name="org.gnu.gdb.i386.core">'
              f'<flags id="i386_eflags" size="4">{_EFLAGS}</flags>'
              + _reg_xml() + '</feature></target>')


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    """$payload#cs with the RSP escapes (E.1: '#', '$', '}' and '*' are escaped)."""
    esc = bytearray()
    for b in payload:
        if b in b"#$}*":
            esc += bytes((0x7D, b ^ 0x20))
        else:
            esc.append(b)
    return b"$" + bytes(esc) + b"#" + b"%02x" % checksum(bytes(esc))


def _unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


class PacketReader:
    """Splits a byte stream into packets, interrupts and acks (E.1).  Never
    raises on bad input: a packet with a bad checksum is reported as None
    (the caller answers '-'), garbage between packets is skipped, and a packet
    longer than MAX_PACKET is dropped."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        """Returns items: bytes (a packet payload), None (bad checksum or
        oversized), or the string "interrupt"."""
        self.buf += data
        out = []
        while self.buf:
            b = self.buf[0]
            if b == 0x03:
                out.append("interrupt")
                del self.buf[0]
                continue
            if b != 0x24:  # '$'
                # acks ('+', '-') and garbage
                j = self.buf.find(b"$")
                k = self.buf.find(b"\x03")
                cut = min(x for x in (j, k, len(self.buf)) if x >= 0)
                del self.buf[:cut]
                continue
            end = self.buf.find(b"#")
            if end < 0:
                if len(self.buf) > MAX_PACKET + 4:
                    out.append(None)
                    self.buf.clear()
                break
            if len(self.buf) < end + 3:
                break
            body = bytes(self.buf[1:end])
            cs = bytes(self.buf[end + 1:end + 3])
            del self.buf[:end + 3]
            try:
                ok = int(cs, 16) == checksum(body)
            except ValueError:
                ok = False
            if not ok or len(body) > MAX_PACKET:
                out.append(None)
                continue
            out.append(_unescape(body))
        return out


class GdbServer:
    """Serves gdb connections one at a time for a Debugger."""

    def __init__(self, dbg: Debugger, host: str = "127.0.0.1", port: int = 1234):
        self.dbg = dbg
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None
        self.noack = False
        self.killed = False
        self.last_stop = None
        self._pending_conn: socket.socket | None = None

    def close(self) -> None:
        for s in (self.conn, self._pending_conn, self.sock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    # ------------------------------------------------------------------ top level
    def serve(self, start_stopped: bool = True, max_insns: int | None = None, timeout: float | None = None):
        """Run the machine for gdb until the guest ends, gdb kills it, or the
        machine cannot go on.  Returns the final Stop (None after a kill)."""
        running = not start_stopped
        try:
            while True:
                if running:
                    st = self._run_until_connection(max_insns, timeout)
                    if st is not None and (st.final or st.reason in (StopReason.LIMIT, StopReason.TIMEOUT)):
                        return st
                    running = False
                conn = self._pending_conn
                self._pending_conn = None
                if conn is None:
                    conn, _ = self.sock.accept()
                how = self.session(conn)
                if how == "kill":
                    return None
                if self.dbg.final is not None:
                    return self.dbg.final
                running = how == "detach"
        finally:
            self.close()

    def _run_until_connection(self, max_insns, timeout):
        """Run (no gdb attached) until the guest stops or gdb connects (QEMU
        stops the machine when gdb attaches)."""
        done = threading.Event()

        def watch():
            while not done.is_set():
                r, _, _ = select.select([self.sock], [], [], 0.05)
                if r:
                    try:
                        self._pending_conn, _ = self.sock.accept()
                    except OSError:
                        return
                    while not done.is_set():
                        self.dbg.interrupt()
                        done.wait(0.05)
                    return
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            st = self.dbg.cont(max_insns=max_insns, timeout=timeout)
        finally:
            done.set()
            t.join()
        if self._pending_conn is not None and not st.final:
            return None
        return st

    # ------------------------------------------------------------------ one connection
    def session(self, conn: socket.socket) -> str:
        """Serve one connection; returns "detach", "kill" or "closed"."""
        self.conn = conn
        self.noack = False
        reader = PacketReader()
        conn.settimeout(None)
        try:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return "closed"
                if not data:
                    return "closed"
                for item in reader.feed(data):
                    if item == "interrupt":
                        continue              # stopped already: nothing to interrupt
                    if item is None:
                        self._raw(b"-")
                        continue
                    if not self.noack:
                        self._raw(b"+")
                    how = self._handle(item, reader)
                    if how in ("detach", "kill", "closed"):
                        return how
        finally:
            try:
                conn.close()
            except OSError:
                pass
            self.conn = None

    def _raw(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except (OSError, AttributeError):
            pass

    def send(self, payload: str | bytes) -> None:
        if isinstance(payload, str):
            payload = payload.encode("latin-1")
        self._raw(frame(payload))

    def _handle(self, pkt: bytes, reader: PacketReader):
        try:
            text = pkt.decode("latin-1")
        except Exception:                 # pragma: no cover - latin-1 decodes everything
            self.send("E01")
            return None
        try:
            return self._dispatch(text, pkt, reader)
        except (DebuggerError, ValueError, IndexError, KeyError, OverflowError) as exc:
            self.send("E01" if not isinstance(exc, DebuggerError) else "E14")
            return None

    def _dispatch(self, text: str, pkt: bytes, reader: PacketReader):
        dbg = self.dbg
        c = text[:1]
        if text.startswith("qSupported"):
            self.send(f"PacketSize={MAX_PACKET:x};qXfer:features:read+;vContSupported+;"
                      "QStartNoAckMode+;swbreak+;hwbreak+")
        elif text == "QStartNoAckMode":
            self.send("OK")
            self.noack = True
        elif text.startswith("qXfer:features:read:"):
            annex, _, rng = text[len("qXfer:features:read:"):].partition(":")
            if annex != "target.xml":
                self.send("E00")
                return None
            off, _, length = rng.partition(",")
            off, length = int(off, 16), int(length, 16)
            data = TARGET_XML.encode()
            chunk = data[off:off + min(length, MAX_PACKET - 16)]
            self.send((b"l" if off + len(chunk) >= len(data) else b"m") + chunk)
        elif text == "?":
            self.send(self._stop_reply(dbg.last_stop))
        elif text in ("qAttached",) or text.startswith("qAttached:"):
            self.send("1")
        elif text == "qC":
            self.send("QC1")
        elif text == "qfThreadInfo":
            self.send("m1")
        elif text == "qsThreadInfo":
            self.send("l")
        elif c == "H" or c == "T" or text.startswith("qSymbol"):
            self.send("OK")
        elif text.startswith("qRcmd,"):
            self._monitor(bytes.fromhex(text[6:]).decode("latin-1"))
        elif c == "g":
            self.send("".join(self._reg_hex(i) for i in range(len(REGS))))
        elif c == "G":
            self._write_all(text[1:])
            self.send("OK")
        elif c == "p":
            i = int(text[1:], 16)
            if not 0 <= i < len(REGS):
                self.send("E00")
            else:
                self.send(self._reg_hex(i))
        elif c == "P":
            n, _, val = text[1:].partition("=")
            i = int(n, 16)
            if not 0 <= i < len(REGS):
                self.send("E00")
            else:
                self._write_reg(i, val)
                self.send("OK")
        elif c == "m":
            addr, _, length = text[1:].partition(",")
            addr, length = int(addr, 16), int(length, 16)
            if length > MAX_PACKET // 2:
                length = MAX_PACKET // 2
            try:
                self.send(dbg.read(addr, length).hex())
            except DebuggerError:
                self.send("E14")
        elif c == "M":
            head, _, data = text[1:].partition(":")
            addr, _, length = head.partition(",")
            addr, length = int(addr, 16), int(length, 16)
            raw = bytes.fromhex(data)
            if len(raw) != length:
                self.send("E01")
                return None
            dbg.write(addr, raw)
            self.send("OK")
        elif c == "X":
            # Binary write (gdb RSP "X addr,length:XX..."): the data bytes come
            # after the first ':' of the unescaped packet.  "X addr,0:" is gdb's
            # probe for the packet's support.
            colon = pkt.find(b":")
            if colon < 0:
                self.send("E01")
                return None
            addr, _, length = pkt[1:colon].decode("latin-1").partition(",")
            addr, length = int(addr, 16), int(length, 16)
            raw = bytes(pkt[colon + 1:])
            if len(raw) != length:
                self.send("E01")
                return None
            if raw:
                dbg.write(addr, raw)
            self.send("OK")
        elif c in "Zz" and len(text) > 1 and text[1] in "01234":
            self._points(text)
        elif text == "vCont?":
            self.send("vCont;c;C;s;S")
        elif text.startswith("vCont;"):
            actions = [a.split(":")[0] for a in text[6:].split(";")]
            if not actions or any(not a or a[0] not in "cCsS" for a in actions):
                self.send("E01")
                return None
            step = any(a[:1] in ("s", "S") for a in actions)
            return self._resume(step, reader)
        elif c in "cC":
            return self._resume(False, reader)
        elif c in "sS":
            return self._resume(True, reader)
        elif c == "D":
            self.send("OK")
            return "detach"
        elif c == "k":
            self.killed = True
            return "kill"
        elif text.startswith("vKill"):
            self.send("OK")
            self.killed = True
            return "kill"
        else:
            self.send("")                 # E.2: an empty reply means "not supported"
        return None

    # ------------------------------------------------------------------ registers
    def _reg_value(self, i: int) -> int:
        name, bits = REGS[i]
        if name in _LIVE:
            v = read_register(self.dbg.cpu, "kernel_gs_base" if name == "k_gs_base" else name)
        elif name == "fctrl":
            v = 0x37F
        elif name == "mxcsr":
            v = 0x1F80
        else:
            v = 0
        return v & ((1 << bits) - 1)

    def _reg_hex(self, i: int) -> str:
        bits = REGS[i][1]
        return self._reg_value(i).to_bytes(bits // 8, "little").hex()

    def _write_reg(self, i: int, hexval: str) -> None:
        name, bits = REGS[i]
        raw = bytes.fromhex(hexval)
        if len(raw) != bits // 8:
            raise ValueError("bad register size")
        v = int.from_bytes(raw, "little")
        if name not in _LIVE:
            return                      # x87/SSE state is not modelled: writes are ignored
        if v == self._reg_value(i):
            return
        write_register(self.dbg.cpu, "kernel_gs_base" if name == "k_gs_base" else name, v)

    def _write_all(self, hexdata: str) -> None:
        raw = bytes.fromhex(hexdata)
        off = 0
        for i, (name, bits) in enumerate(REGS):
            n = bits // 8
            if off + n > len(raw):
                break
            self._write_reg(i, raw[off:off + n].hex())
            off += n

    # ------------------------------------------------------------------ break/watch
    def _points(self, text: str) -> None:
        dbg = self.dbg
        kind = int(text[1])
        parts = text[3:].split(";")[0].split(",")
        addr, size = int(parts[0], 16), int(parts[1], 16) if len(parts) > 1 else 1
        insert = text[0] == "Z"
        if kind in (0, 1):
            if insert:
                if dbg.breakpoint_at(addr) is None:
                    dbg.break_at(addr)
            else:
                p = dbg.breakpoint_at(addr)
                if p is not None:
                    dbg.delete(p.num)
            self.send("OK")
            return
        wkind = {2: "watch", 3: "rwatch", 4: "awatch"}[kind]
        if insert:
            dbg.watch(addr, max(1, min(size, 4096)), wkind)
        else:
            for p in list(dbg.table.values()):
                if p.kind == wkind and p.addr == addr and not p.physical:
                    dbg.delete(p.num)
                    break
        self.send("OK")

    # ------------------------------------------------------------------ running
    def _resume(self, step: bool, reader: PacketReader):
        dbg = self.dbg
        if dbg.final is not None:
            self.send(self._stop_reply(dbg.final))
            return None
        if step:
            st = dbg.step(1)
        else:
            st = self._cont_interruptible(reader)
            if st is None:
                return "closed"
        self.send(self._stop_reply(st))
        return None

    def _cont_interruptible(self, reader: PacketReader):
        """continue while a helper thread watches the socket: 0x03 interrupts
        the guest, a closed connection too (the session then ends)."""
        dbg, conn = self.dbg, self.conn
        done = threading.Event()
        state = {"closed": False}

        def watch():
            asked = False
            while not done.is_set():
                try:
                    r, _, _ = select.select([conn], [], [], 0.05)
                except (OSError, ValueError):
                    r = []
                    state["closed"] = True
                if r:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        state["closed"] = True
                    else:
                        items = reader.feed(data)
                        if "interrupt" in items:
                            asked = True
                if asked or state["closed"]:
                    dbg.interrupt()           # repeated until the run ends (see vmlab_request_slow_path)
                    asked = True
                    if state["closed"]:
                        done.wait(0.05)
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            st = dbg.cont()
        finally:
            done.set()
            t.join()
        if state["closed"]:
            return None
        return st

    def _stop_reply(self, st) -> str:
        if st is None:
            return f"T{SIGTRAP:02x}thread:01;"
        if st.final:
            res = st.result
            if res is not None and res.reason == StopReason.DEBUG_EXIT and res.status is not None:
                return f"W{res.status & 0xFF:02x}"
            from vmlab.tools.debugcli import exit_status
            return f"W{exit_status(res) & 0xFF:02x}"
        if st.reason == StopReason.INTERRUPTED:
            return f"T{SIGINT:02x}thread:01;"
        if st.reason == StopReason.WATCHPOINT and st.point is not None:
            key = {"watch": "watch", "rwatch": "rwatch", "awatch": "awatch"}[st.point.kind]
            return f"T{SIGTRAP:02x}{key}:{st.point.addr:x};thread:01;"
        if st.reason == StopReason.BREAKPOINT:
            return f"T{SIGTRAP:02x}swbreak:;thread:01;"
        return f"T{SIGTRAP:02x}thread:01;"

    def _monitor(self, command: str) -> None:
        from vmlab.tools.debugrepl import execute
        out = execute(self.dbg, command)
        for i in range(0, len(out), 1024):
            self.send("O" + out[i:i + 1024].encode("latin-1", "replace").hex())
        self.send("OK")
