/*
 * log.h - the dirty page log of live migration (vhost-user.rst,
 * "Migration"): one bit per 4 KiB guest-physical page,
 * log[page / 8] |= 1 << page % 8, set with atomic operations (the front-end
 * collects and clears the bits concurrently, and several back-ends may
 * share one log).
 *
 * While the front-end has VHOST_F_LOG_ALL on, every device write to guest
 * memory sets the bits of the pages it touched, after the write (so a page
 * the front-end copies after seeing its bit holds the write): the data
 * path's buffer writes through struct vu_mem's log (net.c), the used ring
 * writes of a ring through its own log pointer (vring.c, vring_packed.c:
 * split used elements, idx, flags and avail_event at the ring's
 * log_guest_addr; packed used descriptors at the descriptor ring's address
 * and the device event area at log_guest_addr).  A NULL log pointer is
 * "logging off": one predictable branch per batch on the data path.
 *
 * Bounds: a bit beyond the log's size is never set (vhost-user.rst: the
 * log covers the guest's memory and the used rings' log addresses); such
 * writes are counted in `outside`.  The bitmap is a mapping of the
 * front-end's file: Python maps it (vuser/dirtylog.py) and guards it
 * against SIGBUS like guest memory (guard.h); C runs every log write inside
 * the guard frame of its caller.
 */
#ifndef VUSER_LOG_H
#define VUSER_LOG_H

#include <stdint.h>

/* cdef-begin */

#define VU_LOG_PAGE 4096            /* VHOST_LOG_PAGE */

struct vu_log {
    uint8_t *bitmap;                /* the mapped log; NULL: nothing to write to */
    uint64_t size;                  /* bytes of bitmap: pages [0, 8 * size) */
    uint64_t updates;               /* log writes so far (SET_LOG_FD: signal when it moves) */
    uint64_t outside;               /* log writes that reached past the log's end */
};

/* Mark the pages of guest-physical [gpa, gpa + len) dirty, in a guard
 * frame: 0, or VU_ERR_FAULT if the log's file shrank under its mapping.
 * For Python (the framework's push of a Python device's buffers); C data
 * paths use vu_log_range below. */
int vu_log_write(struct vu_log *log, uint64_t gpa, uint64_t len);

/* cdef-end */

/* The bits of guest-physical [gpa, gpa + len) (a range that wraps 2^64
 * stops at its top), after a release fence: the data written before is
 * visible to whoever sees a bit.  len 0 marks nothing. */
static inline void vu_log_range(struct vu_log *log, uint64_t gpa, uint64_t len)
{
    uint64_t page, last, limit;

    if (!len || !log->bitmap)
        return;
    page = gpa / VU_LOG_PAGE;
    last = gpa + (len - 1) < gpa ? UINT64_MAX / VU_LOG_PAGE : (gpa + (len - 1)) / VU_LOG_PAGE;
    limit = log->size * 8;          /* (Python keeps size below 2^61) */
    log->updates++;
    if (last >= limit) {
        log->outside++;
        if (page >= limit)
            return;
        last = limit - 1;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (; page <= last; page++)
        __atomic_fetch_or(&log->bitmap[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELAXED);
}

#endif /* VUSER_LOG_H */
