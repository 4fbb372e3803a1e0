"""The vhost-user front-end: what QEMU (or DPDK's virtio_user) does on the socket.

``Frontend`` owns the socket, the guest memory, the back-end channel and the
per-queue fds of the connect phase.  It offers one typed coroutine per
request, the three phases a real front-end goes through (``handshake``,
``start``, ``stop``) ordered by a ``Personality``, and raw access for
malformed-message tests.  The guest side (features, status, rings) is
``vuser.frontend.driver.Driver``.

Resource handling: ``Frontend.connect`` / ``listen`` / ``over_socket`` are
async context managers.  On exit the back-end channel task is cancelled and
the socket, the back-end channel, every eventfd and the guest memory are
closed.  Nothing is sent on exit: call ``stop()`` first for QEMU's
power-off sequence.

Error handling: every request is bounded by ``timeout``; failures raise
``FrontendError`` subclasses (see ``connection``) naming the request.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import trio

from vuser import wire
from vuser.frontend.backend_channel import BackendChannel, BackendHandler, BackendMessage
from vuser.frontend.connection import (
    REPLY_FLAGS,
    BackendRefused,
    BackendTimeout,
    BadReply,
    FeaturesRefused,
    FrontendChannel,
    FrontendError,
    Reply,
    TraceEntry,
)
from vuser.frontend.memory import GuestRam, RamRegion
from vuser.frontend.personality import HARNESS_PROTOCOL_FEATURES, Personality, get_personality
from vuser.frontend.packed import PackedDriverQueue
from vuser.frontend.queue import DriverQueueBase
from vuser.frontend.vring import DriverQueue
from vuser.stream import Message, MessageStream, close_fds
from vuser.transport import listen_unix
from vuser.virtio import Status, Transport, mask
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request

log = logging.getLogger(__name__)

PROTOCOL_FEATURES_BIT = mask(Transport.PROTOCOL_FEATURES)

# Device status bits (virtio 2.1), as the driver model writes them.
ACKNOWLEDGE = int(Status.ACKNOWLEDGE)
DRIVER = int(Status.DRIVER)
DRIVER_OK = int(Status.DRIVER_OK)
FEATURES_OK = int(Status.FEATURES_OK)


class Frontend:
    """A vhost-user front-end session; see the module docstring."""

    def __init__(self, sock: trio.socket.SocketType, nursery: trio.Nursery, *,
                 personality: str | Personality = "qemu-11.1",
                 memory: GuestRam,
                 num_queues: int | None = None,
                 config_size: int | None = None,
                 timeout: float = 5.0,
                 protocol_features: int | None = None,
                 packed: bool = False,
                 on_backend_message: BackendHandler | None = None) -> None:
        self.personality = get_personality(personality)
        # QEMU's `packed=on` device property, DPDK's `packed_vq=1`: without
        # it the guest never sees VIRTIO_F_RING_PACKED (virtio spec 2.8).
        self.packed = packed
        self.conn = FrontendChannel(sock, timeout=timeout)
        self.memory = memory
        self.config_size = config_size
        self._requested_queues = num_queues
        self._nursery = nursery
        # An explicit override is taken as is (tests may negotiate what the
        # harness cannot honour); the personality's set is masked.
        self.supported_protocol_features = (
            self.personality.protocol_features & HARNESS_PROTOCOL_FEATURES
            if protocol_features is None else protocol_features)
        # What the back-end told us.
        self.backend_features: int | None = None
        self.offered_protocol_features: int | None = None
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        # Regions the back-end holds (for ADD/REM_MEM_REG differences).
        self._backend_regions: dict[tuple[int, int, int, int], RamRegion] = {}
        # What we negotiated / sent.
        self.protocol_features = 0
        self.acked_features: int | None = None       # last SET_FEATURES value
        self.negotiated_features: int | None = None  # features confirmed by FEATURES_OK (or start)
        self.status = 0                              # last status sent with SET_STATUS
        self.started_queues: dict[int, DriverQueueBase] = {}
        self.vring_bases: dict[int, int] = {}        # from GET_VRING_BASE, reused at restart
        self.queues: dict[int, DriverQueueBase] = {}
        self.backend_channel = BackendChannel(on_backend_message)
        self._connect_fds: list[int] = []   # masked call / err eventfds of the connect phase

    # ---------------------------------------------------------- opening

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str, *, connect_timeout: float = 5.0,
                      **options: Any) -> AsyncIterator[Frontend]:
        """Connect to a back-end listening on ``path`` (retrying until it
        appears, up to ``connect_timeout`` s) and run the handshake.
        Options: see ``over_socket``."""
        try:
            with trio.fail_after(connect_timeout):
                while True:
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        await sock.connect(path)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        sock.close()
                        await trio.sleep(0.02)
                    except BaseException:
                        sock.close()
                        raise
        except trio.TooSlowError:
            raise FrontendError("connect", f"no back-end listening on {path} "
                                           f"after {connect_timeout}s") from None
        async with cls.over_socket(sock, **options) as fe:
            yield fe

    @classmethod
    @asynccontextmanager
    async def listen(cls, path: str, *, accept_timeout: float = 10.0,
                     on_listening: Callable[[], object] | None = None,
                     **options: Any) -> AsyncIterator[Frontend]:
        """Listen on ``path``, accept one back-end (server mode, as QEMU's
        ``-chardev socket,server=on``) and run the handshake.  The socket
        file is removed once the back-end is accepted.  ``on_listening`` is
        called when the socket is ready for the back-end to connect."""
        # A stale socket from an earlier run is replaced; QEMU's server
        # socket is not private to its user either.
        listener = await listen_unix(path, backlog=1, private=False)
        try:
            if on_listening is not None:
                on_listening()
            try:
                with trio.fail_after(accept_timeout):
                    sock, _ = await listener.accept()
            except trio.TooSlowError:
                raise FrontendError("accept", f"no back-end connected to {path} "
                                              f"within {accept_timeout}s") from None
        finally:
            listener.close()
        async with cls.over_socket(sock, **options) as fe:
            yield fe

    @classmethod
    @asynccontextmanager
    async def over_socket(cls, sock: trio.socket.SocketType, *,
                          personality: str | Personality = "qemu-11.1",
                          memory: GuestRam | None = None,
                          memory_mb: int = 64,
                          regions: int | None = None,
                          separate_fds: bool = False,
                          num_queues: int | None = None,
                          config_size: int | None = None,
                          timeout: float = 5.0,
                          protocol_features: int | None = None,
                          packed: bool = False,
                          own_memory: bool = True,
                          on_backend_message: BackendHandler | None = None,
                          handshake: bool = True) -> AsyncIterator[Frontend]:
        """A front-end on an already connected socket (also used by
        ``connect`` and ``listen``).

        ``memory``: guest RAM to use (closed with the front-end unless
        ``own_memory=False``: a guest that outlives a back-end); default: ``memory_mb`` MiB in ``regions`` regions (personality's
        default count), QEMU-like or, for DPDK, identity-mapped.
        ``num_queues``: queues of the device (QEMU's ``num_vqs``); default:
        GET_QUEUE_NUM's answer when MQ is negotiated, else 1.
        ``config_size``: config space size, for whole-config accesses and the
        GET_CONFIG at start.  ``protocol_features``: override the set of
        protocol features the front-end accepts.  ``packed``: the guest may
        see VIRTIO_F_RING_PACKED (QEMU's ``packed=on``, DPDK's
        ``packed_vq=1``).  ``handshake=False`` sends nothing (raw tests
        start from the first byte).
        """
        pers = get_personality(personality)
        try:
            if memory is None:
                memory = GuestRam.create(memory_mb * 1024 * 1024,
                                            regions=regions or pers.memory_regions,
                                            separate_fds=separate_fds,
                                            identity=pers.identity_memory,
                                            gpa_base=pers.memory_base)
        except BaseException:
            sock.close()
            raise
        try:
            async with trio.open_nursery() as nursery:
                fe = cls(sock, nursery, personality=pers, memory=memory, num_queues=num_queues,
                         config_size=config_size, timeout=timeout,
                         protocol_features=protocol_features, packed=packed,
                         on_backend_message=on_backend_message)
                try:
                    if handshake:
                        await fe.handshake()
                    yield fe
                finally:
                    nursery.cancel_scope.cancel()
                    fe.close()
        finally:
            if own_memory:
                memory.close()
            sock.close()

    def close(self) -> None:
        """Close the socket, the back-end channel and every eventfd (the
        guest memory is closed by the context manager that created it)."""
        self.conn.close()
        self.backend_channel.close()
        close_fds(self._connect_fds)
        self._connect_fds.clear()
        for q in self.queues.values():
            q.close()

    # ---------------------------------------------------------- state helpers

    @property
    def timeout(self) -> float:
        return self.conn.timeout

    @property
    def trace(self) -> list[TraceEntry]:
        """Every message sent, in order."""
        return self.conn.trace

    def sent(self) -> list[str]:
        """Names of the messages sent, in order."""
        return [e.request for e in self.conn.trace]

    @property
    def backend_messages(self) -> list[BackendMessage]:
        """Requests received on the back-end channel, in order."""
        return self.backend_channel.messages

    @property
    def config_changes(self) -> int:
        """How many CONFIG_CHANGE_MSGs the back-end sent."""
        return self.backend_channel.config_changes

    async def wait_config_change(self, since: int | None = None, timeout: float | None = None) -> int:
        """Wait until more than ``since`` CONFIG_CHANGE_MSGs arrived (default:
        the count now); returns the new count.  Use
        ``n = fe.config_changes; <trigger>; await fe.wait_config_change(n)``."""
        return await self.backend_channel.wait_config_change(
            since, self.timeout if timeout is None else timeout)

    def has_protocol_feature(self, feature: int) -> bool:
        return bool(self.protocol_features & (1 << feature))

    @property
    def num_queues(self) -> int:
        if self._requested_queues is not None:
            return self._requested_queues
        if self.queue_num:
            return self.queue_num
        return 1

    @property
    def offers_protocol_features(self) -> bool:
        return bool((self.backend_features or 0) & PROTOCOL_FEATURES_BIT)

    def _need_reply(self, req: Request, override: bool | None) -> bool:
        if override is not None:
            return override
        return self.conn.reply_ack and req in self.personality.need_reply

    async def _call(self, req: Request, payload: bytes | Mapping[str, Any] | None = None,
                    fds: Sequence[int] = (), *, need_reply: bool | None = None) -> Reply | None:
        reply = await self.conn.request(req, payload, fds, need_reply=self._need_reply(req, need_reply))
        if (req in self.personality.sync_with_get_features and not self.conn.reply_ack
                and need_reply is None):
            # QEMU's vhost_user_write_sync without REPLY_ACK: any request
            # with a reply serves as a barrier.
            await self.get_features()
        return reply

    async def _u64(self, req: Request) -> int:
        reply = await self.conn.request(req)
        assert reply is not None
        return reply.u64

    # ---------------------------------------------------------- raw access

    async def request(self, req: int, payload: bytes | Mapping[str, Any] | None = None,
                      fds: Sequence[int] = (), *, need_reply: bool = False,
                      expect_reply: bool | None = None) -> Reply | None:
        """Any request, as given: ``payload`` is raw bytes or a dict for the
        request's wire layout; the reply is validated (see Connection)."""
        return await self.conn.request(req, payload, fds, need_reply=need_reply,
                                       expect_reply=expect_reply)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (wrong sizes, unknown requests, bad flags...)."""
        await self.conn.send_raw(data, fds)

    async def recv_raw(self, timeout: float | None = None) -> Message | None:
        """The next message from the back-end, unvalidated, or None if it
        closed the connection."""
        return await self.conn.recv_raw(timeout)

    async def expect_disconnect(self, timeout: float = 2.0) -> None:
        """Wait for the back-end to close the connection; raise FrontendError
        if it sends something instead or stays silent and open."""
        try:
            msg = await self.conn.recv_raw(timeout)
        except BackendTimeout:
            raise FrontendError("disconnect", f"the back-end kept the connection open for "
                                              f"{timeout}s") from None
        if msg is not None:
            msg.close_fds()
            raise FrontendError(wire.request_name(msg.request),
                                "expected the back-end to disconnect, it sent a message")

    async def expect_silence(self, timeout: float = 0.2) -> None:
        """Check that the back-end sends nothing (and stays connected) for ``timeout`` s."""
        try:
            msg = await self.conn.recv_raw(timeout)
        except BackendTimeout:
            return
        if msg is None:
            raise FrontendError("silence", "the back-end closed the connection")
        msg.close_fds()
        raise FrontendError(wire.request_name(msg.request), "unexpected message from the back-end")

    # ---------------------------------------------------------- typed requests

    async def get_features(self) -> int:
        value = await self._u64(Request.GET_FEATURES)
        self.backend_features = value
        return value

    async def set_features(self, features: int, *, add_protocol_bit: bool = True,
                           need_reply: bool | None = None) -> None:
        """SET_FEATURES.  Like QEMU and DPDK, VHOST_USER_F_PROTOCOL_FEATURES
        is added when the back-end offers it (``add_protocol_bit=False``
        sends ``features`` exactly)."""
        if add_protocol_bit and self.offers_protocol_features:
            features |= PROTOCOL_FEATURES_BIT
        await self._call(Request.SET_FEATURES, {"u64": features}, need_reply=need_reply)
        self.acked_features = features

    async def get_protocol_features(self) -> int:
        value = await self._u64(Request.GET_PROTOCOL_FEATURES)
        self.offered_protocol_features = value
        return value

    async def set_protocol_features(self, features: int) -> None:
        await self._call(Request.SET_PROTOCOL_FEATURES, {"u64": features})
        self.protocol_features = features
        self.conn.protocol_features = features
        self.conn.reply_ack = bool(features & (1 << PF.REPLY_ACK))

    async def get_queue_num(self) -> int:
        self.queue_num = await self._u64(Request.GET_QUEUE_NUM)
        return self.queue_num

    async def get_max_mem_slots(self) -> int:
        self.max_mem_slots = await self._u64(Request.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    async def set_owner(self) -> None:
        await self._call(Request.SET_OWNER)

    async def reset_owner(self) -> None:
        await self._call(Request.RESET_OWNER)

    async def reset_device(self) -> None:
        await self._call(Request.RESET_DEVICE)

    async def set_backend_req_fd(self) -> None:
        """Create the back-end channel (a socketpair), send one end and serve
        the other in the background."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._call(Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        chan = MessageStream(trio.socket.from_stdlib_socket(ours), strict=False, backend=True)
        self._nursery.start_soon(self.backend_channel.serve, chan)

    async def set_mem_table(self, regions: Sequence[RamRegion] | None = None, *,
                            need_reply: bool | None = None) -> None:
        regs = list(self.memory.regions if regions is None else regions)
        payload = {"nregions": len(regs), "regions": [r.table_entry() for r in regs]}
        await self._call(Request.SET_MEM_TABLE, payload, [r.fd for r in regs], need_reply=need_reply)
        self._backend_regions = {_region_key(r): r for r in regs}

    async def add_mem_reg(self, region: RamRegion, *, need_reply: bool | None = None) -> None:
        await self._call(Request.ADD_MEM_REG, {"region": region.table_entry()}, [region.fd],
                         need_reply=need_reply)
        self._backend_regions[_region_key(region)] = region

    async def rem_mem_reg(self, region: RamRegion, *, need_reply: bool | None = None) -> None:
        # QEMU sends no fd and a zero mmap_offset (send_remove_regions).
        entry = dict(region.table_entry(), mmap_offset=0)
        await self._call(Request.REM_MEM_REG, {"region": entry}, need_reply=need_reply)
        self._backend_regions.pop(_region_key(region), None)

    async def set_vring_num(self, index: int, num: int) -> None:
        await self._call(Request.SET_VRING_NUM, {"index": index, "num": num})

    async def set_vring_base(self, index: int, base: int) -> None:
        await self._call(Request.SET_VRING_BASE, {"index": index, "num": base})

    async def set_vring_addr(self, index: int, desc: int, used: int, avail: int, *,
                             flags: int = 0, log: int = 0) -> None:
        """Addresses are front-end virtual addresses (DriverQueue.user_addresses())."""
        await self._call(Request.SET_VRING_ADDR, {
            "index": index, "flags": flags, "desc_user_addr": desc,
            "used_user_addr": used, "avail_user_addr": avail, "log_guest_addr": log})

    async def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring, returns the next avail index."""
        reply = await self.conn.request(Request.GET_VRING_BASE, {"index": index, "num": 0})
        assert reply is not None
        if reply.fields.index != index:
            raise BadReply("GET_VRING_BASE", f"reply for queue {reply.fields.index}, asked {index}")
        self.vring_bases[index] = int(reply.fields.num)
        return int(reply.fields.num)

    async def _vring_fd(self, req: Request, index: int, fd: int | None,
                        need_reply: bool | None) -> None:
        value = index & wire.VRING_IDX_MASK
        if fd is None:
            value |= wire.VRING_NOFD_MASK
        await self._call(req, {"u64": value}, [] if fd is None else [fd], need_reply=need_reply)

    async def set_vring_kick(self, index: int, fd: int | None, *, need_reply: bool | None = None) -> None:
        await self._vring_fd(Request.SET_VRING_KICK, index, fd, need_reply)

    async def set_vring_call(self, index: int, fd: int | None, *, need_reply: bool | None = None) -> None:
        await self._vring_fd(Request.SET_VRING_CALL, index, fd, need_reply)

    async def set_vring_err(self, index: int, fd: int | None, *, need_reply: bool | None = None) -> None:
        await self._vring_fd(Request.SET_VRING_ERR, index, fd, need_reply)

    async def set_vring_enable(self, index: int, enable: bool, *,
                               need_reply: bool | None = None) -> None:
        await self._call(Request.SET_VRING_ENABLE, {"index": index, "num": int(enable)},
                         need_reply=need_reply)

    async def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG; an empty reply (size 0 or header only) is a refusal."""
        payload = wire.Config.build({"offset": offset, "size": size, "flags": flags,
                                     "payload": bytes(size)})
        reply = await self.conn.request(Request.GET_CONFIG, payload)
        assert reply is not None
        got = reply.payload
        if len(got) in (0, wire.CONFIG_HEADER_SIZE) and size:
            raise BackendRefused("GET_CONFIG", 1)
        if len(got) != wire.CONFIG_HEADER_SIZE + size:
            raise BadReply("GET_CONFIG", f"reply payload is {len(got)} bytes, expected "
                                         f"{wire.CONFIG_HEADER_SIZE + size}")
        return got[wire.CONFIG_HEADER_SIZE:]

    async def set_config(self, offset: int, data: bytes, flags: int = wire.CONFIG_FLAG_WRITABLE, *,
                         need_reply: bool | None = None) -> None:
        payload = wire.Config.build({"offset": offset, "size": len(data), "flags": flags,
                                     "payload": data})
        await self._call(Request.SET_CONFIG, payload, need_reply=need_reply)

    async def set_status(self, status: int, *, need_reply: bool | None = None) -> None:
        await self._call(Request.SET_STATUS, {"u64": status}, need_reply=need_reply)
        self.status = status

    async def get_status(self) -> int:
        return await self._u64(Request.GET_STATUS)

    async def add_status(self, bits: int) -> int:
        """QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS with
        ``bits`` added unless they are all set already.  Returns the status."""
        status = await self.get_status()
        if status & bits != bits:
            status |= bits
            await self.set_status(status)
        return status

    # ---------------------------------------------------------- queues

    @property
    def stripped_features(self) -> int:
        """Device feature bits the guest never sees (and SET_FEATURES never
        carries): the personality's, and RING_PACKED unless ``packed``."""
        return self.personality.strip_features | (0 if self.packed else mask(Transport.RING_PACKED))

    def new_queue(self, index: int, num: int = 256, *, packed: bool | None = None,
                  **options: Any) -> DriverQueueBase:
        """Allocate the driver side of queue ``index`` in guest memory (its
        fds are closed with the front-end), a packed ring when ``packed``
        (default: the front-end's ``packed``).  Options: see DriverQueue and
        PackedDriverQueue."""
        if index in self.queues:
            self.queues[index].close()
        q: DriverQueueBase
        if self.packed if packed is None else packed:
            options.pop("align", None)
            q = PackedDriverQueue(self.memory, index, num, **options)
        else:
            options.pop("in_order", None)
            q = DriverQueue(self.memory, index, num, **options)
        self.queues[index] = q
        return q

    def initial_base(self, q: DriverQueueBase) -> int:
        """SET_VRING_BASE for a queue the back-end has not stopped yet."""
        if isinstance(q, PackedDriverQueue):
            return q.initial_base(avail_half_only=self.personality.packed_base_avail_only)
        return 0

    # ---------------------------------------------------------- phases

    async def handshake(self) -> None:
        """The connect phase (QEMU: vhost_user_backend_init + vhost_dev_init;
        DPDK: virtio_user_dev_init)."""
        p = self.personality
        if p.owner_first:
            await self.set_owner()
        features = await self.get_features()
        if features & PROTOCOL_FEATURES_BIT:
            offered = await self.get_protocol_features()
            await self.set_protocol_features(offered & self.supported_protocol_features)
            if self.has_protocol_feature(PF.MQ) and p.query_queue_num:
                await self.get_queue_num()
            if self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS) and p.query_max_mem_slots:
                await self.get_max_mem_slots()
            if self.has_protocol_feature(PF.BACKEND_REQ) and p.backend_channel:
                await self.set_backend_req_fd()
        if not p.owner_first:
            await self.set_owner()
        if p.second_get_features:
            await self.get_features()
        if p.connect_call or p.connect_err:
            # QEMU's masked notifiers: fds that are replaced at start.
            for i in range(self.num_queues):
                if p.connect_call:
                    fd = self._eventfd()
                    await self.set_vring_call(i, fd)
                if p.connect_err:
                    fd = self._eventfd()
                    await self.set_vring_err(i, fd)
        log.info("handshake with back-end done: features %#x, protocol features %s",
                 features, ",".join(wire.protocol_feature_names(self.protocol_features)))

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._connect_fds.append(fd)
        return fd

    def _can_enable(self) -> bool:
        return self.offers_protocol_features or self.personality.enable_without_protocol_features

    async def _send_mem_table(self) -> None:
        if self.personality.use_mem_slots and self.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS):
            # Like QEMU's vhost_user_add_remove_regions: the back-end keeps
            # its regions across stop/start, so send only the difference.
            wanted = {_region_key(r): r for r in self.memory.regions}
            for key, region in list(self._backend_regions.items()):
                if key not in wanted:
                    await self.rem_mem_reg(region)
            for key, region in wanted.items():
                if key not in self._backend_regions:
                    await self.add_mem_reg(region)
        else:
            await self.set_mem_table()

    async def _features_ok(self, features: int) -> None:
        """After SET_FEATURES with STATUS: set FEATURES_OK and (optionally)
        read it back; a back-end refuses a feature set by clearing it."""
        if not self.has_protocol_feature(PF.STATUS):
            self.negotiated_features = features
            return
        if self.personality.status_style == "qemu":
            await self.add_status(FEATURES_OK)
        else:
            await self.set_status(self.status | ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if self.personality.verify_features_ok or self.personality.status_style == "dpdk":
            status = await self.get_status()
            if not status & FEATURES_OK:
                raise FeaturesRefused(features, status)
        self.negotiated_features = features

    async def start(self, queues: Mapping[int, DriverQueueBase], *, features: int | None,
                    features_ok: bool = True, driver_ok: bool = True) -> None:
        """Start the device as the front-end does at guest DRIVER_OK.

        ``features``: the guest-accepted features to send with SET_FEATURES
        (None: send none — the driver already did, ``feature_writes="each"``).
        ``features_ok`` / ``driver_ok``: send those status steps when STATUS
        is negotiated.  Raises FeaturesRefused when FEATURES_OK does not stick.
        """
        p = self.personality
        order = sorted(queues)
        if p.start_call_first:
            for i in order:
                await self.set_vring_call(i, queues[i].call_fd)
        if p.status_style == "dpdk" and self.has_protocol_feature(PF.STATUS) and features_ok:
            await self.set_status(ACKNOWLEDGE)
            await self.set_status(ACKNOWLEDGE | DRIVER)
        if features is not None:
            features &= ~self.stripped_features
            await self.set_features(features)
            if features_ok:
                await self._features_ok(features)
            else:
                self.negotiated_features = features
        await self._send_mem_table()
        for i in order:
            q = queues[i]
            desc, avail, used = q.user_addresses()
            await self.set_vring_num(i, q.num)
            await self.set_vring_base(i, self.vring_bases.get(i, self.initial_base(q)))
            await self.set_vring_addr(i, desc, used, avail)
            await self.set_vring_kick(i, q.kick_fd)
            if not p.start_call_first:
                await self.set_vring_call(i, q.call_fd)
        self.started_queues = dict(queues)
        await self._enable_all(True)
        if driver_ok and self.has_protocol_feature(PF.STATUS):
            if p.status_style == "qemu":
                await self.add_status(ACKNOWLEDGE | DRIVER | DRIVER_OK)
            else:
                await self.set_status(self.status | DRIVER_OK)
        if p.call_again_after_enable:
            for i in order:
                await self.set_vring_call(i, queues[i].call_fd)
        if p.config_at_start and self.config_size and self.has_protocol_feature(PF.CONFIG):
            await self.get_config(0, self.config_size)
        for _ in range(p.mem_table_replacements):
            await self.replace_mem_table()

    async def _enable_all(self, enable: bool) -> None:
        if not self._can_enable():
            return
        targets = range(self.num_queues) if self.personality.enable_all_queues \
            else sorted(self.started_queues)
        for i in targets:
            await self.set_vring_enable(i, enable)

    async def replace_mem_table(self, *, add_region_size: int | None = None) -> None:
        """DPDK's memory hot-plug: disable the rings, send a new memory table
        (optionally with a hot-added region), enable the rings again."""
        await self._enable_all(False)
        if add_region_size is not None:
            self.memory.add_region(add_region_size)
        await self.set_mem_table()
        await self._enable_all(True)

    async def stop(self) -> dict[int, int]:
        """Power-off: SET_VRING_ENABLE 0, GET_VRING_BASE per started queue
        (and SET_STATUS 0 with STATUS).  Returns {queue: next avail index};
        a later ``start`` resumes from these bases."""
        await self._enable_all(False)
        bases = {}
        for i in sorted(self.started_queues):
            bases[i] = await self.get_vring_base(i)
        if self.personality.reset_status_on_stop and self.has_protocol_feature(PF.STATUS):
            await self.set_status(0)
        self.started_queues = {}
        return bases


__all__ = [
    "ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK", "Frontend",
    "PROTOCOL_FEATURES_BIT", "REPLY_FLAGS",
]


def _region_key(region: RamRegion) -> tuple[int, int, int, int]:
    e = region.table_entry()
    return (e["guest_phys_addr"], e["memory_size"], e["userspace_addr"], e["mmap_offset"])
