"""EPT under a VMCS: the soft-MMU's second dimension produces EPT-violation and
EPT-misconfiguration exits with SDM Table 28-7 qualifications (SDM Vol. 3C 29.3)."""
import struct

from vmlab.vmm import vmcs as F
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import vmx_guest
from vmlab.vmm.qualification import EptViolationQualification as Q


def split_first_2m(g):
    """Replace the EPT's first 2 MiB page with 4 KiB entries; returns the PT address."""
    pt = g.ept_tables - 0x1000
    g.vm.mem.write(pt, b"".join(struct.pack("<Q", (i << 12) | 0x37) for i in range(512)))
    g.vm.mem.write(g.ept_tables + 0x2000, struct.pack("<Q", pt | 7))
    return pt


def set_ept_pte(g, pt, gpa, value):
    g.vm.mem.write(pt + 8 * (gpa >> 12), struct.pack("<Q", value))


def test_store_to_ept_read_only_page_is_a_violation_with_exact_fields():
    g = vmx_guest("mov rbx, 0x150008\n mov dword ptr [rbx], 1\n hlt")
    pt = split_first_2m(g)
    set_ept_pte(g, pt, 0x150000, 0x150000 | 0x35)          # R and X, no W, WB
    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.EPT_VIOLATION
    assert ex.decoded == Q(write=True, readable=True, executable=True, linear_address_valid=True,
                           translated_access=True)
    assert ex.qualification == 0x1AA
    assert ex.vmcs.read(F.GUEST_PHYSICAL_ADDRESS) == 0x150008
    assert ex.vmcs.read(F.GUEST_LINEAR_ADDRESS) == 0x150008
    assert ex.vmcs.read(F.GUEST_RIP) == 0x100007                 # at the store


def test_ept_remaps_a_guest_physical_page_to_another_host_page():
    g = vmx_guest("mov rbx, 0x150000\n mov eax, dword ptr [rbx]\n vmcall")
    pt = split_first_2m(g)
    g.vm.mem.write(0x150000, struct.pack("<I", 0x11111111))
    g.vm.mem.write(0x160000, struct.pack("<I", 0x22222222))
    set_ept_pte(g, pt, 0x150000, 0x160000 | 0x37)
    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.VMCALL
    assert g.regs.rax & 0xFFFFFFFF == 0x22222222


def test_fetch_from_ept_non_executable_page():
    g = vmx_guest("mov rax, 0x150000\n jmp rax")
    pt = split_first_2m(g)
    g.vm.mem.write(0x150000, b"\xf4")
    set_ept_pte(g, pt, 0x150000, 0x150000 | 0x33)          # R/W, no X
    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.EPT_VIOLATION
    assert ex.decoded.fetch and not ex.decoded.executable and ex.decoded.translated_access
    assert ex.vmcs.read(F.GUEST_PHYSICAL_ADDRESS) == 0x150000


def test_guest_page_table_access_violation_has_bit_8_clear():
    # The guest's PD pages (0x10000-0x13fff) made not present in the EPT.
    g = vmx_guest("mov rbx, 0x40001000\n mov eax, [rbx]\n hlt")
    pt = split_first_2m(g)
    g.cpu.flush_tlb()
    set_ept_pte(g, pt, 0x11000, 0)                           # PD for [1 GiB, 2 GiB)
    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.EPT_VIOLATION
    assert ex.decoded.read and ex.decoded.linear_address_valid and not ex.decoded.translated_access
    assert not (ex.decoded.readable or ex.decoded.writable or ex.decoded.executable)
    assert ex.vmcs.read(F.GUEST_PHYSICAL_ADDRESS) == 0x11000 + 8 * 0   # PDE for 0x40001000
    assert ex.vmcs.read(F.GUEST_LINEAR_ADDRESS) == 0x40001000


def test_ept_entry_write_without_read_is_a_misconfiguration():
    g = vmx_guest("mov rbx, 0x150000\n mov eax, [rbx]\n hlt")
    pt = split_first_2m(g)
    set_ept_pte(g, pt, 0x150000, 0x150000 | 0x32)          # W without R
    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.EPT_MISCONFIG
    assert ex.vmcs.read(F.GUEST_PHYSICAL_ADDRESS) & ~0xFFF == 0x150000


def test_handler_maps_the_page_and_the_guest_continues():
    g = vmx_guest("mov rbx, 0x150000\n mov dword ptr [rbx], 0x5a5a\n mov eax, [rbx]\n vmcall")
    pt = split_first_2m(g)
    set_ept_pte(g, pt, 0x150000, 0)

    @g.handler(ExitReason.EPT_VIOLATION)
    def fix(ex):
        set_ept_pte(g, pt, ex.vmcs.read(F.GUEST_PHYSICAL_ADDRESS) & ~0xFFF, 0x170000 | 0x37)
        g.cpu.invept()

    ex = g.run(max_insns=10_000)
    assert ex.reason == ExitReason.VMCALL
    assert g.vm.mem.read_u32(0x170000) == 0x5a5a
