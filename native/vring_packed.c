/*
 * vring_packed.c - the packed virtqueue (virtio 1.x section 2.8), back-end
 * side; the contract is in vring.h ("The packed ring"), the entry points
 * (guard frames, dispatch) in vring.c.
 *
 * Positions: a slot index in 0..num-1 and a wrap counter, which flips each
 * time the index passes the end (2.8.1).  Counted modulo 2*num, position =
 * slot + (wrap ? 0 : num): the wrap counter starts at 1.
 */
#include "vring_priv.h"

#define PDESC_LEN 8u                   /* offsetof(struct pvirtq_desc, len) */
#define PDESC_ID 12u
#define PDESC_FLAGS 14u
#define EVENT_OFF_WRAP 0u              /* struct pvirtq_event_suppress */
#define EVENT_FLAGS 2u
#define WRAP_BIT 15                    /* off_wrap and the vhost-user base halves */
#define IDX_MASK 0x7fffu
#define MARK 0x80000000u               /* ids[]: a transient mark while a batch is checked */

struct pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

static inline struct pdesc ld_pdesc(const uint8_t *p)
{
    struct pdesc d;

    d.addr = ld64_raw(p);
    d.len = ld32_raw(p + PDESC_LEN);
    d.id = ld16(p + PDESC_ID);
    d.flags = ld16(p + PDESC_FLAGS);
    return d;
}

/* Made available by the driver in the lap whose wrap counter is `wrap`? */
static inline int is_avail(uint16_t flags, unsigned wrap)
{
    return ((flags & VU_DESC_F_AVAIL) != 0) == wrap && ((flags & VU_DESC_F_USED) != 0) != wrap;
}

static inline uint16_t used_flags(unsigned wrap)
{
    return wrap ? (uint16_t)(VU_DESC_F_AVAIL | VU_DESC_F_USED) : 0;
}

/* Advance (slot, wrap) by n slots, n <= num. */
static inline void advance(uint32_t num, uint16_t *slot, uint8_t *wrap, uint32_t n)
{
    uint32_t s = *slot + n;

    if (s >= num) {
        s -= num;
        *wrap ^= 1;
    }
    *slot = (uint16_t)s;
}

static inline uint32_t *slots_of(struct vu_vring *vr, uint32_t id) { return &vr->ids[id]; }
/* Log position k (any k < 2 num) as an index in 0..num-1: no division on
 * the data path (a divide costs tens of cycles, per chain). */
static inline uint32_t wrap_index(const struct vu_vring *vr, uint32_t k) { return k >= vr->num ? k - vr->num : k; }
static inline uint32_t *log_at(struct vu_vring *vr, uint32_t k) { return &vr->ids[vr->num + wrap_index(vr, k)]; }

int vu_packed_init(struct vu_vring *vr, uint32_t base, uint32_t *ids, uint32_t ids_len)
{
    uint32_t avail = base & 0xffffu, used = base >> 16;

    (void)ids_len;
    if (used == 0)                          /* only the avail half was sent (vring.h) */
        used = avail;
    if ((avail & IDX_MASK) >= vr->num || (used & IDX_MASK) >= vr->num)
        return VU_ERR_BASE;
    vr->last_avail_idx = (uint16_t)(avail & IDX_MASK);
    vr->avail_wrap = (uint8_t)(avail >> WRAP_BIT);
    vr->used_idx = (uint16_t)(used & IDX_MASK);
    vr->used_wrap = (uint8_t)(used >> WRAP_BIT);
    vr->ids = ids;
    memset(ids, 0, 2 * (size_t)vr->num * sizeof *ids);
    return 0;
}

/* Tell the driver where to kick next (EVENT_IDX, 2.8.10): the next slot
 * the device will read. */
void vu_packed_write_event(struct vu_vring *vr)
{
    vr->event_written = (uint16_t)(vr->last_avail_idx | vr->avail_wrap << WRAP_BIT);
    st16(vr->device + EVENT_OFF_WRAP, vr->event_written);
    dirty_used(vr, EVENT_OFF_WRAP, 2);
}

/* The device area's flags (2.8.10), marked dirty. */
static inline void write_event_flags(struct vu_vring *vr, uint16_t flags)
{
    st16(vr->device + EVENT_FLAGS, flags);
    dirty_used(vr, EVENT_FLAGS, 2);
}

