/*
 * guard.h - guest memory that shrinks under us fails one connection, not
 * the process.
 *
 * A front-end can truncate the file behind a region it gave us (a tmpfs or
 * hugetlbfs file cannot be sealed; memfds are sealed on receipt, see
 * vuser/memory.py).  An access past the new end raises SIGBUS.  Every C
 * function that touches guest memory runs inside a guard frame
 * (sigsetjmp); the SIGBUS handler looks the faulting address up in the
 * table of mapped guest ranges and, if it is one and a frame is active,
 * marks that range faulted and siglongjmps back to the frame, which
 * returns VU_ERR_FAULT.  A fault anywhere else (not guest memory, or no
 * frame active) goes to the handler that was there before, so a real bug
 * still crashes loudly.
 *
 * Ranges carry an owner (one per connection's memory table): after a
 * fault, Python asks which owners faulted and closes those connections.
 *
 * Frames nest: the innermost active frame takes the fault.  The handler
 * is installed with SA_NODEFER because siglongjmp leaves the handler
 * without restoring the signal mask (sigsetjmp(env, 0) does not save it:
 * saving it would cost a system call per frame).
 */
#ifndef VUSER_GUARD_H
#define VUSER_GUARD_H

#include <setjmp.h>
#include <stdint.h>

/* cdef-begin */

#define VU_ERR_FAULT -30            /* guest memory access faulted (SIGBUS): the region shrank */
#define VU_GUARD_MAX 4096           /* guest ranges guarded at once (all connections) */

/* Install the SIGBUS handler (idempotent; reinstalls if someone replaced
 * it).  0 or -errno. */
int vu_guard_install(void);

/* Guard [start, start + len) for `owner` (> 0).  Returns the slot, or -1
 * when the table is full. */
int vu_guard_add(uintptr_t start, uint64_t len, uint32_t owner);

/* Stop guarding a slot (the mapping goes away). */
void vu_guard_remove(int slot);

/* Faults caught so far (all owners). */
uint64_t vu_guard_faults(void);

/* Did any range of `owner` fault?  And forget an owner's faults. */
int vu_guard_owner_faulted(uint32_t owner);

/* memcpy under a guard frame: 0, or VU_ERR_FAULT (nothing more is copied). */
int vu_guard_copy(uint8_t *dst, const uint8_t *src, uint64_t n);

/* cdef-end */

struct vu_guard_frame {
    sigjmp_buf env;
    struct vu_guard_frame *prev;
};

extern struct vu_guard_frame *vu_guard_top;

/* if (VU_GUARD_BEGIN(f)) { VU_GUARD_END(f); ...the fault path... }
 * ...guarded code...  VU_GUARD_END(f); */
#define VU_GUARD_BEGIN(f) ((f).prev = vu_guard_top, vu_guard_top = &(f), sigsetjmp((f).env, 0))
#define VU_GUARD_END(f) (vu_guard_top = (f).prev)

#endif /* VUSER_GUARD_H */
