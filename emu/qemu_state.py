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


def _rw_regions(exclude: tuple[int, int] | None):
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if not parts[1].startswith("rw") or parts[1][2] == "x":
                continue          # not data, or a TCG code buffer (1 GiB rwx per engine)
            if len(parts) > 5 and parts[5].startswith("/") and not parts[5].startswith("/dev/zero"):
                continue          # file-backed data: not where malloc puts a CPU
            if exclude and lo < exclude[1] and exclude[0] < hi:
                continue
            yield lo, hi


def find_env_address(uc: Uc, layout: ContextLayout, exclude: tuple[int, int] | None = None) -> int:
    """Host address of the live CPUX86State (its regs[0]), found by writing two
    different register markers and keeping the one location that follows both.
    Lets native code read hflags (mode, CPL) with one load instead of a context
    save.  Raises NativeError if it is not exactly one place."""
    regs = (UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX)
    saved = [uc.reg_read(r) for r in regs]
    m1 = (0x5A17E0C0FFEE0001, 0x5A17E0C0FFEE0002, 0x5A17E0C0FFEE0003, 0x5A17E0C0FFEE0004)
    m2 = tuple(x ^ 0x00FF00FF00FF00FF for x in m1)
    try:
        for r, val in zip(regs, m1):
            uc.reg_write(r, val)
        pat1, pat2 = struct.pack("<4Q", *m1), struct.pack("<4Q", *m2)
        hits = []
        chunk = 64 << 20
        with open("/proc/self/mem", "rb", 0) as mem:
            for lo, hi in _rw_regions(exclude):
                # Large regions (a grown heap) are read in overlapping chunks.
                for start in range(lo, hi, chunk):
                    try:
                        mem.seek(start)
                        data = mem.read(min(chunk + 31, hi - start))
                    except OSError:
                        continue
                    i = data.find(pat1)
                    while i >= 0:
                        if i < chunk:
                            hits.append(start + i)
                        i = data.find(pat1, i + 1)
            for r, val in zip(regs, m2):
                uc.reg_write(r, val)
            live = []
            for addr in hits:
                try:
                    mem.seek(addr)
                    if mem.read(32) == pat2:
                        live.append(addr)
                except OSError:
                    pass
    finally:
        for r, val in zip(regs, saved):
            uc.reg_write(r, val)
    if len(live) != 1:
        raise NativeError(f"cannot locate Unicorn's CPU state ({len(live)} candidates)")
    return live[0]


def try_find_env_address(uc: Uc, layout: ContextLayout, exclude=None) -> int | None:
    """find_env_address, or None: the native side then falls back to context
    saves (slower exits, same results)."""
    try:
        return find_env_address(uc, layout, exclude)
    except NativeError:
        return None
