/*
 * vring.c - the split virtqueue walker, and the entry points of both
 * layouts (the packed ring is vring_packed.c); see vring.h for the
 * contract, vring_priv.h for the shared helpers.
 */
#include "vring_priv.h"

#define AVAIL_RING 4u                  /* offset of avail->ring[0], used->ring[0] */
#define USED_ELEM_SIZE 8u

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

/* used->avail_event (EVENT_IDX) = where the device reads next; marked dirty. */
static inline void write_avail_event(struct vu_vring *vr)
{
    uint64_t off = AVAIL_RING + USED_ELEM_SIZE * (uint64_t)vr->num;

    st16(vr->device + off, vr->last_avail_idx);
    dirty_used(vr, off, 2);
}
static inline uint64_t used_size(uint32_t num) { return 6 + 8 * (uint64_t)num; }
#define PACKED_EVENT_SIZE 4u               /* struct pvirtq_event_suppress */

static int areas_ok(uint32_t num, int packed, const uint8_t *desc, uint64_t desc_len,
                    const uint8_t *driver, uint64_t driver_len, const uint8_t *device, uint64_t device_len)
{
    if (!desc || !driver || !device || desc_len < DESC_SIZE * (uint64_t)num)
        return 0;
    if (packed)
        return driver_len >= PACKED_EVENT_SIZE && device_len >= PACKED_EVENT_SIZE;
    return driver_len >= avail_size(num) && device_len >= used_size(num);
}

static int vring_init(struct vu_vring *vr, uint32_t num,
                      uint8_t *desc, uint64_t desc_len,
                      uint8_t *driver, uint64_t driver_len,
                      uint8_t *device, uint64_t device_len,
                      uint32_t flags, uint32_t base, uint32_t *ids, uint32_t ids_len)
{
    int packed = (flags & VU_RING_PACKED) != 0;

    /* Split sizes are powers of 2 (2.7); packed ones need not be (2.6). */
    if (num == 0 || num > VU_MAX_QUEUE_SIZE || (!packed && (num & (num - 1)) != 0))
        return VU_ERR_NUM;
    if (!areas_ok(num, packed, desc, desc_len, driver, driver_len, device, device_len) ||
        (packed && (!ids || ids_len < 2 * num)))
        return VU_ERR_RING_SIZE;
    memset(vr, 0, sizeof *vr);
    vr->desc = desc;
    vr->driver = driver;
    vr->device = device;
    vr->num = num;
    vr->event_idx = (flags & VU_RING_EVENT_IDX) ? 1 : 0;
    vr->notification = 1;
    if (packed) {
        int rc;
        vr->packed = 1;
        vr->in_order = (flags & VU_RING_IN_ORDER) ? 1 : 0;
        rc = vu_packed_init(vr, base, ids, ids_len);
        if (rc)
            memset(vr, 0, sizeof *vr);      /* not initialised, as before */
        return rc;
    }
    vr->last_avail_idx = (uint16_t)base;
    vr->used_idx = ld16(device + 2);
    vr->signalled_used = vr->used_idx;
    return 0;
}

/* Walk the split chain starting at head; append its segments at segs.
 * 0 (chain complete), WALK_NOSPACE (nothing is committed) or a VU_ERR_*. */
static int walk_chain(const struct vu_vring *vr, const struct vu_mem *mem, uint16_t head,
                      struct vu_seg *segs, uint32_t seg_room, struct vu_chain *out)
{
    const uint8_t *table = vr->desc;
    uint32_t max = vr->num;
    uint32_t i = head;
    uint32_t visited = 0;
    int indirect = 0;
    struct walk w;

