"""native/nested.c's level switch (vmlab_level_save / _compose / _load) against
its Python twin vmm/nested_state.py, and the host-state image (SDM Vol. 3C 28.5)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmlab.emu import x86
from vmlab.emu.native import ffi, lib
from vmlab.vmm import vmcs as F
from vmlab.vmm.nested_state import (CR0, CR3, CR4, EFER, GDTR_BASE, GUEST_IMAGE, IDTR_LIMIT, N, RFLAGS, SEG,
                                    LevelSwitch, host_image, level_compose, level_save, load_py)
from vmlab.vmm.vm import Vm

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, 0xFFFFFFFF)
#: access rights: mostly what descriptors hold (type, S, DPL, P, AVL, L, D/B, G), sometimes unusable or junk
AR = st.one_of(st.integers(0, 0xFF).map(lambda t: t | 0x80), st.integers(0, 0xF0FF),
               st.just(1 << 16), st.integers(0, 0x1FFFF), U32)


def _seg(r, k):
    return r.seg[k] if k < 6 else (r.ldtr if k == 6 else r.tr)


def _fields(r) -> dict:
    out = {n: getattr(r, n) for n in ("rip", "rflags", "cr0", "cr3", "cr4", "efer", "gdtr_base", "gdtr_limit",
                                      "idtr_base", "idtr_limit", "hflags")}
    out["gpr"] = list(r.gpr)
    for k in range(8):
        s = _seg(r, k)
        out[f"seg{k}"] = (s.selector, s.base, s.limit, s.flags)
    return out


@st.composite
def regs(draw):
    r = ffi.new("vmlab_regs *")
    for i in range(16):
        r.gpr[i] = draw(U64)
    r.rip, r.rflags, r.cr0, r.cr3, r.cr4, r.efer = (draw(U64) for _ in range(6))
    r.gdtr_base, r.idtr_base = draw(U64), draw(U64)
    r.gdtr_limit, r.idtr_limit = draw(U32), draw(U32)
    r.hflags = draw(U32)
    for k in range(8):
        s = _seg(r, k)
        s.selector = draw(st.sampled_from([0, 1, 3, 4, 8, 0x10, 0x2B, 0xFFFF]))
        s.base, s.limit = draw(U64), draw(U32)
        s.flags = draw(st.one_of(U32, st.integers(0, 0xFF).map(lambda t: (t << 8) | x86.DESC_P)))
    return r


@st.composite
def images(draw):
    img = [draw(U64) for _ in range(N)]
    for k in range(8):
        img[SEG + 4 * k] = draw(st.integers(0, 0xFFFF))
        img[SEG + 4 * k + 2] = draw(U32)
        img[SEG + 4 * k + 3] = draw(AR)
    img[GDTR_BASE + 1], img[IDTR_LIMIT] = draw(U32), draw(U32)
    return img


def _copy(r):
    c = ffi.new("vmlab_regs *")
    ffi.memmove(c, r, ffi.sizeof("vmlab_regs"))
    return c


@settings(max_examples=300, deadline=None)
@given(regs())
def test_native_save_matches_the_python_twin(r):
    img = ffi.new("uint64_t[]", N)
    lib.vmlab_level_save(r, img)
    assert list(img) == level_save(r)


@settings(max_examples=300, deadline=None)
@given(regs(), images())
def test_native_compose_matches_the_python_twin(r, img):
    a, b = _copy(r), _copy(r)
    lib.vmlab_level_compose(a, ffi.new("uint64_t[]", img))
    level_compose(b, img)
    assert _fields(a) == _fields(b)


def test_the_image_order_is_vmlab_h():
    assert N == len(GUEST_IMAGE) == 43
    assert GUEST_IMAGE[CR0] == int(F.GUEST_CR0) and GUEST_IMAGE[RFLAGS] == int(F.GUEST_RFLAGS)
    assert GUEST_IMAGE[SEG + 4] == int(F.GUEST_CS_SELECTOR) and GUEST_IMAGE[SEG + 31] == int(F.GUEST_TR_ACCESS_RIGHTS)
    assert GUEST_IMAGE[lib.VMLAB_LV_IDTR_LIMIT] == int(F.GUEST_IDTR_LIMIT)


# ---------------------------------------------------------------------- on a live vCPU
#: (CR0, CR4, EFER) of the modes a level may be in: protected without paging,
#: 32-bit paging, PAE, IA-32e (LMA is the CPU's)
_PAGING = [(x86.CR0_PE | x86.CR0_ET | x86.CR0_NE, 0, 0),
           (x86.CR0_PE | x86.CR0_ET | x86.CR0_NE | x86.CR0_PG | x86.CR0_WP, x86.CR4_PSE, 0),
           (x86.CR0_PE | x86.CR0_ET | x86.CR0_PG, x86.CR4_PAE, x86.EFER_NXE),
           (x86.CR0_PE | x86.CR0_ET | x86.CR0_NE | x86.CR0_PG, x86.CR4_PAE | x86.CR4_VMXE,
            x86.EFER_LME | x86.EFER_LMA | x86.EFER_SCE),
           (x86.CR0_PE | x86.CR0_ET | x86.CR0_PG, x86.CR4_PAE | x86.CR4_OSFXSR, x86.EFER_LME | x86.EFER_NXE)]


@st.composite
def live_images(draw):
    img = draw(images())
    img[CR0], img[CR4], img[EFER] = draw(st.sampled_from(_PAGING))
    img[CR3] = draw(st.integers(0, 0xFFF)) << 12
    img[0] = draw(st.integers(0, (1 << 47) - 1))            # RIP, canonical
    img[1] = draw(U64)
    for k in range(8):
        img[SEG + 4 * k + 1] = draw(st.sampled_from([0, 0x1000, 0xFFFF0000, draw(U64)]))
        img[SEG + 4 * k + 3] = draw(st.one_of(st.integers(0, 0xF0FF), st.just(1 << 16)))
    img[GDTR_BASE + 1], img[IDTR_LIMIT] = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    return img


@pytest.fixture(scope="module")
def two_vms():
    a, b = Vm(16 << 20, serial=None), Vm(16 << 20, serial=None)
    yield a, b
    a.close()
    b.close()


@settings(max_examples=60, deadline=None)
@given(first=live_images(), second=live_images())
def test_native_load_matches_the_python_path_on_a_live_vcpu(two_vms, first, second):
    """Two switches in a row (the second often changes the paging registers):
    the vCPU after vmlab_level_load equals the vCPU after the Vcpu calls of
    load_py, register file, hflags and the MMU's copies of CR0/CR3/CR4/EFER."""
    a, b = two_vms
    sw = LevelSwitch(a.vcpu)
    for img in (first, second):
        sw.load(img)
        load_py(b.vcpu, img)
        ra, rb = a.vcpu.refresh(), b.vcpu.refresh()
        assert _fields(ra) == _fields(rb)
        na, nb = a.vcpu.native, b.vcpu.native
        assert (na.cr0, na.cr3, na.cr4, na.efer) == (nb.cr0, nb.cr3, nb.cr4, nb.efer)
        assert sw.save() == level_save(ra)


