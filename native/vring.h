/*
 * vring.h - virtio 1.x virtqueues, back-end side: the split ring (spec
 * section 2.7, vring.c) and the packed ring (2.8, vring_packed.c) behind one
 * struct and one set of functions, so C data paths (net.c) run on either
 * without knowing which (one predictable branch per call).
 *
 * C walks rings, validates chains against the mapped regions, fills used
 * rings, does barriers and EVENT_IDX arithmetic.  It never allocates, never
 * calls into Python, never logs, never opens or maps fds.  Functions return
 * 0 (or a count / boolean) or a negative VU_ERR_* code.  Every pointer
 * travels with a length.  vuser/rings/split_ref.py and packed_ref.py are
 * the same things in pure Python; tests/test_ring_property.py and
 * test_packed_property.py prove each pair agrees.
 *
 * Everything between the cdef markers is also fed to cffi's cdef() by
 * native/build_vring.py, so it must stay plain declarations: structs,
 * simple integer #defines, prototypes.
 *
 * Semantics decided here (both implementations identical):
 *
 * - Zero-length descriptors are accepted and produce no segment.  Their
 *   address is not checked; their flags are (ordering, INDIRECT, NEXT).
 * - A descriptor whose buffer crosses from one region into an ADJACENT one
 *   (the next region starts exactly where the first ends in guest-physical
 *   space) is split into one segment per region.  Any byte outside every
 *   region is VU_ERR_DESC_ADDR.  An indirect table must lie in one region.
 * - INDIRECT is accepted whether negotiated or not (QEMU 7.2 forces it on),
 *   only on the head descriptor of a chain (Linux and QEMU only put it
 *   there; libvhost-user and QEMU ignore it elsewhere), never with NEXT,
 *   never inside an indirect table.  The WRITE flag of the descriptor that
 *   points at a table is ignored (spec 2.7.5.3.2).  A table holds at most
 *   VU_MAX_INDIRECT entries.
 * - Loops: a walk visiting more descriptors than the table it walks holds
 *   (num for the ring's table, len/16 for an indirect one) is VU_ERR_LOOP.
 * - Chain length: a chain of more than VU_MAX_CHAIN_DESCS buffer
 *   descriptors (not counting the one that points at an indirect table;
 *   zero-length ones included: they produce no segment, so the segment
 *   space would not bound them) is VU_ERR_CHAIN_DESCS.  QEMU refuses the same (its
 *   VIRTQUEUE_MAX_SIZE); Linux never makes one.
 * - Byte budget: vu_vring_pop stops BEFORE a chain whose bytes (out_len +
 *   in_len) would take the call's total past max_bytes, unless it is the
 *   first chain of the call (that one is taken whole); the chain is not
 *   consumed.  Callers bound the work of one pass with it.
 * - Guest memory that shrinks under us (a truncated file): every function
 *   here runs in a guard frame (guard.h); a SIGBUS in guest memory makes it
 *   return VU_ERR_FAULT (or mark the ring broken with it).
 * - Segment space: vu_vring_pop stops BEFORE a chain that does not fit in
 *   the remaining segment space and returns 0 (the caller calls again with
 *   fresh space); the chain is not consumed.  If it is the first chain of
 *   the call (it alone needs more than max_segs segments) that is
 *   VU_ERR_CHAIN_SEGS and the ring breaks, like any other chain error.
 * - On a chain error the chains validated before it are returned, the
 *   ring's last_avail_idx stays at the bad chain, the ring is marked broken
 *   and the error is sticky: later pops return it without touching guest
 *   memory.  push / need_notify / set_notification still work on a broken
 *   ring (so the buffers already handed out can be returned).
 * - Ring areas need no particular alignment (every access is a memcpy).
 * - Dirty logging (live migration, vhost-user.rst "Migration"; log.h):
 *   with a ring's dirty log set, every store to its used area is marked
 *   after it at dirty_used (the front-end's log_guest_addr) + the offset
 *   of the bytes stored: a push's used elements (one range, or two when
 *   they wrap past the end) and idx, avail_event (pop, unpop,
 *   set_notification) and flags (set_notification).  Addresses wrap
 *   modulo 2^64.
 *
 * The packed ring (2.8), where it differs:
 *
 * - Areas: the descriptor ring (16 bytes a slot: addr, len, id, flags),
 *   the driver event suppression structure (the "driver" area: off_wrap,
 *   flags; 2.8.10) and the device's (the "device" area).  Any num in
 *   1..32768 (no power of 2 needed, 2.6).
 * - A chain is a run of consecutive slots (wrapping, with the wrap counter)
 *   linked by NEXT; its buffer id is the id of its last descriptor (2.8.6).
 *   The head is available when its AVAIL bit equals the avail wrap counter
 *   and its USED bit does not (2.8.1); every further descriptor of the
 *   chain must be available too (the driver makes the head available last,
 *   2.8.21): if not, VU_ERR_WRAP.  A chain of more slots than the ring
 *   holds is VU_ERR_LOOP.
 * - Indirect (2.8.19): only on a chain of one descriptor (INDIRECT on a
 *   later descriptor: VU_ERR_INDIRECT_POS; with NEXT: VU_ERR_INDIRECT_NEXT).
 *   The table's entries are all used, in order; of their flags only WRITE
 *   counts (NEXT is ignored, as the spec says) except INDIRECT, which is
 *   VU_ERR_INDIRECT_NESTED.  The id is the ring descriptor's.
 * - Buffer ids: >= num is VU_ERR_ID; one already in flight (popped, not
 *   pushed) is VU_ERR_ID_IN_FLIGHT.  The ring remembers, per id in flight,
 *   how many slots its chain took (the used index advances by that much,
 *   2.8.7), and the order of pops (unpop, in-order completion), in the
 *   caller's `ids` array (2 * num entries; C never allocates).
 * - Used descriptors: one per pushed buffer at the used index (id, len,
 *   flags AVAIL|USED = used wrap counter, WRITE when len > 0).  A batch
 *   writes every id and len, then the flags of all but the first, then
 *   (after a release fence) the first one's flags: the driver, which reads
 *   in order, never sees half a batch (2.8.21).  With VIRTIO_F_IN_ORDER
 *   pushes must complete the oldest buffers in pop order
 *   (VU_ERR_PUSH_ORDER) and a run of zero-length completions is written as
 *   one used descriptor carrying the run's last id (2.8.9).
 * - Notifications (2.8.10): the device area says DISABLE, ENABLE or, with
 *   EVENT_IDX, DESC with off_wrap = the next slot to be read; the driver
 *   area is honoured the same way (DESC only with EVENT_IDX, an unknown
 *   value counts as ENABLE).  need_notify counts the used slots written
 *   since the last decision; the event position is passed when it lies in
 *   that span (positions counted modulo 2*num, the wrap counter being the
 *   lap's parity).
 * - Dirty logging: the device area's off_wrap and flags at dirty_used +
 *   0 / 2 when stored; the used descriptors a push wrote, as the span of
 *   slots it moved over from the first one's len (dirty_desc + 16 * slot
 *   + 8; one range, or two when it wraps), once per push (the used
 *   descriptors live in the descriptor ring, which the front-end's
 *   log_guest_addr, the device area, does not cover).
 * - State (vhost-user GET/SET_VRING_BASE, docs/interop/vhost-user.rst):
 *   bits 0-14 last avail index, bit 15 avail wrap counter, bits 16-30 used
 *   index, bit 31 used wrap counter.  A base whose upper half is 0 is read
 *   as "used = avail": DPDK's virtio_user front-end sends only the avail
 *   half (bit 15 set on a fresh ring), and an upper half of 0 with a
 *   non-zero lower half would otherwise mean a full ring of buffers in
 *   flight across a stop, which no stop leaves behind.  An index >= num is
 *   VU_ERR_BASE.
 */
