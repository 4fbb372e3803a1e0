"""A Python distribution written into a folder, for tests of what plugs in
through entry points (devices, balloon policies) without ``pip install``.

::

    write_distribution(tmp, "mypolicies", {"mypolicies": SOURCE},
                       {"vuser.balloon_policies": {"quarter": "mypolicies:quarter"}})
    # then: sys.path.insert(0, str(tmp)), or PYTHONPATH=tmp for a `vuser run` child

``importlib.metadata`` finds the ``NAME-VERSION.dist-info`` folder on the
path like that of an installed package, so vuser's discovery sees the entry
points exactly as it would after an install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

__all__ = ["write_distribution"]


def write_distribution(folder: str | Path, name: str, modules: Mapping[str, str],
                       entry_points: Mapping[str, Mapping[str, str]], *, version: str = "0.1") -> Path:
    """Write modules (module name -> source) and a dist-info with
    ``entry_points`` (group -> {name: "module:object"}) into ``folder``;
    returns the folder."""
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (base / f"{module}.py").write_text(source)
    info = base / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in targets.items()) + "\n"
        for group, targets in entry_points.items()))
    return base
