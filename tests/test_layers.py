"""Imports only go downward (style.md, "Layers"), there is no import cycle
(``TYPE_CHECKING`` imports included), and the protocol layer does no I/O.
Covers ``vuser/`` and ``devices/`` (installed as ``vuser.devices``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = (("vuser", ROOT / "vuser"), ("vuser.devices", ROOT / "devices"))

# Layer rank of each top-level name under vuser (a package counts as one):
# a module may import modules of the same or a lower rank.
RANK = {
    # wire format: constants, layouts, the request table, events
    "virtio": 0, "codes": 0, "events": 0, "wire": 0, "errors": 0, "ratelimit": 0,
    # sans-I/O protocol session
    "negotiation": 1, "protocol": 1,
    # fds from front-ends, guest memory, the dirty page log and rings
    "fds": 2, "memory": 2, "dirtylog": 2, "rings": 2, "virtqueue": 2, "_native": 2,
    # transport: framing, sockets, queue tasks, ring state file, back-end channel, control socket, recorder
    "stream": 3, "transport": 3, "queues": 3, "ringstate": 3, "backend_channel": 3, "control": 3,
    "recorder": 3,
    # device model: the device contract, plugins, the handler, the connection loop
    "handles": 4, "device": 4, "plugin": 4, "handler": 4, "connection": 4,
    # devices, status, discovery, runners
    "devices": 5, "status": 5, "registry": 5, "runner": 5,
    # harness, real-guest kit, conformance probe, command line
    "frontend": 6, "testing": 6, "cli": 6, "plot": 6, "probe": 6, "backend_program": 6,
}
SANS_IO = ("virtio", "codes", "events", "wire", "errors", "negotiation", "protocol")
IO_MODULES = {"trio", "socket", "mmap", "os", "select", "asyncio", "subprocess"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in TREES:
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file (functions and
    ``if TYPE_CHECKING:`` blocks too), resolved to absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def internal(target: str) -> str | None:
    """The vuser module ``target`` names (an attribute import resolves to
    its module), or None for anything outside."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "vuser" or len(parts) < 2:
        return None
    return RANK.get(parts[1])


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m != "vuser" and rank(m) is None]
    assert not missing, f"give these a layer in RANK: {missing}"


def test_sans_io_layers_do_no_io() -> None:
    for name in SANS_IO:
        found = {m.split(".")[0] for m in imports(f"vuser.{name}", MODULES[f"vuser.{name}"])} & IO_MODULES
        assert not found, f"{name} imports {found}"


def test_imports_go_downward() -> None:
    problems = []
    for name, path in MODULES.items():
        own = rank(name)
        if own is None:
            continue
        for target in imports(name, path):
            r = rank(target)
            if r is not None and r > own:
                problems.append(f"{name} (rank {own}) imports {target} (rank {r})")
    assert not problems, "\n".join(problems)


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {m: {t for t in map(internal, imports(m, p)) if t and t != m} for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    # A package importing its own submodules (vuser.rings -> vuser.rings.base)
    # and a submodule importing a sibling through the package are the same
    # cycle a reader trips on, so both count.
    assert cycles() == []


def test_cycle_check_sees_type_checking_imports(tmp_path: Path) -> None:
    """The guard can fail: an import under TYPE_CHECKING is an edge."""
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vuser import device\n")
    assert "vuser.device" in imports("vuser.a", a)


def test_no_two_public_classes_share_a_name() -> None:
    """Classes are named by role (a reader never meets two GuestMemory)."""
    seen: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                seen.setdefault(node.name, []).append(name)
    shared = {cls: mods for cls, mods in seen.items() if len(mods) > 1}
    assert not shared, shared
