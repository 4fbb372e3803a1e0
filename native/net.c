/*
 * net.c - virtio-net switch data path; see net.h for the contract.
 *
 * Frame path: tx chain (validated segments) -> scratch bounce buffer ->
 * each destination.  The scratch buffer keeps VU_NET_HDR_MAX bytes in front
 * of the frame so that a destination's virtio-net header (10 or 12 bytes,
 * written per destination from the parsed source header) and the frame
 * form one contiguous source for the copy into receive buffers or the
 * write() to a tap.  Software segments are built the same way in
 * seg_scratch.
 *
 * Receive buffers are popped ahead from the destination ring, up to as
 * many chains as frames are left in the tx batch (rxc_take; one ring at a
 * time, one chain at a time once destinations alternate), used strictly in
 * the order popped, filled at once, and their used elements batched per
 * ring.  Chains popped ahead and not used, and those of a frame that
 * cannot be completed (ring empty half-way through a mergeable frame,
 * chain too small), are given back with vu_vring_unpop (they were the last
 * ones popped and nothing was published for them), as libvhost-user's
 * vu_queue_rewind does; rx_flush (after every tx batch
 * and before every return to Python) gives back the popped-ahead ones.  A frame's used elements
 * are never split over two publications: Linux's receive_mergeable expects
 * all num_buffers of a frame to be there once the first one is.
 */
#define _DEFAULT_SOURCE
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "net.h"

#define ETH_HLEN 14u
#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_VLAN 0x8100
#define IPPROTO_TCP_ 6
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define GSO_MAX_SEGS 2048              /* software segments of one GSO frame */
#define MRG_NUM_BUFFERS_OFF 10u     /* offsetof(virtio_net_hdr_mrg_rxbuf, num_buffers) */
#define RX_BATCH VU_NET_BATCH
/* tx chains per pop: small batches pace the receivers (measured: 32 moves
 * more frames through reflect than 256, with the same sink rate). */
#define TX_BATCH 32u

/* ------------------------------------------------------------ helpers */

/* What a unit of budget buys (net.h): a frame, or sixteen descriptors of
 * a long chain (1024 zero-length ones cost as much as 64 frames), or an
 * eighth of a software segment (cutting one costs about eight frames). */
#define DESCS_PER_UNIT 16u
#define SEGMENT_UNITS 8u

/* Signed: spending past zero is fine (the frame in hand is finished). */
static inline void spend(struct vu_net_switch *sw, int64_t units, uint32_t bytes)
{
    sw->units_left -= units;
    sw->bytes_left -= bytes;
}

static inline int budget_left(const struct vu_net_switch *sw)
{
    return sw->units_left > 0 && sw->bytes_left > 0;
}


static inline uint8_t *seg_host(const struct vu_mem *mem, const struct vu_seg *s)
{
    const struct vu_region *r;

    /* vu_vring_pop checked this against the same table; check again so a
     * stale segment can never reach outside a mapping. */
    if (!mem || s->region >= mem->nregions || s->region >= VU_MAX_REGIONS)
        return NULL;
    r = &mem->regions[s->region];
    if (!r->host || s->offset > r->size || r->size - s->offset < s->len)
        return NULL;
    return r->host + s->offset;
}

/* Copy the first `want` device-readable bytes of a chain to dst. */
static uint32_t gather(const struct vu_mem *mem, const struct vu_seg *segs, uint32_t nsegs,
                       uint8_t *dst, uint32_t want)
{
    uint32_t done = 0;

    for (uint32_t i = 0; i < nsegs && done < want; i++) {
        const uint8_t *src;
        uint32_t n;

        if (segs[i].flags & VU_SEG_WRITE)
            break;                          /* readable segments come first */
        src = seg_host(mem, &segs[i]);
        if (!src)
            break;
        n = segs[i].len < want - done ? segs[i].len : want - done;
        memcpy(dst + done, src, n);
        done += n;
    }
    return done;
}

/*
 * Write n bytes of src into the device-writable segments of a chain.  The
 * bytes are at offset `base` of the frame being delivered (header
 * included); if mark is not NULL, the host and guest-physical addresses
 * where frame bytes MRG_NUM_BUFFERS_OFF and +1 land are stored in mark and
 * mark_gpa (to patch num_buffers once the number of buffers is known; a
 * header may span buffers).  While the memory's dirty log is on, every
 * piece written is marked in it (log.h).
 */
static uint32_t scatter(const struct vu_mem *mem, const struct vu_seg *segs, uint32_t nsegs,
                        const uint8_t *src, uint32_t n, uint32_t base, uint8_t **mark, uint64_t *mark_gpa)
{
    struct vu_log *dirty = mem->dirty;
    uint32_t done = 0;

    for (uint32_t i = 0; i < nsegs && done < n; i++) {
        uint8_t *dst;
        uint32_t k;

        if (!(segs[i].flags & VU_SEG_WRITE))
            continue;
        dst = seg_host(mem, &segs[i]);
        if (!dst)
            break;
        k = segs[i].len < n - done ? segs[i].len : n - done;
        if (mark) {
            for (uint32_t b = 0; b < 2; b++) {
                uint32_t at = MRG_NUM_BUFFERS_OFF + b;
                if (at >= base + done && at < base + done + k) {
                    mark[b] = dst + (at - base - done);
                    mark_gpa[b] = mem->regions[segs[i].region].gpa + segs[i].offset + (at - base - done);
                }
            }
        }
        memcpy(dst, src + done, k);
        if (dirty)
            vu_log_range(dirty, mem->regions[segs[i].region].gpa + segs[i].offset, k);
        done += k;
    }
    return done;
}

/* Start loading (rw = 0: tx frames) or owning (rw = 1: receive buffers)
 * the first two cache lines of a chain's first two segments PREFETCH_AHEAD
 * chains before it is used: the driver on another CPU just wrote (or last
 * touched) those lines, and misses taken one frame at a time do not
 * overlap.  Measured on 64-byte reflect: the tx frame load was half the
 * time; prefetching took 6 to 14 Mpps, and PREFETCHW (not PREFETCHT0) on
 * receive buffers is worth 9 -> 14 of that.  A few chains ahead, not a
 * whole batch: a prefetch waits for a free fill buffer.  Addresses only
 * from validated segments (seg_host); a prefetch never faults. */
#define PREFETCH_AHEAD 8u

/* A prefetch the compiler may not delete (GCC 12 dropped the loops whose
 * only effect was __builtin_prefetch).  0F 0D /1 (PREFETCHW) executes as a
 * NOP on x86-64 CPUs without PRFCHW. */
static inline void prefetch_line(const uint8_t *p, int rw)
{
#if defined(__x86_64__) || defined(__i386__)
    if (rw)
        __asm__ __volatile__("prefetchw %0" : : "m"(*(const volatile uint8_t *)p));
    else
        __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const volatile uint8_t *)p));
#else
    __builtin_prefetch(p, rw);
    __asm__ __volatile__("" : : "r"(p) : "memory");
#endif
}

