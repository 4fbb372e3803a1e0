/*
 * net.h - the virtio-net data path: a learning L2 switch whose ports are
 * vhost-user rings (rx = queue 2k, tx = queue 2k+1 of each port) and host
 * fds (a tap with a 12-byte virtio-net header).
 *
 * One call moves every ready frame: vu_net_tx_burst drains one tx ring,
 * vu_net_fd_rx drains one fd port, vu_net_poll drains everything (the
 * optional busy-poll mode).  Frames go tx chain -> bounce buffer -> each
 * destination (rx chains of another port, one write() to a tap, the
 * sink, or back to the sender in reflect mode); used rings are published
 * once per batch of tx chains (32: small batches let a receiver on another
 * CPU refill while the sender's ring is still being drained) and the call
 * eventfd is written only when vu_vring_need_notify says so.  Every guest buffer is reached through the
 * segments vu_vring_pop validated (region index + offset + length) and
 * re-checked against the port's memory table; no guest address is used.
 *
 * C never allocates, opens, maps or logs.  Python (vuser/netswitch.py)
 * owns every struct here, refreshes the ring pointers of each port before
 * each call (rings come and go with the vhost-user session) and flushes the
 * pcap buffer after it.  Drops are counted by reason, never silent.
 *
 * Counters are per port and from the guest's point of view: tx = frames
 * the port sent into the switch, rx = frames the switch delivered to it.
 * Drops are counted on the port where they happen: header, size and
 * destination problems on the sending port, missing or unusable receive
 * buffers on the receiving port.
 *
 * Offloads: a frame may carry a partial checksum (NEEDS_CSUM) or be a TCP
 * GSO frame (up to 64 KiB, gso_size bytes of payload per segment) if its
 * port may send them (tx_offloads: the HOST_* features it negotiated; a
 * tap may send all, TUNSETOFFLOAD decides what the kernel hands over).  Each destination gets it as is when its
 * rx_offloads allow (GUEST_* features; a tap always), else resolved in
 * software: the checksum completed in place, the GSO frame cut into
 * segments with their IP and TCP headers and checksums fixed.  Anything
 * else in a header (offloads not negotiated, UDP/ECN GSO, checksum
 * offsets outside the frame) is a VU_NET_DROP_BAD_HEADER.  Of the header
 * flags a guest sends only NEEDS_CSUM is kept: a driver must not set
 * DATA_VALID (spec 5.1.6.2.1), and vuser sets it only on frames whose
 * checksum it completed or computed itself.
 *
 * Work per call is bounded (issue 9): a budget of units (a frame taken is
 * one, plus one per 16 descriptors of its chain; a software segment to one
 * port is eight) and of bytes; tx chains popped beyond it are given back.
 *
 * Switch hygiene: the forwarding table is 4-way set-associative under a
 * keyed hash (SipHash-1-3, key from Python), so no frame can aim at a
 * victim's entry; a learned address moves to another port only after it
 * was silent on its port for hold_down_ms, or at once when its port cannot
 * receive (every receive ring stopped: a guest that migrated announces
 * itself from its new port, GUEST_ANNOUNCE, after its old port's rings
 * were stopped) or for SEND_RARP's announcement; a port learns at most
 * learn_limit addresses; a port locked to a MAC drops frames from any
 * other source (VU_NET_DROP_SPOOFED).
 *
 * Guest memory that shrinks under us: the frame loops run in guard frames
 * (guard.h).  A fault in a port's memory marks that port faulted (its
 * rings broken with VU_ERR_FAULT, never touched again, its pending receive
 * elements dropped) and the frame being moved is lost (VU_NET_DROP_FAULT);
 * the call goes on with the next frame unless the sending port itself
 * faulted.  Python closes the faulted port's connection.
 */
#ifndef VUSER_NET_H
#define VUSER_NET_H

#include <stdint.h>

#include "impair.h"
#include "vring.h"

/* cdef-begin */

