/*
 * guard.c - the SIGBUS guard for guest memory; see guard.h.
 *
 * The handler runs in signal context: it only reads the range table
 * (written by the same thread, never while guest memory is being
 * touched), sets flags and counters, and siglongjmps or hands the signal
 * on.  vuser calls C from one thread (trio), so the frame stack is a plain
 * global: a thread-local would be reached through __tls_get_addr, which
 * may allocate, in a module loaded with dlopen.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>

#include "guard.h"

struct range {
    uintptr_t start;
    uintptr_t len;
    uint32_t owner;                 /* 0: free slot */
    volatile sig_atomic_t faulted;
};

static struct range ranges[VU_GUARD_MAX];
static volatile uint64_t nfaults;
static struct sigaction previous;
static int have_previous;

struct vu_guard_frame *vu_guard_top;

static void hand_on(int sig, siginfo_t *info, void *ctx)
{
    struct sigaction dfl;

    if (have_previous && (previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction) {
        previous.sa_sigaction(sig, info, ctx);
        return;
    }
    if (have_previous && previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: a real fault re-executes and kills the process
     * with the signal, as it would have without us. */
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    if (info->si_code <= 0)         /* sent with kill(): it will not recur */
        raise(sig);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    struct vu_guard_frame *f = vu_guard_top;
    uintptr_t a = (uintptr_t)info->si_addr;

    if (f && info->si_code > 0) {
        for (int i = 0; i < VU_GUARD_MAX; i++) {
            if (ranges[i].owner && a - ranges[i].start < ranges[i].len) {
                ranges[i].faulted = 1;
                nfaults++;
                siglongjmp(f->env, 1);
            }
        }
    }
    hand_on(sig, info, ctx);
}

int vu_guard_install(void)
{
    struct sigaction sa, cur;

    if (sigaction(SIGBUS, NULL, &cur) < 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    /* NODEFER: siglongjmp leaves without restoring the mask (guard.h). */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) < 0)
        return -errno;
    have_previous = 1;
    return 0;
}

int vu_guard_add(uintptr_t start, uint64_t len, uint32_t owner)
{
    if (!owner || !len)
        return -1;
    for (int i = 0; i < VU_GUARD_MAX; i++) {
        if (!ranges[i].owner) {
            ranges[i].start = start;
            ranges[i].len = (uintptr_t)len;
            ranges[i].faulted = 0;
            ranges[i].owner = owner;        /* last: the handler skips free slots */
            return i;
        }
    }
    return -1;
}

void vu_guard_remove(int slot)
{
    if (slot >= 0 && slot < VU_GUARD_MAX)
        ranges[slot].owner = 0;
}

uint64_t vu_guard_faults(void)
{
    return nfaults;
}

int vu_guard_owner_faulted(uint32_t owner)
{
    if (!owner)
        return 0;
    for (int i = 0; i < VU_GUARD_MAX; i++)
        if (ranges[i].owner == owner && ranges[i].faulted)
            return 1;
    return 0;
}

int vu_guard_copy(uint8_t *dst, const uint8_t *src, uint64_t n)
{
    struct vu_guard_frame g;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        return VU_ERR_FAULT;
    }
    memcpy(dst, src, n);
    VU_GUARD_END(g);
    return 0;
}
