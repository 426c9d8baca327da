"""Reaching the CPU state Unicorn 2.1.4 keeps but its API does not expose.

Unicorn's API does not give segment caches, CPL, the error code of an exception
it raised, or QEMU's "exception in flight" field.  They live in QEMU's
``CPUX86State``, which vmlab reads and writes in place:

* **Where it is** -- by following the engine's own pointers, per engine:
  ``Uc._uch`` is the ``uc_engine *`` (Unicorn's ``struct uc_struct``), whose
  ``cpu`` field points at the ``X86CPU``; its ``CPUState.env_ptr`` points at
  the ``CPUX86State`` embedded in that same ``X86CPU`` (QEMU 5 lays an
  ``X86CPU`` out as CPUState, CPUNegativeOffsetState, CPUX86State).  Both
  routes must agree and the register file must follow ``reg_write``, or the
  vCPU refuses to start.  Every pointer is read through :func:`peek`, which
  the kernel checks, so a wrong offset is an error message, not a crash.
* **The fields inside it** -- at fixed offsets (``CPUX86State`` of QEMU 5.0's
  target/i386/cpu.h in Unicorn 2.1.4's x86_64 build), each checked once per
  process by :func:`verified_layout`, which runs a stub whose effect on every
  field is known (segment loads, LLDT, LTR, far returns into 64-bit,
  compatibility and ring-3 code, a #GP with a known error code, INT n).

``ContextLayout`` gives the fields' offsets inside a ``uc_context`` blob (what
``uc_context_save`` fills: a 40-byte header, then a copy of ``CPUX86State``
from its start), the form the native module takes them in; the live state is
at ``env_address - layout.env`` in the same terms.

This is internal layout, so vmlab also refuses to start on any other Unicorn
than the pinned one (:func:`check_unicorn_version`).
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import unicorn
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc
from unicorn import x86_const as X

from .errors import NativeError

#: The Unicorn release whose internal layout this module knows.
PINNED_UNICORN = (2, 1, 4)

# --- Unicorn 2.1.4 engine structures (x86_64 Linux build).  Measured by following
# pointers from a handle to the register file (RAX written through the API) and
# checked against QEMU 5's X86CPU: CPUState holds a 200-byte sigjmp_buf before
# env_ptr and a 4096-entry tb_jmp_cache (32 KiB) after it, which puts env past
# 0x8000.  Checked per engine by find_env_address.
UC_STRUCT_CPU = 0x1B8          # uc_struct.cpu          (CPUState *, the X86CPU)
CPUSTATE_ENV_PTR = 0x128       # CPUState.env_ptr       (CPUX86State *)
X86CPU_ENV = 0x8A50            # offsetof(X86CPU, env)

# --- CPUX86State fields (QEMU 5.0 target/i386/cpu.h, TARGET_X86_64: target_ulong
# is 8 bytes).  regs[16], eip, eflags, cc_dst, cc_src, cc_src2 (8 bytes each),
# cc_op, df (4 each), then hflags, hflags2; segs[6], ldt, tr are SegmentCache
# {u32 selector; u64 base; u32 limit; u32 flags} (24 bytes with padding).
# error_code, exception_is_int, exception_next_eip, dr[8], bp[4], old_exception
# follow each other after the FPU/SSE/MSR state.
ENV_HFLAGS = 176
ENV_SEGS = 184
SEG_SIZE = 24
ENV_LDT = ENV_SEGS + 6 * SEG_SIZE          # 328
ENV_TR = ENV_LDT + SEG_SIZE                # 352
ENV_ERROR_CODE = 5384
ENV_IS_INT = ENV_ERROR_CODE + 4
ENV_OLD_EXCEPTION = ENV_ERROR_CODE + 112   # + next_eip (8, aligned) + dr[8] + bp[4]
# What the bulk register read (native vmlab_regs_read) takes in place: eip after
# regs[16]; gdt and idt (SegmentCache) after tr, then cr[] -- nine entries in
# Unicorn's copy of QEMU 5 (cr[8] added; measured: a20_mask's reset value
# 0xffffffff follows at +72); then int32 a20_mask, BNDReg bnd_regs[4] (16
# bytes each, 8-aligned), BNDCSReg (16), u64 msr_bndcfgs, then efer (found by
# writing EFER through the API); dr[8] after exception_next_eip.
ENV_EIP = 128
ENV_GDT = ENV_TR + SEG_SIZE                # 376
ENV_IDT = ENV_GDT + SEG_SIZE               # 400
ENV_CR = ENV_IDT + SEG_SIZE                # 424
ENV_EFER = ENV_CR + 9 * 8 + 8 + 4 * 16 + 16 + 8   # 592
ENV_DR = ENV_ERROR_CODE + 16               # 5400
# RFLAGS is computed as QEMU's cpu_compute_eflags does (exported by Unicorn as
# cpu_cc_compute_all_x86_64): eflags | cc_compute_all(env, cc_op) | (df & DF).
ENV_EFLAGS, ENV_CC_OP, ENV_DF = 136, 168, 172
#: CR8 is cr[8] (what the API reads and writes, measured); IA32_KERNEL_GS_BASE
#: (env->kernelgsbase) found by writing the MSR through the API
ENV_KERNEL_GS_BASE = 4864
#: uc_context header before the copy of CPUX86State (Unicorn 2.1.4 uc_priv.h:
#: size_t context_size; uc_mode mode; uc_arch arch; int snapshot_level;
#: bool ramblock_freed; RAMBlock *last_block; FlatView *fv)
CONTEXT_HEADER = 40

_HF_CPL, _HF_CS32, _HF_SS32, _HF_LMA, _HF_CS64 = 3, 1 << 4, 1 << 5, 1 << 14, 1 << 15
_GPRS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX)


@dataclass(frozen=True)
class ContextLayout:
    """Offsets of CPUX86State fields inside a uc_context blob (see module doc)."""
    env: int             # CPUX86State.regs[0]
    hflags: int
    segs: int
    ldt: int
    tr: int
    error_code: int
    is_int: int
    old_exception: int
    eip: int
    gdt: int             # SegmentCache gdt; idt follows it
    cr: int              # target_ulong cr[9] (Unicorn's)
    efer: int
    dr: int              # target_ulong dr[8]
    kernel_gs_base: int


LAYOUT = ContextLayout(env=CONTEXT_HEADER, hflags=CONTEXT_HEADER + ENV_HFLAGS, segs=CONTEXT_HEADER + ENV_SEGS,
                       ldt=CONTEXT_HEADER + ENV_LDT, tr=CONTEXT_HEADER + ENV_TR,
                       error_code=CONTEXT_HEADER + ENV_ERROR_CODE, is_int=CONTEXT_HEADER + ENV_IS_INT,
                       old_exception=CONTEXT_HEADER + ENV_OLD_EXCEPTION, eip=CONTEXT_HEADER + ENV_EIP,
                       gdt=CONTEXT_HEADER + ENV_GDT, cr=CONTEXT_HEADER + ENV_CR, efer=CONTEXT_HEADER + ENV_EFER,
                       dr=CONTEXT_HEADER + ENV_DR, kernel_gs_base=CONTEXT_HEADER + ENV_KERNEL_GS_BASE)


# ---------------------------------------------------------------------- version
def check_unicorn_version() -> None:
    """Raise NativeError (one line) unless the binding and the library loaded are
    the pinned Unicorn: the offsets above belong to that build only."""
    want = ".".join(map(str, PINNED_UNICORN))
    binding = getattr(unicorn, "__version__", "?")
    try:
        combined = unicorn.uc_version()[2]      # major << 24 | minor << 16 | patch << 8 | extra
        core = f"{combined >> 24}.{(combined >> 16) & 0xFF}.{(combined >> 8) & 0xFF}"
    except Exception:                           # pragma: no cover - a very different binding
        core = "?"
    if binding != want or core != want:
        raise NativeError(f"vmlab needs unicorn=={want} (its CPU-state layout is pinned); "
                          f"found binding {binding}, library {core}: run `pip install unicorn=={want}`")


# ---------------------------------------------------------------------- bounded reads
_libc = ctypes.CDLL(None, use_errno=True)
_libc.write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_libc.write.restype = ctypes.c_ssize_t
_PEEK_MAX = 1 << 16      # a pipe holds 64 KiB by default (pipe(7))


def peek(addr: int, size: int) -> bytes | None:
    """``size`` bytes at host address ``addr``, or None if they are not all
    readable.  The kernel copies them into a pipe and reports EFAULT for an
    unmapped address instead of the process faulting."""
    if not (0 < size <= _PEEK_MAX and 0x1000 <= addr and addr + size <= 1 << 47):
        return None
    r, w = os.pipe()
    try:
        if _libc.write(w, addr, size) != size:
            return None
        return os.read(r, size)
    finally:
        os.close(r)
        os.close(w)


def _peek_u64(addr: int) -> int | None:
    raw = peek(addr, 8)
    return None if raw is None else struct.unpack("<Q", raw)[0]


# ---------------------------------------------------------------------- per engine
def find_env_address(uc: Uc) -> int:
    """Host address of this engine's live CPUX86State (its regs[0]), by following
    uc_struct.cpu and CPUState.env_ptr.  Checks that env_ptr points inside the
    X86CPU where QEMU embeds env, and that RAX-RBX there follow two different
    values written through the API.  Raises NativeError (one line) otherwise."""
    # Unicorn 2 creates the CPU lazily, on the first call that needs it (uc_init):
    # this read makes sure uc_struct.cpu is set before it is followed.
    saved = [uc.reg_read(r) for r in _GPRS]
    handle = uc._uch.value
    cpu = _peek_u64(handle + UC_STRUCT_CPU) if handle else None
    env = _peek_u64(cpu + CPUSTATE_ENV_PTR) if cpu else None
    if env is None or env != cpu + X86CPU_ENV:
        raise NativeError(f"Unicorn's CPU state is not where unicorn=={'.'.join(map(str, PINNED_UNICORN))} "
                          f"keeps it (uc_struct.cpu -> env_ptr gave {env and hex(env)}, expected cpu + {X86CPU_ENV:#x})")
    try:
        for marks in ((0x5A17E0C0FFEE0001, 0x5A17E0C0FFEE0002, 0x5A17E0C0FFEE0003, 0x5A17E0C0FFEE0004),
                      (0x0123456789ABCDEF, 0x1122334455667788, 0x99AABBCCDDEEFF00, 0x0F1E2D3C4B5A6978)):
            for r, val in zip(_GPRS, marks):
                uc.reg_write(r, val)
            if peek(env, 32) != struct.pack("<4Q", *marks):
                raise NativeError(f"Unicorn's register file is not at env_ptr ({env:#x}); "
                                  f"vmlab needs unicorn=={'.'.join(map(str, PINNED_UNICORN))}")
    finally:
        for r, val in zip(_GPRS, saved):
            uc.reg_write(r, val)
    return env


# ---------------------------------------------------------------------- the self-test
def _desc(base: int, limit: int, access: int, flags: int) -> int:
    """A segment descriptor quadword (SDM Vol. 3A 3.4.5): access byte, flags nibble (G D/B L AVL)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) | (((limit >> 16) & 0xF) << 48)
            | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def _sys_desc(base: int, limit: int, access: int) -> tuple[int, int]:
    """A 16-byte long-mode system descriptor (LDT, TSS; SDM Vol. 3A 7.2.3)."""
    return _desc(base & 0xFFFFFFFF, limit, access, 0), base >> 32