#define VU_NET_MAX_PORTS 32
#define VU_NET_MAX_QP 16            /* queue pairs per vhost-user port */
#define VU_NET_HDR_MAX 12           /* struct virtio_net_hdr_mrg_rxbuf */
#define VU_NET_FRAME_MAX 65550      /* 64 KiB IP packet + Ethernet + VLAN header */
#define VU_NET_SCRATCH_SIZE 65600   /* >= VU_NET_HDR_MAX + VU_NET_FRAME_MAX */
#define VU_NET_BATCH 256            /* tx chains popped / rx used elements per batch */
#define VU_NET_SEGS 2048
#define VU_NET_FDB_SIZE 4096        /* learned MAC addresses: 1024 sets of 4 */
#define VU_NET_FDB_WAYS 4
#define VU_NET_PCAP_REC_HDR 16

/* struct vu_net_port.kind */
#define VU_NET_PORT_NONE 0          /* slot unused / disconnected: frames to it are dropped */
#define VU_NET_PORT_VHOST 1         /* a vhost-user front-end's rings */
#define VU_NET_PORT_FD 2            /* a tap (IFF_VNET_HDR, 12-byte header), one frame per read/write */

/* struct vu_net_switch.mode */
#define VU_NET_MODE_SWITCH 0        /* learning L2 switch */
#define VU_NET_MODE_REFLECT 1       /* every frame back to its sender, MAC addresses swapped */
#define VU_NET_MODE_SINK 2          /* every frame dropped and counted */

/* virtio_net_hdr.flags / gso_type (virtio spec 5.1.6) */
#define VU_NET_HDR_F_NEEDS_CSUM 1
#define VU_NET_HDR_F_DATA_VALID 2
#define VU_NET_HDR_GSO_NONE 0
#define VU_NET_HDR_GSO_TCPV4 1
#define VU_NET_HDR_GSO_TCPV6 4
#define VU_NET_HDR_GSO_ECN 0x80

/* struct vu_net_port.tx_offloads / rx_offloads */
#define VU_NET_OFF_CSUM 1           /* partial checksums (NEEDS_CSUM) */
#define VU_NET_OFF_TSO4 2           /* TCP segmentation over IPv4 */
#define VU_NET_OFF_TSO6 4           /* TCP segmentation over IPv6 */

/* Drop reasons: index into vu_net_stats.drops. */
#define VU_NET_DROP_BAD_HEADER 0    /* tx chain shorter than the header, or an offload asked for */
#define VU_NET_DROP_RUNT 1          /* frame shorter than an Ethernet header */
#define VU_NET_DROP_TOO_BIG 2       /* frame longer than VU_NET_FRAME_MAX or the port's MTU */
#define VU_NET_DROP_NO_DEST 3       /* nowhere to send it (only port, or destination is the sender) */
#define VU_NET_DROP_NO_BUFFER 4     /* receiving ring not running, disabled or out of buffers */
#define VU_NET_DROP_RX_TOO_SMALL 5  /* receive chain (non-mergeable) too small for the frame */
#define VU_NET_DROP_BAD_RX_BUFFER 6 /* receive chain with device-readable buffers */
#define VU_NET_DROP_RING_ERROR 7    /* receiving ring broken by the guest */
#define VU_NET_DROP_FD_ERROR 8      /* write to the fd port failed (errno in fd_errno) */
#define VU_NET_DROP_SINK 9          /* sink mode */
#define VU_NET_DROP_BAD_GSO 10      /* a GSO frame that cannot be segmented (not TCP, bad headers) */
#define VU_NET_DROP_FAULT 11        /* lost when a port's guest memory faulted (a region shrank) */
#define VU_NET_DROP_SPOOFED 12      /* source MAC is not the MAC the port is locked to */
#define VU_NET_DROP_REASONS 13

#define VU_NET_ERR_PORT -100        /* port index out of range or wrong kind (caller error) */
#define VU_NET_ERR_IO -101          /* read on an fd port failed; errno in fd_errno */