    walk_start(&w, segs, seg_room);
    for (;;) {
        struct desc d;
        int rc;

        if (++visited > max)
            return VU_ERR_LOOP;
        d = ld_desc(table + (size_t)i * DESC_SIZE);

        if (d.flags & VU_DESC_F_INDIRECT) {
            if (indirect)
                return VU_ERR_INDIRECT_NESTED;
            if (visited > 1)
                return VU_ERR_INDIRECT_POS;
            if (d.flags & VU_DESC_F_NEXT)
                return VU_ERR_INDIRECT_NEXT;
            rc = indirect_table(mem, d.addr, d.len, &table, &max);
            if (rc)
                return rc;
            i = 0;
            visited = 0;
            indirect = 1;
            continue;
        }

        rc = walk_buffer(&w, mem, d.addr, d.len, d.flags & VU_DESC_F_WRITE);
        if (rc)
            return rc;
        if (!(d.flags & VU_DESC_F_NEXT))
            break;
        if (d.next >= max)
            return VU_ERR_NEXT;
        i = d.next;
    }
    walk_finish(&w, head, out);
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

    avail_idx = ld16(vr->driver + 2);
    /* Read ring entries and descriptors only after avail->idx (2.7.13). */
    FENCE_ACQUIRE();
    pending = (uint16_t)(avail_idx - vr->last_avail_idx);
    if (pending > vr->num) {
        rc = VU_ERR_AVAIL_IDX;
        goto broken;
    }

