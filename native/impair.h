/*
 * impair.h - network impairment on the frames the switch delivers to one
 * port, in the manner of Linux's netem (tc-netem(8)): loss (random with
 * correlation, or the Gilbert-Elliott model), delay with jitter drawn from
 * a distribution, duplication, corruption, reordering, a rate limit, and a
 * bound on the frames held.  net.c asks impair.c for a verdict per frame
 * and keeps the held frames here; nothing per frame runs in Python.
 *
 * Decisions, in netem's order, per frame offered to the port:
 *   1. duplicate (probability, correlation): the frame goes out twice, the
 *      copy taking its own pass through 3-6 (netem re-enqueues the clone
 *      with duplication off);
 *   2. loss: random (probability, correlation) or Gilbert-Elliott (p, r,
 *      1-h, 1-k: good->bad, bad->good, loss in bad, loss in good);
 *   3. corrupt (probability, correlation): one random bit of the frame
 *      after its Ethernet header is flipped; nothing is fixed (checksums
 *      stay wrong, as on a wire: net.c completes partial checksums for a
 *      port that corrupts, and passes no DATA_VALID to it);
 *   4. reorder (probability, correlation, gap): with a gap set, every
 *      gap-th frame (or, past the gap, with the probability) goes out at
 *      once, ahead of frames still delayed; the others are delayed;
 *   5. delay + jitter: delay + jitter * a draw from the distribution
 *      (uniform in [-1, 1], normal, or Pareto normalised to mean 0 and
 *      deviation 1), never negative;
 *   6. rate: a frame leaves when the one before it has left plus its own
 *      serialisation time (len * 8 / rate): frames queue behind each other.
 * A frame due now is delivered at once; a later one is copied into the
 * port's held queue (limit frames; beyond: dropped, counted) and delivered
 * by the data path or the switch's timer when due.
 *
 * Random numbers: xoshiro256** seeded from `seed` (splitmix64), per port;
 * the same seed and the same frames give the same decisions.
 * Correlation as netem: next = ((2^32 - rho) * random + rho * last) / 2^32.
 * Probabilities are fractions of 2^32 (a percentage * 2^32 / 100).
 *
 * Memory: Python allocates the held queue (limit entries, limit slots of
 * VU_IMPAIR_SLOT bytes); C never allocates.  Frames larger than a slot
 * (jumbo frames over 9216 bytes) are not delayed (counted as `unheld`).
 */
#ifndef VUSER_IMPAIR_H
#define VUSER_IMPAIR_H

#include <stdint.h>

/* cdef-begin */

#define VU_IMPAIR_SLOT 9232         /* bytes a held frame may take (9216-byte frames and a header) */
#define VU_IMPAIR_MAX_LIMIT 65536   /* frames one port may hold */
#define VU_IMPAIR_DIST_UNIFORM 0
#define VU_IMPAIR_DIST_NORMAL 1
#define VU_IMPAIR_DIST_PARETO 2
#define VU_IMPAIR_LOSS_RANDOM 0
#define VU_IMPAIR_LOSS_GEMODEL 1

/* A correlated random source: probability (fraction of 2^32), correlation
 * (the same), and the last value drawn. */
struct vu_impair_prob {
    uint32_t p;
    uint32_t rho;
    uint32_t last;
    uint32_t reserved;
};

/* A frame held back: when it is due, its order among equal times, where
 * its bytes are, and what the receiving side needs to deliver it. */
struct vu_impair_held {
    uint64_t due_us;
    uint64_t seq;
    uint32_t slot;                  /* index of its bytes in the arena */
    uint32_t len;
    uint32_t src_qp;
    uint8_t hdr_flags;              /* struct vnet_hdr of the frame (no GSO: impaired ports take none) */
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t reserved;
};

struct vu_net_impair {
    /* parameters (set by Python) */
    struct vu_impair_prob loss;
    struct vu_impair_prob duplicate;
    struct vu_impair_prob corrupt;
    struct vu_impair_prob reorder;
    uint32_t loss_model;            /* VU_IMPAIR_LOSS_* */
    uint32_t ge_p, ge_r, ge_h, ge_k;  /* gemodel: good->bad, bad->good, 1-h (loss in bad), 1-k (loss in good) */
    uint32_t gap;                   /* reorder: every gap-th frame may go ahead (0: no reordering) */
    uint64_t delay_us;
    uint64_t jitter_us;
    uint32_t dist;                  /* VU_IMPAIR_DIST_* */
    uint32_t limit;                 /* frames held at most (<= the arrays' size) */
    uint64_t rate_bps;              /* 0: no rate limit */
    /* state */
    uint64_t rng[4];
    uint32_t ge_bad;                /* gemodel: in the bad state */
    uint32_t counter;               /* reorder: frames since the last one sent ahead */
    uint64_t last_due_us;           /* rate: when the last frame leaves */
    uint64_t seq;
    /* the held frames: a min-heap by (due_us, seq) of nheld entries, and
     * the free slots of the arena (VU_IMPAIR_SLOT bytes each) */
    struct vu_impair_held *heap;
    uint32_t *free_slots;
    uint8_t *arena;
    uint32_t nheld;
    uint32_t nfree;
    /* counters */
    uint64_t offered;               /* frames offered to the port */
    uint64_t dropped;               /* lost (loss) */
    uint64_t duplicated;            /* extra copies made */
    uint64_t corrupted;
    uint64_t reordered;             /* sent ahead of delayed frames */
    uint64_t delayed;               /* held for later */
    uint64_t limit_dropped;         /* dropped: the held queue was full */
    uint64_t unheld;                /* too big to hold: delivered without delay */
};

/* Seed the random source (splitmix64 of seed).  Python calls it when the
 * impairment is set. */
void vu_impair_seed(struct vu_net_impair *im, uint64_t seed);

/* cdef-end */

/* What to do with one copy of a frame (impair.c). */
struct vu_impair_copy {
    uint64_t due_us;                /* deliver at (<= now: at once) */
    int32_t flip_bit;               /* bit to flip after the Ethernet header, or -1 */
};

/* Decide the fate of a frame of len bytes offered at now_us: the number of
 * copies to deliver (0: lost; 1 or 2) in copies[0..n).  Counts. */
uint32_t vu_impair_decide(struct vu_net_impair *im, uint32_t len, uint64_t now_us,
                          struct vu_impair_copy copies[2]);

/* Hold a copy of frame[0, len) until due_us (with what its delivery
 * needs).  0, or -1 if the queue is full or the frame too big (counted). */
int vu_impair_hold(struct vu_net_impair *im, uint64_t due_us, const uint8_t *frame, uint32_t len,
                   const struct vu_impair_held *meta);

/* The held frame due first, if due at now_us: its entry (its bytes at
 * vu_impair_bytes); else NULL.  vu_impair_release takes it out. */
const struct vu_impair_held *vu_impair_due(const struct vu_net_impair *im, uint64_t now_us);
uint8_t *vu_impair_bytes(const struct vu_net_impair *im, const struct vu_impair_held *h);
void vu_impair_release(struct vu_net_impair *im);

#endif /* VUSER_IMPAIR_H */