def test_host_image_attributes():
    """SDM Vol. 3C 28.5.2: null data selectors are unusable except SS; CS.L is
    "host address-space size"; TR busy TSS, limit 0x67; LDTR unusable; EFER."""
    vals = {int(F.HOST_CS_SELECTOR): 8, int(F.HOST_SS_SELECTOR): 0, int(F.HOST_DS_SELECTOR): 0x10,
            int(F.HOST_TR_SELECTOR): 0x18, int(F.HOST_TR_BASE): 0x5000, int(F.HOST_FS_BASE): 0x7000,
            int(F.HOST_RIP): 0x1234, int(F.HOST_IA32_EFER): 0xD01}
    img = host_image(vals.get, 1 << 9, x86.EFER_SCE | x86.EFER_NXE | x86.EFER_LMA)
    ar = [img[SEG + 4 * k + 3] for k in range(8)]
    assert ar[0] == 1 << 16 and ar[3] != 1 << 16 and ar[2] != 1 << 16 and ar[4] == 1 << 16
    assert ar[1] & (1 << 13) and ar[6] == 1 << 16 and ar[7] == 0x8B
    assert img[SEG + 4 * 7 + 2] == 0x67 and img[SEG + 4 * 4 + 1] == 0x7000 and img[0] == 0x1234
    assert img[EFER] == x86.EFER_SCE | x86.EFER_NXE | x86.EFER_LME and img[RFLAGS] == 2
    img32 = host_image(vals.get, 1 << 21, 0)
    assert img32[EFER] == 0xD01 and not img32[SEG + 4 + 3] & (1 << 13) and img32[SEG + 4 + 3] & (1 << 14)


def test_host_state_image_is_rebuilt_after_a_full_entry_and_an_efer_change():
    """NestedVmx keeps the host-state image of the last VM exit; a VMWRITE of a
    host-state field makes the next VM entry take the full path, which must
    make the next VM exit load the new value (here: HOST_RIP)."""
    from vmlab.vmm.nested import _L2Guest
    from vmlab.vmm.vmx import TrackedVmcs, VmEntryFailed
    with Vm(16 << 20, serial=None) as vm:
        n = vm.enable_nested_vmx()
        v = TrackedVmcs.wrap(n.caps.new_vmcs())
        for f, val in ((F.HOST_CR0, x86.CR0_PE | x86.CR0_ET | x86.CR0_NE), (F.HOST_CS_SELECTOR, 8),
                       (F.HOST_SS_SELECTOR, 0x10), (F.HOST_TR_SELECTOR, 0x18), (F.HOST_RIP, 0x1000)):
            v.write(f, val)
        cpu = vm.vcpu
        n._load_host_state(v)
        assert cpu.refresh().rip == 0x1000
        v.write(F.HOST_RIP, 0x2000)
        g = _L2Guest(vm, n.caps, v)
        g._checked = True
        with pytest.raises(VmEntryFailed):      # the rest of this VMCS is empty: VMfailValid
            g._enter()
        n._load_host_state(v)
        assert cpu.refresh().rip == 0x2000
        v.mem[F.slot(F.HOST_RIP)] = 0x3000      # (not how a VMM writes: only an EFER change rebuilds now)
        cpu.write_efer(x86.EFER_NXE)
        n._load_host_state(v)
        assert cpu.refresh().rip == 0x3000
