/*
 * vring.c - split virtqueue walker; see vring.h for the contract.
 *
 * The guest is hostile: every ring field is read once (memcpy into a local,
 * then made opaque to the compiler so it cannot re-read guest memory),
 * converted from little-endian and bounds-checked before use.
 */
#define _DEFAULT_SOURCE
#include <endian.h>
#include <stddef.h>
#include <string.h>

#include "vring.h"

#define DESC_SIZE 16u
#define AVAIL_RING 4u                  /* offset of avail->ring[0], used->ring[0] */
#define USED_ELEM_SIZE 8u

/* Pin a value read from guest memory: the compiler may not re-load it. */
#define OPAQUE(v) __asm__ __volatile__("" : "+r"(v))

/* Fences (virtio spec 2.7.13, Linux virtio_ring.h virt_*mb). */
#define FENCE_ACQUIRE() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define FENCE_RELEASE() __atomic_thread_fence(__ATOMIC_RELEASE)
#define FENCE_FULL() __atomic_thread_fence(__ATOMIC_SEQ_CST)

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

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline struct desc ld_desc(const uint8_t *p)
{
    struct desc d;
    uint64_t a;
    uint32_t l;
    uint16_t f, n;

    memcpy(&a, p, 8);
    memcpy(&l, p + 8, 4);
    memcpy(&f, p + 12, 2);
    memcpy(&n, p + 14, 2);
    d.addr = le64toh(a);
    d.len = le32toh(l);
    d.flags = le16toh(f);
    d.next = le16toh(n);
    OPAQUE(d.addr);
    OPAQUE(d.len);
    OPAQUE(d.flags);
    OPAQUE(d.next);
    return d;
}

int vu_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

static inline uint64_t avail_size(uint32_t num) { return 6 + 2 * (uint64_t)num; }
static inline uint64_t used_size(uint32_t num) { return 6 + 8 * (uint64_t)num; }

