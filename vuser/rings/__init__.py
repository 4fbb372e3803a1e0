"""Ring implementations behind one interface (``base.Ring``).

``ring_class(layout, impl)`` picks the class; every layout has a C
implementation (``impl="native"``) and its pure-Python twin
(``impl="python"``), proven equal by ``tests/test_ring_property.py``.
"""

from __future__ import annotations

from .base import Ring
from .errors import RingError
from .native import NativePackedRing, NativeSplitRing, native_available
from .packed_ref import PyPackedRing
from .split_ref import PySplitRing

RING_CLASSES: dict[tuple[str, str], type[Ring]] = {
    ("split", "native"): NativeSplitRing,
    ("split", "python"): PySplitRing,
    ("packed", "native"): NativePackedRing,
    ("packed", "python"): PyPackedRing,
}
IMPLS = ("native", "python")
LAYOUTS = ("split", "packed")


def ring_class(layout: str, impl: str) -> type[Ring]:
    try:
        return RING_CLASSES[(layout, impl)]
    except KeyError:
        raise ValueError(f"no {layout} ring implementation {impl!r} "
                         f"(have {', '.join(f'{l}/{i}' for l, i in RING_CLASSES)})") from None


__all__ = ["IMPLS", "LAYOUTS", "NativePackedRing", "NativeSplitRing", "PyPackedRing", "PySplitRing", "Ring",
           "RingError", "native_available", "ring_class"]
