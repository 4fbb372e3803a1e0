"""Live migration as QEMU drives a vhost-user back-end, and a check of the
back-end's dirty log against what it really wrote.

QEMU's sequence (hw/virtio/vhost.c and vhost-user.c, 7.2 to 11):

* start (``vhost_log_global_start`` -> ``vhost_migration_log``): a log
  sized to the highest guest-physical address (``vhost_get_log_size``: one
  u64 word per 64 pages) in a memfd, ``SET_LOG_BASE`` (fd, size, offset 0;
  QEMU waits for the reply), ``SET_FEATURES`` with VHOST_F_LOG_ALL added
  (NEED_REPLY with REPLY_ACK, else a GET_FEATURES as a barrier; with STATUS
  the FEATURES_OK check), then ``SET_VRING_ADDR`` of every started ring
  with VHOST_VRING_F_LOG and ``log_guest_addr`` = the used ring's (packed:
  the device area's) guest-physical address, each waited for the same way;
* while RAM is copied: the bits are collected and cleared word by word
  (``vhost_dev_sync_region``: atomic exchange with 0), and the pages they
  name are sent again;
* memory hot-plug while logging: a bigger log first (``SET_LOG_BASE``
  again, the old log's bits collected after the switch), then the table;
* stop-and-copy: the rings are stopped (``GET_VRING_BASE``; the power-off
  sequence of the personality), the log is collected one last time;
* cancel (``vhost_log_global_stop``): ``SET_FEATURES`` without LOG_ALL,
  ``SET_VRING_ADDR`` without the flag; the log is dropped;
* the destination (``Migration.destination``): another front-end on
  another socket, the same guest memory, the rings started from the bases
  GET_VRING_BASE returned (a net device then wants SEND_RARP unless the
  guest accepted GUEST_ANNOUNCE: the caller's business).

The check (``Migration.check``) plays the destination's RAM: guest memory
is copied when logging starts, and at every sync the pages marked dirty --
by the back-end in its log, or by the harness's own driver
(``GuestRam.track_writes``: QEMU tracks the guest's CPUs itself) -- are
copied again, as QEMU resends them.  After the last sync (the rings
stopped) the copy must equal guest memory: a page that differs was
written by the back-end without its bit, and the destination would run on
a stale copy of it.

Resource handling: the log memfd and its mapping belong to the
``Migration`` (``close``, or leaving its ``async with``); a replaced log is
closed once collected.
"""

from __future__ import annotations

import mmap
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, AsyncIterator

from vuser.dirtylog import LOG_PAGE
from vuser.frontend.connection import BackendRefused
from vuser.frontend.frontend import FEATURES_OK, Frontend
from vuser.frontend.memory import GuestRam
from vuser.frontend.queue import DriverQueueBase
from vuser.virtio import Transport, mask
from vuser.wire import VRING_F_LOG
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request

LOG_ALL = mask(Transport.LOG_ALL)
LOG_CHUNK_PAGES = 64                 # VHOST_LOG_BITS: one u64 word of the log


