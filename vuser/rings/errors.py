"""Ring error codes, their names and descriptions, and ``RingError``.

The codes are identical to ``VU_ERR_*`` in ``native/vring.h`` and
``native/guard.h`` (checked at import by ``vuser.rings.native``).
Chain errors (-1..-19) mean the guest put garbage in a ring: the ring
breaks and the device needs a reset.  ``ERR_FAULT`` means the front-end
took guest memory away under a mapping (SIGBUS caught): the connection is
closed.  The others are caller errors and change nothing.
"""

from __future__ import annotations

ERR_AVAIL_IDX = -1
ERR_HEAD = -2
ERR_NEXT = -3
ERR_LOOP = -4
ERR_DESC_ADDR = -5
ERR_CHAIN_LEN = -6
ERR_INDIRECT_NEXT = -7
ERR_INDIRECT_NESTED = -8
ERR_INDIRECT_POS = -9
ERR_INDIRECT_LEN = -10
ERR_INDIRECT_ADDR = -11
ERR_ORDER = -12
ERR_CHAIN_SEGS = -13
ERR_CHAIN_DESCS = -14
ERR_WRAP = -15
ERR_ID = -16
ERR_ID_IN_FLIGHT = -17
ERR_NOT_READY = -20
ERR_NUM = -21
ERR_RING_SIZE = -22
ERR_PUSH_COUNT = -23
ERR_PUSH_ID = -24
ERR_PUSH_ORDER = -25
ERR_BASE = -26
ERR_UNPOP = -27
ERR_FAULT = -30

ERROR_NAMES: dict[int, str] = {
    code: "VU_" + name for name, code in dict(globals()).items() if name.startswith("ERR_")
}

DESCRIPTIONS = {
    ERR_AVAIL_IDX: "avail index moved more than the queue size ahead",
    ERR_HEAD: "avail ring names a head descriptor beyond the table",
    ERR_NEXT: "descriptor next index beyond its table",
    ERR_LOOP: "descriptor chain loops",
    ERR_DESC_ADDR: "buffer outside guest memory",
    ERR_CHAIN_LEN: "chain longer than 4 GiB - 1",
    ERR_INDIRECT_NEXT: "indirect descriptor with NEXT set",
    ERR_INDIRECT_NESTED: "indirect descriptor inside an indirect table",
    ERR_INDIRECT_POS: "indirect descriptor that is not the chain head",
    ERR_INDIRECT_LEN: "indirect table length 0, not a multiple of 16 or too long",
    ERR_INDIRECT_ADDR: "indirect table not inside one guest memory region",
    ERR_ORDER: "device-readable descriptor after a device-writable one",
    ERR_CHAIN_SEGS: "chain has more segments than the queue's segment space",
    ERR_CHAIN_DESCS: "chain longer than 1024 descriptors",
    ERR_WRAP: "packed chain descriptor not marked available for the ring's current lap",
    ERR_ID: "packed buffer id beyond the queue size",
    ERR_ID_IN_FLIGHT: "packed buffer id already in flight",
    ERR_NOT_READY: "ring not configured",
    ERR_NUM: "queue size not a power of 2 in 1..32768",
    ERR_RING_SIZE: "ring area too small",
    ERR_PUSH_COUNT: "more used elements than the queue size in one batch",
    ERR_PUSH_ID: "used element id beyond the queue size or not in flight",
    ERR_PUSH_ORDER: "in-order ring: used elements not the oldest buffers in pop order",
    ERR_BASE: "packed ring base index beyond the queue size",
    ERR_UNPOP: "unpop: not the last chains popped, or not in flight",
    ERR_FAULT: "guest memory faulted: the front-end shrank a region under its mapping",
}


class RingError(Exception):
    """The guest put garbage in a ring (``code`` is a VU_ERR_* value)."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.name = ERROR_NAMES.get(code, f"VU_ERR_{-code}")
        super().__init__(f"{self.name}: {DESCRIPTIONS.get(code, 'unknown ring error')}")
