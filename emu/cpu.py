"""The vCPU: one x86 CPU over a Unicorn engine, with vmlab's soft-MMU and hooks.

A Vcpu owns a UC_MODE_64 Unicorn engine (the only mode whose register API reaches
every register in every mode), maps guest RAM into it without copies, registers
the native hooks (TLB fill, block, interrupt, CPUID/RDTSC) and returns exit values
from ``run()``.  It knows nothing of devices or of the VMM.
"""
from __future__ import annotations

import struct
import time
from functools import lru_cache
from typing import Callable

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import unicorn_const as ucc
from unicorn import x86_const as X

from . import x86
from .errors import ClosedError, ConfigError, NativeError, UnsupportedError
from .debugpoints import debug_exit
from .decode import decode_site, fault_address, mmio_access, noncanonical_vector, site_exit
from .fastpath import Policy, exception_exit
from .pio import PORTS
from .exits import (DeadlineExit, EptExit, ExceptionExit, Exit, HltExit, InternalErrorExit, IrqWindowExit, PolicyExit,
                    RetryExit, TaskSwitchExit, TrapExit)
from .memory import HIGH_RAM_BASE, GuestMemory
from .native import ensure_api, ffi, lib
from .qemu_state import find_env_address, verified_layout

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPR_INDEX = {n: i for i, n in enumerate(GPR_NAMES)}
# write-mask bits of vmlab_regs_write (native/hooks.c)
#: indices of RIP and RFLAGS in Vcpu.regs_q (vmlab_regs: gpr[16], rip, rflags)
REGS_Q_RIP, REGS_Q_RFLAGS = 16, 17
if ffi.offsetof("vmlab_regs", "rip") != 8 * REGS_Q_RIP or ffi.offsetof("vmlab_regs", "rflags") != 8 * REGS_Q_RFLAGS:
    raise ImportError("vmlab_regs layout: gpr[16], rip, rflags expected first (native/vmlab.h)")
_M_RIP, _M_RFLAGS, _M_CR2, _M_FSBASE, _M_GSBASE, _M_KGSBASE, _M_GDTR, _M_IDTR, _M_DR = (
    1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24)

ACC_READ, ACC_WRITE, ACC_USER, ACC_FETCH = 0, 2, 4, 16
WALK_SET_AD, WALK_IMPLICIT_SUP = 1, 2

#: Trap kinds by name -> bit number (native/vmlab.h VMLAB_TRAP_*)
TRAP_KINDS = {
    "rdmsr": 0, "wrmsr": 1, "cr_read": 2, "cr_write": 3, "clts": 4, "lmsw": 5, "invlpg": 6,
    "hlt": 7, "io": 8, "cpuid": 9, "rdtsc": 10, "rdtscp": 11, "rdpmc": 12, "wbinvd": 13,
    "invd": 14, "xsetbv": 15, "mwait": 16, "monitor": 17, "pause": 18, "dr": 19, "desc": 20,
    "rdrand": 21, "rdseed": 22, "vmx": 23, "invpcid": 24, "smsw": 25, "int1": 26, "iret": 27,
    "task": 28,
}
#: Unicorn's CPU model: Broadwell is the oldest model that executes CLAC/STAC
#: (SMAP, which the CPUID model advertises); the default (Haswell) raises #UD
#: for them.  Measured with Unicorn 2.1.4 for every model (tests/unit/test_cpu_model.py).
UNICORN_CPU_MODEL = X.UC_CPU_X86_BROADWELL


def unicorn_model_id(name: str) -> int:
    """UC_CPU_X86_* of a model name (emu.cpuprobe.unicorn_models())."""
    from .cpuprobe import unicorn_models
    models = unicorn_models()
    if name not in models:
        raise ConfigError(f"unknown CPU model {name!r} (vmlab run --cpu help lists them)")
    return models[name]


#: What the machine itself must see to be correct (MSR/CR models, port I/O, TLB).
_STOP_FAST_EXIT = lib.VMLAB_STOP_FAST_EXIT
MACHINE_TRAPS = frozenset({"rdmsr", "wrmsr", "cr_write", "clts", "lmsw", "invlpg", "io", "hlt", "invpcid"})


class EptFault(Exception):
    """An access made on the guest's behalf (event delivery, string I/O) that the
    EPT refused; a VMM turns it into an EPT-violation/misconfiguration exit."""

    def __init__(self, gpa: int, gla: int, qualification: int, misconfig: bool):
        super().__init__(gpa, gla, qualification, misconfig)
        self.gpa, self.gla, self.qualification, self.misconfig = gpa, gla, qualification, misconfig


class GuestFault(Exception):
    """Raised inside emu/ when an access made on the guest's behalf faults; the
    caller turns it into an exception delivered to the guest."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(vector, error_code, cr2)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


@lru_cache(maxsize=None)
def _cs(bits: int) -> Cs:
    md = Cs(CS_ARCH_X86, {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}[bits])
    md.detail = True
    return md


@lru_cache(maxsize=None)
def _reset_stub() -> tuple[bytes, bytes, bytes, bytes]:
    """A stub that leaves Unicorn's 64-bit start state the way a CPU leaves long
    mode, ending in real mode with HLT.
    Unicorn starts a UC_MODE_64 engine with EFER.LMA=1 and CR0.PG=0; LMA only
    clears on a CR0.PG 1->0 transition, hence the PG on/off pair."""
    k64, k32, k16 = Ks(KS_ARCH_X86, KS_MODE_64), Ks(KS_ARCH_X86, KS_MODE_32), Ks(KS_ARCH_X86, KS_MODE_16)
    s64 = bytes(k64.asm("mov rax, 0x1800; lgdt [rax]; push 0x08; mov rax, 0x1040; push rax; "
                        ".byte 0x48, 0xcb", 0x1000)[0])                        # retfq
    s32 = bytes(k32.asm("mov eax, cr4; or eax, 0x20; mov cr4, eax; "
                        "mov eax, cr0; or eax, 0x80000000; mov cr0, eax; "
                        "and eax, 0x7fffffff; mov cr0, eax; "
                        "mov ecx, 0xc0000080; xor eax, eax; xor edx, edx; wrmsr; "
                        "xor eax, eax; mov cr4, eax; "
                        ".byte 0xea; .long 0x1080; .word 0x10", 0x1040)[0])    # ljmp 0x10:0x1080
    s16 = bytes(k16.asm("mov ax, 0x18; mov ds, ax; mov es, ax; mov ss, ax; mov fs, ax; mov gs, ax; "
                        "mov eax, cr0; and eax, 0xfffffffe; mov cr0, eax; "
                        ".byte 0xea; .word 0x10c0; .word 0", 0x1080)[0])        # ljmp 0:0x10c0
    real = bytes(k16.asm("xor ax, ax; mov ds, ax; mov es, ax; mov ss, ax; mov fs, ax; mov gs, ax; hlt",
                         0x10C0)[0])
    return s64, s32, s16, real


_STUB_GDT = struct.pack("<HQ", 0x1F, 0x1810).ljust(16, b"\0") + struct.pack(
    "<4Q", 0, 0x00CF9A000000FFFF, 0x00009A000000FFFF, 0x000092000000FFFF)


def compute_hflags(hflags: int, cr0: int, efer: int, rflags: int, segs) -> int:
    """Recompute QEMU's segment-derived hflags bits like cpu_x86_load_seg_cache."""
    cs, ss = segs[x86.R_CS], segs[x86.R_SS]
    hf = hflags & ~x86.HF_SEG_BITS
    if not (cr0 & x86.CR0_PE):
        cpl = 0
    elif rflags & x86.RFLAGS_VM:
        cpl = 3
    else:
        cpl = (ss.flags >> x86.DESC_DPL_SHIFT) & 3
    hf |= cpl
    if (hflags & x86.HF_LMA) and (cs.flags & x86.DESC_L):
        hf |= x86.HF_CS32 | x86.HF_SS32 | x86.HF_CS64
    else:
        if cs.flags & x86.DESC_B:
            hf |= x86.HF_CS32
        if ss.flags & x86.DESC_B:
            hf |= x86.HF_SS32
        if not (cr0 & x86.CR0_PE) or (rflags & x86.RFLAGS_VM) or not (hf & x86.HF_CS32):
            hf |= x86.HF_ADDSEG
        elif segs[x86.R_DS].base | segs[x86.R_ES].base | segs[x86.R_SS].base:
            hf |= x86.HF_ADDSEG
    return hf