static int vring_init(struct vu_vring *vr, uint32_t num,
                      uint8_t *desc, uint64_t desc_len,
                      uint8_t *avail, uint64_t avail_len,
                      uint8_t *used, uint64_t used_len,
                      int event_idx, uint16_t last_avail_idx)
{
    if (num == 0 || num > VU_MAX_QUEUE_SIZE || (num & (num - 1)) != 0)
        return VU_ERR_NUM;
    if (!desc || !avail || !used || desc_len < DESC_SIZE * (uint64_t)num ||
        avail_len < avail_size(num) || used_len < used_size(num))
        return VU_ERR_RING_SIZE;
    memset(vr, 0, sizeof *vr);
    vr->desc = desc;
    vr->avail = avail;
    vr->used = used;
    vr->num = num;
    vr->last_avail_idx = last_avail_idx;
    vr->used_idx = ld16(used + 2);
    vr->signalled_used = vr->used_idx;
    vr->event_idx = event_idx ? 1 : 0;
    vr->notification = 1;
    return 0;
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

/* Outcome of walking one chain. */
#define WALK_NOSPACE 1

/*
 * Walk the chain starting at head; append its segments at segs[*ns...].
 * Returns 0 (chain complete), WALK_NOSPACE (segment space ran out; nothing
 * is committed) or a VU_ERR_*.
 */
static int walk_chain(const struct vu_vring *vr, const struct vu_mem *mem, uint16_t head,
                      struct vu_seg *segs, uint32_t seg_room, struct vu_chain *out)
{
    const uint8_t *table = vr->desc;
    uint32_t max = vr->num;
    uint32_t i = head;
    uint32_t visited = 0, total = 0;
    uint32_t nsegs = 0, nread = 0;
    uint64_t out_len = 0, in_len = 0;
    int indirect = 0, seen_write = 0;

    for (;;) {
        struct desc d;

        if (++visited > max)
            return VU_ERR_LOOP;
        d = ld_desc(table + (size_t)i * DESC_SIZE);

        if (d.flags & VU_DESC_F_INDIRECT) {
            int r;
            if (indirect)
                return VU_ERR_INDIRECT_NESTED;
            if (visited > 1)
                return VU_ERR_INDIRECT_POS;
            if (d.flags & VU_DESC_F_NEXT)
                return VU_ERR_INDIRECT_NEXT;
            if (d.len == 0 || d.len % DESC_SIZE != 0 || d.len / DESC_SIZE > VU_MAX_INDIRECT)
                return VU_ERR_INDIRECT_LEN;
            r = find_region(mem, d.addr);
            if (r < 0 || mem->regions[r].size - (d.addr - mem->regions[r].gpa) < d.len)
                return VU_ERR_INDIRECT_ADDR;
            table = mem->regions[r].host + (d.addr - mem->regions[r].gpa);
            max = d.len / DESC_SIZE;
            i = 0;
            visited = 0;
            indirect = 1;
            continue;
        }

        if (++total > VU_MAX_CHAIN_DESCS)
            return VU_ERR_CHAIN_DESCS;
        if (d.flags & VU_DESC_F_WRITE)
            seen_write = 1;
        else if (seen_write)
            return VU_ERR_ORDER;

        if (d.flags & VU_DESC_F_WRITE)
            in_len += d.len;
        else
            out_len += d.len;
        if (out_len + in_len > UINT32_MAX)
            return VU_ERR_CHAIN_LEN;

        if (d.len) {
            uint64_t gpa = d.addr, rem = d.len;
            if (gpa + rem - 1 < gpa)            /* wraps past 2^64 */
                return VU_ERR_DESC_ADDR;
            while (rem) {
                int r = find_region(mem, gpa);
                uint64_t off, piece;
                if (r < 0)
                    return VU_ERR_DESC_ADDR;
                off = gpa - mem->regions[r].gpa;
                piece = mem->regions[r].size - off;
                if (piece > rem)
                    piece = rem;
                if (nsegs >= seg_room)
                    return WALK_NOSPACE;
                segs[nsegs].offset = off;
                segs[nsegs].len = (uint32_t)piece;
                segs[nsegs].region = (uint16_t)r;
                segs[nsegs].flags = (d.flags & VU_DESC_F_WRITE) ? VU_SEG_WRITE : 0;
                nread += !(d.flags & VU_DESC_F_WRITE);
                nsegs++;
                gpa += piece;
                rem -= piece;
            }
        }

        if (!(d.flags & VU_DESC_F_NEXT))
            break;
        if (d.next >= max)
            return VU_ERR_NEXT;
        i = d.next;
    }

    out->head = head;
    out->ndescs = (uint16_t)total;
    out->nsegs = nsegs;
    out->nread = nread;
    out->out_len = (uint32_t)out_len;
    out->in_len = (uint32_t)in_len;
    return 0;
}

static int vring_pop(struct vu_vring *vr, const struct vu_mem *mem,
                     struct vu_chain *chains, uint32_t max_chains,
                     struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                     uint32_t *n_chains, uint32_t *n_segs)
{
    uint32_t nc = 0, ns = 0;
    uint64_t bytes = 0;
    uint16_t avail_idx, start = vr->last_avail_idx;
    uint32_t pending;
    int rc = 0;

    *n_chains = 0;
    *n_segs = 0;
    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (vr->broken)
        return vr->error;

    avail_idx = ld16(vr->avail + 2);
    /* Read ring entries and descriptors only after avail->idx (2.7.13). */
    FENCE_ACQUIRE();
    pending = (uint16_t)(avail_idx - vr->last_avail_idx);
    if (pending > vr->num) {
        rc = VU_ERR_AVAIL_IDX;
        goto broken;
    }

    while (pending > 0 && nc < max_chains) {
        uint32_t slot = vr->last_avail_idx & (vr->num - 1);
        uint16_t head = ld16(vr->avail + AVAIL_RING + 2 * slot);
        int w;

        if (head >= vr->num) {
            rc = VU_ERR_HEAD;
            goto broken;
        }
        w = walk_chain(vr, mem, head, segs + ns, max_segs - ns, &chains[nc]);
        if (w == WALK_NOSPACE) {
            if (nc == 0) {
                rc = VU_ERR_CHAIN_SEGS;
                goto broken;
            }
            break;
        }
        if (w < 0) {
            rc = w;
            goto broken;
        }
        if (max_bytes != UINT64_MAX) {      /* (C data paths keep their own budget) */
            if (nc > 0 && bytes + chains[nc].out_len + chains[nc].in_len > max_bytes)
                break;                      /* over the byte budget: not consumed */
            bytes += (uint64_t)chains[nc].out_len + chains[nc].in_len;
        }
        chains[nc].first_seg = ns;
        ns += chains[nc].nsegs;
        nc++;
        vr->last_avail_idx++;
        pending--;
    }
    goto out;

broken:
    vr->broken = 1;
    vr->error = rc;
out:
    if (vr->last_avail_idx != start && vr->event_idx && vr->notification)
        st16(vr->used + AVAIL_RING + USED_ELEM_SIZE * vr->num, vr->last_avail_idx);
    *n_chains = nc;
    *n_segs = ns;
    return rc;
}

static int vring_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n)
{
    uint16_t old, new_idx;

    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (n > vr->num)
        return VU_ERR_PUSH_COUNT;
    for (uint32_t k = 0; k < n; k++)
        if (elems[k].id >= vr->num)
            return VU_ERR_PUSH_ID;
    if (n == 0)
        return 0;

    old = vr->used_idx;
    for (uint32_t k = 0; k < n; k++) {
        uint8_t *e = vr->used + AVAIL_RING +
                     USED_ELEM_SIZE * ((uint32_t)(uint16_t)(old + k) & (vr->num - 1));
        st32(e, elems[k].id);
        st32(e + 4, elems[k].len);
    }
    new_idx = (uint16_t)(old + n);
    /* The guest must see the elements before the index (2.7.13). */
    FENCE_RELEASE();
    st16(vr->used + 2, new_idx);
    vr->used_idx = new_idx;
    /* signalled_used fell more than 2^15 behind: its comparison with
     * used_event would be meaningless (libvhost-user vu_queue_flush). */
    if ((int16_t)(uint16_t)(new_idx - vr->signalled_used) < (int32_t)(uint16_t)(new_idx - old))
        vr->signalled_used_valid = 0;
    return 0;
}

