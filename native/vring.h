/*
 * vring.h - virtio 1.x split virtqueue (spec section 2.7), back-end side.
 *
 * C walks rings, validates chains against the mapped regions, fills used
 * rings, does barriers and EVENT_IDX arithmetic.  It never allocates, never
 * calls into Python, never logs, never opens or maps fds.  Functions return
 * 0 (or a count / boolean) or a negative VU_ERR_* code.  Every pointer
 * travels with a length.  vuser/ring_ref.py is the same thing in pure
 * Python; tests/test_ring_property.py proves the two agree.
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
 */
#ifndef VUSER_VRING_H
#define VUSER_VRING_H

#include <stdint.h>

#include "guard.h"

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
#define VU_ERR_NOT_READY -20      /* ring not initialised (caller error) */
#define VU_ERR_NUM -21            /* init: num not a power of 2 in 1..32768 (caller error) */
#define VU_ERR_RING_SIZE -22      /* init: a ring area is shorter than the layout needs */
#define VU_ERR_PUSH_COUNT -23     /* push: more used elements than num in one batch */
#define VU_ERR_PUSH_ID -24        /* push: used element id >= num */

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
 * both). */
struct vu_mem {
    uint32_t nregions;
    struct vu_region regions[64];
};

/* One split ring.  desc/avail/used are host pointers to the three areas
 * (16*num, 6+2*num and 6+8*num bytes), checked by vu_vring_init.  The
 * indexes are free-running 16-bit counters, as in the spec. */
struct vu_vring {
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t num;                  /* 0 = not initialised */
    uint16_t last_avail_idx;       /* next avail slot to consume (GET_VRING_BASE) */
    uint16_t used_idx;             /* used->idx as last published */
    uint16_t signalled_used;       /* used_idx at the last notification decision */
    uint8_t signalled_used_valid;  /* 0 until the first decision, or after a wrap past it */
    uint8_t event_idx;             /* VIRTIO_RING_F_EVENT_IDX in effect */
    uint8_t notification;          /* kicks wanted (vu_vring_set_notification) */
    uint8_t broken;                /* sticky: a chain error was seen */
    int32_t error;                 /* the VU_ERR_* that broke the ring */
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

/* Set up a ring; reads used->idx into used_idx (resume after reconnect),
 * clears broken/error, enables notifications, forgets signalled_used. */
int vu_vring_init(struct vu_vring *vr, uint32_t num,
                  uint8_t *desc, uint64_t desc_len,
                  uint8_t *avail, uint64_t avail_len,
                  uint8_t *used, uint64_t used_len,
                  int event_idx, uint16_t last_avail_idx);

/* Drain every available chain (up to max_chains / max_segs / max_bytes)
 * in one call.  Writes *n_chains and *n_segs always.  Returns 0 or a
 * VU_ERR_*. With EVENT_IDX and notifications enabled, writes avail_event =
 * last_avail_idx once if any chain was consumed. */
int vu_vring_pop(struct vu_vring *vr, const struct vu_mem *mem,
                 struct vu_chain *chains, uint32_t max_chains,
                 struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                 uint32_t *n_chains, uint32_t *n_segs);

/* Write n used elements and publish used->idx once (release fence first). */
int vu_vring_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n);

/* Whether to signal the call fd now: 1 or 0 (or VU_ERR_NOT_READY).
 * EVENT_IDX: vring_need_event(used_event, used_idx, signalled_used), with
 * signalled_used tracking as libvhost-user; else !(avail->flags & NO_INTERRUPT). */
int vu_vring_need_notify(struct vu_vring *vr);

/* Ask for kicks (enable=1) or not.  Without EVENT_IDX: used->flags
 * NO_NOTIFY.  With EVENT_IDX: enabling writes avail_event = last_avail_idx,
 * disabling writes nothing.  Enabling ends with a full fence, so the caller
 * must re-check vu_vring_avail_pending afterwards. */
void vu_vring_set_notification(struct vu_vring *vr, int enable);

/* 1 if avail->idx != last_avail_idx, else 0 (also 0 when broken or not ready). */
int vu_vring_avail_pending(struct vu_vring *vr);

/* vring_need_event from virtio_ring.h: should moving used idx from old to
 * new_idx trigger the event index event_idx?  Exported for tests. */
int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx);

/* cdef-end */

#endif /* VUSER_VRING_H */