struct vu_net_stats {
    uint64_t tx_packets;            /* frames taken from the port */
    uint64_t tx_bytes;              /* their Ethernet bytes (no virtio-net header) */
    uint64_t rx_packets;            /* frames delivered to the port */
    uint64_t rx_bytes;
    uint64_t rx_buffers;            /* receive chains used (> rx_packets with mergeable buffers) */
    uint64_t notifies;              /* call eventfd writes */
    uint64_t tx_gso;                /* GSO frames taken from the port */
    uint64_t rx_segments;           /* segments made in software for the port (in rx_packets) */
    uint64_t rx_csum;               /* checksums completed in software for the port */
    uint64_t learn_refused;         /* source addresses not learned: the port's learn_limit */
    uint64_t moves_held;            /* source addresses not moved here: hold-down on another port */
    uint64_t drops[13];             /* VU_NET_DROP_* */
};

struct vu_net_port {
    uint32_t kind;                  /* VU_NET_PORT_* */
    uint32_t hdr_len;               /* 10 or 12 (vhost); 12 for fd ports */
    uint32_t mrg_rxbuf;             /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    uint32_t max_frame;             /* largest Ethernet frame accepted/delivered (MTU + 18) */
    int32_t fd;                     /* fd port: the tap, non-blocking */
    int32_t fd_errno;               /* last errno of a failed read/write */
    uint32_t nqp;                   /* entries of rx/tx/rx_call/tx_call in use */
    uint32_t tx_offloads;           /* VU_NET_OFF_*: what the port may send (HOST_* features) */
    uint32_t rx_offloads;           /* VU_NET_OFF_*: what may be delivered as is (GUEST_* features) */
    uint32_t guard_owner;           /* the guard owner of its memory table (guard.h); 0: none */
    uint32_t faulted;               /* its guest memory faulted: the port is never touched again */
    uint32_t learned;               /* forwarding-table entries on this port */
    uint32_t learn_limit;           /* most entries it may have (0: no limit) */
    uint8_t mac[6];                 /* the port's MAC when mac_locked */
    uint8_t mac_locked;             /* drop frames from other source MACs */
    uint8_t reserved;
    const struct vu_mem *mem;       /* the port's memory table (vhost) */
    struct vu_vring *rx[16];        /* NULL: not running or disabled */
    struct vu_vring *tx[16];
    int32_t rx_call[16];            /* -1: no call fd */
    int32_t tx_call[16];
    uint32_t rx_pending[16];        /* used elements waiting in rx_used */
    struct vu_used_elem rx_used[16][256];
    struct vu_net_stats stats;
    struct vu_net_impair *impair;   /* impairment of the frames delivered to it (impair.h); NULL: none */
};

struct vu_net_fdb_entry {
    uint8_t mac[6];
    uint16_t port;                  /* port index + 1; 0 = empty */
    uint64_t seen_ms;               /* last frame from it (now_ms of that call) */
};