static int vring_need_notify(struct vu_vring *vr)
{
    uint16_t old, new_idx, used_event;
    int valid;

    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    /* Publish used entries before reading the guest's wishes. */
    FENCE_FULL();
    if (!vr->event_idx)
        return !(ld16(vr->avail) & VU_AVAIL_F_NO_INTERRUPT);
    valid = vr->signalled_used_valid;
    old = vr->signalled_used;
    new_idx = vr->used_idx;
    vr->signalled_used_valid = 1;
    vr->signalled_used = new_idx;
    used_event = ld16(vr->avail + AVAIL_RING + 2 * vr->num);
    return !valid || vu_need_event(used_event, new_idx, old);
}

static void vring_set_notification(struct vu_vring *vr, int enable)
{
    if (vr->num == 0)
        return;
    vr->notification = enable ? 1 : 0;
    if (vr->event_idx) {
        if (enable)
            st16(vr->used + AVAIL_RING + USED_ELEM_SIZE * vr->num, vr->last_avail_idx);
    } else {
        uint16_t flags = ld16(vr->used);
        if (enable)
            flags &= (uint16_t)~VU_USED_F_NO_NOTIFY;
        else
            flags |= VU_USED_F_NO_NOTIFY;
        st16(vr->used, flags);
    }
    /* Expose avail_event / flags before the caller re-reads avail->idx. */
    if (enable)
        FENCE_FULL();
}

static int vring_avail_pending(struct vu_vring *vr)
{
    uint16_t idx;

    if (vr->num == 0 || vr->broken)
        return 0;
    idx = ld16(vr->avail + 2);
    FENCE_ACQUIRE();
    return idx != vr->last_avail_idx;
}

/* ------------------------------------------------------------ guarded entry points
 *
 * A SIGBUS in guest memory (the front-end shrank the file behind a region)
 * lands in the frame of the function that was running: the ring is marked
 * broken with VU_ERR_FAULT and the function returns it (guard.h).
 */

static void faulted(struct vu_vring *vr)
{
    vr->broken = 1;
    vr->error = VU_ERR_FAULT;
}

int vu_vring_init(struct vu_vring *vr, uint32_t num,
                  uint8_t *desc, uint64_t desc_len,
                  uint8_t *avail, uint64_t avail_len,
                  uint8_t *used, uint64_t used_len,
                  int event_idx, uint16_t last_avail_idx)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        vr->num = 0;                        /* unusable until a good init */
        return VU_ERR_FAULT;
    }
    rc = vring_init(vr, num, desc, desc_len, avail, avail_len, used, used_len, event_idx, last_avail_idx);
    VU_GUARD_END(g);
    return rc;
}

int vu_vring_pop(struct vu_vring *vr, const struct vu_mem *mem,
                 struct vu_chain *chains, uint32_t max_chains,
                 struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                 uint32_t *n_chains, uint32_t *n_segs)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        *n_chains = 0;                      /* chains popped before the fault are lost with the ring */
        *n_segs = 0;
        return VU_ERR_FAULT;
    }
    rc = vring_pop(vr, mem, chains, max_chains, segs, max_segs, max_bytes, n_chains, n_segs);
    VU_GUARD_END(g);
    return rc;
}

int vu_vring_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        return VU_ERR_FAULT;
    }
    rc = vring_push(vr, elems, n);
    VU_GUARD_END(g);
    return rc;
}

int vu_vring_need_notify(struct vu_vring *vr)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        return VU_ERR_FAULT;
    }
    rc = vring_need_notify(vr);
    VU_GUARD_END(g);
    return rc;
}

void vu_vring_set_notification(struct vu_vring *vr, int enable)
{
    struct vu_guard_frame g;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        return;
    }
    vring_set_notification(vr, enable);
    VU_GUARD_END(g);
}

int vu_vring_avail_pending(struct vu_vring *vr)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        return 0;
    }
    rc = vring_avail_pending(vr);
    VU_GUARD_END(g);
    return rc;
}