class Closed:
    """What a closed object becomes (its class is swapped on close()): every
    attribute use raises ClosedError, so a stale reference fails with one clear
    line instead of reaching freed native state.  close() stays a no-op."""

    _what = "object"
    _allowed = frozenset({"close", "closed", "__class__", "__dict__", "__repr__", "__exit__"})

    def __getattribute__(self, name):
        if name in type(self)._allowed:
            return object.__getattribute__(self, name)
        raise ClosedError(f"this {type(self)._what} is closed (close() was called); create a new one")

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return True

    def __exit__(self, *exc) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<closed {type(self)._what}>"


class ClosedVcpu(Closed):
    _what = "Vcpu"


class Vcpu:
    """One virtual x86 CPU over guest RAM.

    The register file is fetched in one native call after each exit
    (``self.regs``, a cffi ``vmlab_regs``) and written back in one call before
    the next run for whatever was changed through ``set_reg``/``set_rip``.
    """

    #: True once close() has run (the instance is then a ClosedVcpu)
    closed = False

    def __init__(self, memory: GuestMemory, *, cpuid=None, maxphyaddr: int = 40):
        ensure_api()
        # Offsets inside QEMU's CPU state: checked once per process by a stub run
        # on an engine of its own (also refuses any Unicorn but the pinned one).
        self.layout = verified_layout()
        self.mem = memory
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # Unicorn's CPU model decides which instructions execute (CLAC/STAC,
        # RDSEED, ADX...); set before the engine initialises. See UNICORN_CPU_MODEL.
        uc.ctl_set_cpu_model(unicorn_model_id(cpuid.unicorn_model) if cpuid is not None else UNICORN_CPU_MODEL)
        self._uch = ffi.cast("void *", uc._uch.value)
        # This engine's live CPU state, by following its own pointers.
        self.env_address = find_env_address(uc)
        uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.address)
        if memory.high_size:        # RAM above the 32-bit hole (emu/memory.py)
            uc.mem_map_ptr(HIGH_RAM_BASE, memory.high_size, UC_PROT_ALL, memory.address + HIGH_RAM_BASE)
        uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
        self._v = v = ffi.new("vmlab_vcpu *")
        if lib.vmlab_vcpu_init(v, self._uch, ffi.cast("uint8_t *", memory.address), memory.size,
                               memory.high_size):
            raise NativeError("native vCPU initialisation failed")
        # Host-side writes (device DMA, loaders) drop translated code they hit.
        phys_written = lib.vmlab_phys_written
        memory.on_write = lambda gpa, n, _v=v: phys_written(_v, gpa, n)
        lay = self.layout
        v.ctx_env, v.ctx_hflags, v.ctx_segs, v.ctx_ldt, v.ctx_tr = lay.env, lay.hflags, lay.segs, lay.ldt, lay.tr
        v.ctx_error_code, v.ctx_is_int, v.ctx_old_exception = lay.error_code, lay.is_int, lay.old_exception
        v.ctx_eip, v.ctx_gdt, v.ctx_cr, v.ctx_efer, v.ctx_dr = lay.eip, lay.gdt, lay.cr, lay.efer, lay.dr
        v.ctx_kernel_gs_base = lay.kernel_gs_base
        v.maxphyaddr = maxphyaddr
        v.env = ffi.cast("uint8_t *", self.env_address)
        v.env_hflags = lay.hflags - lay.env
        v.env_cs_flags = lay.segs + 24 + 20 - lay.env  # CPUX86State.segs[R_CS].flags
        err = lib.vmlab_attach(v, self._uch)
        if err:
            raise NativeError(f"registering native hooks failed (code {err})")
        # Exits enabled with an empty set: emu_start's `until` is then ignored
        # (trap sites are code hooks, see native/hooks.c exit_add).
        uc.ctl_exits_enabled(True)
        self.regs = ffi.new("vmlab_regs *")
        #: the register file's GPRs, RIP and RFLAGS (indices 0-15, 16, 17) as a
        #: memoryview of 64-bit integers: the same memory, read and written
        #: from Python in about half the time of a cffi field access
        self.regs_q = memoryview(ffi.buffer(self.regs, 8 * (REGS_Q_RFLAGS + 1))).cast("Q")
        self._dirty = 0
        #: keep the block registry's discovery/invalidation logs for a TbCache reader
        self.keep_block_logs = False
        self._site_cache: dict = {}
        #: the VM-exit fast path's policy (a cffi ``vmlab_fastpath``) while a VMM
        #: runs the guest under one (emu/fastpath.py), else None
        self.fastpath = None
        #: the policy outside VMX non-root operation (``fastpath`` None): nothing
        #: VM-exits, and a MOV to/from CR0, CR3 or CR4 that needs only MOV's own
        #: checks is completed in C (vmlab_cr_value, as emulate_cr does it) --
        #: a kernel's CR3 writes (every context switch, a TLB flush) do not come
        #: to Python.  ``bare_fastpath`` is it while the machine's run loop lets
        #: it be used (None: every MOV CR comes to Python -- exits logged, or
        #: guest-visible VMX, whose CR0/CR4 fixed bits are Python's).
        self.bare_policy = ffi.new("vmlab_fastpath *")
        self.bare_fastpath = None
        #: coalesced port I/O served under bare_policy (emu/pio.py; fast_port)
        self.pio = ffi.new("vmlab_pio *")
        self.bare_policy.pio = self.pio
        #: guest-visible VMX: L1's VMREAD/VMWRITE served in C (vmm/nested_shadow.py), or None
        self.vmx_shadow = None
        #: called after C entered L2 from L1's VMRESUME (set by vmm/nested.py)
        self.vmx_entered = None
        self._err = ffi.new("int *")
        #: the run loop's lean path context (emu/lean.py): one argument per exit
        lean = self.lean = ffi.new("vmlab_lean *")
        lean.v, lean.uc, lean.r = v, self._uch, self.regs
        self._counting = False         # the last run was a one-instruction step
        self._scratch_mapped = False
        self._trap_names: frozenset[str] = frozenset()
        self.cpuid = None
        if cpuid is not None:
            self.set_cpuid(cpuid)
        self.reset()

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Free the native vCPU state and the Unicorn engine now (idempotent).
        Guest RAM stays the caller's (Vm.close unmaps it).  The Vcpu becomes a
        ClosedVcpu: any later use raises ClosedError."""
        v, uc = self.__dict__.get("_v"), self.__dict__.get("uc")
        mem = self.__dict__.get("mem")
        if mem is not None:
            mem.on_write = None
        if v is not None and v.priv != ffi.NULL:
            lib.vmlab_vcpu_fini(v)
        # The binding closes an engine through a weakref.finalize that runs at
        # most once (uc_close); calling it now frees the engine (TCG buffers,
        # hooks, the CPU) without waiting for the Uc object to be collected.
        release = getattr(uc, "_Uc__finalizer", None)
        if release is not None:
            release()
        self.__class__ = ClosedVcpu

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @property
    def native(self):
        """The native vmlab_vcpu struct (stats, icount, deadline)."""
        return self._v

    @property
    def icount(self) -> int:
        """Virtual time in ns: instructions executed (virtual clock), or host
        monotonic time since the clock's origin, read now (host clock)."""
        if self.clock == "host":
            return lib.vmlab_host_now(self._v)
        return self._v.icount

    # ------------------------------------------------------------------ clock
    #: "virtual": virtual time is the instruction count (1 instruction = 1 ns),
    #: exact per block and deterministic.  "host": virtual time is the host's
    #: monotonic clock (QEMU without -icount): no instruction is counted, run()
    #: deadlines are times in ns since the origin, stopped by a host timer.
    clock = "virtual"

    def set_clock(self, clock: str, origin_ns: int | None = None) -> None:
        """Select the clock (see ``clock``).  ``origin_ns``: the
        time.monotonic_ns() value that is virtual time 0 with the host clock
        (default: now).  Instruction counts are not kept with the host clock, so
        switching back to "virtual" resumes counting from the current time."""
        if clock not in ("virtual", "host"):
            raise ConfigError(f"unknown clock {clock!r} (virtual or host)")
        if origin_ns is None:
            origin_ns = time.monotonic_ns()
        err = lib.vmlab_set_clock(self._v, self._uch, 1 if clock == "host" else 0, origin_ns)
        if err:
            raise NativeError(f"switching the clock failed ({err})")
        if clock == "host" and self.clock != "host":
            self._v.icount = lib.vmlab_host_now(self._v)
        self.clock = clock

    #: QEMU's -icount shift=N: one instruction is 2^N ns of virtual time
    #: (virtual clock only; 0 by default: 1 instruction = 1 ns).  QEMU's
    #: softmmu/icount.c allows 0..10 (MAX_ICOUNT_SHIFT).
    MAX_ICOUNT_SHIFT = 10

    @property
    def icount_shift(self) -> int:
        return self._v.icount_shift

    def set_icount_shift(self, shift: int) -> None:
        """One guest instruction = 2**shift ns of virtual time from now on (the
        TSC, the timers and run() deadlines follow virtual time)."""
        if not 0 <= shift <= self.MAX_ICOUNT_SHIFT:
            raise ConfigError(f"icount shift {shift} out of range 0..{self.MAX_ICOUNT_SHIFT}")
        self._v.icount_shift = shift

    def set_cpuid(self, model) -> None:
        """Load a CPUID model (emu.cpuid.CpuidModel) into the native table."""
        entries = model.entries()
        if len(entries) > len(self._v.cpuid):
            raise ConfigError("too many CPUID entries")
        for i, (leaf, sub, sig, regs) in enumerate(entries):
            e = self._v.cpuid[i]
            e.leaf, e.subleaf, e.flags = leaf, sub or 0, 1 if sig else 0
            e.eax, e.ebx, e.ecx, e.edx = regs
        self._v.ncpuid = len(entries)
        self._v.cpuid_max_basic = model.max_basic
        self._v.cpuid_max_ext = model.max_ext
        self._v.pdpe1gb = 1 if model.has_pdpe1gb else 0
        self._v.maxphyaddr = model.maxphyaddr
        self.cpuid = model
        Policy(cr_emulate=1, cr4_valid=model.cr4_valid_mask(), maxphyaddr=model.maxphyaddr).to_native(self.bare_policy)

    def fast_port(self, port: int, read_value: int | None = None, write: bool = False) -> None:
        """Publish how ``port`` may be served without an exit (emu/pio.py): a
        1-byte IN returns ``read_value`` (None: the IN exits), a 1-byte OUT is
        queued when ``write``.  A port with neither leaves the table."""
        t = self.pio
        n = min(t.nports, PORTS)
        k = next((i for i in range(n) if t.port[i] == port), n)
        if read_value is None and not write:
            if k < n:                       # remove: the last entry takes its place
                last = n - 1
                t.port[k], t.read_ok[k], t.read_value[k], t.write_ok[k] = (
                    t.port[last], t.read_ok[last], t.read_value[last], t.write_ok[last])
                t.nports = last
            return
        if k == n:
            if n == PORTS:
                return                      # table full: the port keeps exiting
            t.port[k] = port
            t.nports = n + 1
        t.read_ok[k], t.read_value[k] = (0, 0) if read_value is None else (1, read_value & 0xFF)
        t.write_ok[k] = 1 if write else 0

    def take_queued_io(self) -> list[tuple[int, int]]:
        """The OUTs queued since the last call, in order, as (port, byte)."""
        t = self.pio
        n = t.nqueued
        if not n:
            return []
        words = ffi.unpack(t.ring, n)
        t.nqueued = 0
        return [(w >> 8, w & 0xFF) for w in words]

    def set_traps(self, names) -> None:
        """Arm the trap sites of these kinds (TRAP_KINDS names) and only those."""
        names = frozenset(names)
        unknown = names - TRAP_KINDS.keys()
        if unknown:
            raise ConfigError(f"unknown trap kinds: {sorted(unknown)}")
        mask = 0
        for n in names:
            mask |= 1 << TRAP_KINDS[n]
        self._trap_names = names
        lib.vmlab_trap_set_kinds(self._v, self._uch, mask)

    @property
    def trap_kinds(self) -> frozenset[str]:
        return self._trap_names

    def armed_sites(self) -> list[int]:
        v = self._v
        return [v.exits[i] for i in range(v.nexits)]

    def reset(self) -> None:
        """Put the CPU in its power-on state (SDM Vol. 3A 10.1.1, Table 10-1):
        real mode, CS:IP = F000:FFF0 with CS.base FFFF0000, CR0 = 60000010H."""
        uc, v = self.uc, self._v
        kinds = self._trap_names
        if kinds:
            self.set_traps(())
        scratch = self.mem.read(0x1000, 0x1000)
        s64, s32, s16, real = _reset_stub()
        self.mem.fill(0x1000, 0x1000)
        self.mem.write(0x1000, s64)
        self.mem.write(0x1040, s32)
        self.mem.write(0x1080, s16)
        self.mem.write(0x10C0, real)
        self.mem.write(0x1800, _STUB_GDT)
        v.cr0, v.cr3, v.cr4, v.efer = 0, 0, 0, 0     # the stub runs identity-mapped
        self._flush_translations()
        v.icount_deadline = 1 << 62
        uc.reg_write(X.UC_X86_REG_RSP, 0x1F00)
        try:
            uc.emu_start(0x1000, 0)
        except UcError as exc:  # pragma: no cover - would mean Unicorn changed
            raise NativeError(f"reset stub failed in Unicorn: {exc}") from exc
        self.mem.write(0x1000, scratch)
        if uc.reg_read(X.UC_X86_REG_CR0) & 1 or uc.reg_read(X.UC_X86_REG_MSR, x86.MSR_EFER) & x86.EFER_LMA:
            raise NativeError("reset stub did not reach real mode")
        uc.ctl_flush_tb()
        lib.vmlab_tb_reset(v)
        # Architectural reset values.
        for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RSI,
                  X.UC_X86_REG_RDI, X.UC_X86_REG_RBP, X.UC_X86_REG_RSP, X.UC_X86_REG_R8,
                  X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12,
                  X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15, X.UC_X86_REG_CR2,
                  X.UC_X86_REG_CR3):
            uc.reg_write(r, 0)
        sig = self.cpuid.signature if self.cpuid is not None else 0x600
        uc.reg_write(X.UC_X86_REG_RDX, sig)
        uc.reg_write(X.UC_X86_REG_RFLAGS, 2)
        uc.reg_write(X.UC_X86_REG_CR0, x86.CR0_RESET)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0xFFFF, 0))
        v.icount_deadline = 0
        self.refresh()
        data = x86.DESC_P | x86.DESC_S | x86.DESC_W | x86.DESC_A
        code = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A
        self.load_segments({x86.R_CS: (0xF000, 0xFFFF0000, 0xFFFF, code)} |
                           {s: (0, 0, 0xFFFF, data) for s in (0, 2, 3, 4, 5)})
        self.set_rip(0xFFF0)
        self._sync_paging()
        if kinds:
            self.set_traps(kinds)

    # ------------------------------------------------------------------ registers
    def refresh(self):
        """Fetch the whole register file in one native call; returns self.regs."""
        self.flush()
        err = lib.vmlab_regs_read(self._v, self._uch, self.regs)
        if err:
            raise NativeError(f"register read failed ({err})")
        return self.regs

    def attention_setter(self) -> Callable[..., None]:
        """A callback (any arguments, any thread) that sets the vCPU's
        attention word: the run loop's lean path (emu/lean.py) looks before
        the next run.  It holds the native state, not the Vcpu."""
        v = self._v

        def attend(*_args) -> None:
            v.attention = 1
        return attend

    def flush(self) -> None:
        """Write back registers changed through set_* (one native call)."""
        if self._dirty:
            lib.vmlab_regs_write(self._v, self._uch, self.regs, self._dirty)
            self._dirty = 0

    def get_reg(self, name: str) -> int:
        i = GPR_INDEX.get(name)
        if i is not None:
            return self.regs.gpr[i]
        return getattr(self.regs, name)

    def set_reg(self, name: str, value: int) -> None:
        i = GPR_INDEX.get(name)
        if i is not None:
            self.regs_q[i] = value & 0xFFFFFFFFFFFFFFFF
            self._dirty |= 1 << i
            return
        bit = {"rip": _M_RIP, "rflags": _M_RFLAGS, "cr2": _M_CR2, "fs_base": _M_FSBASE,
               "gs_base": _M_GSBASE, "kernel_gs_base": _M_KGSBASE}.get(name)
        if bit is None:
            raise ConfigError(f"register {name!r} is not writable this way")
        setattr(self.regs, name, value & 0xFFFFFFFFFFFFFFFF)
        self._dirty |= bit

    def set_gpr(self, index: int, value: int, size: int = 8) -> None:
        """Write a GPR like an instruction with this operand size would
        (32-bit writes zero-extend; 8/16-bit writes merge)."""
        q = self.regs_q
        if size == 8:
            new = value
        elif size == 4:
            new = value & 0xFFFFFFFF
        else:
            mask = (1 << (8 * size)) - 1
            new = (q[index] & ~mask) | (value & mask)
        q[index] = new & 0xFFFFFFFFFFFFFFFF
        self._dirty |= 1 << index

    def set_rip(self, rip: int) -> None:
        self.regs_q[REGS_Q_RIP] = rip & 0xFFFFFFFFFFFFFFFF
        self._dirty |= _M_RIP

    def set_rflags(self, value: int) -> None:
        self.regs.rflags = (value | 2) & 0x3F7FD7
        self._dirty |= _M_RFLAGS

    def set_dr(self, n: int, value: int) -> None:
        """Write debug register DR0-3, DR6 or DR7 (written back with the others)."""
        self.regs.dr[n] = value & 0xFFFFFFFFFFFFFFFF
        self._dirty |= _M_DR

    def set_descriptor_tables(self, gdtr=None, idtr=None) -> None:
        if gdtr is not None:
            self.regs.gdtr_base, self.regs.gdtr_limit = gdtr
            self._dirty |= _M_GDTR
        if idtr is not None:
            self.regs.idtr_base, self.regs.idtr_limit = idtr
            self._dirty |= _M_IDTR

    @property
    def cpl(self) -> int:
        return self.regs.hflags & 3

    @property
    def mode_bits(self) -> int:
        """16, 32 or 64: the default operand size of the code segment."""
        hf = self.regs.hflags
        return 64 if hf & x86.HF_CS64 else 32 if hf & x86.HF_CS32 else 16

    def linear_rip(self) -> int:
        r = self.regs
        if r.hflags & x86.HF_CS64:
            return r.rip
        return (r.seg[x86.R_CS].base + r.rip) & 0xFFFFFFFF

    def load_segments(self, segs: dict, hflags_extra: tuple[int, int] = (0, 0), clear_exception=False):
        """Load segment caches {index: (selector, base, limit, flags)} (index 6 = LDTR,
        7 = TR) and recompute the segment-derived hflags."""
        self.flush()
        r = self.regs
        mask = 0
        for idx, (sel, base, limit, flags) in segs.items():
            s = r.seg[idx] if idx < 6 else (r.ldtr if idx == 6 else r.tr)
            s.selector, s.base, s.limit, s.flags = sel, base, limit, flags
            mask |= 1 << idx
        hf = compute_hflags(r.hflags, r.cr0, r.efer, r.rflags, r.seg)
        hmask, hval = hflags_extra
        hf = (hf & ~hmask) | (hval & hmask)
        if lib.vmlab_env_set_segs(self._v, self._uch, r, mask, 0xFFFFFFFF, hf, 1 if clear_exception else 0):
            raise NativeError("segment load through the CPU context failed")
        r.hflags = hf

    def clear_exception_state(self) -> None:
        """Reset QEMU's exception-in-flight field (stale after UC_HOOK_INTR)."""
        self.flush()
        lib.vmlab_env_set_segs(self._v, self._uch, self.regs, 0, 0, 0, 1)

    # ------------------------------------------------------------------ control registers
    def _sync_paging(self) -> None:
        """Copy CR0/CR3/CR4/EFER into the native MMU context (after any change)."""
        uc, v = self.uc, self._v
        v.cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        v.cr3 = uc.reg_read(X.UC_X86_REG_CR3)
        v.cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        v.efer = uc.reg_read(X.UC_X86_REG_MSR, x86.MSR_EFER)
        r = self.regs
        r.cr0, r.cr3, r.cr4, r.efer = v.cr0, v.cr3, v.cr4, v.efer

    def write_cr(self, n: int, value: int) -> None:
        """Write CR0/2/3/4/8 with Unicorn's side effects (mode, hflags, TLB flush);
        callers have done the architectural checks (emu.sensitive)."""
        self.flush()
        reg = {0: X.UC_X86_REG_CR0, 2: X.UC_X86_REG_CR2, 3: X.UC_X86_REG_CR3,
               4: X.UC_X86_REG_CR4, 8: X.UC_X86_REG_CR8}[n]
        self.uc.reg_write(reg, value)
        if n in (0, 3, 4):
            self._flush_translations()
        if n == 3:
            # The common case (every context switch): only CR3 changed.
            self._v.cr3 = self.regs.cr3 = self.uc.reg_read(X.UC_X86_REG_CR3)
        else:
            self._sync_paging()
        if n == 0:
            # PE/PG/LMA changes alter hflags: read them back.
            self.refresh()
        elif n == 2:
            self.regs.cr2 = value
        elif n == 8:
            self.regs.cr8 = value

    def write_efer(self, value: int) -> None:
        self.flush()
        self.uc.reg_write(X.UC_X86_REG_MSR, (x86.MSR_EFER, value))
        self._flush_translations()
        self._sync_paging()
        self.refresh()

    def read_msr_raw(self, msr: int) -> int:
        return self.uc.reg_read(X.UC_X86_REG_MSR, msr)

    def write_msr_raw(self, msr: int, value: int) -> None:
        self.flush()
        self.uc.reg_write(X.UC_X86_REG_MSR, (msr, value))

    def tlb_stats(self) -> dict:
        """Soft-MMU statistics: TLB fills (Unicorn misses), hits in vmlab's software
        TLB (no walk), fills that faulted, MMIO fills, and flushes."""
        v = self._v
        return {"fills": v.stat_fills, "stlb_hits": v.stat_stlb_hits, "walks": v.stat_fills - v.stat_stlb_hits,
                "faults": v.stat_fill_faults, "mmio": v.stat_mmio, "flushes": v.stat_stlb_flushes}

    def _flush_translations(self) -> None:
        """Drop cached translations: vmlab's software TLB and Unicorn's TLB."""
        lib.vmlab_stlb_flush(self._v)
        lib.vmlab_tlb_flush(self._uch)

    def set_ept(self, eptp: int | None) -> None:
        """Turn the second dimension of the walk on (EPT pointer) or off (None);
        cached translations are dropped (like INVEPT all-context)."""
        v = self._v
        on = eptp is not None
        if on != bool(v.ept_enabled) or (on and eptp != v.eptp):
            v.eptp, v.ept_enabled = (eptp or 0), 1 if on else 0
            self._flush_translations()

    def invept(self) -> None:
        """After changing EPT tables through memory: drop every cached
        translation (INVEPT all-context; VPIDs are not modelled, so INVVPID is
        the same)."""
        self._flush_translations()

    def flush_tlb(self) -> None:
        self._flush_translations()

    # ------------------------------------------------------------------ mode entry
    def enter_real(self, cs: int, ip: int) -> None:
        data = x86.DESC_P | x86.DESC_S | x86.DESC_W | x86.DESC_A
        code = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A
        self.load_segments({x86.R_CS: (cs, cs << 4, 0xFFFF, code)} |
                           {s: (0, 0, 0xFFFF, data) for s in (0, 2, 3, 4, 5)})
        self.set_rip(ip)

    def enter_protected32(self, entry: int, cs: int = 0x08, ds: int = 0x10) -> None:
        """Flat 32-bit protected mode, paging off (Multiboot §3.2 machine state)."""
        self.write_cr(0, x86.CR0_PE | x86.CR0_ET)
        g = x86.DESC_G | x86.DESC_B | x86.DESC_P | x86.DESC_S | x86.DESC_A
        self.load_segments({x86.R_CS: (cs, 0, 0xFFFFFFFF, g | x86.DESC_CS | x86.DESC_R)} |
                           {s: (ds, 0, 0xFFFFFFFF, g | x86.DESC_W) for s in (0, 2, 3, 4, 5)})
        self.set_rflags(2)
        self.set_rip(entry)

    def enter_long64(self, entry: int, cr3: int, gdt: tuple[int, int] | None) -> None:
        """64-bit mode with the loader's page tables (SDM Vol. 3A 10.8.5 order:
        PAE, CR3, EFER.LME, then CR0.PG)."""
        self.write_cr(4, x86.CR4_PAE)
        self.write_cr(3, cr3)
        self.write_efer(x86.EFER_LME)
        self.write_cr(0, x86.CR0_PG | x86.CR0_PE | x86.CR0_ET | x86.CR0_WP)
        if gdt is not None:
            self.set_descriptor_tables(gdtr=gdt)
        code = x86.DESC_P | x86.DESC_S | x86.DESC_CS | x86.DESC_R | x86.DESC_A | x86.DESC_L | x86.DESC_G
        data = x86.DESC_P | x86.DESC_S | x86.DESC_W | x86.DESC_A | x86.DESC_G | x86.DESC_B
        self.load_segments({x86.R_CS: (0x08, 0, 0xFFFFFFFF, code)} |
                           {s: (0x10, 0, 0xFFFFFFFF, data) for s in (0, 2, 3, 4, 5)})
        self.set_rflags(2)
        self.set_rip(entry)

    # ------------------------------------------------------------------ guest-linear memory
    def translate(self, vaddr: int, access: int = ACC_READ, *, user: bool | None = None,
                  set_ad: bool = False, implicit: bool = False):
        """Walk the guest page tables for vaddr (native walker); returns the
        vmlab_walk struct.  user=None takes the current CPL."""
        w = ffi.new("vmlab_walk *")
        if user is None:
            user = self.cpl == 3
        acc = access | (ACC_USER if user and not implicit else 0)
        flags = (WALK_SET_AD if set_ad else 0) | (WALK_IMPLICIT_SUP if implicit else 0)
        lib.vmlab_walk_do(self._v, vaddr, acc, flags, w)
        return w

    def _linear_chunks(self, vaddr: int, length: int, access: int, user, implicit: bool):
        out = []
        while length > 0:
            w = self.translate(vaddr, access, user=user, set_ad=True, implicit=implicit)
            if w.fault == 1:
                raise GuestFault(x86.PF, w.error_code, vaddr)
            if w.fault in (3, 4):
                raise EptFault(w.gpa, vaddr, w.ept_qualification, w.fault == 4)
            n = min(length, 4096 - (vaddr & 0xFFF))
            if w.fault == 2:
                out.append((None, n, w.paddr))
            else:
                out.append((w.paddr, n, None))
            vaddr = (vaddr + n) & 0xFFFFFFFFFFFFFFFF
            length -= n
        return out

    def read_linear(self, vaddr: int, length: int, *, user=None, implicit=False) -> bytes:
        """Read guest-linear memory like the CPU would (page walk, A bits);
        raises GuestFault(#PF) on a fault.  Non-RAM reads as all-ones."""
        buf = bytearray()
        for pa, n, mmio in self._linear_chunks(vaddr, length, ACC_READ, user, implicit):
            buf += b"\xff" * n if pa is None else self.mem.read(pa, n)
        return bytes(buf)

    def write_linear(self, vaddr: int, data: bytes, *, user=None, implicit=False) -> None:
        off = 0
        chunks = self._linear_chunks(vaddr, len(data), ACC_WRITE, user, implicit)
        for pa, n, mmio in chunks:
            if pa is not None:
                self.mem.write(pa, data[off:off + n], notify=False)   # coherence: the next lines
                lib.vmlab_code_page_written(self._v, pa & ~0xFFF)
            off += n
        # Keep Unicorn's translated code coherent with host-side writes.
        self.uc.ctl_remove_cache(vaddr, vaddr + len(data))

    def read_linear_int(self, vaddr: int, size: int, **kw) -> int:
        return int.from_bytes(self.read_linear(vaddr, size, **kw), "little")

    def write_linear_int(self, vaddr: int, size: int, value: int, **kw) -> None:
        self.write_linear(vaddr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), **kw)

    # ------------------------------------------------------------------ decoding
    def fetch_insn(self, linear: int | None = None):
        """Decode the instruction at a linear address (default: RIP) with Capstone."""
        if linear is None:
            linear = self.linear_rip()
        # Read as the CPU fetched it: an instruction fetch at the current CPL
        # (an implicit supervisor read of user code would fault under SMAP).
        try:
            code = self.read_code(linear, 15)
        except (GuestFault, EptFault):
            # The instruction may end before an unmapped page.
            n = 4096 - (linear & 0xFFF)
            try:
                code = self.read_code(linear, n) if n < 15 else b""
            except (GuestFault, EptFault):
                code = b""
            if not code:
                code = self._code_of_running_block(linear, 15)
        insn = next(_cs(self.mode_bits).disasm(code, self.regs.rip), None)
        return insn

    def _code_of_running_block(self, linear: int, length: int) -> bytes:
        """The bytes at ``linear`` through the translation the block that holds
        it was made with, when the page tables no longer map it: the guest
        rewrote its paging structures and runs on from translations the TLB
        still holds (SDM Vol. 3A 4.10.4.3: software must invalidate; until
        then the processor may use the old translation).  The block registry
        knows each block's physical address.  Rare: a linear scan."""
        v = self._v
        hf = self.regs.hflags & 0xC0F3
        for i in range(v.ntbs):
            t = v.tbs[i]
            if t.valid and t.hflags == hf and t.pc <= linear < t.pc + t.size \
                    and (t.paddr & 0xFFF) + t.size <= 4096:
                pa = t.paddr + (linear - t.pc)
                n = min(length, 4096 - (pa & 0xFFF))
                if self.mem.contains(pa, n):
                    return self.mem.read(pa, n)
        return b""

    def read_code(self, vaddr: int, length: int) -> bytes:
        """Read instruction bytes as the CPU fetches them: an instruction fetch
        at the current CPL (so SMAP, which forbids implicit supervisor reads of
        user pages, does not apply), A bits set as by the fetch.  Raises
        GuestFault/EptFault where the fetch would fault."""
        buf = bytearray()
        for pa, n, mmio in self._linear_chunks(vaddr, length, ACC_FETCH, None, False):
            buf += b"\xff" * n if pa is None else self.mem.read(pa, n)
        return bytes(buf)

    # ------------------------------------------------------------------ running
    def run(self, deadline: int, single_step: bool = False) -> Exit:
        """Run until something needs attention or virtual time reaches
        ``deadline`` (ns of virtual time: instructions with the virtual clock,
        host time since the origin with the host clock); returns one exit value.
        ``single_step`` executes at most one instruction (returns DeadlineExit
        after it)."""
        v = self._v
        if self._dirty & ~_M_RIP:
            self.flush()
        else:
            # RIP alone needs no write: the run starts at regs.rip (emu_start's begin).
            self._dirty = 0
        # flags: 1 = one instruction; 2 = the block registry sees every block
        # (with the host clock only the logs need it)
        flags = (1 if single_step else 0) | (2 if self.keep_block_logs else 0)
        r = self.regs
        if single_step != self._counting:
            # Unicorn 2.1.4 counts instructions (emu_start's count) with a code
            # hook compiled only into blocks translated after it was added:
            # blocks translated while running freely would run whole.  Entering
            # count mode, drop them (leaving it, Unicorn flushes by itself).
            if single_step:
                self.uc.ctl_flush_tb()
            self._counting = single_step
        if single_step and self.clock != "host":
            v.stop_kind = 0
            v.icount_deadline = deadline
            start = v.icount
            err = lib.vmlab_run(v, self._uch, r.rip, flags)
            if v.icount == start and not v.stop_kind and not err:
                v.icount += 1 << v.icount_shift    # a one-instruction step outside a fresh block
            if lib.vmlab_regs_read(v, self._uch, r):       # nothing is dirty: flushed above
                raise NativeError("register read failed")
            kind = v.stop_kind
            v.stop_kind = 0
            if not self.keep_block_logs:
                v.ntb_new = v.ntb_inval = 0
        else:
            # The common path in one native call: run, read the registers, and
            # let the fast path decide a trap site.
            f = self.fastpath
            if f is None:
                f = self.bare_fastpath
            sh = self.vmx_shadow
            if sh is None:
                kind = lib.vmlab_run_exit(v, self._uch, deadline, flags, r, f if f is not None else ffi.NULL,
                                          self._err)
            else:
                kind = lib.vmlab_run_exit_vmx(v, self._uch, deadline, flags, r,
                                              f if f is not None else ffi.NULL, sh, self._err)
                if sh.entered:
                    # C executed L1's VMRESUME and ran L2 (native/nested.c):
                    # vmm/nested.py makes L2's policy current, then this exit is L2's.
                    sh.entered = 0
                    self.vmx_entered()
                    f = self.fastpath
            if kind == _STOP_FAST_EXIT:
                if f.exit_reason == 0:
                    # an exception the bitmap makes a VM exit: the machine exit
                    # exit_of would have built (the VMX layer decides it again)
                    return exception_exit(f, r.rip)
                return PolicyExit(r.rip, f.exit_len, f.exit_reason, f.exit_qual,
                                  (v.fault_vaddr, v.fault_paddr, v.fault_error_code))
            if kind < 0:
                raise NativeError("register read failed")
            err = self._err[0]
        return self.exit_of(kind, err, single_step)

    def _int_n(self, vector: int) -> bool:
        """A software interrupt or exception of ``vector`` just raised (RIP is
        after its instruction): was it INT n (CD ib)?  Vectors 3 and 4 come
        from INT3 (CC) and INTO (CE) too, which end in that byte; INT 3 / INT 4
        end in 03 / 04."""
        if vector not in (x86.BP, x86.OF):
            return True
        try:
            last = self.read_code((self.linear_rip() - 1) & 0xFFFFFFFFFFFFFFFF, 1)
        except (GuestFault, EptFault):
            return False
        return last[0] != (0xCC if vector == x86.BP else 0xCE)

    def exit_of(self, kind: int, err: int, single_step: bool = False) -> Exit:
        """The exit value of a run that stopped with stop kind ``kind``
        (VMLAB_STOP_*, not the fast path's) and Unicorn error ``err``; the
        register file has been read."""
        v = self._v
        r = self.regs
        if kind == 7 and not err:           # a trap site: the most frequent exit
            return self._trap_exit(v.fault_vaddr, v.fault_paddr, v.fault_error_code)
        if kind in (1, 6, 8):               # deadline, rescan restart, registry log to drain
            return DeadlineExit(rip=r.rip)
        if kind == 2:
            return IrqWindowExit(rip=r.rip)
        if kind == 3:
            vec = v.intno
            sw = bool(r.exception_is_int)
            ec = r.error_code & 0xFFFFFFFF if vec in x86.ERROR_CODE_VECTORS and not sw else None
            return ExceptionExit(rip=r.rip, vector=vec, error_code=ec, software=sw,
                                 int_n=sw and self._int_n(vec))
        if kind == 4:
            return self._page_fault_exit(v.fault_vaddr, v.fault_access, v.fault_error_code)
        if kind == 5:
            return self._mmio_exit(v.fault_vaddr, v.fault_paddr, v.fault_access)
        if kind in (10, 11):
            gla = fault_address(self, v.fault_vaddr, v.fault_access)
            gpa = v.fault_ept_gpa
            if kind == 10 and (v.fault_ept_qualification >> 8) & 1:
                gpa = (gpa & ~0xFFF) | (gla & 0xFFF)    # the fill only knew the page
            return EptExit(rip=r.rip, gpa=gpa, gla=gla, qualification=v.fault_ept_qualification,
                           misconfig=kind == 11)
        if kind == 9:
            return ExceptionExit(rip=r.rip, vector=noncanonical_vector(self), error_code=0)
        if kind == 13:                      # native task switch to finish (emu/taskswitch.py)
            return TaskSwitchExit(rip=r.rip)
        if kind == 12:
            # SYSCALL/SYSENTER: Unicorn only stepped past it; rewind so that the
            # instruction has not run (emu.sensitive completes it).
            start = v.fault_vaddr
            length = (r.rip - start) & 0xFFFFFFFFFFFFFFFF
            self.set_rip(start)
            return TrapExit(rip=start, insn_len=length, kind="sysenter" if v.intno else "syscall")
        if kind >= 20:                      # debugger stops (native/debug.c)
            return debug_exit(self, kind)
        if err == ucc.UC_ERR_INSN_INVALID:
            return self._invalid_opcode_exit()
        if single_step and kind == 0 and err == 0:
            return DeadlineExit(rip=r.rip)
        if err not in (0,):
            return InternalErrorExit(rip=r.rip, message=f"Unicorn: {UcError(err)}")
        lin = self.linear_rip()
        # HLT leaves RIP after the F4 byte.
        try:
            prev = self.read_code(lin - 1, 1)
        except (GuestFault, EptFault):
            # The code page no longer translates: the guest rewrote its paging
            # structures and ran on from translations the TLB still held (SDM
            # Vol. 3A 4.10.4: no invalidation was required of the CPU).  Only
            # HLT ends a run with neither an error nor a stop reason.
            return HltExit(rip=r.rip)
        if prev == b"\xf4":
            return HltExit(rip=r.rip)
        return InternalErrorExit(rip=r.rip, message="emulation stopped for an unknown reason")

    # ---- exit decoding helpers (emu.decode does the operand work)
    def _page_fault_exit(self, vpage: int, access: int, error_code: int) -> Exit:
        cr2 = fault_address(self, vpage, access)
        return ExceptionExit(rip=self.regs.rip, vector=x86.PF, error_code=error_code, cr2=cr2)

    def _mmio_exit(self, vpage: int, ppage: int, access: int) -> Exit:
        return mmio_access(self, vpage, ppage, access)

    def _invalid_opcode_exit(self) -> Exit:
        try:
            b = self.read_code(self.linear_rip(), 1)
        except (GuestFault, EptFault):
            b = b""
        if b == b"\xf1":  # INT1/ICEBP: a #DB trap (SDM Vol. 3A 6.15 "Interrupt 1")
            return ExceptionExit(rip=self.regs.rip + 1, vector=x86.DB, software=False, insn_len=1)
        return ExceptionExit(rip=self.regs.rip, vector=x86.UD)

    def trap_exit_at(self, ex: PolicyExit) -> Exit:
        """The ordinary exit value of a trap site the fast path decided (its
        operands decoded in Python), for whoever needs more than the policy's
        reason and qualification (e.g. emulating the instruction)."""
        return self._trap_exit(*ex.site)

    def _trap_exit(self, lin: int, paddr: int, gen: int) -> Exit:
        """The exit for the trap site at linear address ``lin`` (physical
        ``paddr``, page write generation ``gen``).  Never runs the guest: a site
        that is not an armed instruction any more is dropped and RetryExit
        tells the caller to run again."""
        key = (lin, paddr, gen, self.regs.hflags & 0xC0F3)
        cache = self._site_cache
        if key in cache:
            site = cache[key]
        else:
            site = decode_site(self, lin)
            if len(cache) > 4096:
                cache.clear()
            cache[key] = site
        ex = site_exit(self, site) if site is not None else None
        if ex is None:
            # Not an armed instruction (the code changed under a stale site, the
            # kind is no longer armed, or it is not one in the current mode):
            # drop the site; the caller's loop runs again.
            lib.vmlab_exit_remove(self._v, self._uch, lin)
            return RetryExit(rip=self.regs.rip)
        return ex

    #: guest-physical address of the hidden scratch page used to replay MMIO
    #: instructions (outside guest RAM, so the guest's own walks never reach it)
    SCRATCH_PA = (1 << 39) - 0x1000

    def replay_mmio(self, ex, value: int | None) -> int | None:
        """Run the instruction of a ``replay`` MmioExit once, natively, with its
        memory operand's page redirected to a scratch page that holds ``value``
        (what the device returned).  Returns the operand's new value if the
        instruction wrote it.  This completes any instruction (ALU, TEST, XCHG…)
        without an x86 emulator of our own."""
        if not self._scratch_mapped:
            self.uc.mem_map(self.SCRATCH_PA, 0x1000)
            self._scratch_mapped = True
        off = ex.gla & 0xFFF
        self.uc.mem_write(self.SCRATCH_PA + off, (value or 0).to_bytes(ex.size, "little"))
        v = self._v
        self.flush()
        v.redirect_vpage, v.redirect_ppage, v.redirect_on = ex.gla & ~0xFFF, self.SCRATCH_PA, 1
        self._flush_translations()
        lin = self.linear_rip()
        self.uc.ctl_remove_cache(lin, lin + ex.insn_len)
        try:
            err = lib.vmlab_emu_step(v, self._uch, self.regs.rip)
            kind, vector = v.stop_kind, v.intno
        finally:
            v.redirect_on = 0
            self._flush_translations()
            self.uc.ctl_remove_cache(lin, lin + ex.insn_len)
            v.stop_kind = 0
        self.refresh()
        if kind == lib.VMLAB_STOP_EXCEPTION:
            # The replayed instruction faulted after reading the device's value
            # (a POP ES of open bus loads selector FFFFH: #GP): the fault is
            # the instruction's, delivered as for any other instruction.
            ec = self.regs.error_code & 0xFFFFFFFF if vector in x86.ERROR_CODE_VECTORS else None
            raise GuestFault(vector, ec)
        if kind == lib.VMLAB_STOP_PAGE_FAULT:
            raise GuestFault(x86.PF, v.fault_error_code, v.fault_vaddr)
        if kind == lib.VMLAB_STOP_MMIO:
            raise UnsupportedError(f"the instruction at {lin:#x} touches two pages outside RAM "
                                   f"({ex.gla & ~0xFFF:#x} and {v.fault_vaddr:#x}); vmlab replays one")
        if err == ucc.UC_ERR_INSN_INVALID:
            # An encoding Capstone decodes but the CPU model rejects (e.g. the
            # F6 /1 alias of TEST with a memory operand): #UD, as the guest gets
            # for it anywhere else.
            raise GuestFault(x86.UD)
        if err:
            raise NativeError(f"replaying the MMIO instruction at {lin:#x} failed ({err})")
        if ex.is_write:
            return int.from_bytes(self.uc.mem_read(self.SCRATCH_PA + off, ex.size), "little")
        return None

    def skip(self, insn_len: int) -> None:
        """Advance RIP past an emulated instruction.  Completing it also ends an
        STI / MOV SS interrupt shadow (SDM Vol. 3A 6.8.3), which QEMU keeps in
        hflags and only clears when it executes the next instruction itself."""
        r = self.regs
        if r.hflags & x86.HF_INHIBIT_IRQ:
            self.load_segments({}, hflags_extra=(x86.HF_INHIBIT_IRQ, 0))
        mask = 0xFFFFFFFFFFFFFFFF if r.hflags & x86.HF_CS64 else 0xFFFFFFFF if r.hflags & x86.HF_CS32 else 0xFFFF
        self.set_rip((r.rip + insn_len) & mask)