def _cache(desc: int, selector: int, base_hi: int = 0) -> tuple[int, int, int, int]:
    """(selector, base, limit, flags) QEMU's segment cache holds after loading
    ``desc`` (target/i386/seg_helper.c: flags = the descriptor's high dword)."""
    lo, hi = desc & 0xFFFFFFFF, desc >> 32
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000) | (base_hi << 32)
    limit = (lo & 0xFFFF) | (hi & 0x000F0000)
    if hi & (1 << 23):
        limit = (limit << 12) | 0xFFF
    return selector, base, limit, hi


# Selectors of the self-test's GDT, and what each holds.  Every data segment
# differs in selector, base and limit, so a cache read at the wrong index or a
# wrong field offset cannot match.  All have the accessed bit set already.
_SEL_CS64, _SEL_CS32, _SEL_FLAT, _SEL_ES, _SEL_DS, _SEL_FS, _SEL_GS, _SEL_SS16 = range(0x08, 0x48, 8)
_SEL_CS3, _SEL_SS3, _SEL_LDT, _SEL_TSS = 0x48, 0x50, 0x58, 0x68
#: selector past the GDT's limit: loading it raises #GP(selector & ~3) (SDM Vol. 2A MOV)
_SEL_BAD = 0x1A8
_LDT_BASE, _TSS_BASE = 0x00007F12_89ABCDEF, 0x00007E00_12345678
_GDT = {
    _SEL_CS64: _desc(0, 0xFFFFF, 0x9B, 0xA),        # 64-bit code, DPL 0
    _SEL_CS32: _desc(0, 0xFFFFF, 0x9B, 0xC),        # 32-bit code, DPL 0
    _SEL_FLAT: _desc(0, 0xFFFFF, 0x93, 0xC),        # flat 32-bit data (B=1)
    _SEL_ES: _desc(0x11223344, 0x01234, 0x93, 0x4),
    _SEL_DS: _desc(0x22334455, 0x02345, 0x93, 0x4),
    _SEL_FS: _desc(0x33445566, 0x03456, 0x93, 0x0),
    _SEL_GS: _desc(0x44556677, 0x04567, 0x93, 0x8),  # G=1: limit 0x4567fff
    _SEL_SS16: _desc(0x00050000, 0x0FFFF, 0x93, 0x0),  # 16-bit stack (B=0)
    _SEL_CS3: _desc(0, 0xFFFFF, 0xFB, 0xC),         # 32-bit code, DPL 3
    _SEL_SS3: _desc(0, 0xFFFFF, 0xF3, 0xC),         # flat data, DPL 3
}
_LDT_DESC = _sys_desc(_LDT_BASE, 0x0FF7, 0x82)        # LDT (type 2)
_TSS_DESC = _sys_desc(_TSS_BASE, 0x0067, 0x89)        # available 64-bit TSS (type 9)
_GDT_LIMIT = _SEL_TSS + 16 - 1
_CODE64, _CS_ENTRY, _CODE32, _RING3, _GDTR, _GDT_BASE, _STACK = (
    0x1000, 0x1080, 0x1100, 0x1200, 0x1800, 0x1810, 0x1F00)