def log_size(memory: GuestRam) -> int:
    """QEMU's vhost_get_log_size, in bytes: words up to the last byte of
    the highest region."""
    last = max(r.gpa_end - 1 for r in memory.regions)
    return (last // (LOG_PAGE * LOG_CHUNK_PAGES) + 1) * 8


class LogFile:
    """The front-end's side of one dirty log: a memfd and its mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vuser-harness-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def collect(self) -> set[int]:
        """The pages (numbers) whose bits are set; the bits are cleared.
        (Word by word like QEMU; the back-end sets bits with atomic ORs, and
        this harness runs in the back-end's thread or another process.)"""
        pages: set[int] = set()
        m = self._map
        for word in range(0, self.size, 8):
            value = int.from_bytes(m[word:word + 8], "little")
            if not value:
                continue
            m[word:word + 8] = bytes(8)
            pages.update(8 * word + bit for bit in range(64) if value >> bit & 1)
        return pages

    def close(self) -> None:
        if self.fd >= 0:
            self._map.close()
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class LogCheck:
    """The destination's copy against guest memory (page numbers)."""

    stale: frozenset[int]      # pages whose copy differs: written, never marked since
    logged: frozenset[int]     # pages whose bits the back-end set
    log_only: frozenset[int]   # pages a sync copied only because the log named them
    driver: frozenset[int]     # pages the harness's driver wrote

    @property
    def ok(self) -> bool:
        return not self.stale

    def __str__(self) -> str:
        pages = ", ".join(f"{p * LOG_PAGE:#x}" for p in sorted(self.stale)[:8])
        return (f"{len(self.logged)} pages logged by the back-end ({len(self.log_only)} copied on the log's "
                f"word alone), {len(self.stale)} stale on the destination" + (f": {pages}" if self.stale else ""))


class Migration:
    """QEMU's side of a live migration on a started ``Frontend``; see the
    module docstring.  ``async with Migration(fe) as m: ...`` starts
    logging and closes the log on the way out (without sending anything)."""

    def __init__(self, fe: Frontend) -> None:
        if not fe.has_protocol_feature(PF.LOG_SHMFD):
            raise ValueError("the back-end did not negotiate LOG_SHMFD: QEMU refuses to migrate")
        self.fe = fe
        self.log: LogFile | None = None
        self.logged: set[int] = set()
        self.driver: set[int] = set()
        self.log_only: set[int] = set()
        self.logging = False
        self.queues: dict[int, DriverQueueBase] = {}   # the rings stopped at stop-and-copy
        self.bases: dict[int, int] = {}                  # and where they stopped
        self._copy: list[tuple[int, bytearray]] = []    # the destination's RAM, per region

    async def __aenter__(self) -> Migration:
        await self.begin()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        self.fe.memory.track_writes(False)

    # ---------------------------------------------------------- QEMU's steps

    async def begin(self) -> None:
        """Logging starts: SET_LOG_BASE, LOG_ALL, the rings' log flag."""
        mem = self.fe.memory
        self._copy = [(r.gpa, bytearray(mem.read(r.gpa, r.size))) for r in mem.regions]
        mem.track_writes()
        await self.set_log_base()
        await self._set_log(True)
        self.logging = True

    async def set_log_base(self) -> None:
        """SET_LOG_BASE with a log sized to the memory now; the previous
        log's bits are collected after the switch (vhost_dev_log_resize)."""
        new = LogFile(log_size(self.fe.memory))
        try:
            reply = await self.fe.request(Request.SET_LOG_BASE, {"mmap_size": new.size, "mmap_offset": 0},
                                          [new.fd])
        except BaseException:
            new.close()
            raise
        if reply is not None and reply.u64 != 0:
            new.close()
            raise BackendRefused("SET_LOG_BASE", reply.u64)
        old, self.log = self.log, new
        if old is not None:
            self._resend(old.collect())
            old.close()

    async def _wait(self, req: Request, payload: dict[str, Any]) -> None:
        """A request QEMU waits for while logging (enforce_reply): NEED_REPLY
        with REPLY_ACK, else a GET_FEATURES behind it."""
        fe = self.fe
        await fe.request(req, payload, need_reply=fe.conn.reply_ack)
        if not fe.conn.reply_ack:
            await fe.get_features()

    async def _set_log(self, on: bool) -> None:
        """vhost_dev_set_log: features, then every started ring's addresses."""
        fe = self.fe
        base = fe.acked_features if fe.acked_features is not None else (fe.negotiated_features or 0)
        features = base | LOG_ALL if on else base & ~LOG_ALL
        if on:
            await self._wait(Request.SET_FEATURES, {"u64": features})
        else:
            await fe.request(Request.SET_FEATURES, {"u64": features})
        fe.acked_features = features
        if fe.has_protocol_feature(PF.STATUS):
            await fe.add_status(FEATURES_OK)     # vhost_user_set_features with STATUS
        for index, q in sorted(fe.started_queues.items()):
            desc, avail, used = q.user_addresses()
            payload = {"index": index, "flags": VRING_F_LOG if on else 0, "desc_user_addr": desc,
                       "used_user_addr": used, "avail_user_addr": avail,
                       "log_guest_addr": q.addresses()[2]}
            if on:
                await self._wait(Request.SET_VRING_ADDR, payload)
            else:
                await fe.request(Request.SET_VRING_ADDR, payload)

    def sync(self) -> set[int]:
        """One of QEMU's RAM iterations: collect (and clear) the log's bits
        and the driver's pages, and copy those pages again.  Returns the
        pages the back-end's log named."""
        assert self.log is not None
        pages = self.log.collect()
        self._resend(pages)
        return pages

    def _resend(self, logged: set[int]) -> None:
        """Copy the pages ``logged`` names, and those the driver wrote
        since the last time, to the destination's copy again."""
        mem = self.fe.memory
        self.logged |= logged
        driver = set(mem.written or ())
        self.driver |= driver
        self.log_only |= logged - driver
        if mem.written is not None:
            mem.written.clear()
        for page in logged | driver:
            for gpa, copy in self._copy:
                off = page * LOG_PAGE - gpa
                if -LOG_PAGE < off < len(copy):
                    lo, hi = max(off, 0), min(off + LOG_PAGE, len(copy))
                    copy[lo:hi] = mem.read(gpa + lo, hi - lo)

    async def stop(self) -> dict[int, int]:
        """Stop-and-copy: the rings stop (the bases the destination starts
        from), the log is collected one last time."""
        self.queues = dict(self.fe.started_queues)
        self.bases = await self.fe.stop()
        self.sync()
        return dict(self.bases)

    @asynccontextmanager
    async def destination(self, path: str, **options: Any) -> AsyncIterator[Frontend]:
        """After ``stop``: the destination's front-end on ``path`` (the
        source's personality, protocol features, queues and ring layout
        unless ``options`` say otherwise), its device started on the same
        guest memory with the source's features and ring bases."""
        fe = self.fe
        settings: dict[str, Any] = dict(personality=fe.personality, packed=fe.packed, num_queues=fe.num_queues,
                                        protocol_features=fe.protocol_features)
        settings.update(options)
        async with Frontend.connect(path, memory=fe.memory, own_memory=False, **settings) as dest:
            dest.vring_bases = dict(self.bases)
            await dest.start(self.queues, features=fe.negotiated_features)
            yield dest

    async def cancel(self) -> None:
        """The migration is cancelled: logging off, the rings keep running."""
        await self._set_log(False)
        self.logging = False
        self.sync()

    # ---------------------------------------------------------- the check

    def check(self) -> LogCheck:
        """The destination's copy against guest memory, after the last sync
        (see the module docstring)."""
        mem = self.fe.memory
        stale: set[int] = set()
        for gpa, copy in self._copy:
            now = mem.read(gpa, len(copy))
            if now == copy:
                continue
            for off in range(0, len(now), LOG_PAGE):
                if now[off:off + LOG_PAGE] != copy[off:off + LOG_PAGE]:
                    stale.update(range((gpa + off) // LOG_PAGE,
                                       (gpa + min(off + LOG_PAGE, len(now)) - 1) // LOG_PAGE + 1))
        return LogCheck(frozenset(stale), frozenset(self.logged), frozenset(self.log_only), frozenset(self.driver))