#ifndef VUSER_VRING_H
#define VUSER_VRING_H

#include <stdint.h>

#include "guard.h"
#include "log.h"

/* cdef-begin */

#define VU_MAX_REGIONS 64
#define VU_MAX_CHAIN_DESCS 1024   /* buffer descriptors in one chain (direct or indirect) */
#define VU_MAX_QUEUE_SIZE 32768
#define VU_MAX_INDIRECT 32768     /* entries in one indirect table */

/* vring_desc.flags, vring_avail.flags, vring_used.flags (virtio_ring.h) */
#define VU_DESC_F_NEXT 1
#define VU_DESC_F_WRITE 2
#define VU_DESC_F_INDIRECT 4
#define VU_AVAIL_F_NO_INTERRUPT 1
#define VU_USED_F_NO_NOTIFY 1
/* packed descriptor flags and event suppression (virtio_ring.h, spec 2.8) */
#define VU_DESC_F_AVAIL 128
#define VU_DESC_F_USED 32768
#define VU_EVENT_F_ENABLE 0
#define VU_EVENT_F_DISABLE 1
#define VU_EVENT_F_DESC 2

/* vu_vring_init flags */
#define VU_RING_EVENT_IDX 1        /* VIRTIO_RING_F_EVENT_IDX negotiated */
#define VU_RING_PACKED 2           /* VIRTIO_F_RING_PACKED: the packed layout */
#define VU_RING_IN_ORDER 4         /* VIRTIO_F_IN_ORDER (packed: batched used descriptors) */

