"""Code in RAM that a device (DMA) or the host rewrites runs as the new bytes:
the pages it hits lose their translations and trap-site classification, as
QEMU invalidates translated code on DMA (a CPU store is caught by the TLB
fill instead)."""
import pytest

from support import Machine, asm

FUNC = 0x180000


class Dma:
    """A port device that writes guest RAM when poked, like a disk's DMA."""

    def __init__(self, mem, addr: int, data: bytes):
        self.mem, self.addr, self.data = mem, addr, data

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.mem.write(self.addr, self.data)


@pytest.mark.parametrize("new, status", [
    ("mov eax, 2\n ret", (2 << 1) | 1),
    # the rewritten function holds a trap-site kind (port I/O) it did not before
    ("mov al, 0x23\n out 0xf4, al\n ret", (0x23 << 1) | 1),
])
def test_code_rewritten_by_dma_runs_as_the_new_bytes(new, status):
    m = Machine()
    try:
        m.mem.write(FUNC, asm("mov eax, 1\n ret", FUNC, 32))
        m.vm.pio.register(0x520, 1, Dma(m.mem, FUNC, asm(new, FUNC, 32)), "dma")
        m.boot(asm(f"""
            mov esp, 0x90000
            mov ebx, {FUNC:#x}
            call ebx                 # translated and run once: returns 1
            mov dx, 0x520
            out dx, al               # the device rewrites the function
            call ebx
            out 0xf4, al             # (eax << 1) | 1
            hlt
        """, 0x100000, 32), 0x100000, "protected32")
        res = m.vm.run(max_insns=100_000)
    finally:
        m.close()
    assert res.reason == "debug-exit" and res.status == status, res


def test_host_write_to_data_pages_keeps_translations():
    """Writes that hit no code page (rings, buffers) drop nothing."""
    m = Machine()
    try:
        m.boot(asm("l: jmp l", 0x100000, 32), 0x100000, "protected32")
        m.vm.run(max_insns=10_000)
        v = m.cpu.native
        before = v.stat_tb_invalidations
        assert m.cpu.native.page_flags[0x100] & 1          # the loop's page holds code
        m.mem.write(0x200000, b"\x90" * 64)
        assert v.stat_tb_invalidations == before
        m.mem.write(0x100000, b"\xeb\xfe")
        assert v.stat_tb_invalidations > before
    finally:
        m.close()


class Counter:
    def __init__(self):
        self.reads = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@pytest.mark.slow
def test_trap_sites_stay_bounded_for_a_guest_that_keeps_making_new_code():
    """A JIT-like guest writes and calls 8400 tiny functions, each with an IN
    at a new address: the armed sites never exceed the bound (Unicorn walks
    its hook list for every instruction it translates); past it they are all
    dropped and re-armed as blocks run, and every IN still reaches the device."""
    from vmlab.emu.native import lib
    m = Machine()
    try:
        dev = Counter()
        m.vm.pio.register(0x9A, 1, dev, "counter")
        m.boot(asm("""
            mov esp, 0x90000
            mov edi, 0x200000
            mov ecx, 8400
        next:
            mov word ptr [edi], 0x9ae5       # in eax, 0x9a
            mov byte ptr [edi + 2], 0xc3     # ret
            call edi
            add edi, 3
            dec ecx
            jnz next
            mov al, 0
            out 0xf4, al
            hlt
        """, 0x100000, 32), 0x100000, "protected32")
        res = m.vm.run(max_insns=5_000_000)
        v = m.cpu.native
        assert res.reason == "debug-exit" and res.status == 1, res
        assert dev.reads == 8400
        assert v.stat_sites_resets >= 1 and v.nexits <= lib.VMLAB_MAX_SITES
    finally:
        m.close()