_CMP = 0x1300


@lru_cache(maxsize=None)
def _stub() -> dict[int, bytes]:
    """The self-test's code, by address.  Each HLT ends emu_start at a point
    where the checks below know what every field must hold."""
    from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks
    k64, k32 = Ks(KS_ARCH_X86, KS_MODE_64), Ks(KS_ARCH_X86, KS_MODE_32)
    loads = "".join(f"mov ax, {sel:#x}; mov {reg}, ax; " for reg, sel in
                    (("es", _SEL_ES), ("ds", _SEL_DS), ("fs", _SEL_FS), ("gs", _SEL_GS), ("ss", _SEL_FLAT)))
    a = bytes(k64.asm(f"mov rax, {_GDTR:#x}; lgdt [rax]; {loads}"
                      f"mov ax, {_SEL_LDT:#x}; lldt ax; mov ax, {_SEL_TSS:#x}; ltr ax; "
                      f"mov rsp, {_STACK:#x}; push {_SEL_CS64:#x}; mov rax, {_CS_ENTRY:#x}; push rax; "
                      ".byte 0x48, 0xcb", _CODE64)[0])                                    # retfq
    # stop A (64-bit, CPL 0), then a far return into compatibility mode
    b = bytes(k64.asm(f"hlt; push {_SEL_CS32:#x}; mov rax, {_CODE32:#x}; push rax; .byte 0x48, 0xcb",
                      _CS_ENTRY)[0])
    # stop B (32-bit code, 32-bit stack), stop C (16-bit stack), then to ring 3
    c = bytes(k32.asm(f"hlt; mov ax, {_SEL_SS16:#x}; mov ss, ax; hlt; "
                      f"mov ax, {_SEL_FLAT:#x}; mov ss, ax; mov esp, {_STACK:#x}; "
                      f"push {_SEL_SS3 | 3:#x}; push {_STACK - 0x100:#x}; push {_SEL_CS3 | 3:#x}; "
                      f"push {_RING3:#x}; retf", _CODE32)[0])
    # ring 3: #GP(_SEL_BAD) at the MOV DS (stops D..F), then INT 0x42 (stop G)
    d = bytes(k32.asm(f"mov ax, {_SEL_BAD:#x}; .byte 0x8e, 0xd8; int 0x42; hlt", _RING3)[0])   # 8E D8: mov ds, ax
    gdt = bytearray(_GDT_LIMIT + 1)
    for sel, q in _GDT.items():
        struct.pack_into("<Q", gdt, sel, q)
    struct.pack_into("<2Q", gdt, _SEL_LDT, *_LDT_DESC)
    struct.pack_into("<2Q", gdt, _SEL_TSS, *_TSS_DESC)
    cmp = bytes(k64.asm("mov rax, 5; mov rbx, 7; std; cmp rax, rbx; hlt", _CMP)[0])
    return {_CODE64: a, _CS_ENTRY: b, _CODE32: c, _RING3: d, _CMP: cmp,
            _GDTR: struct.pack("<HQ", _GDT_LIMIT, _GDT_BASE), _GDT_BASE: bytes(gdt)}