#define VU_SEG_WRITE 1            /* vu_seg.flags: device-writable */

/* Error codes.  Chain errors (the guest put garbage in the ring) break the
 * ring; the others are caller errors and change nothing. */
#define VU_ERR_AVAIL_IDX -1       /* avail->idx is more than num ahead of last_avail_idx */
#define VU_ERR_HEAD -2            /* avail ring entry (chain head) >= num */
#define VU_ERR_NEXT -3            /* desc.next >= size of the table being walked */
#define VU_ERR_LOOP -4            /* more descriptors visited than the table holds */
#define VU_ERR_DESC_ADDR -5       /* buffer not inside guest memory (or wraps 2^64) */
#define VU_ERR_CHAIN_LEN -6       /* total chain length exceeds 2^32-1 */
#define VU_ERR_INDIRECT_NEXT -7   /* INDIRECT together with NEXT */
#define VU_ERR_INDIRECT_NESTED -8 /* INDIRECT inside an indirect table */
#define VU_ERR_INDIRECT_POS -9    /* INDIRECT on a descriptor that is not the chain head */
#define VU_ERR_INDIRECT_LEN -10   /* indirect len 0, not a multiple of 16, or > VU_MAX_INDIRECT entries */
#define VU_ERR_INDIRECT_ADDR -11  /* indirect table not inside one region */
#define VU_ERR_ORDER -12          /* device-readable descriptor after a device-writable one */
#define VU_ERR_CHAIN_SEGS -13     /* one chain needs more than max_segs segments */
#define VU_ERR_CHAIN_DESCS -14    /* one chain has more than VU_MAX_CHAIN_DESCS descriptors */
#define VU_ERR_WRAP -15           /* packed: a chain descriptor not marked available for this lap */
#define VU_ERR_ID -16             /* packed: buffer id >= num */
#define VU_ERR_ID_IN_FLIGHT -17   /* packed: buffer id already in flight */
#define VU_ERR_NOT_READY -20      /* ring not initialised (caller error) */
#define VU_ERR_NUM -21            /* init: num not a power of 2 in 1..32768 (caller error) */
#define VU_ERR_RING_SIZE -22      /* init: a ring area is shorter than the layout needs */
#define VU_ERR_PUSH_COUNT -23     /* push: more used elements than num in one batch */
#define VU_ERR_PUSH_ID -24        /* push: used element id >= num (packed: not in flight) */
#define VU_ERR_PUSH_ORDER -25     /* push, in order: not the oldest buffers in pop order */
#define VU_ERR_BASE -26           /* init, packed: a base index >= num */
#define VU_ERR_UNPOP -27          /* unpop: not the last chains popped, or not in flight */