static void prefetch_chain(const struct vu_mem *mem, const struct vu_chain *c,
                           const struct vu_seg *segs, int rw)
{
    /* a header in a segment of its own is common: look at two */
    uint32_t n = c->nsegs < 2 ? c->nsegs : 2;

    for (uint32_t k = 0; k < n; k++) {
        const struct vu_seg *s = &segs[c->first_seg + k];
        const uint8_t *p = seg_host(mem, s);

        if (!p || !s->len)
            continue;
        prefetch_line(p, rw);
        if (s->len > 64)
            prefetch_line(p + 64, rw);
    }
}

/* Chains [from, to) of a batch of nc. */
static inline void prefetch_chains(const struct vu_mem *mem, const struct vu_chain *chains,
                                   uint32_t from, uint32_t to, uint32_t nc,
                                   const struct vu_seg *segs, int rw)
{
    for (uint32_t i = from; i < to && i < nc; i++)
        prefetch_chain(mem, &chains[i], segs, rw);
}

/* Signal a call eventfd.  The front-end shares its file description and
 * may have cleared O_NONBLOCK: a full counter would then block write(), so
 * POLLOUT is asked first and a full counter is "already signalled".  The
 * residual race (the counter filled between poll and write, on a
 * description made blocking) is vuser/fds.py's. */
static inline void notify(struct vu_vring *vr, int32_t fd, struct vu_net_stats *st)
{
    static const uint64_t one = 1;
    struct pollfd pfd;

    if (fd < 0 || vu_vring_need_notify(vr) <= 0)
        return;
    pfd.fd = fd;
    pfd.events = POLLOUT;
    pfd.revents = 0;
    if (poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLOUT))
        return;
    if (write(fd, &one, sizeof one) == (ssize_t)sizeof one)
        st->notifies++;
}

static inline int ring_usable(const struct vu_vring *vr)
{
    return vr && vr->num != 0;
}

/* Give back the last n chains popped from vr (none was published). */
static inline void rewind_avail(struct vu_vring *vr, uint32_t n)
{
    (void)vu_vring_unpop(vr, n);            /* (cannot fail: they are the last pops, in flight) */
}

/* Give back the receive chains popped ahead and not used (the last ones
 * popped from that ring; nothing was published for them). */
static void rxc_drop(struct vu_net_switch *sw)
{
    if (sw->rxc_vr && sw->rxc_next < sw->rxc_count)
        rewind_avail(sw->rxc_vr, sw->rxc_count - sw->rxc_next);
    sw->rxc_vr = NULL;
    sw->rxc_next = sw->rxc_count = 0;
}

/* The next receive chain of vr, popped ahead in batches of up to the
 * frames left in the current tx batch (one vu_vring_pop per batch instead
 * of per frame; chains are still used strictly in the order popped).  NULL
 * with *rc = 0: the ring is empty; *rc < 0: it is broken. */
static const struct vu_chain *rxc_take(struct vu_net_switch *sw, struct vu_vring *vr,
                                       const struct vu_mem *mem, int *rc)
{
    *rc = 0;
    if (sw->rxc_vr != vr) {
        if (sw->rxc_next < sw->rxc_count)
            sw->rx_single = 1;              /* popped ahead for nothing: stop that */
        rxc_drop(sw);
        sw->rxc_vr = vr;
    }
    if (sw->rxc_next == sw->rxc_count) {
        uint32_t want = sw->rx_single ? 1 : sw->rx_hint, nc = 0, ns = 0;

        if (want < 1)
            want = 1;
        if (want > RX_BATCH)
            want = RX_BATCH;
        *rc = vu_vring_pop(vr, mem, sw->rx_chains, want, sw->rx_segs, VU_NET_SEGS, UINT64_MAX, &nc, &ns);
        sw->rxc_next = 0;
        sw->rxc_count = nc;
        if (nc == 0)
            return NULL;
        if (nc > 1)
            prefetch_chains(mem, sw->rx_chains, 0, PREFETCH_AHEAD, nc, sw->rx_segs, 1);
        *rc = 0;                            /* use the good chains before a fault */
    }
    if (sw->rxc_next + PREFETCH_AHEAD < sw->rxc_count)
        prefetch_chain(mem, &sw->rx_chains[sw->rxc_next + PREFETCH_AHEAD], sw->rx_segs, 1);
    return &sw->rx_chains[sw->rxc_next++];
}

static void rx_publish(struct vu_net_port *p, uint32_t q)
{
    struct vu_vring *vr = p->rx[q];
    uint32_t n = p->rx_pending[q];

    p->rx_pending[q] = 0;
    if (!n || !ring_usable(vr))
        return;
    vu_vring_push(vr, p->rx_used[q], n);
}

/* Publish every pending receive batch and signal where the guest wants it. */
static void rx_flush(struct vu_net_switch *sw)
{
    uint32_t np = sw->nports < VU_NET_MAX_PORTS ? sw->nports : VU_NET_MAX_PORTS;

    rxc_drop(sw);
    sw->rx_single = 0;
    for (uint32_t i = 0; i < np; i++) {
        struct vu_net_port *p = sw->ports[i];
        uint32_t nq;

        if (!p || p->kind != VU_NET_PORT_VHOST)
            continue;
        nq = p->nqp < VU_NET_MAX_QP ? p->nqp : VU_NET_MAX_QP;
        for (uint32_t q = 0; q < nq; q++) {
            if (!p->rx_pending[q])
                continue;
            rx_publish(p, q);
            if (ring_usable(p->rx[q]))
                notify(p->rx[q], p->rx_call[q], &p->stats);
        }
    }
}

/* ------------------------------------------------------------ fdb */

#define FDB_SETS (VU_NET_FDB_SIZE / VU_NET_FDB_WAYS)
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                        \
    do {                                                                \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);       \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                          \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                          \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);       \
    } while (0)

/* SipHash-1-3 of a 6-byte address under the switch's key: the set an
 * address lives in cannot be chosen by a guest that does not know the key. */
static inline uint32_t mac_set(const struct vu_net_switch *sw, const uint8_t *m)
{
    uint64_t v0 = 0x736f6d6570736575ULL ^ sw->fdb_key[0];
    uint64_t v1 = 0x646f72616e646f6dULL ^ sw->fdb_key[1];
    uint64_t v2 = 0x6c7967656e657261ULL ^ sw->fdb_key[0];
    uint64_t v3 = 0x7465646279746573ULL ^ sw->fdb_key[1];
    uint64_t b = (uint64_t)6 << 56 | (uint64_t)m[5] << 40 | (uint64_t)m[4] << 32 | (uint64_t)m[3] << 24 |
                 (uint64_t)m[2] << 16 | (uint64_t)m[1] << 8 | m[0];

    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return (uint32_t)((v0 ^ v1 ^ v2 ^ v3) & (FDB_SETS - 1));
}

static struct vu_net_fdb_entry *fdb_find(struct vu_net_switch *sw, const uint8_t *mac)
{
    struct vu_net_fdb_entry *e = &sw->fdb[mac_set(sw, mac) * VU_NET_FDB_WAYS];