class _Probe:
    """The self-test engine: runs the stub stop by stop and reads fields in place."""

    def __init__(self):
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x10000)
        for addr, data in _stub().items():
            uc.mem_write(addr, data)
        self.env = find_env_address(uc)
        self.intr: list[int] = []
        uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _on_intr(self, uc, intno, _data):
        self.intr.append(intno)
        uc.emu_stop()

    def run(self, at: int) -> None:
        self.intr.clear()
        self.uc.emu_start(at, 0)

    def u32(self, off: int) -> int:
        return struct.unpack("<I", peek(self.env + off, 4))[0]

    def i32(self, off: int) -> int:
        return struct.unpack("<i", peek(self.env + off, 4))[0]

    def seg(self, off: int) -> tuple[int, int, int, int]:
        sel, base, limit, flags = struct.unpack("<I4xQII", peek(self.env + off, SEG_SIZE))
        return sel, base, limit, flags

    def close(self) -> None:
        release = getattr(self.uc, "_Uc__finalizer", None)   # the binding's own uc_close, run once
        if release is not None:
            release()
        self.uc = None


def _expect(what: str, got, want) -> None:
    if got != want:
        fmt = (lambda v: "(" + ", ".join(f"{x:#x}" for x in v) + ")") if isinstance(want, tuple) else hex
        raise NativeError(f"Unicorn CPU-state self-test failed: {what} is {fmt(got)}, expected {fmt(want)} "
                          f"(vmlab needs unicorn=={'.'.join(map(str, PINNED_UNICORN))})")


