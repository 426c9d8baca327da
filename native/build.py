"""cffi builder for native/_vmlab_native (run by the install: setup.py cffi_modules).

The C code is compiled against the headers shipped inside the unicorn wheel and
does not link libunicorn: the Unicorn (and Capstone) entry points are handed over
as pointers at run time by emu/native.py, from the libraries the Python bindings
already loaded.  See docs/platform-notes.md, "Building the native module".
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _unicorn_include() -> str:
    import unicorn

    inc = pathlib.Path(unicorn.__file__).resolve().parent / "include"
    if not (inc / "unicorn" / "unicorn.h").exists():
        raise RuntimeError(f"unicorn headers not found under {inc}")
    return str(inc)


def _cdef_text() -> str:
    lines = (HERE / "vmlab.h").read_text().splitlines()
    return "\n".join(l for l in lines if not l.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "vmlab.native._vmlab_native",
    '#include "vmlab.h"\n',
    sources=[os.path.relpath(HERE / "mmu.c"), os.path.relpath(HERE / "hooks.c"),
             os.path.relpath(HERE / "debug.c"),
             os.path.relpath(HERE / "virtq.c"), os.path.relpath(HERE / "nested.c"),
             os.path.relpath(HERE / "vmcs.c")],
    include_dirs=[str(HERE), _unicorn_include()],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    # A rebuild in place (after editing the C): cffi writes the module under
    # vmlab/native/ for the dotted name; it belongs in native/ (the folder the
    # install maps to vmlab.native).
    import shutil

    built = pathlib.Path(ffibuilder.compile(tmpdir=str(HERE.parent), verbose=False))
    for old in HERE.glob("_vmlab_native*.so"):
        old.unlink()
    shutil.move(str(built), HERE / built.name)
    shutil.rmtree(HERE.parent / "vmlab", ignore_errors=True)
