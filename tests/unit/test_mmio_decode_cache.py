"""MMIO accesses decoded once (emu/decode.py _MMIO_PLANS): an instruction that
hits MMIO again is not decoded by Capstone again, and each access still gets
its own address, value and destination (the plan holds the operands, never
their values)."""
from support import asm

from vmlab.emu import decode


def _run64(machine, body):
    code = asm(body + "\n mov al, 0\n out 0xf4, al", 0x100000, 64)
    machine.boot(code, 0x100000, "long64")
    return machine.run()


def test_repeated_mmio_instructions_use_their_own_values_and_addresses(machine, monkeypatch):
    decode._MMIO_PLANS.clear()
    fetches = []
    real_fetch = type(machine.cpu).fetch_insn
    monkeypatch.setattr(type(machine.cpu), "fetch_insn", lambda self, *a: fetches.append(1) or real_fetch(self, *a))
    res = _run64(machine, """
        mov rbx, 0xfee00000
        mov r10d, dword ptr [rbx + 0x30]
        mov r11d, dword ptr [rbx + 0x20]
        xor r8, r8
        xor r9, r9
        mov ecx, 1
    l:
        mov eax, ecx
        shl eax, 4
        mov dword ptr [rbx + 0x80], eax      # one instruction, eight values (TPR)
        mov edx, dword ptr [rbx + 0x80]      # read back
        add r8, rdx
        mov esi, ecx
        and esi, 1
        shl esi, 4
        add esi, 0x20                        # 0x30 (version) for odd, 0x20 (ID) for even counts
        mov edx, dword ptr [rbx + rsi]       # one instruction, two registers
        add r9, rdx
        inc ecx
        cmp ecx, 8
        jbe l
    """)
    assert res.reason == "debug-exit", res
    g = list(machine.cpu.regs.gpr)
    n_fetches = len(fetches)
    assert g[8] == 0x10 * sum(range(1, 9))
    # four reads of the version register (0x30), four of the ID register (0x20)
    assert g[10] & 0xFF == 0x14
    assert g[9] == 4 * (g[10] + g[11])
    # 26 MMIO accesses by five instructions: each decoded by Capstone once
    assert n_fetches == 5
    assert len(decode._MMIO_PLANS) == 5
