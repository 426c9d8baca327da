"""The VMCS in native memory (native/vmcs.c; vmm/vmcs.py ``Vmcs.area``): the
fixed layout's slots, the guest-state and exit-information stores against
their Python twins, and a VMCS that Python and C read and write in place."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vmlab.emu import fastpath
from vmlab.emu.native import ffi, lib
from vmlab.vmm import vmcs as F
from vmlab.vmm.controls import PrimaryProcBasedControls as PP
from vmlab.vmm.exit_reasons import ExitReason
from vmlab.vmm.harness import vmx_guest
from vmlab.vmm.nested_state import GUEST_IMAGE, store_guest

from .test_nested_state import regs

U64 = st.integers(0, (1 << 64) - 1)


def test_every_field_has_its_own_slot_inside_the_area():
    slots = [f.slot for f in F.FIELDS]
    assert len(set(slots)) == len(slots)
    assert all(0 <= k < F.VMCS_SLOTS for k in slots)
    assert F.VMCS_SLOTS == lib.VMLAB_VMCS_SLOTS


@given(st.integers(0, 0xFFFFFFFF))
def test_slot_twin(encoding):
    assert lib.vmlab_vmcs_slot(encoding) == F.slot(encoding) == fastpath.vmcs_slot(encoding)


def test_native_guest_image_encodings_are_the_python_ones():
    assert [lib.vmlab_vmcs_guest_image_encoding(k) for k in range(len(GUEST_IMAGE) + 1)] == [*GUEST_IMAGE, 0]


def _area(values):
    a = ffi.new("uint64_t[]", F.VMCS_SLOTS)
    a[0:F.VMCS_SLOTS] = values
    return a


#: a whole area's prior contents: drawn as a seed (1024 drawn integers make hypothesis slow)
AREAS = st.integers(0, 1 << 32).map(lambda seed: [random.Random(seed).getrandbits(64) for _ in range(F.VMCS_SLOTS)])


@settings(max_examples=200, deadline=None)
@given(regs(), AREAS, st.booleans())
def test_store_guest_twin(r, before, nmi_blocked):
    native, twin = _area(before), _area(before)
    lib.vmlab_vmcs_store_guest(r, native, nmi_blocked)
    store_guest(r, twin, nmi_blocked)
    assert list(native) == list(twin)
    intr = F.slot(F.GUEST_INTERRUPTIBILITY_STATE)
    assert native[intr] & 8 == (8 if nmi_blocked else 0)
    assert native[intr] & ~8 == before[intr] & ~8
    assert native[F.slot(F.GUEST_RIP)] == r.rip and native[F.slot(F.GUEST_RSP)] == r.gpr[4]
    # nothing outside the guest-state fields moves
    touched = {F.slot(e) for e in GUEST_IMAGE} | {intr}
    assert all(native[k] == before[k] for k in range(F.VMCS_SLOTS) if k not in touched)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1), st.integers(0, 15),
       st.one_of(st.just(0), st.integers(0, 0xFFFFFFFF)), st.integers(0, 0xFFFFFFFF),
       AREAS)
def test_store_exit_twin(reason, qual, length, intr_info, intr_error, before):
    f = ffi.new("vmlab_fastpath *")
    f.exit_reason, f.exit_qual, f.exit_len = reason, qual, length
    f.exit_intr_info, f.exit_intr_error = intr_info, intr_error
    native, twin = _area(before), _area(before)
    lib.vmlab_vmcs_store_exit(f, native)
    fastpath.store_exit(f, twin)
    assert list(native) == list(twin)
    v = F.Vmcs()
    ffi.memmove(v.area, native, 8 * F.VMCS_SLOTS)
    assert (v.read(F.VM_EXIT_REASON), v.read(F.EXIT_QUALIFICATION), v.read(F.VM_EXIT_INSTRUCTION_LEN),
            v.read(F.VM_EXIT_INTR_INFO), v.read(F.IDT_VECTORING_INFO)) == (reason, qual, length, intr_info, 0)
    ec = F.slot(F.VM_EXIT_INTR_ERROR_CODE)
    assert native[ec] == (intr_error if intr_info & 0x800 else before[ec])


@given(st.sampled_from(F.FIELDS), U64, st.booleans())
def test_vmread_vmwrite_go_through_the_area(field, value, high):
    v = F.Vmcs()
    if high and field.width is not F.FieldWidth.BITS64:
        high = False
    v.write(field.encoding | int(high), value)
    stored = v.area[field.slot]
    expect = ((value & 0xFFFFFFFF) << 32) if high else value & field.mask
    assert stored == expect
    v.area[field.slot] = field.mask             # what C writes, VMREAD returns
    assert v.read(field.encoding) == field.mask
    assert v.copy().snapshot()[field.name] == field.mask


def test_a_lean_exit_finds_its_exit_information_in_the_area_before_any_python_store():
    """The handler reads the area directly (no VMREAD, nothing deferred is
    stored by reading it): reason, qualification and length are there
    because the native call wrote them at the exit (SDM Vol. 3C 28.2)."""
    g = vmx_guest("""
        mov ecx, 5
    l:  mov dx, 0x1234
        out dx, al
        cpuid
        dec ecx
        jnz l
        vmcall
    """, proc=(PP.UNCONDITIONAL_IO_EXITING, PP.USE_IO_BITMAPS))
    mem, seen = g.vmcs.mem, []
    reason_k, qual_k, len_k = (F.slot(e) for e in (F.VM_EXIT_REASON, F.EXIT_QUALIFICATION,
                                                   F.VM_EXIT_INSTRUCTION_LEN))

    def on_exit(ex):
        seen.append((mem[reason_k], mem[qual_k], mem[len_k], g.vmcs.lazy is not None))
        ex.skip()
    g.handlers[int(ExitReason.CPUID)] = g.handlers[int(ExitReason.IO_INSTRUCTION)] = on_exit
    lean_words, lean_exit = [], g.lean_exit

    def counted(word):
        lean_words.append(word)
        return lean_exit(word)
    g.lean_exit = counted                   # the run loop looks it up on the guest
    ex = g.run()
    assert ex.reason == ExitReason.VMCALL
    # OUT DX, AL: qualification size 0 (1 byte), direction 0 (out), DX-form bit 6 = 0,
    # port 0x1234 in bits 31:16 (SDM Vol. 3C Table 28-5); CPUID: 0, length 2
    io = (int(ExitReason.IO_INSTRUCTION), 0x1234 << 16, 1, True)
    cpuid = (int(ExitReason.CPUID), 0, 2, True)
    assert seen == [io, cpuid] * 5
    # the first exit comes through the general path (its VM entry is the
    # full one); the others were the lean path's, written by C alone
    assert len(lean_words) >= 8


def test_a_vmcs_copies_and_pickles_with_its_area():
    import copy
    import pickle
    v = F.Vmcs(revision_id=7)
    v.write(F.GUEST_RIP, 0x1234)
    v.write(F.EPT_POINTER | 1, 0xAB)            # the high half of a 64-bit field
    v.launch()
    for c in (copy.copy(v), copy.deepcopy(v), pickle.loads(pickle.dumps(v))):
        assert c.snapshot() == v.snapshot() and c.launched and c.revision_id == 7
        assert c.area != v.area                 # its own native memory
        c.write(F.GUEST_RIP, 1)
        assert v.read(F.GUEST_RIP) == 0x1234
