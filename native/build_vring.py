"""cffi build script (API mode, out of line) for ``vuser._native``.

setup.py passes ``cffi_modules=["native/build_vring.py:ffibuilder"]``; run
this file directly to build the extension in place, next to the sources
(``python native/build_vring.py``).  The cdef is the part of vring.h between
its cdef markers, so the header is the one source of truth.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent  # native/; its parent is the project root
HEADER = (HERE / "vring.h").read_text()
NET_HEADER = (HERE / "net.h").read_text()  # the virtio-net data path (native/net.c)

ffibuilder = FFI()
ffibuilder.cdef(HEADER.split("/* cdef-begin */")[1].split("/* cdef-end */")[0])
ffibuilder.cdef(NET_HEADER.split("/* cdef-begin */")[1].split("/* cdef-end */")[0])
ffibuilder.set_source(
    "vuser._native",
    '#include "vring.h"\n#include "net.h"',
    # Relative to the project root: setuptools runs from there, and
    # compile() below switches to it (an absolute path would put the
    # object file under build/<absolute path>/).
    sources=["native/vring.c", "native/net.c"],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
    (HERE / "vring.o").unlink(missing_ok=True)  # build debris outside .gitignore
    (HERE / "net.o").unlink(missing_ok=True)
