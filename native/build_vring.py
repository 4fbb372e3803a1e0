"""cffi build script (API mode, out of line) for ``vuser._native``.

setup.py passes ``cffi_modules=["native/build_vring.py:ffibuilder"]``; run
this file directly to build the extension in place, next to the sources
(``python native/build_vring.py``).  The cdef is the part of vring.h between
its cdef markers, so the header is the one source of truth.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent  # native/; its parent is the project root
# guard.h: the SIGBUS guard; log.h: the dirty page log; vring.h: split
# and packed rings; impair.h: network impairment; net.h: the virtio-net
# data path.
HEADERS = ("guard.h", "log.h", "vring.h", "impair.h", "net.h")

ffibuilder = FFI()
for name in HEADERS:
    ffibuilder.cdef((HERE / name).read_text().split("/* cdef-begin */")[1].split("/* cdef-end */")[0])
ffibuilder.set_source(
    "vuser._native",
    "".join(f'#include "{name}"\n' for name in HEADERS),
    # Relative to the project root: setuptools runs from there, and
    # compile() below switches to it (an absolute path would put the
    # object file under build/<absolute path>/).
    sources=["native/guard.c", "native/log.c", "native/vring.c", "native/vring_packed.c", "native/impair.c",
             "native/net.c"],
    libraries=["m"],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
    for source in HERE.glob("*.o"):  # build debris outside .gitignore
        source.unlink()
