"""Offsets inside a Unicorn 2.1.4 saved context (QEMU's CPUX86State).

Unicorn's API does not expose segment caches, CPL, the error code of an exception
it raised, or QEMU's "exception in flight" field.  They are reached through the
context blob (../shared/platform-notes.md, "Reaching CPU state the API does not
expose").  This is internal layout, so it is found by anchors and verified every
time a vCPU starts: if Unicorn changes, vmlab fails loudly here instead of
corrupting guests.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import Uc
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_ES

from .errors import NativeError

_MARKS = (0x0123456789ABCDEF, 0x1122334455667788, 0x99AABBCCDDEEFF00, 0x0F1E2D3C4B5A6978)
_DR_RESET = struct.pack("<8Q", 0, 0, 0, 0, 0, 0, 0xFFFF0FF0, 0x400)


@dataclass(frozen=True)
class ContextLayout:
    env: int             # CPUX86State.regs[0]
    hflags: int
    segs: int
    ldt: int
    tr: int
    error_code: int
    is_int: int
    old_exception: int


def find_layout(uc: Uc) -> ContextLayout:
    """Locate the fields by anchors on a fresh engine (clobbers RAX-RDX, ES)."""
    saved = [uc.reg_read(r) for r in (UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX)]
    for reg, val in zip((UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX), _MARKS):
        uc.reg_write(reg, val)
    uc.reg_write(UC_X86_REG_ES, 0x2B)
    blob = bytes(uc.context_save())
    env = blob.find(struct.pack("<4Q", *_MARKS))
    dr = blob.find(_DR_RESET)
    if env < 0 or dr < 0 or blob.find(struct.pack("<4Q", *_MARKS), env + 1) >= 0:
        raise NativeError("unicorn context layout not recognised (is unicorn==2.1.4 installed?)")
    lay = ContextLayout(env=env, hflags=env + 176, segs=env + 184, ldt=env + 184 + 6 * 24,
                        tr=env + 184 + 7 * 24, error_code=dr - 16, is_int=dr - 12,
                        old_exception=dr + 96)
    # Verify the anchors: ES selector where segs[0] should be, old_exception == -1
    # at reset, and 64-bit hflags (LMA | CS64) in a UC_MODE_64 engine.
    es_sel = struct.unpack_from("<I", blob, lay.segs)[0]
    old_exc = struct.unpack_from("<i", blob, lay.old_exception)[0]
    hflags = struct.unpack_from("<I", blob, lay.hflags)[0]
    if es_sel != 0x2B or old_exc != -1 or not (hflags & (1 << 14)):
        raise NativeError(
            f"unicorn context self-test failed (es={es_sel:#x} old_exception={old_exc} "
            f"hflags={hflags:#x}); vmlab needs unicorn==2.1.4")
    for reg, val in zip((UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX), saved):
        uc.reg_write(reg, val)
    uc.reg_write(UC_X86_REG_ES, 0)
    return lay