/* A push wrote its used descriptors in the `total` slots from `start`
 * (wrapping at most once): mark that span, from the first one's len, as
 * one range or two -- once per push, as the split ring marks its used
 * elements, not an atomic OR per descriptor (a quarter of the packed
 * reflect rate at 64 B went there).  The slots in between hold the same
 * chains' other descriptors, the device's to write as well: marking them
 * only makes the front-end copy those bytes again. */
static inline void dirty_used_span(const struct vu_vring *vr, struct vu_log *dirty, uint32_t start,
                                   uint32_t total)
{
    uint32_t first = vr->num - start < total ? vr->num - start : total;

    vu_log_range(dirty, vr->dirty_desc + (uint64_t)start * DESC_SIZE + PDESC_LEN,
                 (uint64_t)first * DESC_SIZE - PDESC_LEN);
    if (total > first)
        vu_log_range(dirty, vr->dirty_desc, (uint64_t)(total - first) * DESC_SIZE);
}

/* Walk the chain at last_avail_idx (its head known available).  0,
 * WALK_NOSPACE or a VU_ERR_*; *slots: the ring slots it took. */
static int walk_packed(const struct vu_vring *vr, const struct vu_mem *mem,
                       struct vu_seg *segs, uint32_t seg_room, struct vu_chain *out, uint32_t *slots)
{
    uint32_t i = vr->last_avail_idx, n = 0;
    unsigned wrap = vr->avail_wrap;
    struct pdesc d;
    struct walk w;
    int rc;

    walk_start(&w, segs, seg_room);
    for (;;) {
        if (++n > vr->num)
            return VU_ERR_LOOP;
        d = ld_pdesc(vr->desc + (size_t)i * DESC_SIZE);
        if (n > 1 && !is_avail(d.flags, wrap))
            return VU_ERR_WRAP;
        if (d.flags & VU_DESC_F_INDIRECT) {
            const uint8_t *table;
            uint32_t entries;

            if (n > 1)
                return VU_ERR_INDIRECT_POS;
            if (d.flags & VU_DESC_F_NEXT)
                return VU_ERR_INDIRECT_NEXT;
            rc = indirect_table(mem, d.addr, d.len, &table, &entries);
            if (rc)
                return rc;
            for (uint32_t k = 0; k < entries; k++) {
                struct pdesc t = ld_pdesc(table + (size_t)k * DESC_SIZE);
                if (t.flags & VU_DESC_F_INDIRECT)
                    return VU_ERR_INDIRECT_NESTED;
                rc = walk_buffer(&w, mem, t.addr, t.len, t.flags & VU_DESC_F_WRITE);
                if (rc)
                    return rc;
            }
            break;
        }
        rc = walk_buffer(&w, mem, d.addr, d.len, d.flags & VU_DESC_F_WRITE);
        if (rc)
            return rc;
        if (!(d.flags & VU_DESC_F_NEXT))
            break;
        if (++i == vr->num) {
            i = 0;
            wrap ^= 1;
        }
    }
    /* The buffer id is the last descriptor's (2.8.6). */
    if (d.id >= vr->num)
        return VU_ERR_ID;
    if (vr->ids[d.id])
        return VU_ERR_ID_IN_FLIGHT;
    walk_finish(&w, d.id, out);
    *slots = n;
    return 0;
}

