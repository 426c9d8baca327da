"""A hostile guest gets faults or error statuses, never a Python traceback
(architecture rule 4): random code and random descriptor tables, in every mode."""
import struct

from hypothesis import HealthCheck, example, given, settings, strategies as st

from support import Machine

REASONS = {"debug-exit", "halted", "shutdown", "limit", "timeout", "error"}


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(code=st.binary(min_size=1, max_size=64),
       mode=st.sampled_from(["real", "protected32", "long64"]),
       idt=st.binary(min_size=0, max_size=256))
# F6 /1 (TEST's alias) on MMIO: Capstone decodes it, Unicorn's replay rejects it -> #UD
@example(code=b"\xf6H\x80", mode="protected32", idt=b"")
# POP ES with the stack outside RAM across a page boundary: two unbacked pages
@example(code=b"\x00\x00\x03\x60\xfd\x07", mode="protected32", idt=b"")
def test_random_code_and_idt_never_raise(code, mode, idt):
    m = Machine(ram=4 << 20)
    addr = 0x7C00 if mode == "real" else 0x100000
    m.boot(code, addr, mode)
    if idt:
        # Point IDTR at random bytes: delivery must bound its walk by the limit.
        m.mem.write(0x20000, idt)
        m.cpu.set_descriptor_tables(idtr=(0x20000, len(idt) - 1))
        m.cpu.flush()
    res = m.vm.run(max_insns=20_000, timeout=10)
    assert res.reason in REASONS, res
    if res.reason == "error":
        # a clear message about the guest, not a vmlab bug caught by the run loop
        assert res.message and not res.message.startswith("internal error"), res.message


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(pte=st.integers(0, 2 ** 64 - 1), cr3=st.integers(0, 2 ** 32 - 1))
def test_random_page_tables_fault_instead_of_escaping_ram(pte, cr3):
    # 32-bit code enables paging with a random CR3 / PDE; accesses must stay in RAM.
    m = Machine(ram=4 << 20)
    m.mem.write(0x3000, struct.pack("<Q", pte) * 4)
    code = bytes.fromhex("b8") + struct.pack("<I", cr3 & 0xFFFFF000) + bytes.fromhex(
        "0f22d8"            # mov cr3, eax
        "0f20c0"            # mov eax, cr0
        "0d00000080"        # or eax, 0x80000000
        "0f22c0"            # mov cr0, eax
        "8b0500100000"      # mov eax, [0x1000]
        "f4")
    m.boot(code, 0x100000, "protected32")
    res = m.vm.run(max_insns=20_000, timeout=10)
    assert res.reason in REASONS, res
    if res.reason == "error":
        assert not res.message.startswith("internal error"), res.message