    for (uint32_t w = 0; w < VU_NET_FDB_WAYS; w++)
        if (e[w].port && memcmp(e[w].mac, mac, 6) == 0)
            return &e[w];
    return NULL;
}

static inline struct vu_net_port *port_at(const struct vu_net_switch *sw, uint32_t i)
{
    if (i >= sw->nports || i >= VU_NET_MAX_PORTS)
        return NULL;
    return sw->ports[i];
}

static void fdb_count(struct vu_net_switch *sw, uint16_t port1, int delta)
{
    struct vu_net_port *p = port1 ? port_at(sw, port1 - 1u) : NULL;

    if (p)
        p->learned = (uint32_t)((int64_t)p->learned + delta);
}

/* Can frames reach port i now?  A vhost port whose receive rings are all
 * stopped cannot (a migrated guest's old port after GET_VRING_BASE). */
static int port_receiving(const struct vu_net_switch *sw, uint32_t i)
{
    const struct vu_net_port *p = port_at(sw, i);
    uint32_t nq;

    if (!p || p->kind == VU_NET_PORT_NONE || p->faulted)
        return 0;
    if (p->kind != VU_NET_PORT_VHOST)
        return 1;
    nq = p->nqp < VU_NET_MAX_QP ? p->nqp : VU_NET_MAX_QP;
    for (uint32_t q = 0; q < nq; q++)
        if (p->rx[q] && p->rx[q]->num)
            return 1;
    return 0;
}

/* Learn that `mac` is behind `port` (see net.h: hold-down, learn limit). */
static void fdb_learn(struct vu_net_switch *sw, const uint8_t *mac, uint32_t port)
{
    struct vu_net_port *p = sw->ports[port];
    struct vu_net_fdb_entry *e, *set, *victim;

    if (mac[0] & 1)                         /* group addresses are never sources */
        return;
    e = fdb_find(sw, mac);
    if (e && e->port == port + 1) {
        e->seen_ms = sw->now_ms;
        return;
    }
    if (!sw->force_learn) {
        if (e && sw->now_ms - e->seen_ms < sw->hold_down_ms && port_receiving(sw, e->port - 1u)) {
            p->stats.moves_held++;          /* still alive where it is: do not move it */
            return;
        }
        if (p->learn_limit && p->learned >= p->learn_limit) {
            p->stats.learn_refused++;
            return;
        }
    }
    if (!e) {
        /* A free way; else the oldest of this port's own entries (a port
         * flooding new addresses only ever evicts its own); else the
         * oldest. */
        set = &sw->fdb[mac_set(sw, mac) * VU_NET_FDB_WAYS];
        victim = NULL;
        for (uint32_t w = 0; w < VU_NET_FDB_WAYS && !(victim && !victim->port); w++) {
            struct vu_net_fdb_entry *c = &set[w];
            if (!c->port || !victim)
                victim = c;
            else if ((c->port == port + 1) != (victim->port == port + 1))
                victim = c->port == port + 1 ? c : victim;
            else if (c->seen_ms < victim->seen_ms)
                victim = c;
        }
        e = victim;
        memcpy(e->mac, mac, 6);
    }
    fdb_count(sw, e->port, -1);
    e->port = (uint16_t)(port + 1);
    e->seen_ms = sw->now_ms;
    fdb_count(sw, e->port, 1);
    sw->learned++;
}

int vu_net_fdb_lookup(const struct vu_net_switch *sw, const uint8_t *mac)
{
    const struct vu_net_fdb_entry *e = fdb_find((struct vu_net_switch *)sw, mac);

    return e ? e->port - 1 : -1;
}

void vu_net_fdb_flush_port(struct vu_net_switch *sw, uint32_t port)
{
    struct vu_net_port *p = port_at(sw, port);

    for (uint32_t i = 0; i < VU_NET_FDB_SIZE; i++)
        if (sw->fdb[i].port == port + 1)
            sw->fdb[i].port = 0;
    if (p)
        p->learned = 0;
}

/* ------------------------------------------------------------ pcap */

static void pcap_record(struct vu_net_switch *sw, const uint8_t *frame, uint32_t len)
{
    uint32_t incl = len < sw->pcap_snaplen ? len : sw->pcap_snaplen;
    uint32_t rec[4];
    struct timespec ts;

    if (!sw->pcap)
        return;
    if (sw->pcap_len > sw->pcap_cap || sw->pcap_cap - sw->pcap_len < VU_NET_PCAP_REC_HDR + (uint64_t)incl) {
        sw->pcap_dropped++;
        return;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    rec[0] = (uint32_t)ts.tv_sec;
    rec[1] = (uint32_t)(ts.tv_nsec / 1000);
    rec[2] = incl;
    rec[3] = len;
    /* pcap records are in the writer's byte order; the global header's
     * magic tells readers which (Python writes it natively too). */
    memcpy(sw->pcap + sw->pcap_len, rec, sizeof rec);
    memcpy(sw->pcap + sw->pcap_len + sizeof rec, frame, incl);
    sw->pcap_len += sizeof rec + incl;
    sw->pcap_records++;
}

/* ------------------------------------------------------------ headers */

/* struct virtio_net_hdr, parsed (virtio spec 5.1.6). */
struct vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};