struct vu_net_switch {
    uint32_t mode;                  /* VU_NET_MODE_* */
    uint32_t nports;                /* ports[0, nports) may be used */
    struct vu_net_port *ports[32];
    struct vu_net_fdb_entry fdb[4096];
    uint64_t fdb_key[2];            /* SipHash key: Python draws it at random */
    uint64_t now_ms;                /* coarse clock (CLOCK_MONOTONIC), read once per call */
    uint32_t hold_down_ms;          /* see the header comment; 0: addresses move at once */
    uint32_t force_learn;           /* set during vu_net_inject: move at once */
    uint64_t flooded;               /* frames sent to every other port (unknown/multicast destination) */
    uint64_t segmented;             /* GSO frames segmented in software (for at least one port) */
    uint64_t learned;               /* fdb insertions or moves */
    /* pcap: records (16-byte header + frame) appended at pcap[pcap_len];
     * Python writes them out and resets pcap_len.  pcap == NULL: off. */
    uint8_t *pcap;
    uint64_t pcap_cap;
    uint64_t pcap_len;
    uint64_t pcap_records;
    uint64_t pcap_dropped;          /* records that did not fit */
    uint32_t pcap_snaplen;
    uint32_t reserved;
    /* scratch space, owned by Python */
    uint8_t *scratch;               /* VU_NET_SCRATCH_SIZE bytes: header + frame bounce buffer */
    uint8_t *seg_scratch;           /* VU_NET_SCRATCH_SIZE bytes: one software segment */
    struct vu_chain *chains;        /* VU_NET_BATCH */
    struct vu_seg *segs;            /* VU_NET_SEGS */
    struct vu_chain *rx_chains;     /* VU_NET_BATCH */
    struct vu_seg *rx_segs;         /* VU_NET_SEGS */
    struct vu_used_elem *tx_used;   /* VU_NET_BATCH */
    /* receive chains popped ahead from one ring (net.c rxc_*): chains
     * rx_chains[rxc_next, rxc_count) of rxc_vr are popped, unused and the
     * last ones popped from it; given back before anything returns. */
    struct vu_vring *rxc_vr;
    uint32_t rxc_next;
    uint32_t rxc_count;
    uint32_t rx_hint;               /* frames left in the current tx batch */
    uint32_t rx_single;             /* destinations alternate: pop one at a time */
    /* budget of the running call (see the header comment) */
    int64_t units_left;
    int64_t bytes_left;
    uint32_t tx_next;               /* the tx chain of the batch being moved (fault recovery) */
    uint32_t reserved2;
    uint64_t now_us;                /* the clock of the running call (CLOCK_MONOTONIC) */
    uint64_t impair_next_us;        /* when the next held frame is due (0: none held) */
    uint8_t *impair_scratch;        /* VU_NET_SCRATCH_SIZE bytes: a corrupted copy */
};

/* Drain tx ring qp of vhost port `port` within a budget of `units` and
 * `bytes` (0 = no limit; see the header comment).  Returns the number of
 * chains consumed (>= 0) or a VU_ERR_* from the ring after moving the good
 * chains before the fault (the ring is then broken), VU_ERR_FAULT if the
 * port's own memory faulted, or VU_NET_ERR_PORT. */
int vu_net_tx_burst(struct vu_net_switch *sw, uint32_t port, uint32_t qp, uint32_t units, uint64_t bytes);

/* Read and switch frames from fd port `port` until the fd has none
 * (EAGAIN) or the budget is spent.  Returns frames read, or
 * VU_NET_ERR_IO / VU_NET_ERR_PORT. */
int vu_net_fd_rx(struct vu_net_switch *sw, uint32_t port, uint32_t units, uint64_t bytes);

/* Busy-poll: every tx ring of every vhost port and every fd port, in
 * rounds, until a round finds nothing and spin_us microseconds passed
 * since the last frame (spin_us = 0: one round), or `units` (0 = no
 * limit) were spent.  Returns the frames moved (ring errors are left in
 * the rings' state). */
int vu_net_poll(struct vu_net_switch *sw, uint32_t units, uint32_t spin_us);

/* Send `len` bytes (an Ethernet frame) into the switch as if port `port`
 * had sent it (SEND_RARP's announcement).  Returns 0 or VU_NET_ERR_PORT;
 * the counters say what became of the frame. */
int vu_net_inject(struct vu_net_switch *sw, uint32_t port, const uint8_t *frame, uint32_t len);

/* Deliver the held frames of impaired ports that are due (the switch's
 * timer: Python calls it at impair_next_us).  Returns frames delivered. */
int vu_net_impair_tick(struct vu_net_switch *sw, uint32_t units);

/* Forget every MAC address learned on `port` (it went away). */
void vu_net_fdb_flush_port(struct vu_net_switch *sw, uint32_t port);

/* The port an address was learned on, or -1. */
int vu_net_fdb_lookup(const struct vu_net_switch *sw, const uint8_t *mac);

/* cdef-end */

#endif /* VUSER_NET_H */
