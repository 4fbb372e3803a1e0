/*
 * vring_priv.h - what the split (vring.c) and packed (vring_packed.c)
 * walkers share: reading guest memory once, fences, region lookup, and
 * turning one buffer descriptor into segments.  Not part of the cffi
 * interface.
 *
 * The guest is hostile: every ring field is read once (memcpy into a local,
 * then made opaque to the compiler so it cannot re-read guest memory),
 * converted from little-endian and bounds-checked before use.
 */
#ifndef VUSER_VRING_PRIV_H
#define VUSER_VRING_PRIV_H

#define _DEFAULT_SOURCE
#include <endian.h>
#include <stddef.h>
#include <string.h>

#include "vring.h"

#define DESC_SIZE 16u                  /* split and packed descriptors alike */

/* Pin a value read from guest memory: the compiler may not re-load it. */
#define OPAQUE(v) __asm__ __volatile__("" : "+r"(v))

/* Fences (virtio spec 2.7.13 and 2.8.21; Linux virtio_ring.h virt_*mb). */
#define FENCE_ACQUIRE() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define FENCE_RELEASE() __atomic_thread_fence(__ATOMIC_RELEASE)
#define FENCE_FULL() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Outcome of walking one chain besides 0 and VU_ERR_*: the segment space
 * ran out; nothing is committed. */
#define WALK_NOSPACE 1

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    v = le16toh(v);
    OPAQUE(v);
    return v;
}

static inline void st16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof v);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof v);
}

static inline uint64_t ld64_raw(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    v = le64toh(v);
    OPAQUE(v);
    return v;
}

static inline uint32_t ld32_raw(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    v = le32toh(v);
    OPAQUE(v);
    return v;
}

/* Which region holds gpa?  Index, or -1. */
static inline int find_region(const struct vu_mem *mem, uint64_t gpa)
{
    uint32_t n = mem->nregions < VU_MAX_REGIONS ? mem->nregions : VU_MAX_REGIONS;

    for (uint32_t i = 0; i < n; i++) {
        const struct vu_region *r = &mem->regions[i];
        if (gpa - r->gpa < r->size)
            return (int)i;
    }
    return -1;
}

/* Where an indirect table of len bytes at addr lies: its host address and
 * entry count, or VU_ERR_INDIRECT_LEN / VU_ERR_INDIRECT_ADDR. */
static inline int indirect_table(const struct vu_mem *mem, uint64_t addr, uint32_t len,
                                 const uint8_t **table, uint32_t *entries)
{
    int r;

    if (len == 0 || len % DESC_SIZE != 0 || len / DESC_SIZE > VU_MAX_INDIRECT)
        return VU_ERR_INDIRECT_LEN;
    r = find_region(mem, addr);
    if (r < 0 || mem->regions[r].size - (addr - mem->regions[r].gpa) < len)
        return VU_ERR_INDIRECT_ADDR;
    *table = mem->regions[r].host + (addr - mem->regions[r].gpa);
    *entries = len / DESC_SIZE;
    return 0;
}

/* A chain being walked: its segments so far and their totals. */
struct walk {
    struct vu_seg *segs;
    uint32_t seg_room;
    uint32_t nsegs, nread, total;
    uint64_t out_len, in_len;
    int seen_write;
};

static inline void walk_start(struct walk *w, struct vu_seg *segs, uint32_t seg_room)
{
    w->segs = segs;
    w->seg_room = seg_room;
    w->nsegs = w->nread = w->total = 0;
    w->out_len = w->in_len = 0;
    w->seen_write = 0;
}

/* One buffer descriptor of the chain (not one pointing at a table):
 * ordering, the chain's length and descriptor caps, and its segments (one
 * per region it spans).  0, WALK_NOSPACE or a VU_ERR_*. */
static inline int walk_buffer(struct walk *w, const struct vu_mem *mem,
                              uint64_t addr, uint32_t len, int write)
{
    if (++w->total > VU_MAX_CHAIN_DESCS)
        return VU_ERR_CHAIN_DESCS;
    if (write) {
        w->seen_write = 1;
        w->in_len += len;
    } else {
        if (w->seen_write)
            return VU_ERR_ORDER;
        w->out_len += len;
    }
    if (w->out_len + w->in_len > UINT32_MAX)
        return VU_ERR_CHAIN_LEN;
    if (len) {
        uint64_t gpa = addr, rem = len;
        if (gpa + rem - 1 < gpa)            /* wraps past 2^64 */
            return VU_ERR_DESC_ADDR;
        while (rem) {
            int r = find_region(mem, gpa);
            uint64_t off, piece;
            struct vu_seg *s;
            if (r < 0)
                return VU_ERR_DESC_ADDR;
            off = gpa - mem->regions[r].gpa;
            piece = mem->regions[r].size - off;
            if (piece > rem)
                piece = rem;
            if (w->nsegs >= w->seg_room)
                return WALK_NOSPACE;
            s = &w->segs[w->nsegs++];
            s->offset = off;
            s->len = (uint32_t)piece;
            s->region = (uint16_t)r;
            s->flags = write ? VU_SEG_WRITE : 0;
            w->nread += !write;
            gpa += piece;
            rem -= piece;
        }
    }
    return 0;
}

static inline void walk_finish(const struct walk *w, uint16_t head, struct vu_chain *out)
{
    out->head = head;
    out->ndescs = (uint16_t)w->total;
    out->nsegs = w->nsegs;
    out->nread = w->nread;
    out->out_len = (uint32_t)w->out_len;
    out->in_len = (uint32_t)w->in_len;
}

/* What a pop does with the chain it just walked (w: walk's result): 0
 * take it (its bytes counted), 1 stop before it (not consumed: segment
 * space or byte budget, vring.h), or the VU_ERR_* that breaks the ring. */
static inline int chain_verdict(int w, uint32_t taken, const struct vu_chain *c,
                                uint64_t *bytes, uint64_t max_bytes)
{
    if (w == WALK_NOSPACE)
        return taken ? 1 : VU_ERR_CHAIN_SEGS;
    if (w < 0)
        return w;
    if (max_bytes != UINT64_MAX) {          /* (C data paths keep their own budget) */
        if (taken && *bytes + c->out_len + c->in_len > max_bytes)
            return 1;
        *bytes += (uint64_t)c->out_len + c->in_len;
    }
    return 0;
}

/* Dirty logging of the ring's own writes (vring.h, "Dirty logging"): the
 * bytes [off, off + len) of the used area (split) or device area (packed),
 * at log_guest_addr + off (addresses computed modulo 2^64).  The packed
 * ring's used descriptors: vring_packed.c. */
static inline void dirty_used(const struct vu_vring *vr, uint64_t off, uint64_t len)
{
    if (vr->dirty)
        vu_log_range(vr->dirty, vr->dirty_used + off, len);
}

/* vring_packed.c, called by vring.c's entry points for packed rings. */
int vu_packed_init(struct vu_vring *vr, uint32_t base, uint32_t *ids, uint32_t ids_len);
int vu_packed_pop(struct vu_vring *vr, const struct vu_mem *mem,
                  struct vu_chain *chains, uint32_t max_chains,
                  struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                  uint32_t *n_chains, uint32_t *n_segs);
int vu_packed_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n);
int vu_packed_need_notify(struct vu_vring *vr);
void vu_packed_set_notification(struct vu_vring *vr, int enable);
int vu_packed_avail_pending(struct vu_vring *vr);
int vu_packed_unpop(struct vu_vring *vr, uint32_t n);
void vu_packed_write_event(struct vu_vring *vr);

#endif /* VUSER_VRING_PRIV_H */