    while (pending > 0 && nc < max_chains) {
        uint32_t slot = vr->last_avail_idx & (vr->num - 1);
        uint16_t head = ld16(vr->driver + AVAIL_RING + 2 * slot);
        int w;

        if (head >= vr->num) {
            rc = VU_ERR_HEAD;
            goto broken;
        }
        w = walk_chain(vr, mem, head, segs + ns, max_segs - ns, &chains[nc]);
        w = chain_verdict(w, nc, &chains[nc], &bytes, max_bytes);
        if (w > 0)
            break;
        if (w < 0) {
            rc = w;
            goto broken;
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
        write_avail_event(vr);
    vr->popped += nc;
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
        uint8_t *e = vr->device + AVAIL_RING +
                     USED_ELEM_SIZE * ((uint32_t)(uint16_t)(old + k) & (vr->num - 1));
        st32(e, elems[k].id);
        st32(e + 4, elems[k].len);
    }
    new_idx = (uint16_t)(old + n);
    /* The guest must see the elements before the index (2.7.13). */
    FENCE_RELEASE();
    st16(vr->device + 2, new_idx);
    vr->used_idx = new_idx;
    if (vr->dirty) {                        /* the elements (wrapping at most once), the index */
        uint32_t slot = old & (vr->num - 1), first = n < vr->num - slot ? n : vr->num - slot;
        dirty_used(vr, AVAIL_RING + USED_ELEM_SIZE * (uint64_t)slot, USED_ELEM_SIZE * (uint64_t)first);
        dirty_used(vr, AVAIL_RING, USED_ELEM_SIZE * (uint64_t)(n - first));
        dirty_used(vr, 2, 2);
    }
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
        return !(ld16(vr->driver) & VU_AVAIL_F_NO_INTERRUPT);
    valid = vr->signalled_used_valid;
    old = vr->signalled_used;
    new_idx = vr->used_idx;
    vr->signalled_used_valid = 1;
    vr->signalled_used = new_idx;
    used_event = ld16(vr->driver + AVAIL_RING + 2 * vr->num);
    return !valid || vu_need_event(used_event, new_idx, old);
}

static void vring_set_notification(struct vu_vring *vr, int enable)
{
    if (vr->num == 0)
        return;
    vr->notification = enable ? 1 : 0;
    if (vr->event_idx) {
        if (enable)
            write_avail_event(vr);
    } else {
        uint16_t flags = ld16(vr->device);
        if (enable)
            flags &= (uint16_t)~VU_USED_F_NO_NOTIFY;
        else
            flags |= VU_USED_F_NO_NOTIFY;
        st16(vr->device, flags);
        dirty_used(vr, 0, 2);
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
    idx = ld16(vr->driver + 2);
    FENCE_ACQUIRE();
    return idx != vr->last_avail_idx;
}

static int vring_unpop(struct vu_vring *vr, uint32_t n)
{
    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (!n || vr->broken)                   /* a broken ring is never read again */
        return 0;
    if (vr->packed) {
        int rc = vu_packed_unpop(vr, n);
        if (rc)
            return rc;
        vr->popped -= n;
        /* vu_vring_pop moved the device event past them; put it back. */
        if (vr->event_idx && vr->notification)
            vu_packed_write_event(vr);
        return 0;
    }
    vr->last_avail_idx = (uint16_t)(vr->last_avail_idx - n);
    vr->popped -= n;
    if (vr->event_idx && vr->notification)
        write_avail_event(vr);
    return 0;
}

int vu_vring_rebind(struct vu_vring *vr, uint8_t *desc, uint64_t desc_len,
                    uint8_t *driver, uint64_t driver_len,
                    uint8_t *device, uint64_t device_len)
{
    if (vr->num == 0)
        return VU_ERR_NOT_READY;
    if (!areas_ok(vr->num, vr->packed, desc, desc_len, driver, driver_len, device, device_len))
        return VU_ERR_RING_SIZE;
    vr->desc = desc;
    vr->driver = driver;
    vr->device = device;
    return 0;
}

uint32_t vu_vring_base(const struct vu_vring *vr)
{
    if (!vr->packed)
        return vr->last_avail_idx;
    return ((uint32_t)vr->last_avail_idx | (uint32_t)vr->avail_wrap << 15) |
           ((uint32_t)vr->used_idx | (uint32_t)vr->used_wrap << 15) << 16;
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

/* Return `call` (an int) evaluated in a guard frame: a fault breaks the
 * ring and returns VU_ERR_FAULT. */
#define RETURN_GUARDED(vr, call)                                            \
    do {                                                                    \
        struct vu_guard_frame g_;                                           \
        int rc_;                                                            \
        if (VU_GUARD_BEGIN(g_)) {                                           \
            VU_GUARD_END(g_);                                               \
            faulted(vr);                                                    \
            return VU_ERR_FAULT;                                            \
        }                                                                   \
        rc_ = (call);                                                       \
        VU_GUARD_END(g_);                                                   \
        return rc_;                                                         \
    } while (0)

int vu_vring_init(struct vu_vring *vr, uint32_t num,
                  uint8_t *desc, uint64_t desc_len,
                  uint8_t *driver, uint64_t driver_len,
                  uint8_t *device, uint64_t device_len,
                  uint32_t flags, uint32_t base, uint32_t *ids, uint32_t ids_len)
{
    struct vu_guard_frame g;
    int rc;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        vr->num = 0;                        /* unusable until a good init */
        return VU_ERR_FAULT;
    }
    rc = vring_init(vr, num, desc, desc_len, driver, driver_len, device, device_len, flags, base, ids, ids_len);
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
    rc = vr->packed ? vu_packed_pop(vr, mem, chains, max_chains, segs, max_segs, max_bytes, n_chains, n_segs)
                    : vring_pop(vr, mem, chains, max_chains, segs, max_segs, max_bytes, n_chains, n_segs);
    VU_GUARD_END(g);
    return rc;
}

int vu_vring_push(struct vu_vring *vr, const struct vu_used_elem *elems, uint32_t n)
{
    RETURN_GUARDED(vr, vr->packed ? vu_packed_push(vr, elems, n) : vring_push(vr, elems, n));
}

int vu_vring_need_notify(struct vu_vring *vr)
{
    RETURN_GUARDED(vr, vr->packed ? vu_packed_need_notify(vr) : vring_need_notify(vr));
}

void vu_vring_set_notification(struct vu_vring *vr, int enable)
{
    struct vu_guard_frame g;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        faulted(vr);
        return;
    }
    if (vr->packed)
        vu_packed_set_notification(vr, enable);
    else
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
    rc = vr->packed ? vu_packed_avail_pending(vr) : vring_avail_pending(vr);
    VU_GUARD_END(g);
    return rc;
}

int vu_vring_unpop(struct vu_vring *vr, uint32_t n)
{
    RETURN_GUARDED(vr, vring_unpop(vr, n));
}
