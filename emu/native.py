"""Binding to the native fast path (native/_vmlab_native, built by the install).

The C side does not link libunicorn or libcapstone: this module hands it the
entry points of the libraries the Python bindings already loaded, once per
process.  ``ffi``/``lib`` are the cffi objects; everything else in emu/ goes
through them.
"""
from __future__ import annotations

import ctypes

from .errors import NativeError

try:
    from vmlab.native._vmlab_native import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - depends on the install
    raise NativeError(
        "the native module native/_vmlab_native is not built: "
        "run `pip install -e .` (or `python native/build.py`) in the vmlab checkout"
    ) from exc

_api_set = False


def _fn_ptr(cdll, name: str) -> int:
    return ctypes.cast(getattr(cdll, name), ctypes.c_void_p).value


def ensure_api() -> None:
    """Give the C side Unicorn's and Capstone's entry points (idempotent)."""
    global _api_set
    if _api_set:
        return
    from unicorn.unicorn_py3.unicorn import uclib
    import capstone

    cs = capstone._cs
    # The C side walks cs_disasm's array of cs_insn itself (a block's instruction
    # starts): its layout must be the one of the Capstone library loaded here.
    insn = capstone._cs_insn
    layout = (ctypes.sizeof(insn), insn.address.offset, insn.size.offset)
    if layout != (lib.VMLAB_CS_INSN_SIZE, lib.VMLAB_CS_INSN_ADDRESS, lib.VMLAB_CS_INSN_LEN):
        raise NativeError(f"Capstone {capstone.__version__}: cs_insn layout {layout} is not the one "
                          "native/vmlab.h was written for (Capstone 5.x); pin capstone<6")
    names_uc = ["uc_hook_add", "uc_hook_del", "uc_reg_read", "uc_reg_write", "uc_reg_read_batch",
                "uc_reg_write_batch", "uc_emu_stop", "uc_ctl", "uc_context_alloc",
                "uc_context_save", "uc_context_restore", "uc_context_free"]
    ptrs = [ffi.cast("void *", _fn_ptr(uclib, n)) for n in names_uc]
    ptrs += [ffi.cast("void *", _fn_ptr(cs, n)) for n in ("cs_open", "cs_disasm", "cs_free")]
    lib.vmlab_set_api(*ptrs)
    lib.vmlab_set_emu_start(ffi.cast("void *", _fn_ptr(uclib, "uc_emu_start")))
    lib.vmlab_set_cs_close(ffi.cast("void *", _fn_ptr(cs, "cs_close")))
    lib.vmlab_set_cc_compute_all(ffi.cast("void *", _fn_ptr(uclib, "cpu_cc_compute_all_x86_64")))
    lib.vmlab_debug_set_api(*(ffi.cast("void *", _fn_ptr(uclib, n))
                              for n in ("uc_hook_add", "uc_hook_del", "uc_emu_stop", "uc_ctl")))
    _api_set = True
