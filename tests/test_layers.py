"""Imports only go downward (style.md, "Layers"); the protocol layer does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "vuser"

# Layer rank: a module may import modules of the same or a lower rank.
RANK = {
    "wire": 0,
    "protocol": 1,
    "memory": 2, "ring_ref": 2, "virtqueue": 2, "_native": 2,
    "transport": 3, "control": 3, "netswitch": 3,
    # connection.py binds a transport connection to a device: device-model layer.
    "connection": 4,
    "device": 4,
    "registry": 5, "runner": 5, "devices": 5,
    "frontend": 6, "testing": 6, "cli": 6,
}
IO_MODULES = {"trio", "socket", "mmap", "os", "select", "asyncio", "subprocess"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = node.module or ""
                if base:
                    out.add("vuser." + base)
                else:
                    out.update("vuser." + a.name for a in node.names)
            elif node.module:
                out.add(node.module)
    return out


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "vuser" or len(parts) < 2:
        return None
    return RANK.get(parts[1])


def test_protocol_layer_does_no_io() -> None:
    for name in ("wire.py", "protocol.py"):
        found = {m.split(".")[0] for m in _imports(PKG / name)} & IO_MODULES
        assert not found, f"{name} imports {found}"


def test_imports_go_downward() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        own = RANK.get(rel.parts[0].removesuffix(".py"))
        if own is None:
            continue
        tree_imports = _imports(path)
        for mod in tree_imports:
            r = _rank(mod)
            if r is not None and r > own:
                problems.append(f"{rel} (rank {own}) imports {mod} (rank {r})")
    assert not problems, "\n".join(problems)