int vu_packed_pop(struct vu_vring *vr, const struct vu_mem *mem,
                  struct vu_chain *chains, uint32_t max_chains,
                  struct vu_seg *segs, uint32_t max_segs, uint64_t max_bytes,
                  uint32_t *n_chains, uint32_t *n_segs)
{
    uint32_t nc = 0, ns = 0;
    uint64_t bytes = 0;
    int rc = 0;

    *n_chains = 0;
    *n_segs = 0;
    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (vr->broken)
        return vr->error;

    while (nc < max_chains) {
        uint16_t flags = ld16(vr->desc + (size_t)vr->last_avail_idx * DESC_SIZE + PDESC_FLAGS);
        uint32_t slots = 0;
        int w;

        if (!is_avail(flags, vr->avail_wrap))
            break;
        /* Read the descriptors only after their head's flags (2.8.21). */
        FENCE_ACQUIRE();
        w = walk_packed(vr, mem, segs + ns, max_segs - ns, &chains[nc], &slots);
        w = chain_verdict(w, nc, &chains[nc], &bytes, max_bytes);
        if (w > 0)
            break;
        if (w < 0) {
            rc = w;
            goto broken;
        }
        *slots_of(vr, chains[nc].head) = slots;
        *log_at(vr, vr->log_end) = chains[nc].head;
        vr->log_end = wrap_index(vr, vr->log_end + 1);
        vr->inflight++;
        advance(vr->num, &vr->last_avail_idx, &vr->avail_wrap, slots);
        chains[nc].first_seg = ns;
        ns += chains[nc].nsegs;
        nc++;
    }
    goto out;

broken:
    vr->broken = 1;
    vr->error = rc;
out:
    if (nc && vr->event_idx && vr->notification)
        vu_packed_write_event(vr);
    vr->popped += nc;
    *n_chains = nc;
    *n_segs = ns;
    return rc;
}

/* Store a flags word after a release fence: the driver that sees it sees
 * the id and length written before it (2.8.21).  (A fence and a memcpy,
 * not an atomic store: ring areas need no alignment, vring.h; on x86 the
 * fence costs nothing.) */
static inline void st16_release(uint8_t *p, uint16_t v)
{
    FENCE_RELEASE();
    st16(p, v);
}

/* Every element names an id in flight, none twice (in order: the oldest
 * ones, in pop order, which are distinct by construction)?  0 or the
 * caller error; nothing is changed. */
static int check_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n)
{
    int rc = 0;
    uint32_t k;

    if (vr->in_order) {
        for (k = 0; k < n; k++) {
            uint32_t id = elems[k].id;
            if (id >= vr->num || !vr->ids[id])
                return VU_ERR_PUSH_ID;
            if (k >= vr->inflight || *log_at(vr, vr->log_start + k) != id)   /* (k < inflight <= num) */
                return VU_ERR_PUSH_ORDER;
        }
        return 0;
    }
    for (k = 0; k < n; k++) {
        uint32_t id = elems[k].id;
        if (id >= vr->num || !vr->ids[id] || (vr->ids[id] & MARK)) {
            rc = VU_ERR_PUSH_ID;
            break;
        }
        vr->ids[id] |= MARK;
    }
    while (k--)
        vr->ids[elems[k].id] &= ~MARK;
    return rc;
}

/* In order, a run of zero-length completions is written as one used
 * descriptor with the run's last id (2.8.9): is element k skipped? */
static inline int coalesced(const struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n, uint32_t k)
{
    return vr->in_order && k + 1 < n && elems[k].len == 0 && elems[k + 1].len == 0;
}

int vu_packed_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n)
{
    uint16_t pos, at, first, first_flags = 0;
    uint8_t wrap, at_wrap;
    uint32_t written = 0, total = 0;
    struct vu_log *dirty = vr->dirty;
    int rc;

    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (n > vr->num)
        return VU_ERR_PUSH_COUNT;
    rc = check_push(vr, elems, n);
    if (rc || n == 0)
        return rc;

    /* Each used descriptor sits where its run of buffers starts (the slot
     * the driver reads next, 2.8.9): id and length, then its flags with
     * release semantics -- except the first one's flags, written last
     * after a fence: the driver reads in order and never sees half a
     * batch (2.8.21). */
    pos = at = first = vr->used_idx;
    wrap = at_wrap = vr->used_wrap;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t id = elems[k].id, slots = vr->ids[id];
        uint8_t *d;
        uint16_t flags;

        vr->ids[id] = 0;
        total += slots;
        advance(vr->num, &pos, &wrap, slots);
        if (coalesced(vr, elems, n, k))
            continue;
        d = vr->desc + (size_t)at * DESC_SIZE;
        st32(d + PDESC_LEN, elems[k].len);
        st16(d + PDESC_ID, (uint16_t)id);
        flags = used_flags(at_wrap) | (elems[k].len ? VU_DESC_F_WRITE : 0);
        if (written++ == 0) {
            first = at;
            first_flags = flags;
        } else {
            st16_release(d + PDESC_FLAGS, flags);
        }
        at = pos;
        at_wrap = wrap;
    }
    FENCE_RELEASE();
    st16(vr->desc + (size_t)first * DESC_SIZE + PDESC_FLAGS, first_flags);
    if (dirty)
        dirty_used_span(vr, dirty, vr->used_idx, total);
    vr->used_idx = pos;
    vr->used_wrap = wrap;
    vr->unsignalled = vr->unsignalled + total < vr->num ? vr->unsignalled + total : vr->num;
    vr->inflight -= n;
    if (vr->in_order)
        vr->log_start = wrap_index(vr, vr->log_start + n);
    return 0;
}

