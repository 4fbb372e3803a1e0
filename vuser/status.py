"""The status JSON of ``vuser ctl PATH status``, assembled in one place.

For one socket: the device (name, virtio id, offered features by name),
the socket (path, server or client mode, connections served), the live
connection (messages, features accepted and negotiated, protocol
features, status, ring error, the dirty log of a live migration, queue
layout with each queue's role and counters) and the device's own figures (``Device.status``), which are also
copied to the top level without shadowing a generic key (the balloon's
target, actual, bytes_released ...).  Several sockets in one process (net
ports) give ``{"device", "sockets": [...], "device_status"}``.
"""

from __future__ import annotations

from typing import Any, Sequence

from . import wire
from .connection import DeviceConnection
from .device import Device


def connection_status(conn: DeviceConnection) -> dict[str, Any]:
    s = conn.session
    dev = conn.device
    layout = dev.queue_layout(s.effective_features)
    broken = conn.handler.device_broken
    return {
        "connected": True,
        "messages": conn.messages,
        "accepted_features": None if s.accepted_features is None else dev.feature_names(s.accepted_features),
        "negotiated_features": None if s.negotiated_features is None
        else dev.feature_names(s.negotiated_features),
        "protocol_features": wire.protocol_feature_names(s.acked_protocol_features),
        "status": s.status,
        "needs_reset": s.needs_reset,
        "ring_error": None if broken is None else str(broken),
        # Live migration: whether the front-end has the back-end log its
        # writes now, the log's size and how many writes it took so far.
        "dirty_log": {"logging": conn.handler.logging, "size": conn.handler.dirty_log.size,
                      "updates": conn.handler.dirty_log.updates, "outside": conn.handler.dirty_log.outside},
        "queue_policy": layout.policy,
        "queues": [
            {"index": slot.index, "role": layout.roles.get(slot.index), "size": slot.num,
             "running": slot.running, "enabled": slot.enabled, "buffers": slot.buffers,
             "kicks": slot.kicks, "notifies": slot.notifies}
            for slot in conn.handler.slots
        ],
    }


def socket_status(device: Device, socket_path: str, *, client: bool, connections: int,
                  conn: DeviceConnection | None, with_device: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device": device.name,
        "virtio_id": device.virtio_id,
        "socket": socket_path,
        "mode": "client" if client else "server",
        "connections": connections,
        "offered_features": device.feature_names(device.offered_bits),
    }
    if conn is not None:
        out.update(connection_status(conn))
    else:
        out.update({"connected": False, "queue_policy": device.queue_policy,
                    "queues": device.queue_layout(None).as_list(), "negotiated_features": None})
    if with_device:
        device_status = device.status()
        out["device_status"] = device_status
        for key, value in device_status.items():
            out.setdefault(key, value)
    return out


def group_status(sockets: Sequence[dict[str, Any]], first: Device) -> dict[str, Any]:
    """Several sockets of one device type in one process."""
    return {"device": first.name, "sockets": list(sockets), "device_status": first.status()}