/* One mapped guest memory region.  host points at guest-physical gpa; the
 * region is host[0, size).  uva is the front-end's virtual address. */
struct vu_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uva;
    uint8_t *host;
};

/* The memory table; regions must not overlap in gpa.  Kept in sync with
 * vuser.memory.GuestMemory.regions (same order, so vu_seg.region indexes
 * both).  dirty: the dirty page log data paths mark their buffer writes
 * in while the front-end has VHOST_F_LOG_ALL on, else NULL (log.h). */
struct vu_mem {
    uint32_t nregions;
    struct vu_region regions[64];
    struct vu_log *dirty;
};

/* One ring.  desc/driver/device are host pointers to the three areas
 * (split: descriptor table, avail ring, used ring of 16*num, 6+2*num and
 * 6+8*num bytes; packed: descriptor ring of 16*num bytes and the two
 * 4-byte event suppression structures), checked by vu_vring_init.  Split
 * indexes are free-running 16-bit counters, as in the spec; packed ones
 * are slots in 0..num-1 with a wrap counter each. */
struct vu_vring {
    uint8_t *desc;
    uint8_t *driver;
    uint8_t *device;
    uint32_t *ids;                 /* packed: [0, num) slots each id in flight took (0: none),
                                    * [num, 2 num) the pop-order log */
    uint32_t num;                  /* 0 = not initialised */
    uint16_t last_avail_idx;       /* next avail slot to consume (GET_VRING_BASE) */
    uint16_t used_idx;             /* split: used->idx as last published; packed: next used slot */
    uint16_t signalled_used;       /* split: used_idx at the last notification decision */
    uint8_t signalled_used_valid;  /* 0 until the first decision, or after a wrap past it */
    uint8_t event_idx;             /* VIRTIO_RING_F_EVENT_IDX in effect */
    uint8_t notification;          /* kicks wanted (vu_vring_set_notification) */
    uint8_t broken;                /* sticky: a chain error was seen */
    uint8_t packed;                /* the packed layout */
    uint8_t in_order;              /* packed: VIRTIO_F_IN_ORDER */
    uint8_t avail_wrap;            /* packed: wrap counter of last_avail_idx */
    uint8_t used_wrap;             /* packed: wrap counter of used_idx */
    uint16_t event_written;        /* packed: the off_wrap last written to the device area */
    uint32_t log_start;            /* packed: the oldest pop still in the log (in order) */
    uint32_t log_end;              /* packed: where the next pop is logged */
    uint32_t inflight;             /* packed: buffers popped and not pushed */
    uint32_t unsignalled;          /* packed: used slots written since the last decision (<= num) */
    uint32_t popped;               /* chains popped, less those given back (wraps): progress */
    int32_t error;                 /* the VU_ERR_* that broke the ring */
    /* The dirty page log (log.h) its writes are marked in: set by Python
     * after init while VHOST_F_LOG_ALL is on and SET_VRING_ADDR carried
     * VHOST_VRING_F_LOG, else NULL (init clears it). */
    struct vu_log *dirty;
    uint64_t dirty_used;           /* log_guest_addr: split used ring, packed device area */
    uint64_t dirty_desc;           /* packed: the descriptor ring's guest-physical address */
};

/* One piece of a buffer: region index, offset in that region, length.
 * A chain's segments are segs[first_seg, first_seg + nsegs): the first
 * nread are device-readable, the rest device-writable. */
struct vu_seg {
    uint64_t offset;
    uint32_t len;
    uint16_t region;
    uint16_t flags;                /* VU_SEG_WRITE */
};

