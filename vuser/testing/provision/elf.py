"""The little of ELF that provisioning reads: a kernel module's ``.modinfo``
and what a program or library needs at run time (its loader, its
``DT_NEEDED`` libraries and its search path).

ELF64 little-endian only (x86_64 guests).  ``struct`` rather than construct:
provisioning runs before vuser's dependencies are installed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vuser.testing.provision.common import ProvisionError

__all__ = ["Needs", "is_elf", "modinfo", "needs"]

MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
# e_phoff, e_shoff at 0x20 / 0x28 (then e_flags, e_ehsize); e_phentsize,
# e_phnum, e_shentsize, e_shnum, e_shstrndx at 0x36..0x3e.
HEADER = struct.Struct("<32xQQ6xHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")      # type, flags, offset, vaddr, paddr, filesz, memsz, align
SHDR_FIELDS = struct.Struct("<I20xQQ")  # name, (type, flags, addr), offset, size
DYN = struct.Struct("<qQ")             # tag, value
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29


def is_elf(data: bytes) -> bool:
    return data[:4] == MAGIC


def _header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if not is_elf(data) or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB or len(data) < 64:
        raise ProvisionError("not an ELF64 little-endian file")
    phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx = HEADER.unpack_from(data)
    return phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx


def _cstring(data: bytes, offset: int) -> str:
    return data[offset:data.index(b"\0", offset)].decode(errors="replace")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Key/values of a kernel module's .modinfo section."""
    _, shoff, _, _, shentsize, shnum, shstrndx = _header(elf)

    def section(i: int) -> tuple[int, int, int]:
        name, offset, size = SHDR_FIELDS.unpack_from(elf, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, off, size = section(i)
        if _cstring(elf, stroff + name_off) == ".modinfo":
            for item in elf[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


@dataclass
class Needs:
    """What the dynamic loader needs to run a file."""

    interpreter: str | None = None               # PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
    libraries: list[str] = field(default_factory=list)   # DT_NEEDED sonames, in order
    search_path: list[str] = field(default_factory=list)  # DT_RUNPATH (or DT_RPATH) entries


def needs(data: bytes) -> Needs:
    """The loader, libraries and search path an ELF file asks for (empty for
    a static one).  Raises ProvisionError for a file that is not ELF64."""
    phoff, _, phentsize, phnum, _, _, _ = _header(data)
    phdrs = [PHDR.unpack_from(data, phoff + i * phentsize) for i in range(phnum)]
    out = Needs()
    dynamic = None
    for p_type, _, offset, _, _, filesz, _, _ in phdrs:
        if p_type == PT_INTERP:
            out.interpreter = data[offset:offset + filesz].rstrip(b"\0").decode()
        elif p_type == PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return out
    entries = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1] - DYN.size + 1, DYN.size):
        tag, value = DYN.unpack_from(data, off)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab_vaddr = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab_vaddr is None:
        return out
    # DT_STRTAB is an address: find the loaded segment that holds it.
    strtab = next((offset + strtab_vaddr - vaddr for p_type, _, offset, vaddr, _, filesz, _, _ in phdrs
                   if p_type == PT_LOAD and vaddr <= strtab_vaddr < vaddr + filesz), None)
    if strtab is None:
        raise ProvisionError("DT_STRTAB outside every loaded segment")
    runpath = [v for t, v in entries if t == DT_RUNPATH] or [v for t, v in entries if t == DT_RPATH]
    out.libraries = [_cstring(data, strtab + v) for t, v in entries if t == DT_NEEDED]
    out.search_path = [d for v in runpath for d in _cstring(data, strtab + v).split(":") if d]
    return out