def _check_register_fields(p: _Probe) -> None:
    """The fields the bulk register read takes in place (RIP, CR0-CR4, GDTR,
    IDTR, EFER, DR0-DR7) hold what the API reads: first as the stub left them
    (64-bit mode, a GDT loaded), then after distinct values written through the
    API (each field a different value, so a swapped or shifted offset cannot
    match)."""
    uc = p.uc
    q = lambda off: struct.unpack("<Q", peek(p.env + off, 8))[0]     # noqa: E731

    from unicorn.unicorn_py3.unicorn import uclib
    cc_all = uclib.cpu_cc_compute_all_x86_64
    cc_all.argtypes, cc_all.restype = (ctypes.c_void_p, ctypes.c_int), ctypes.c_uint32

    def check(when: str) -> None:
        _expect(f"eip ({when})", q(ENV_EIP), uc.reg_read(X.UC_X86_REG_RIP))
        rflags = q(ENV_EFLAGS) | cc_all(p.env, p.u32(ENV_CC_OP)) | (p.u32(ENV_DF) & 0x400)
        _expect(f"rflags from eflags, cc_op, df ({when})", rflags, uc.reg_read(X.UC_X86_REG_RFLAGS))
        _expect(f"kernelgsbase ({when})", q(ENV_KERNEL_GS_BASE), uc.reg_read(X.UC_X86_REG_MSR, 0xC0000102))
        for n, reg in ((0, X.UC_X86_REG_CR0), (2, X.UC_X86_REG_CR2), (3, X.UC_X86_REG_CR3), (4, X.UC_X86_REG_CR4),
                       (8, X.UC_X86_REG_CR8)):
            _expect(f"cr[{n}] ({when})", q(ENV_CR + 8 * n), uc.reg_read(reg))
        for name, off, reg in (("gdt", ENV_GDT, X.UC_X86_REG_GDTR), ("idt", ENV_IDT, X.UC_X86_REG_IDTR)):
            _, base, limit, _ = uc.reg_read(reg)
            _expect(f"{name} base ({when})", q(off + 8), base)
            _expect(f"{name} limit ({when})", p.u32(off + 16) & 0xFFFF, limit)
        _expect(f"efer ({when})", q(ENV_EFER), uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080))
        for n, reg in ((0, X.UC_X86_REG_DR0), (1, X.UC_X86_REG_DR1), (2, X.UC_X86_REG_DR2), (3, X.UC_X86_REG_DR3),
                       (6, X.UC_X86_REG_DR6), (7, X.UC_X86_REG_DR7)):
            _expect(f"dr[{n}] ({when})", q(ENV_DR + 8 * n), uc.reg_read(reg))

    check("stop A")
    saved = {reg: uc.reg_read(reg) for reg in (X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS, X.UC_X86_REG_RAX,
                                                X.UC_X86_REG_RBX, X.UC_X86_REG_CR2, X.UC_X86_REG_IDTR,
                                                X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2,
                                                X.UC_X86_REG_DR3, X.UC_X86_REG_DR7)}
    uc.reg_write(X.UC_X86_REG_RIP, 0x1FF0)
    uc.reg_write(X.UC_X86_REG_CR2, 0x00007C2C_2C2C2000)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x00007D1D_71D71000, 0x0FFF, 0))
    for n, reg in enumerate((X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3)):
        uc.reg_write(reg, 0x00007DD0_00000000 + 0x1000 * (n + 1))
    uc.reg_write(X.UC_X86_REG_DR7, 0x0000_0455)
    uc.reg_write(X.UC_X86_REG_CR8, 0xB)
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000102, 0x00007E6B_5B5E5000))
    check("values written through the API")
    p.run(_CMP)                                      # flags QEMU keeps lazily: a CMP, then HLT
    check("after a CMP")
    uc.reg_write(X.UC_X86_REG_CR8, 0)
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000102, 0))
    for reg, val in saved.items():
        uc.reg_write(reg, val)