int vu_packed_need_notify(struct vu_vring *vr)
{
    uint32_t span, twice, now, event;
    uint16_t flags, off_wrap;
    int valid;

    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    /* Publish used descriptors before reading the guest's wishes. */
    FENCE_FULL();
    span = vr->unsignalled;
    valid = vr->signalled_used_valid;
    vr->unsignalled = 0;
    vr->signalled_used_valid = 1;
    flags = ld16(vr->driver + EVENT_FLAGS);
    if (flags == VU_EVENT_F_DISABLE)
        return 0;
    if (flags != VU_EVENT_F_DESC || !vr->event_idx || !valid)
        return 1;
    if (span == 0)
        return 0;
    if (span >= vr->num)                    /* a whole lap: the event was passed */
        return 1;
    /* Did the used index pass the event position in the last `span` slots? */
    off_wrap = ld16(vr->driver + EVENT_OFF_WRAP);
    twice = 2 * vr->num;
    now = vr->used_idx + (vr->used_wrap ? 0 : vr->num);
    event = ((off_wrap & IDX_MASK) + ((off_wrap >> WRAP_BIT) ? 0 : vr->num)) % twice;
    return (now + twice - event - 1) % twice < span;
}

void vu_packed_set_notification(struct vu_vring *vr, int enable)
{
    if (vr->num == 0)
        return;
    vr->notification = enable ? 1 : 0;
    if (!enable) {
        write_event_flags(vr, VU_EVENT_F_DISABLE);
        return;
    }
    if (vr->event_idx) {
        vu_packed_write_event(vr);
        FENCE_RELEASE();                    /* off_wrap before the flags that make it count */
        write_event_flags(vr, VU_EVENT_F_DESC);
    } else {
        write_event_flags(vr, VU_EVENT_F_ENABLE);
    }
    /* Expose the event before the caller looks at the ring again. */
    FENCE_FULL();
}

int vu_packed_avail_pending(struct vu_vring *vr)
{
    uint16_t flags;

    if (vr->num == 0 || vr->broken)
        return 0;
    flags = ld16(vr->desc + (size_t)vr->last_avail_idx * DESC_SIZE + PDESC_FLAGS);
    FENCE_ACQUIRE();
    return is_avail(flags, vr->avail_wrap);
}

/* Give back the last n pops: every one in flight, none twice. */
int vu_packed_unpop(struct vu_vring *vr, uint32_t n)
{
    uint32_t k, rc = 0;

    if (n > vr->inflight)
        return VU_ERR_UNPOP;
    for (k = 0; k < n; k++) {
        uint32_t id = *log_at(vr, vr->log_end + vr->num - 1 - k);
        if (!vr->ids[id] || (vr->ids[id] & MARK)) {
            rc = 1;
            break;
        }
        vr->ids[id] |= MARK;
    }
    while (k--)
        vr->ids[*log_at(vr, vr->log_end + vr->num - 1 - k)] &= ~MARK;
    if (rc)
        return VU_ERR_UNPOP;
    for (k = 0; k < n; k++) {
        uint32_t id, slots;

        vr->log_end = wrap_index(vr, vr->log_end + vr->num - 1);
        id = *log_at(vr, vr->log_end);
        slots = vr->ids[id];
        vr->ids[id] = 0;
        /* Back over `slots` slots: forward by num - slots, one lap less. */
        advance(vr->num, &vr->last_avail_idx, &vr->avail_wrap, vr->num - slots);
        vr->avail_wrap ^= 1;
        vr->inflight--;
    }
    return 0;
}