struct vu_chain {
    uint32_t first_seg;
    uint32_t nsegs;
    uint32_t nread;                /* device-readable segments (they come first) */
    uint32_t out_len;              /* device-readable bytes */
    uint32_t in_len;               /* device-writable bytes */
    uint16_t head;                 /* the id to give back in the used ring */
    uint16_t ndescs;               /* buffer descriptors walked (zero-length ones too): the work */
};

struct vu_used_elem {
    uint32_t id;
    uint32_t len;                  /* bytes the device wrote */
};

/* Set up a ring; `flags` VU_RING_*.  Split: base's low 16 bits are
 * last_avail_idx and used_idx is read from used->idx (resume after
 * reconnect).  Packed: base is the vhost-user encoding (see above); `ids`
 * holds ids_len >= 2 * num entries and is cleared.  Clears broken/error,
 * enables notifications, forgets signalled_used. */
int vu_vring_init(struct vu_vring *vr, uint32_t num,
                  uint8_t *desc, uint64_t desc_len,
                  uint8_t *driver, uint64_t driver_len,
                  uint8_t *device, uint64_t device_len,
                  uint32_t flags, uint32_t base, uint32_t *ids, uint32_t ids_len);

/* The same ring at new host addresses (the memory table was replaced and
 * the areas are mapped elsewhere): every other field is kept. */
int vu_vring_rebind(struct vu_vring *vr, uint8_t *desc, uint64_t desc_len,
                    uint8_t *driver, uint64_t driver_len,
                    uint8_t *device, uint64_t device_len);

/* GET_VRING_BASE's value: split last_avail_idx; packed the encoding above. */
uint32_t vu_vring_base(const struct vu_vring *vr);

/* Give back the last n chains popped (nothing was published for them):
 * they will be popped again.  A no-op on a broken ring (never read again).
 * Packed: VU_ERR_UNPOP unless they are the last n pops, all in flight. */
int vu_vring_unpop(struct vu_vring *vr, uint32_t n);

/* Drain every available chain (up to max_chains / max_segs / max_bytes)
 * in one call.  Writes *n_chains and *n_segs always.  Returns 0 or a
 * VU_ERR_*. With EVENT_IDX and notifications enabled, writes avail_event =
 * last_avail_idx once if any chain was consumed. */
int vu_vring_pop(struct vu_vring *vr, const struct vu_mem *mem,
                 struct vu_chain *chains, uint32_t max_chains,
                 struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                 uint32_t *n_chains, uint32_t *n_segs);

/* Write n used elements and publish them once (split: used->idx after a
 * release fence; packed: the first used descriptor's flags last). */
int vu_vring_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n);

/* Whether to signal the call fd now: 1 or 0 (or VU_ERR_NOT_READY).
 * Split, EVENT_IDX: vring_need_event(used_event, used_idx, signalled_used),
 * with signalled_used tracking as libvhost-user; else !(avail->flags &
 * NO_INTERRUPT).  Packed: see above. */
int vu_vring_need_notify(struct vu_vring *vr);

/* Ask for kicks (enable=1) or not.  Split without EVENT_IDX: used->flags
 * NO_NOTIFY; with EVENT_IDX: enabling writes avail_event = last_avail_idx,
 * disabling writes nothing.  Packed: the device area's flags (DISABLE,
 * ENABLE, or DESC after off_wrap = next avail slot and wrap).  Enabling ends with a full fence, so the caller
 * must re-check vu_vring_avail_pending afterwards. */
void vu_vring_set_notification(struct vu_vring *vr, int enable);

/* 1 if a chain is available (split: avail->idx != last_avail_idx; packed:
 * the next slot is marked available), else 0 (also when broken or not ready). */
int vu_vring_avail_pending(struct vu_vring *vr);

/* vring_need_event from virtio_ring.h: should moving used idx from old to
 * new_idx trigger the event index event_idx?  Exported for tests. */
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);

/* cdef-end */

#endif /* VUSER_VRING_H */