static inline uint16_t rd16le(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint16_t rd16be(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16le(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void wr16be(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void wr32be(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void parse_hdr(const uint8_t *p, struct vnet_hdr *h)
{
    h->flags = p[0];
    h->gso_type = p[1];
    h->hdr_len = rd16le(p + 2);
    h->gso_size = rd16le(p + 4);
    h->csum_start = rd16le(p + 6);
    h->csum_offset = rd16le(p + 8);
}

static inline uint32_t gso_need(uint8_t gso_type)
{
    return gso_type == VU_NET_HDR_GSO_TCPV4 ? VU_NET_OFF_TSO4 : VU_NET_OFF_TSO6;
}

/* May port `offloads` send a frame with this header of len bytes? */
static int header_ok(const struct vnet_hdr *h, uint32_t offloads, uint32_t len)
{
    if (h->flags & VU_NET_HDR_F_NEEDS_CSUM) {
        if (!(offloads & VU_NET_OFF_CSUM))
            return 0;
        if ((uint32_t)h->csum_start + h->csum_offset + 2 > len)
            return 0;
    }
    if (h->gso_type == VU_NET_HDR_GSO_NONE)
        return 1;
    if (h->gso_type != VU_NET_HDR_GSO_TCPV4 && h->gso_type != VU_NET_HDR_GSO_TCPV6)
        return 0;                           /* UDP, ECN: never offered */
    return (offloads & gso_need(h->gso_type)) && h->gso_size != 0 &&
           (h->flags & VU_NET_HDR_F_NEEDS_CSUM);
}

/* ------------------------------------------------------------ checksums */

static uint64_t csum_add(uint64_t sum, const uint8_t *p, uint32_t n)
{
    while (n >= 2) {
        sum += rd16be(p);
        p += 2;
        n -= 2;
    }
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* NEEDS_CSUM: the checksum over [csum_start, len) (the field already holds
 * the pseudo-header sum) goes to csum_start + csum_offset (Linux
 * skb_checksum_help, including its 0 -> 0xffff). */
static void csum_complete(uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    uint8_t *field = frame + h->csum_start + h->csum_offset;
    uint16_t c = csum_fold(csum_add(0, frame + h->csum_start, len - h->csum_start));

    wr16be(field, c ? c : 0xffff);
}

/* ------------------------------------------------------------ delivery */

/* Which receive queue of d takes a frame that came from queue pair src_qp:
 * the same pair number modulo d's pairs (keeps each sending queue's frames
 * in order), else the first running one.  -1: none. */
static int pick_rx(const struct vu_net_port *d, uint32_t src_qp)
{
    uint32_t n = d->nqp < VU_NET_MAX_QP ? d->nqp : VU_NET_MAX_QP;

    if (!n)
        return -1;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t q = (src_qp + k) % n;
        if (ring_usable(d->rx[q]))
            return (int)q;
    }
    return -1;
}

/* The header a destination gets: the source's, less what it may not see. */
static void put_hdr(uint8_t *p, const struct vnet_hdr *h, uint32_t rx_offloads)
{
    uint8_t flags = h->flags;

    if (!(rx_offloads & VU_NET_OFF_CSUM))
        flags &= (uint8_t)~VU_NET_HDR_F_DATA_VALID;
    p[0] = flags;
    p[1] = h->gso_type;
    wr16le(p + 2, h->hdr_len);
    wr16le(p + 4, h->gso_size);
    wr16le(p + 6, h->csum_start);
    wr16le(p + 8, h->csum_offset);
}

/* Deliver frame (len bytes, VU_NET_HDR_MAX bytes of headroom before it)
 * into receive buffers of vhost port d. */
static int deliver_vhost(struct vu_net_switch *sw, struct vu_net_port *d, uint32_t src_qp,
                         uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    struct vu_used_elem used[RX_BATCH];
    uint8_t *mark[2] = { NULL, NULL };
    uint64_t mark_gpa[2] = { 0, 0 };
    uint32_t hdr_len = d->hdr_len == 10 ? 10 : VU_NET_HDR_MAX;
    uint8_t *src = frame - hdr_len;
    uint32_t need = hdr_len + len, have = 0, nchains = 0, cap;
    struct vu_vring *vr;
    int q;

    if (d->faulted)
        return VU_NET_DROP_FAULT;
    q = pick_rx(d, src_qp);
    if (q < 0)
        return VU_NET_DROP_NO_BUFFER;
    vr = d->rx[q];
    if (vr->broken)
        return vr->error == VU_ERR_FAULT ? VU_NET_DROP_FAULT : VU_NET_DROP_RING_ERROR;
    /* Frames that find no buffer are dropped, never held, so a kick saying
     * buffers were added is of no use: spare the guest the exits (vhost-net
     * keeps rx notifications off the same way).  A kick re-enables them
     * (vuser.connection), the next frame turns them off again. */
    if (vr->notification)
        vu_vring_set_notification(vr, 0);
    put_hdr(src, h, d->rx_offloads);
    if (hdr_len == VU_NET_HDR_MAX)
        wr16le(src + MRG_NUM_BUFFERS_OFF, 1);   /* patched below */

    while (have < need) {
        const struct vu_chain *c;
        uint32_t took, want;
        int rc;

        if (nchains == RX_BATCH) {
            rxc_drop(sw);
            rewind_avail(vr, nchains);
            return VU_NET_DROP_RX_TOO_SMALL;
        }
        c = rxc_take(sw, vr, d->mem, &rc);
        if (rc < 0)
            return VU_NET_DROP_RING_ERROR;  /* the ring is broken now; Python reports it */
        if (!c) {
            rewind_avail(vr, nchains);
            return VU_NET_DROP_NO_BUFFER;
        }
        if (c->out_len != 0) {
            /* Not a receive buffer.  It stays at the head of the ring and
             * every frame for this queue is dropped (and counted) until
             * the driver resets the device. */
            rxc_drop(sw);
            rewind_avail(vr, nchains + 1);
            return VU_NET_DROP_BAD_RX_BUFFER;
        }
        if (!d->mrg_rxbuf && c->in_len < need) {
            rxc_drop(sw);
            rewind_avail(vr, 1);
            return VU_NET_DROP_RX_TOO_SMALL;
        }
        want = c->in_len < need - have ? c->in_len : need - have;
        took = scatter(d->mem, sw->rx_segs + c->first_seg, c->nsegs,
                       src + have, want, have, hdr_len == VU_NET_HDR_MAX ? mark : NULL, mark_gpa);
        used[nchains].id = c->head;
        used[nchains].len = took;
        nchains++;
        have += took;
        if (took != want || (!took && have < need)) {
            /* Segments that do not fit the memory table (cannot happen
             * for segments just validated), or a chain of zero-length
             * buffers in a mergeable ring: give up on this frame. */
            rxc_drop(sw);
            rewind_avail(vr, nchains);
            return took != want ? VU_NET_DROP_RING_ERROR : VU_NET_DROP_RX_TOO_SMALL;
        }
        if (!d->mrg_rxbuf)
            break;
    }
    if (nchains > 1 && mark[0] && mark[1]) {
        *mark[0] = (uint8_t)(nchains & 0xff);
        *mark[1] = (uint8_t)(nchains >> 8);
        if (d->mem->dirty) {                /* written after scatter marked them: again */
            vu_log_range(d->mem->dirty, mark_gpa[0], 1);
            vu_log_range(d->mem->dirty, mark_gpa[1], 1);
        }
    }

    /* All of a frame's buffers go out in one publication. */
    cap = vr->num < RX_BATCH ? vr->num : RX_BATCH;
    if (d->rx_pending[q] + nchains > cap)
        rx_publish(d, (uint32_t)q);
    /* (not memcpy: a call or rep movs for the usual single element) */
    for (uint32_t k = 0; k < nchains; k++)
        d->rx_used[q][d->rx_pending[q] + k] = used[k];
    d->rx_pending[q] += nchains;
    d->stats.rx_buffers += nchains;
    return -1;
}

static int deliver_fd(struct vu_net_port *d, uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    uint8_t *src = frame - VU_NET_HDR_MAX;
    ssize_t n;

    put_hdr(src, h, d->rx_offloads);
    wr16le(src + MRG_NUM_BUFFERS_OFF, 0);
    do {
        n = write(d->fd, src, VU_NET_HDR_MAX + (size_t)len);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(VU_NET_HDR_MAX + len)) {
        d->fd_errno = n < 0 ? errno : EIO;
        return VU_NET_DROP_FD_ERROR;
    }
    return -1;
}

/* Deliver one frame or segment as it is, now; counts it on d. */
static void deliver_now(struct vu_net_switch *sw, struct vu_net_port *d, uint32_t src_qp,
                        uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    int drop;

    if (d->kind == VU_NET_PORT_VHOST)
        drop = deliver_vhost(sw, d, src_qp, frame, len, h);
    else if (d->kind == VU_NET_PORT_FD)
        drop = deliver_fd(d, frame, len, h);
    else
        drop = VU_NET_DROP_NO_BUFFER;
    if (drop >= 0) {
        d->stats.drops[drop]++;
        return;
    }
    d->stats.rx_packets++;
    d->stats.rx_bytes += len;
}

/* A frame for an impaired port (impair.h): lost, duplicated, corrupted (a
 * copy in impair_scratch, with the header room in front), delivered now
 * or held until due.  While the port corrupts, DATA_VALID is not passed
 * on: the guest checks checksums, so corruption shows as on a wire. */
static void deliver_impaired(struct vu_net_switch *sw, struct vu_net_port *d, uint32_t src_qp,
                             uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    struct vu_net_impair *im = d->impair;
    struct vu_impair_copy copies[2];
    struct vnet_hdr plain = *h;
    uint32_t n = vu_impair_decide(im, len, sw->now_us, copies);

    if (im->corrupt.p)
        plain.flags &= (uint8_t)~VU_NET_HDR_F_DATA_VALID;
    for (uint32_t k = 0; k < n; k++) {
        uint8_t *f = frame;

        if (copies[k].flip_bit >= 0) {
            f = sw->impair_scratch + VU_NET_HDR_MAX;
            memcpy(f, frame, len);
            f[ETH_HLEN + (uint32_t)copies[k].flip_bit / 8u] ^= (uint8_t)(1u << (copies[k].flip_bit % 8));
        }
        if (copies[k].due_us > sw->now_us) {
            struct vu_impair_held meta = {
                .src_qp = src_qp, .hdr_flags = plain.flags, .gso_type = plain.gso_type,
                .hdr_len = plain.hdr_len, .gso_size = plain.gso_size,
                .csum_start = plain.csum_start, .csum_offset = plain.csum_offset,
            };
            if (vu_impair_hold(im, copies[k].due_us, f, len, &meta) == 0) {
                if (!sw->impair_next_us || copies[k].due_us < sw->impair_next_us)
                    sw->impair_next_us = copies[k].due_us;
                continue;
            }
            if (len <= VU_IMPAIR_SLOT - VU_NET_HDR_MAX)
                continue;                   /* the held queue is full: dropped (counted) */
        }
        deliver_now(sw, d, src_qp, f, len, &plain);
    }
}

static inline void deliver_one(struct vu_net_switch *sw, struct vu_net_port *d, uint32_t src_qp,
                               uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    if (d->impair)
        deliver_impaired(sw, d, src_qp, frame, len, h);
    else
        deliver_now(sw, d, src_qp, frame, len, h);
}

static void net_fault(struct vu_net_switch *sw);

/* deliver_now in a guard frame: a fault in d's memory loses that frame. */
static void deliver_guarded(struct vu_net_switch *sw, struct vu_net_port *d, uint32_t src_qp,
                            uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    struct vu_guard_frame g;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        net_fault(sw);
        return;
    }
    deliver_now(sw, d, src_qp, frame, len, h);
    VU_GUARD_END(g);
}

/* Deliver the held frames that are due, on every impaired port, within
 * the call's budget; sets impair_next_us to the next one due (0: none). */
static uint32_t release_due(struct vu_net_switch *sw)
{
    uint32_t np = sw->nports < VU_NET_MAX_PORTS ? sw->nports : VU_NET_MAX_PORTS;
    uint32_t total = 0;
    uint64_t next = 0;

    for (uint32_t i = 0; i < np; i++) {
        struct vu_net_port *d = sw->ports[i];
        struct vu_net_impair *im = d ? d->impair : NULL;
        const struct vu_impair_held *e;

        if (!im || !im->nheld)
            continue;
        while (budget_left(sw) && (e = vu_impair_due(im, sw->now_us)) != NULL) {
            struct vnet_hdr h = {
                .flags = e->hdr_flags, .gso_type = e->gso_type, .hdr_len = e->hdr_len,
                .gso_size = e->gso_size, .csum_start = e->csum_start, .csum_offset = e->csum_offset,
            };
            deliver_guarded(sw, d, e->src_qp, vu_impair_bytes(im, e), e->len, &h);
            vu_impair_release(im);
            spend(sw, 1, 0);
            total++;
        }
        if (im->nheld && (!next || im->heap[0].due_us < next))
            next = im->heap[0].due_us;
    }
    sw->impair_next_us = next;
    if (total)
        rx_flush(sw);
    return total;
}

/* ------------------------------------------------------------ segmentation */

/* Where the headers of a TCP GSO frame are. */
struct gso_layout {
    uint32_t l3, l4, hdrs;                  /* IP header, TCP header, payload offsets */
    int ipv4;
};

static int gso_parse(const uint8_t *f, uint32_t len, const struct vnet_hdr *h, struct gso_layout *g)
{
    uint32_t l3 = ETH_HLEN;
    uint16_t type = rd16be(f + 12);

    if (type == ETH_P_VLAN) {
        if (len < ETH_HLEN + 4)
            return -1;
        type = rd16be(f + 16);
        l3 += 4;
    }
    g->l3 = l3;
    if (h->gso_type == VU_NET_HDR_GSO_TCPV4) {
        uint32_t ihl;
        if (type != ETH_P_IPV4 || len < l3 + 20 || (f[l3] >> 4) != 4)
            return -1;
        ihl = (uint32_t)(f[l3] & 0xf) * 4;
        if (ihl < 20 || f[l3 + 9] != IPPROTO_TCP_)
            return -1;
        g->l4 = l3 + ihl;
        g->ipv4 = 1;
    } else {
        /* No extension headers: Linux only offloads plain TCP/IPv6. */
        if (type != ETH_P_IPV6 || len < l3 + 40 || (f[l3] >> 4) != 6 || f[l3 + 6] != IPPROTO_TCP_)
            return -1;
        g->l4 = l3 + 40;
        g->ipv4 = 0;
    }
    if (len < g->l4 + 20)
        return -1;
    g->hdrs = g->l4 + (uint32_t)(f[g->l4 + 12] >> 4) * 4;
    if (g->hdrs < g->l4 + 20 || g->hdrs > len)
        return -1;
    return 0;
}

/* Build segment k (payload [off, off + n)) of the GSO frame f into out
 * (headers, then the payload) with every length, id, sequence number,
 * flag and checksum fixed; returns its length. */
static uint32_t gso_segment(const uint8_t *f, const struct gso_layout *g, uint32_t off, uint32_t n,
                            uint32_t k, int last, uint8_t *out)
{
    uint8_t *ip = out + g->l3, *tcp = out + g->l4;
    uint32_t tcp_len = g->hdrs - g->l4 + n;
    uint64_t sum;

    memcpy(out, f, g->hdrs);
    memcpy(out + g->hdrs, f + g->hdrs + off, n);
    if (g->ipv4) {
        uint32_t ihl = g->l4 - g->l3;
        wr16be(ip + 2, (uint16_t)(ihl + tcp_len));
        wr16be(ip + 4, (uint16_t)(rd16be(f + g->l3 + 4) + k));
        wr16be(ip + 10, 0);
        wr16be(ip + 10, csum_fold(csum_add(0, ip, ihl)));
        sum = csum_add(0, ip + 12, 8);      /* source and destination */
    } else {
        wr16be(ip + 4, (uint16_t)tcp_len);
        sum = csum_add(0, ip + 8, 32);
    }
    sum += IPPROTO_TCP_ + tcp_len;
    wr32be(tcp + 4, rd32be(f + g->l4 + 4) + off);
    if (!last)
        tcp[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
    if (k)
        tcp[13] &= (uint8_t)~TCP_CWR;
    wr16be(tcp + 16, 0);
    wr16be(tcp + 16, csum_fold(csum_add(sum, tcp, tcp_len)));
    return g->hdrs + n;
}

/* Cut the GSO frame into segments for the ports in dsts (which cannot take
 * it whole).  Returns 0, or -1 if the frame cannot be segmented. */
static int deliver_segmented(struct vu_net_switch *sw, struct vu_net_port **dsts, uint32_t ndst,
                             uint32_t src_qp, uint8_t *frame, uint32_t len, const struct vnet_hdr *h)
{
    /* vuser computed every checksum of a segment itself: DATA_VALID */
    static const struct vnet_hdr plain = { .flags = VU_NET_HDR_F_DATA_VALID };
    uint8_t *out = sw->seg_scratch + VU_NET_HDR_MAX;
    struct gso_layout g;
    uint32_t payload, k = 0;

    if (gso_parse(frame, len, h, &g) < 0)
        return -1;
    payload = len - g.hdrs;
    /* A tiny gso_size would turn one frame into tens of thousands. */
    if (payload / h->gso_size > GSO_MAX_SEGS)
        return -1;
    sw->segmented++;
    for (uint32_t off = 0; off < payload || (off == 0 && payload == 0); off += h->gso_size, k++) {
        uint32_t n = payload - off < h->gso_size ? payload - off : h->gso_size;
        uint32_t seg_len = gso_segment(frame, &g, off, n, k, off + n >= payload, out);

        /* Software segments are work: each one, to each port, spends
         * budget (the frame is finished regardless). */
        spend(sw, (int64_t)ndst * SEGMENT_UNITS, 0);
        for (uint32_t i = 0; i < ndst; i++) {
            if (seg_len > dsts[i]->max_frame) {
                dsts[i]->stats.drops[VU_NET_DROP_TOO_BIG]++;
                continue;
            }
            deliver_one(sw, dsts[i], src_qp, out, seg_len, &plain);
            dsts[i]->stats.rx_segments++;
        }
        if (payload == 0)
            break;
    }
    return 0;
}

/* Deliver to every port in dsts: as is where its rx_offloads allow,
 * resolved in software elsewhere. */
static void deliver_all(struct vu_net_switch *sw, struct vu_net_port *src, struct vu_net_port **dsts,
                        uint32_t ndst, uint32_t src_qp, uint8_t *frame, uint32_t len, struct vnet_hdr *h)
{
    struct vu_net_port *seg[VU_NET_MAX_PORTS];
    uint32_t nseg = 0;

    for (uint32_t i = 0; i < ndst; i++) {
        struct vu_net_port *d = dsts[i];
        /* An impaired port takes frames as a wire carries them, segmented
         * (loss, delay and rate act per wire frame), and with full
         * checksums while it corrupts: a flipped bit must fail the guest's
         * check (netem also completes checksums only to corrupt).  Else a
         * partial checksum stays partial: nothing to pay per byte. */
        uint32_t rx_offloads = d->rx_offloads;
        if (d->impair)
            rx_offloads = d->impair->corrupt.p ? 0 : rx_offloads & VU_NET_OFF_CSUM;

        if (h->gso_type != VU_NET_HDR_GSO_NONE) {
            if (!(rx_offloads & gso_need(h->gso_type))) {
                seg[nseg++] = d;
                continue;
            }
            if (len > VU_NET_FRAME_MAX) {
                d->stats.drops[VU_NET_DROP_TOO_BIG]++;
                continue;
            }
        } else {
            if (len > d->max_frame) {
                d->stats.drops[VU_NET_DROP_TOO_BIG]++;
                continue;
            }
            if ((h->flags & VU_NET_HDR_F_NEEDS_CSUM) && !(rx_offloads & VU_NET_OFF_CSUM)) {
                /* Complete it once, in place: ports that took the partial
                 * frame already have their copy, later ones get it whole. */
                csum_complete(frame, len, h);
                h->flags &= (uint8_t)~VU_NET_HDR_F_NEEDS_CSUM;
                h->flags |= VU_NET_HDR_F_DATA_VALID;
                h->csum_start = h->csum_offset = 0;
                d->stats.rx_csum++;
            }
        }
        deliver_one(sw, d, src_qp, frame, len, h);
    }
    if (nseg && deliver_segmented(sw, seg, nseg, src_qp, frame, len, h) < 0)
        src->stats.drops[VU_NET_DROP_BAD_GSO]++;
}

/* ------------------------------------------------------------ switching */

/* Switch the frame at scratch + VU_NET_HDR_MAX (len bytes) that port src
 * sent from queue pair src_qp with header h (checked). */
static void switch_frame(struct vu_net_switch *sw, uint32_t src, uint32_t src_qp, uint32_t len,
                         struct vnet_hdr *h)
{
    struct vu_net_port *s = sw->ports[src];
    struct vu_net_port *dsts[VU_NET_MAX_PORTS];
    uint8_t *frame = sw->scratch + VU_NET_HDR_MAX;
    uint32_t ndst = 0;
    int dst;

    if (len < ETH_HLEN) {
        s->stats.drops[VU_NET_DROP_RUNT]++;
        return;
    }
    if (s->mac_locked && memcmp(frame + 6, s->mac, 6) != 0) {
        s->stats.drops[VU_NET_DROP_SPOOFED]++;
        return;
    }
    /* A GSO frame is as big as the payload the guest handed over (64 KiB
     * at most); its segments must fit the MTU. */
    if (len > VU_NET_FRAME_MAX || (h->gso_type == VU_NET_HDR_GSO_NONE && len > s->max_frame) ||
        (h->gso_type != VU_NET_HDR_GSO_NONE && h->gso_size > s->max_frame)) {
        s->stats.drops[VU_NET_DROP_TOO_BIG]++;
        return;
    }
    if (h->gso_type != VU_NET_HDR_GSO_NONE)
        s->stats.tx_gso++;
    pcap_record(sw, frame, len);

    if (sw->mode == VU_NET_MODE_SINK) {
        s->stats.drops[VU_NET_DROP_SINK]++;
        return;
    }
    if (sw->mode == VU_NET_MODE_REFLECT) {
        uint8_t tmp[6];
        memcpy(tmp, frame, 6);
        memcpy(frame, frame + 6, 6);
        memcpy(frame + 6, tmp, 6);
        dsts[0] = s;
        deliver_all(sw, s, dsts, 1, src_qp, frame, len, h);
        return;
    }

    fdb_learn(sw, frame + 6, src);
    dst = (frame[0] & 1) ? -1 : vu_net_fdb_lookup(sw, frame);
    if (dst >= 0) {
        struct vu_net_port *d = port_at(sw, (uint32_t)dst);
        if ((uint32_t)dst == src || !d) {
            s->stats.drops[VU_NET_DROP_NO_DEST]++;
            return;
        }
        dsts[ndst++] = d;
    } else {
        for (uint32_t i = 0; i < sw->nports && i < VU_NET_MAX_PORTS; i++) {
            struct vu_net_port *d = sw->ports[i];
            if (i != src && d && d->kind != VU_NET_PORT_NONE)
                dsts[ndst++] = d;
        }
        if (!ndst) {
            s->stats.drops[VU_NET_DROP_NO_DEST]++;
            return;
        }
        sw->flooded++;
    }
    deliver_all(sw, s, dsts, ndst, src_qp, frame, len, h);
}

/* ------------------------------------------------------------ entry points */

/* After a SIGBUS in guest memory (guard.h): every port whose memory
 * faulted is marked faulted, its rings broken with VU_ERR_FAULT, its
 * pending receive elements and popped-ahead chains forgotten (they would
 * be written to the memory that is gone); the frame in flight is counted
 * as lost on each.  Other ports are untouched and go on. */
static void net_fault(struct vu_net_switch *sw)
{
    uint32_t np = sw->nports < VU_NET_MAX_PORTS ? sw->nports : VU_NET_MAX_PORTS;

    for (uint32_t i = 0; i < np; i++) {
        struct vu_net_port *p = sw->ports[i];
        uint32_t nq;

        if (!p || p->faulted || p->kind != VU_NET_PORT_VHOST || !vu_guard_owner_faulted(p->guard_owner))
            continue;
        p->faulted = 1;
        p->stats.drops[VU_NET_DROP_FAULT]++;
        nq = p->nqp < VU_NET_MAX_QP ? p->nqp : VU_NET_MAX_QP;
        for (uint32_t q = 0; q < nq; q++) {
            struct vu_vring *rings[2] = { p->rx[q], p->tx[q] };

            for (uint32_t k = 0; k < 2; k++) {
                if (!rings[k])
                    continue;
                if (sw->rxc_vr == rings[k]) {
                    sw->rxc_vr = NULL;
                    sw->rxc_next = sw->rxc_count = 0;
                }
                rings[k]->broken = 1;
                rings[k]->error = VU_ERR_FAULT;
            }
            p->rx_pending[q] = 0;
        }
    }
}

/* Move the frame of tx chain k of the batch (nc chains) of port p. */
static inline __attribute__((always_inline)) void tx_frame(struct vu_net_switch *sw, struct vu_net_port *p, uint32_t port, uint32_t qp,
                     uint8_t *hdr, uint32_t hdr_len, uint32_t k, uint32_t nc)
{
    const struct vu_chain *c = &sw->chains[k];
    struct vnet_hdr h;
    uint32_t flen;

    sw->tx_used[k].id = c->head;
    sw->tx_used[k].len = 0;
    sw->rx_hint = nc - k;
    if (k + PREFETCH_AHEAD < nc)
        prefetch_chain(p->mem, &sw->chains[k + PREFETCH_AHEAD], sw->segs, 0);
    p->stats.tx_packets++;
    spend(sw, 1 + c->ndescs / DESCS_PER_UNIT, c->out_len);
    if (c->out_len < hdr_len) {
        p->stats.drops[VU_NET_DROP_BAD_HEADER]++;
        return;
    }
    flen = c->out_len - hdr_len;
    if (flen > VU_NET_FRAME_MAX) {
        p->stats.drops[VU_NET_DROP_TOO_BIG]++;
        return;
    }
    if (gather(p->mem, sw->segs + c->first_seg, c->nsegs, hdr, c->out_len) != c->out_len) {
        p->stats.drops[VU_NET_DROP_BAD_HEADER]++;
        return;
    }
    p->stats.tx_bytes += flen;
    parse_hdr(hdr, &h);
    /* A driver may only ask for a checksum (NEEDS_CSUM); DATA_VALID and
     * the rest are the device's to set (virtio spec 5.1.6.2.1). */
    h.flags &= VU_NET_HDR_F_NEEDS_CSUM;
    if (!header_ok(&h, p->tx_offloads, flen)) {
        p->stats.drops[VU_NET_DROP_BAD_HEADER]++;
        return;
    }
    switch_frame(sw, port, qp, flen, &h);
}

/* The frames of one popped batch, in a guard frame that resumes with the
 * next frame after a fault in another port's memory.  Returns how many
 * chains were handled (the rest, over the budget, are given back by the
 * caller); stops early when the sender's own memory faulted. */
static uint32_t tx_batch(struct vu_net_switch *sw, struct vu_net_port *p, uint32_t port, uint32_t qp,
                         uint8_t *hdr, uint32_t hdr_len, uint32_t chains)
{
    struct vu_guard_frame g;
    /* volatile: read again after a siglongjmp (gcc's -Wclobbered, which
     * the sanitizer build's register allocation trips over). */
    volatile uint32_t nc = chains;
    uint32_t k;

    sw->tx_next = 0;
    while (sw->tx_next < nc) {
        if (VU_GUARD_BEGIN(g)) {
            /* A fault during frame sw->tx_next (a store the fence below kept
             * in memory, whatever registers siglongjmp restored). */
            VU_GUARD_END(g);
            k = sw->tx_next;
            net_fault(sw);
            if (p->faulted)
                return k;
            sw->tx_used[k].id = sw->chains[k].head;  /* the frame is lost; the chain goes back */
            sw->tx_used[k].len = 0;
            sw->tx_next = k + 1;
            continue;
        }
        for (k = sw->tx_next; k < nc && budget_left(sw); k++) {
            sw->tx_next = k;
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            tx_frame(sw, p, port, qp, hdr, hdr_len, k, nc);
        }
        VU_GUARD_END(g);
        return k;
    }
    return sw->tx_next;
}

static int tx_one_ring(struct vu_net_switch *sw, uint32_t port, uint32_t qp)
{
    struct vu_net_port *p = sw->ports[port];
    struct vu_vring *tx = p->tx[qp];
    uint32_t hdr_len = p->hdr_len == 10 ? 10 : VU_NET_HDR_MAX;
    uint8_t *hdr = sw->scratch + VU_NET_HDR_MAX - hdr_len;
    uint32_t total = 0;
    int err = 0;

    if (!ring_usable(tx) || p->faulted)
        return 0;
    while (budget_left(sw)) {
        uint32_t want = TX_BATCH, nc = 0, ns = 0, done;
        int rc;

        if (sw->units_left < (int64_t)want)
            want = (uint32_t)sw->units_left;
        rc = vu_vring_pop(tx, p->mem, sw->chains, want, sw->segs, VU_NET_SEGS, UINT64_MAX, &nc, &ns);
        prefetch_chains(p->mem, sw->chains, 0, PREFETCH_AHEAD, nc, sw->segs, 0);
        done = tx_batch(sw, p, port, qp, hdr, hdr_len, nc);
        if (p->faulted) {                   /* its own memory is gone: touch nothing of it */
            err = VU_ERR_FAULT;
            break;
        }
        if (done < nc)                      /* over the budget: given back, never published */
            rewind_avail(tx, nc - done);
        if (done)
            vu_vring_push(tx, sw->tx_used, done);
        /* Publish what was received per batch: the receiving side
         * (another CPU) refills its ring while we go on. */
        rx_flush(sw);
        total += done;
        if (rc < 0) {
            err = rc;
            break;
        }
        if (nc == 0 || done < nc)
            break;
    }
    rx_flush(sw);
    if (total && !p->faulted)
        notify(tx, p->tx_call[qp], &p->stats);
    return err ? err : (int)total;
}

static inline uint64_t now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* What every entry point does first: the call's budget and clock, and the
 * held frames that are due (the data path releases them whenever it runs;
 * the switch's timer, vu_net_impair_tick, when nothing else does). */
static void begin_call(struct vu_net_switch *sw, uint64_t units, uint64_t bytes)
{
    sw->units_left = units ? (int64_t)units : INT64_MAX;
    sw->bytes_left = bytes && bytes < INT64_MAX ? (int64_t)bytes : INT64_MAX;
    sw->now_us = now_us();
    sw->now_ms = sw->now_us / 1000u;
    if (sw->impair_next_us && sw->impair_next_us <= sw->now_us)
        release_due(sw);
}

int vu_net_impair_tick(struct vu_net_switch *sw, uint32_t units)
{
    begin_call(sw, units, 0);
    return (int)release_due(sw);
}

int vu_net_tx_burst(struct vu_net_switch *sw, uint32_t port, uint32_t qp, uint32_t units, uint64_t bytes)
{
    struct vu_net_port *p = port_at(sw, port);

    if (!p || p->kind != VU_NET_PORT_VHOST || qp >= p->nqp || qp >= VU_NET_MAX_QP)
        return VU_NET_ERR_PORT;
    begin_call(sw, units, bytes);
    return tx_one_ring(sw, port, qp);
}

/* Frames from fd port p until EAGAIN or the budget, in a guard frame that
 * resumes with the next frame after a fault in a receiver's memory. */
static int fd_rx(struct vu_net_switch *sw, uint32_t port)
{
    struct vu_net_port *p = sw->ports[port];
    struct vu_guard_frame g;
    volatile uint32_t total = 0;
    volatile int err = 0;

    for (;;) {
        if (VU_GUARD_BEGIN(g)) {
            VU_GUARD_END(g);
            net_fault(sw);                  /* the frame is lost; go on with the next */
            continue;
        }
        while (budget_left(sw)) {
            ssize_t n = read(p->fd, sw->scratch, VU_NET_HDR_MAX + VU_NET_FRAME_MAX);
            struct vnet_hdr h;
            uint32_t flen;

            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    p->fd_errno = errno;
                    err = VU_NET_ERR_IO;
                }
                break;
            }
            if (n == 0)
                break;
            total++;
            spend(sw, 1, (uint32_t)n);
            p->stats.tx_packets++;
            if ((size_t)n < VU_NET_HDR_MAX) {
                p->stats.drops[VU_NET_DROP_BAD_HEADER]++;
                continue;
            }
            flen = (uint32_t)n - VU_NET_HDR_MAX;
            p->stats.tx_bytes += flen;
            parse_hdr(sw->scratch, &h);
            if (!header_ok(&h, p->tx_offloads, flen)) {
                p->stats.drops[VU_NET_DROP_BAD_HEADER]++;
                continue;
            }
            sw->rx_hint = 1;
            switch_frame(sw, port, 0, flen, &h);
            /* Publish as we go: a tap can deliver frames for a long time. */
            if ((total & (VU_NET_BATCH - 1)) == 0)
                rx_flush(sw);
        }
        VU_GUARD_END(g);
        break;
    }
    rx_flush(sw);
    return err ? err : (int)total;
}

int vu_net_fd_rx(struct vu_net_switch *sw, uint32_t port, uint32_t units, uint64_t bytes)
{
    struct vu_net_port *p = port_at(sw, port);

    if (!p || p->kind != VU_NET_PORT_FD)
        return VU_NET_ERR_PORT;
    begin_call(sw, units, bytes);
    return fd_rx(sw, port);
}

static uint32_t poll_round(struct vu_net_switch *sw)
{
    uint32_t total = 0;

    for (uint32_t i = 0; i < sw->nports && i < VU_NET_MAX_PORTS; i++) {
        struct vu_net_port *p = sw->ports[i];
        int n;

        if (!p)
            continue;
        if (p->kind == VU_NET_PORT_VHOST) {
            uint32_t nq = p->nqp < VU_NET_MAX_QP ? p->nqp : VU_NET_MAX_QP;
            for (uint32_t q = 0; q < nq; q++) {
                n = tx_one_ring(sw, i, q);
                if (n > 0)
                    total += (uint32_t)n;
            }
        } else if (p->kind == VU_NET_PORT_FD) {
            n = fd_rx(sw, i);
            if (n > 0)
                total += (uint32_t)n;
        }
    }
    return total;
}

int vu_net_poll(struct vu_net_switch *sw, uint32_t units, uint32_t spin_us)
{
    uint64_t total = 0, idle_since;

    begin_call(sw, units, 0);
    idle_since = spin_us ? now_us() : 0;
    for (;;) {
        uint32_t n = poll_round(sw);

        total += n;
        if (!spin_us || sw->units_left <= 0)
            break;
        if (n) {
            idle_since = now_us();
            sw->now_ms = idle_since / 1000u;
        } else if (now_us() - idle_since >= spin_us) {
            break;
        }
    }
    return total > INT32_MAX ? INT32_MAX : (int)total;
}

int vu_net_inject(struct vu_net_switch *sw, uint32_t port, const uint8_t *frame, uint32_t len)
{
    struct vu_net_port *p = port_at(sw, port);
    struct vu_guard_frame g;
    struct vnet_hdr h;

    if (!p || len > VU_NET_FRAME_MAX)
        return VU_NET_ERR_PORT;
    begin_call(sw, 0, 0);
    memset(&h, 0, sizeof h);
    memcpy(sw->scratch + VU_NET_HDR_MAX, frame, len);
    p->stats.tx_packets++;
    p->stats.tx_bytes += len;
    sw->rx_hint = 1;
    /* SEND_RARP: the guest is on this port now (it migrated here), so its
     * address moves at once, whatever the hold-down. */
    sw->force_learn = 1;
    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        net_fault(sw);
    } else {
        switch_frame(sw, port, 0, len, &h);
        VU_GUARD_END(g);
    }
    sw->force_learn = 0;
    rx_flush(sw);
    return 0;
}
