/*
 * impair.c - netem-style decisions and the held-frame queue of one port;
 * see impair.h for the semantics.
 */
#include <math.h>
#include <string.h>

#include "impair.h"

#define ETH_HLEN 14u
#define HEADROOM 12u                /* VU_NET_HDR_MAX: the header is written in front of the frame */

/* ------------------------------------------------------------ random numbers */

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256** (Blackman and Vigna, public domain algorithm). */
static uint64_t next64(struct vu_net_impair *im)
{
    uint64_t *s = im->rng;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static inline uint32_t next32(struct vu_net_impair *im) { return (uint32_t)(next64(im) >> 32); }

/* A double in (0, 1). */
static inline double unit(struct vu_net_impair *im)
{
    return ((double)(next64(im) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

void vu_impair_seed(struct vu_net_impair *im, uint64_t seed)
{
    for (int i = 0; i < 4; i++) {       /* splitmix64 */
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        im->rng[i] = z ^ (z >> 31);
    }
}

/* A random value correlated with the last one (netem's get_crandom). */
static uint32_t crandom(struct vu_net_impair *im, struct vu_impair_prob *pr)
{
    uint32_t value = next32(im);
    uint64_t rho;

    if (pr->rho == 0)
        return value;
    rho = (uint64_t)pr->rho + 1;
    pr->last = (uint32_t)(((uint64_t)value * ((1ull << 32) - rho) + (uint64_t)pr->last * rho) >> 32);
    return pr->last;
}

static inline int event(struct vu_net_impair *im, struct vu_impair_prob *pr)
{
    return pr->p && crandom(im, pr) <= pr->p;
}

static int lost(struct vu_net_impair *im)
{
    if (im->loss_model == VU_IMPAIR_LOSS_GEMODEL) {
        /* Gilbert-Elliott: move, then lose by the state the frame met. */
        int bad = (int)im->ge_bad;
        if (!bad && next32(im) < im->ge_p)
            im->ge_bad = 1;
        else if (bad && next32(im) < im->ge_r)
            im->ge_bad = 0;
        return next32(im) < (bad ? im->ge_h : im->ge_k);
    }
    return event(im, &im->loss);
}

/* ------------------------------------------------------------ delays */

static double dist(struct vu_net_impair *im)
{
    switch (im->dist) {
    case VU_IMPAIR_DIST_NORMAL:        /* Box-Muller */
        return sqrt(-2.0 * log(unit(im))) * cos(2.0 * M_PI * unit(im));
    case VU_IMPAIR_DIST_PARETO:        /* shape 3, scale 1: mean 1.5, deviation sqrt(3)/2 */
        return (pow(unit(im), -1.0 / 3.0) - 1.5) / 0.8660254037844386;
    default:
        return 2.0 * unit(im) - 1.0;
    }
}

static uint64_t delay_us(struct vu_net_impair *im)
{
    double d = (double)im->delay_us;

    if (im->jitter_us)
        d += (double)im->jitter_us * dist(im);
    return d > 0 ? (uint64_t)d : 0;
}

/* When a copy of len bytes offered at now leaves (reorder, delay, rate). */
static uint64_t due(struct vu_net_impair *im, uint32_t len, uint64_t now)
{
    uint64_t d, at = now;

    if (im->gap && im->counter >= im->gap - 1 && event(im, &im->reorder)) {
        im->counter = 0;
        im->reordered++;
        return now;                 /* ahead of everything delayed */
    }
    im->counter++;
    d = delay_us(im);
    if (im->rate_bps) {
        /* Behind the last frame: what it still waits counts against our delay. */
        if (im->last_due_us > now) {
            uint64_t ahead = im->last_due_us - now;
            d = d > ahead ? d - ahead : 0;
            at = im->last_due_us;
        }
        d += (uint64_t)len * 8u * 1000000u / im->rate_bps;
        im->last_due_us = at + d;
    }
    return at + d;
}

uint32_t vu_impair_decide(struct vu_net_impair *im, uint32_t len, uint64_t now_us,
                          struct vu_impair_copy copies[2])
{
    uint32_t n = 0, want = 1;

    im->offered++;
    if (event(im, &im->duplicate)) {
        want = 2;
        im->duplicated++;
    }
    for (uint32_t k = 0; k < want; k++) {
        if (lost(im)) {
            im->dropped++;
            continue;
        }
        copies[n].flip_bit = -1;
        if (event(im, &im->corrupt) && len > ETH_HLEN) {
            copies[n].flip_bit = (int32_t)(next64(im) % ((uint64_t)(len - ETH_HLEN) * 8u));
            im->corrupted++;
        }
        copies[n].due_us = due(im, len, now_us);
        n++;
    }
    return n;
}

/* ------------------------------------------------------------ the held queue */

static inline int earlier(const struct vu_impair_held *a, const struct vu_impair_held *b)
{
    return a->due_us < b->due_us || (a->due_us == b->due_us && a->seq < b->seq);
}

int vu_impair_hold(struct vu_net_impair *im, uint64_t due_us, const uint8_t *frame, uint32_t len,
                   const struct vu_impair_held *meta)
{
    struct vu_impair_held e = *meta;
    uint32_t i;

    if (len > VU_IMPAIR_SLOT - HEADROOM) {
        im->unheld++;
        return -1;
    }
    if (im->nheld >= im->limit || !im->nfree) {
        im->limit_dropped++;
        return -1;
    }
    e.slot = im->free_slots[--im->nfree];
    e.len = len;
    e.due_us = due_us;
    e.seq = im->seq++;
    memcpy(im->arena + (size_t)e.slot * VU_IMPAIR_SLOT + HEADROOM, frame, len);
    /* sift up */
    i = im->nheld++;
    while (i > 0 && earlier(&e, &im->heap[(i - 1) / 2])) {
        im->heap[i] = im->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    im->heap[i] = e;
    im->delayed++;
    return 0;
}

const struct vu_impair_held *vu_impair_due(const struct vu_net_impair *im, uint64_t now_us)
{
    return im->nheld && im->heap[0].due_us <= now_us ? &im->heap[0] : 0;
}

uint8_t *vu_impair_bytes(const struct vu_net_impair *im, const struct vu_impair_held *h)
{
    return im->arena + (size_t)h->slot * VU_IMPAIR_SLOT + HEADROOM;
}

void vu_impair_release(struct vu_net_impair *im)
{
    struct vu_impair_held last;
    uint32_t i = 0, n;

    if (!im->nheld)
        return;
    im->free_slots[im->nfree++] = im->heap[0].slot;
    n = --im->nheld;
    last = im->heap[n];
    /* sift the last entry down from the root */
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && earlier(&im->heap[c + 1], &im->heap[c]))
            c++;
        if (!earlier(&im->heap[c], &last))
            break;
        im->heap[i] = im->heap[c];
        i = c;
    }
    if (n)
        im->heap[i] = last;
}
