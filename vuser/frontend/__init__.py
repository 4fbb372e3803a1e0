"""vuser.frontend — a vhost-user front-end and Linux-like virtio driver, in-process.

Exercise any vhost-user back-end (vuser's, DPDK's net_vhost, libvhost-user
examples...) without a VM, over a real unix socket, with memfd guest memory
and eventfds, replaying what QEMU or DPDK's virtio_user sends.

Pieces:

* ``Frontend`` (frontend.py): the socket session.  ``Frontend.connect(path)``
  (back-end listens), ``Frontend.listen(path)`` (back-end connects, as with
  QEMU's ``server=on``) and ``Frontend.over_socket(sock)`` are async context
  managers that run the connect-phase handshake of the chosen personality.
  One coroutine per request (``get_features``, ``set_mem_table``,
  ``get_config``, ``set_vring_enable``, ``get_vring_base``, ...), the phases
  ``handshake()``, ``start(queues, features=...)``, ``stop()``,
  ``replace_mem_table()``, raw access ``request(code, payload, fds)``,
  ``send_raw(bytes, fds)``, ``recv_raw()``, ``expect_disconnect()``, and the
  back-end channel (``config_changes``, ``wait_config_change()``,
  ``backend_messages``).  ``fe.trace`` lists every message sent
  (``TraceEntry``: name, flags, payload, decoded fields); ``fe.sent()`` just
  the names.
* Personalities (personality.py): ``"qemu-11.1"`` (default), ``"qemu-7.2"``
  (NEED_REPLY on fewer messages, no SET_VRING_ERR), ``"dpdk"`` (SET_OWNER
  first, no EVENT_IDX, SET_VRING_ENABLE even without PROTOCOL_FEATURES,
  identity-mapped memory, memory table replaced twice while running).
* ``Driver`` (driver.py): Linux's virtio_dev_probe — feature table,
  ``decline``, ``validate`` hook that may read config and clear bits,
  ``pre_feature_writes`` (e.g. ``[0]``), FEATURES_OK read-back, queue
  discovery, ``setup`` hook, DRIVER_OK.  ``feature_writes="qemu"`` sends one
  SET_FEATURES at DRIVER_OK (what QEMU does); ``"each"`` forwards every
  feature write as SET_FEATURES and every status access as SET/GET_STATUS.
* ``DriverQueue`` (vring.py): the driver side of a split ring in guest
  memory: ``add_outbuf(data)``, ``add_inbuf(size)``,
  ``add_chain(out=[...], in_=[...], indirect=None)``, ``add_segments(...)``
  for hostile chains, ``kick()`` (honours EVENT_IDX / NO_NOTIFY),
  ``await wait_used(count, timeout)`` -> ``[UsedElem(head, length, data, token)]``.
* ``GuestRam`` (memory.py): memfd regions with gaps, non-zero mmap
  offsets and QEMU-like front-end virtual addresses.
* ``Migration`` (migration.py): QEMU's live migration against the
  back-end -- SET_LOG_BASE, LOG_ALL, the rings' log flag, RAM iterations,
  stop-and-copy, cancel, memory hot-plug's bigger log, the destination's
  start from the source's ring bases -- and ``check()``: the destination's
  copy of guest memory, resent page by page as the back-end's log and the
  driver's own writes say, must equal guest memory at the end.

Example::

    from vuser.frontend import Driver, Frontend

    async with Frontend.connect("/tmp/rng.sock", num_queues=1) as fe:
        print(hex(fe.backend_features), fe.sent())
        drv = Driver(fe, features=[], feature_writes="each", pre_feature_writes=[0])
        await drv.probe()
        q = drv.queue(0)
        q.add_inbuf(64)
        q.kick()
        (elem,) = await q.wait_used(timeout=2)
        assert len(elem.data) == elem.length
        bases = await fe.stop()          # {0: 1}: next avail index
        assert drv.negotiated_features is not None

Errors: every wait is bounded (``timeout``, default 5 s); a misbehaving
back-end raises a ``FrontendError`` subclass naming the request —
``BackendTimeout``, ``BackendDisconnected``, ``BadReply``, ``BackendRefused``
(REPLY_ACK payload != 0), ``FeaturesRefused`` (FEATURES_OK did not stick);
ring misbehaviour raises ``UsedRingError`` / ``QueueTimeout``.
"""

from vuser.frontend.backend_channel import BackendChannel, BackendMessage
from vuser.frontend.connection import (
    BackendDisconnected,
    BackendRefused,
    BackendTimeout,
    BadReply,
    FeaturesRefused,
    FrontendChannel,
    FrontendError,
    Reply,
    TraceEntry,
)
from vuser.frontend.driver import DEFAULT_TRANSPORT_FEATURES, Driver, FeatureWrites
from vuser.frontend.frontend import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    PROTOCOL_FEATURES_BIT,
    Frontend,
)
from vuser.frontend.memory import GuestRam, GuestRamError, RamRegion, RamRegionSpec, default_layout
from vuser.frontend.personality import (
    DPDK,
    HARNESS_PROTOCOL_FEATURES,
    PERSONALITIES,
    QEMU_7_2,
    QEMU_11_1,
    Personality,
)
from vuser.frontend.vring import (
    DriverQueue,
    QueueFull,
    QueueTimeout,
    Segment,
    SplitLayout,
    UsedElem,
    UsedRingError,
)
from vuser.stream import Message

__all__ = [
    "ACKNOWLEDGE", "BackendChannel", "BackendDisconnected", "BackendMessage", "BackendRefused", "BackendTimeout",
    "BadReply", "DEFAULT_TRANSPORT_FEATURES", "DPDK", "DRIVER",
    "DRIVER_OK", "Driver", "DriverQueue", "FEATURES_OK", "FeatureWrites", "FeaturesRefused",
    "Frontend", "FrontendChannel", "FrontendError", "GuestRam", "GuestRamError", "HARNESS_PROTOCOL_FEATURES",
    "Message", "PERSONALITIES", "PROTOCOL_FEATURES_BIT", "Personality", "QEMU_11_1", "QEMU_7_2",
    "QueueFull", "QueueTimeout", "RamRegion", "RamRegionSpec", "Reply", "Segment",
    "SplitLayout", "TraceEntry", "UsedElem", "UsedRingError", "default_layout",
]