def self_test() -> ContextLayout:
    """Run the stub on an engine of its own and check every offset vmlab uses
    against its known effect; returns the layout or raises NativeError."""
    check_unicorn_version()
    p = _Probe()
    try:
        seg = lambda i: ENV_SEGS + SEG_SIZE * i          # noqa: E731  (ES CS SS DS FS GS)
        p.run(_CODE64)                                   # stop A: segment loads, LLDT, LTR, far return to 64-bit
        _expect("rip after stop A", p.uc.reg_read(X.UC_X86_REG_RIP), _CS_ENTRY + 1)
        for i, sel in ((0, _SEL_ES), (3, _SEL_DS), (4, _SEL_FS), (5, _SEL_GS), (2, _SEL_FLAT)):
            _expect(f"segs[{i}]", p.seg(seg(i)), _cache(_GDT[sel], sel))
        _expect("segs[1] (CS)", p.seg(seg(1)), _cache(_GDT[_SEL_CS64], _SEL_CS64))
        _expect("ldt", p.seg(ENV_LDT), _cache(_LDT_DESC[0], _SEL_LDT, _LDT_DESC[1]))
        # LTR loads the cache from the descriptor as it was (type 9, available) and
        # then marks the descriptor in the GDT busy (type 11; seg_helper.c helper_ltr).
        _expect("tr", p.seg(ENV_TR), _cache(_TSS_DESC[0], _SEL_TSS, _TSS_DESC[1]))
        _expect("TSS descriptor after LTR", struct.unpack("<Q", p.uc.mem_read(_GDT_BASE + _SEL_TSS, 8))[0],
                _TSS_DESC[0] | (2 << 40))
        _expect("hflags (64-bit, CPL 0)", p.u32(ENV_HFLAGS) & (_HF_CPL | _HF_CS32 | _HF_SS32 | _HF_LMA | _HF_CS64),
                _HF_LMA | _HF_CS64 | _HF_CS32 | _HF_SS32)
        _expect("old_exception at reset", p.i32(ENV_OLD_EXCEPTION), -1)
        _check_register_fields(p)
        blob = bytes(p.uc.context_save())
        _expect("context copy of CPUX86State", blob[CONTEXT_HEADER:CONTEXT_HEADER + ENV_OLD_EXCEPTION + 4] ==
                peek(p.env, ENV_OLD_EXCEPTION + 4), True)

        p.run(_CS_ENTRY + 1)                             # stop B: compatibility mode, 32-bit stack
        _expect("segs[1] (CS) in compatibility mode", p.seg(seg(1)), _cache(_GDT[_SEL_CS32], _SEL_CS32))
        _expect("hflags (compatibility mode)", p.u32(ENV_HFLAGS) & (_HF_CPL | _HF_CS32 | _HF_SS32 | _HF_LMA | _HF_CS64),
                _HF_LMA | _HF_CS32 | _HF_SS32)
        p.run(p.uc.reg_read(X.UC_X86_REG_RIP))          # stop C: 16-bit stack segment
        _expect("segs[2] (SS, 16-bit)", p.seg(seg(2)), _cache(_GDT[_SEL_SS16], _SEL_SS16))
        _expect("hflags (16-bit stack)", p.u32(ENV_HFLAGS) & (_HF_CPL | _HF_CS32 | _HF_SS32 | _HF_CS64),
                _HF_CS32)

        fault_rip = _RING3 + 4                           # MOV DS, AX (2 bytes) after MOV AX, imm16 (66 B8 iw)
        p.run(p.uc.reg_read(X.UC_X86_REG_RIP))          # stop D: ring 3, #GP(_SEL_BAD)
        _expect("interrupt at stop D", tuple(p.intr), (13,))
        _expect("rip of the #GP", p.uc.reg_read(X.UC_X86_REG_RIP), fault_rip)
        _expect("hflags CPL in ring 3", p.u32(ENV_HFLAGS) & _HF_CPL, 3)
        _expect("segs[1] (CS) in ring 3", p.seg(seg(1)), _cache(_GDT[_SEL_CS3], _SEL_CS3 | 3))
        _expect("segs[2] (SS) in ring 3", p.seg(seg(2)), _cache(_GDT[_SEL_SS3], _SEL_SS3 | 3))
        _expect("error_code of #GP", p.u32(ENV_ERROR_CODE), _SEL_BAD & ~3)
        _expect("exception_is_int after a fault", p.u32(ENV_IS_INT), 0)
        _expect("old_exception after #GP", p.i32(ENV_OLD_EXCEPTION), 13)
        # Left stale, the next contributory fault becomes a double fault (SDM Vol. 3A
        # Table 6-5) ...
        p.run(fault_rip)                                 # stop E
        _expect("interrupt after a stale #GP", tuple(p.intr), (8,))
        _expect("error_code of #DF", p.u32(ENV_ERROR_CODE), 0)
        # ... and cleared through the layout, it is an ordinary #GP again.
        ctypes.c_int32.from_address(p.env + ENV_OLD_EXCEPTION).value = -1
        p.run(fault_rip)                                 # stop F
        _expect("interrupt after old_exception = -1", tuple(p.intr), (13,))
        _expect("error_code of the second #GP", p.u32(ENV_ERROR_CODE), _SEL_BAD & ~3)
        ctypes.c_int32.from_address(p.env + ENV_OLD_EXCEPTION).value = -1
        p.run(fault_rip + 2)                             # stop G: INT 0x42
        _expect("interrupt at stop G", tuple(p.intr), (0x42,))
        _expect("exception_is_int after INT n", p.u32(ENV_IS_INT), 1)
    finally:
        p.close()
    return LAYOUT


def verified_layout() -> ContextLayout:
    """The layout, self-tested once per process (offsets are properties of the
    library; the env pointer is found per engine by find_env_address).  The
    version check runs on every call: it is cheap, and a refused start stays
    refused."""
    check_unicorn_version()
    return _tested_layout()


@lru_cache(maxsize=None)
def _tested_layout() -> ContextLayout:
    return self_test()
