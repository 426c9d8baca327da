"""The block registry: discovery once per block, exec counts on request,
invalidation by stores to code, mode-keyed entries, -d in_asm/exec/tb logs."""
import io

from support import Machine, asm
from vmlab.vmm.log import DebugLog


def _boot64(m, body):
    m.boot(asm(body + "\n mov al, 0\n out 0xf4, al", 0x100000, 64), 0x100000, "long64")


def test_loop_block_registered_once_and_counted_when_asked(machine):
    machine.vm.tbs.set_exec_counting(True)
    _boot64(machine, "mov ecx, 1000\n l: add rax, rcx\n dec ecx\n jnz l")
    assert machine.run().reason == "debug-exit"
    loop = [b for b in machine.vm.tbs.blocks() if b.exec_count >= 999]
    assert len(loop) == 1
    b = loop[0]
    # the first pass runs in the entry block (mov ecx + the body); the loop
    # block itself 999 times, each counted once
    assert b.exec_count == 999
    assert b.ninsn == 3 and b.translations == 1 and b.bits == 64 and b.cpl == 0
    assert [m for _, m, _ in machine.vm.tbs.disassemble(b)] == ["add", "dec", "jne"]


def test_exec_counts_with_the_host_clock():
    """The host clock's block hook counts the same executions."""
    m = Machine(clock="host")
    try:
        m.vm.tbs.set_exec_counting(True)
        _boot64(m, "mov ecx, 1000\n l: add rax, rcx\n dec ecx\n jnz l")
        assert m.run().reason == "debug-exit"
        assert [b.exec_count for b in m.vm.tbs.blocks() if b.ninsn == 3 and b.exec_count > 1] == [999]
    finally:
        m.close()


def test_store_to_code_invalidates_its_blocks(machine):
    # Run a block, patch it, run it again: the registry sees one invalidation and
    # a second translation of the same key.
    _boot64(machine, """
        mov rbx, target
        call target
        mov byte ptr [rbx + 1], 0x07     # mov al, 5 -> mov al, 7
        call target
        mov r8, rax
        jmp done
    target:
        mov al, 5
        ret
    done:
    """)
    machine.vm.vcpu.keep_block_logs = True
    assert machine.run().reason == "debug-exit"
    assert machine.cpu.regs.gpr[8] & 0xFF == 7
    st = machine.vm.tbs.stats()
    assert st["invalidations"] >= 1
    inval = machine.vm.tbs.drain_invalidated()
    assert any(machine.mem.read(b.paddr, 1) == b"\xb0" for b in inval)


def test_same_bytes_in_16_32_64_bit_mode_are_three_blocks():
    from support import Machine
    # 0x48 0x40 ...: in 64-bit mode a REX prefix; in 16/32-bit mode DEC/INC.
    code = bytes.fromhex("b8 00 00 00 00 48 40 90".replace(" ", ""))
    seen = set()
    for mode, addr in (("real", 0x7c00), ("protected32", 0x100000), ("long64", 0x100000)):
        m = Machine()
        m.boot(code + b"\xe6\xf4", addr, mode)
        m.run(max_insns=100)
        blocks = [b for b in m.vm.tbs.blocks() if b.paddr == addr]
        assert blocks, mode
        seen |= {(b.bits, b.ninsn) for b in blocks}
    assert {bits for bits, _ in seen} == {16, 32, 64}
    assert len({n for _, n in seen}) >= 2       # decoded differently


def test_in_asm_and_tb_logs_print_blocks_and_invalidations():
    out = io.StringIO()
    from vmlab.vmm.vm import Vm
    from vmlab.emu.loaders import load
    vm = Vm(16 << 20, serial=None, log=DebugLog.parse("in_asm,tb", out))
    code = asm("""
        mov rbx, patch
        mov byte ptr [rbx], 0x90
    patch:
        hlt
        mov al, 0
        out 0xf4, al
    """, 0x100000, 64)
    vm.load(load(code, fmt="flat", ram_size=16 << 20, flat_addr=0x100000, flat_mode="long64"))
    assert vm.run(max_insns=1000).reason == "debug-exit"
    text = out.getvalue()
    assert "IN: [long cpl=0 phys=0x100000]" in text
    assert "0x0000000000100000:  movabs rbx, 0x100011" in text or "mov rbx" in text
    assert "invalidate tb" in text


def test_modes_guest_registers_one_block_per_mode_for_the_same_bytes():
    """guests/modes.asm runs one byte string as 16-, 32- and 64-bit code: the
    registry holds three blocks at that physical address, decoded three ways."""
    import pathlib
    from vmlab.emu.loaders import load
    from vmlab.tools.asm import build
    from vmlab.vmm.vm import Vm
    root = pathlib.Path(__file__).resolve().parents[2]
    image = build(root / "guests" / "modes.asm")
    data = image.read_bytes()
    pattern = bytes.fromhex("31c048b80100404 0c3".replace(" ", ""))
    vm = Vm(64 << 20, serial=None)
    img = load(str(image), ram_size=64 << 20)
    vm.load(img)
    res = vm.run(max_insns=10_000_000)
    assert res.reason == "debug-exit" and res.status == 1, (res, vm.serial_output)
    load_addr = img.writes[0][0]
    paddr = load_addr + data.index(pattern)
    blocks = [b for b in vm.tbs.blocks() if b.paddr == paddr]
    assert {b.bits for b in blocks} == {16, 32, 64}
    decoded = {b.bits: [m for _, m, _ in vm.tbs.disassemble(b)] for b in blocks}
    assert decoded[16][:5] == ["xor", "dec", "mov", "inc", "inc"]
    assert decoded[32][:3] == ["xor", "dec", "mov"]
    assert decoded[64][:2] == ["xor", "movabs"]


def test_a_store_to_the_second_page_of_a_page_crossing_block_rearms_it():
    """A block from virtual page 0x400000 (physical 0x200000) into 0x401000
    (physical 0x300000, not the next physical page) runs; the guest then writes
    an OUT into its second page: the block's bytes there are classified again,
    so the OUT is a trap site and reaches the debug-exit port (as on QEMU)."""
    m = Machine(32 << 20)
    try:
        body = """
            mov rbx, 0x400ffa
            call rbx
            mov byte ptr [0x300000], 0xe6     # out 0xf4, al: through the identity map
            mov byte ptr [0x300001], 0xf4
            mov byte ptr [0x300002], 0xc3     # ret
            mov al, 0x05
            call rbx
            hlt
        """
        m.boot(asm(body, 0x100000, 64), 0x100000, "long64")
        pdpt = m.u64(m.cpu.refresh().cr3 & ~0xFFF) & 0xFFFFFFFFF000
        pd = m.u64(pdpt) & 0xFFFFFFFFF000
        pt = 0x50000
        m.mem.write_int(pt, 8, 0x200000 | 3)            # 0x400000 -> 0x200000
        m.mem.write_int(pt + 8, 8, 0x300000 | 3)        # 0x401000 -> 0x300000
        m.mem.write_int(pd + 8 * 2, 8, pt | 3)          # [4 MiB, 6 MiB) through that table
        m.mem.write(0x200FFA, b"\x90" * 6)              # the block: 6 NOPs, then in the next page
        m.mem.write(0x300000, b"\x90\x90\xc3")          # NOP NOP RET (the same size as OUT + RET)
        res = m.run(max_insns=100_000)
        assert res.reason == "debug-exit" and res.status == (5 << 1) | 1
    finally:
        m.close()
