"""Faults that come before VM exits (SDM Vol. 3C 26.1.1): "Certain exceptions
have priority over VM exits. These include invalid-opcode exceptions, faults
based on privilege level, and general-protection exceptions that are based on
checking I/O permission bits in the task-state segment (TSS)."

A guest at CPL 3 under controls that would make each instruction VM-exit:
the privileged ones raise #GP(0) (a VM exit with reason 0 through the
exception bitmap), those that need no privilege still VM-exit.  The fast path
in C and the Python path must agree on this (the fast path leaves such sites
to Python)."""
from __future__ import annotations

import struct

import pytest

from vmlab.vmm import vmcs as F
from vmlab.vmm.controls import PrimaryProcBasedControls as PP
from vmlab.vmm.controls import SecondaryProcBasedControls as SP
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import close_guests, vmx_guest

# IRETQ to ring 3 (selectors 0x23 code, 0x2b data: GDT entries 4 and 5 below)
TO_RING3 = """
    mov rax, rsp
    push 0x2b
    push rax
    pushfq
    or qword ptr [rsp], {iopl}
    push 0x23
    lea rcx, [rip + user]
    push rcx
    iretq
user:
"""
EXITING = (PP.HLT_EXITING | PP.UNCONDITIONAL_IO_EXITING | PP.INVLPG_EXITING | PP.MOV_DR_EXITING
           | PP.RDPMC_EXITING | PP.CR3_LOAD_EXITING | PP.CR3_STORE_EXITING | PP.RDTSC_EXITING
           | PP.MWAIT_EXITING | PP.MONITOR_EXITING | PP.ACTIVATE_SECONDARY_CONTROLS)
GP, UD = 13, 6


def _run(insn: str, iopl: int = 0):
    g = vmx_guest(TO_RING3.format(iopl=iopl << 12) + insn + "\n vmcall",
                  exception_bitmap=(1 << GP) | (1 << UD),
                  proc=(EXITING, PP.USE_IO_BITMAPS | PP.USE_MSR_BITMAPS),
                  proc2=(SP.WBINVD_EXITING | SP.DESCRIPTOR_TABLE_EXITING, 0),
                  fields={"GUEST_GDTR_LIMIT": 0x2F, "CR0_GUEST_HOST_MASK": 0xFFFFFFFF,
                          "CR0_READ_SHADOW": 0})
    mem = g.vm.mem
    mem.write(0x6020, struct.pack("<QQ", 0x00AFFB000000FFFF, 0x00CFF3000000FFFF))
    mem.write(0x5000 + 0x66, struct.pack("<H", 0x68))      # I/O map base past the TSS limit: every port refused
    ex = g.run()
    vec = ex.vmcs.read(F.VM_EXIT_INTR_INFO) & 0xFF if ex.reason == ExitReason.EXCEPTION_NMI else None
    out = (ex.reason, vec, g.cpu.cpl, ex.vmcs.read(F.GUEST_RIP))
    return out


@pytest.mark.parametrize("insn", ["hlt", "xor ecx, ecx\n wrmsr", "mov ecx, 0x10\n rdmsr", "invlpg [rax]",
                                  "mov dr7, rax", "clts", "lmsw ax", "wbinvd", "invd", "xor ecx, ecx\n rdpmc",
                                  "lgdt [rax]", "mov cr3, rax", "mov rax, cr3", "mov eax, 0x80000011\n mov cr0, rax",
                                  "out 0x80, al", "in al, dx"])
def test_privileged_instruction_at_cpl3_is_gp_not_a_vm_exit(insn):
    try:
        reason, vec, cpl, rip = _run(insn)
        assert (reason, vec, cpl) == (ExitReason.EXCEPTION_NMI, GP, 3)
    finally:
        close_guests()


@pytest.mark.parametrize("insn,reason", [("cpuid", ExitReason.CPUID), ("rdtsc", ExitReason.RDTSC),
                                         ("pause", None)])
def test_unprivileged_instruction_at_cpl3_still_exits(insn, reason):
    try:
        got, vec, cpl, _ = _run(insn)
        assert cpl == 3
        assert got == (reason if reason is not None else ExitReason.VMCALL)
    finally:
        close_guests()


def test_io_at_cpl3_allowed_by_iopl_exits():
    try:
        reason, vec, cpl, _ = _run("out 0x80, al", iopl=3)
        assert (reason, cpl) == (ExitReason.IO_INSTRUCTION, 3)
    finally:
        close_guests()


def test_monitor_at_cpl3_is_ud():
    try:
        reason, vec, cpl, _ = _run("xor ecx, ecx\n xor edx, edx\n monitor")
        assert (reason, vec, cpl) == (ExitReason.EXCEPTION_NMI, UD, 3)
    finally:
        close_guests()
