/*
 * log.c - the dirty page log's entry point for Python; see log.h.
 */
#include "guard.h"
#include "log.h"

int vu_log_write(struct vu_log *log, uint64_t gpa, uint64_t len)
{
    struct vu_guard_frame g;

    if (VU_GUARD_BEGIN(g)) {
        VU_GUARD_END(g);
        return VU_ERR_FAULT;
    }
    vu_log_range(log, gpa, len);
    VU_GUARD_END(g);
    return 0;
}
